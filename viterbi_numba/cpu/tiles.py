"""Register tiles of a step's transition block, for kernels that consume the block as it is made.

A step's block is ``trans[i, j] = E1[src_rows[i]] . E2[dst_rows[j]]`` (K x K, each a D-long dot). The
forward pass, Viterbi and the stochastic sampler never build it whole: they walk it in column strips of
``strip_width`` columns, each strip (K x strip_width, in L1) made by ``strip_dots`` and reduced at once
(column maxima, sums of exps, the sampler's weights), so the block does not travel to L2 and back
(docs/design.md §6, "Transition tiles"). Kernels that keep a whole block (the backward passes) get it
from ``transition_block``, made of the same strips.

``strip_dots`` runs the micro-kernel ``tile_dots``: ``ROWS`` rows times ``strip_width`` columns of
accumulators, each a vector register (two per row), updated with one vector FMA per (row, vector, d).
``strip_dots_max`` also takes the strip's column maxima (of the entries, or of offsets[i] + entry *
scale, as the forward pass needs) from the tile's registers before it is stored, in place of a pass
over the strip.
Numba cannot keep such a tile in registers itself (LLVM vectorises only innermost loops, and an
accumulator array in memory costs a load and a store per FMA), so ``tile_dots`` is an ``@intrinsic``
that writes the loop in LLVM IR. Vectors are as wide as the machine's widest (16 float32 lanes with
AVX-512, 8 with AVX2); every entry is the same chain of FMAs over d in order, so the bits do not
depend on the width, the thread count or a BLAS library.

The stochastic sampler's draw has register tiles of its own, ``running_sums``: for a few chains and one
vector of columns they keep each chain's running sums (and targets and counts) in registers while they
walk the rows of the step's weights: ``column_totals`` and ``crossing_counts`` (docs/design.md §6).

Operands are gathered once per step by ``gather_operands``: ``src_emb`` (K_rows, D) and ``dst_t``
(D, K_cols), with K_rows and K_cols rounded up to whole tiles and strips and the padding zero
(``workspace``); ``prefetch_operands`` asks for the next step's rows while a step computes.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from .intrinsics import prefetch_row


def _vector_bytes() -> int:
    """32 (AVX2) or 64 (AVX-512) bytes: the width of the vector registers of the CPU Numba compiles for
    (the host, or the one ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` names)."""
    if config.CPU_NAME or config.CPU_FEATURES:
        return 64 if "+avx512f" in (config.CPU_FEATURES or "") else 32
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # no feature string on this platform: LLVM splits or merges as needed
        return 32
    return 64 if features.get("avx512f", False) else 32


VECTOR_BYTES = _vector_bytes()
ROWS = 6  # rows of a tile: with two vectors per row, 12 accumulators, which fit AVX2's 16 registers
VECTORS = 2  # vectors of columns in a tile, and in a strip
STRIP_F32 = VECTORS * VECTOR_BYTES // 4
STRIP_F64 = VECTORS * VECTOR_BYTES // 8


def _typed_tile(src_emb, dst_t, row, column, out):
    """The float type of a tile's operands, or None where they are not C-contiguous 2-D arrays of one
    float type and integer indices."""
    arrays = (src_emb, dst_t, out)
    if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
        return None
    dtype = src_emb.dtype
    if dtype not in (types.float32, types.float64) or dst_t.dtype != dtype or out.dtype != dtype:
        return None
    if not (isinstance(row, types.Integer) and isinstance(column, types.Integer)):
        return None
    return dtype


@intrinsic
def tile_dots(typingctx, src_emb, dst_t, row, column, out):
    """out[row + r, c] = sum_d src_emb[row + r, d] * dst_t[d, column + c] for r < ROWS, c < out.shape[1]
    (= strip_width), summed over d in order with fused multiply-adds; every index must be in bounds (the
    caller pads to whole tiles). C-contiguous 2-D arrays of one float type."""
    dtype = _typed_tile(src_emb, dst_t, row, column, out)
    if dtype is None:
        return None
    return types.none(src_emb, dst_t, row, column, out), _tile_codegen(dtype, None)


@intrinsic
def tile_dots_max(typingctx, src_emb, dst_t, row, column, out, rows, offsets, scale, column_max):
    """``tile_dots``, then column_max[c] = max(offsets[i] + out[i, c] * scale, column_max[c]) for the
    tile's rows i = row + r < rows in order of r (a product, then a sum: no FMA), while the tile is in
    registers; offsets None: max(out[i, c], column_max[c]). ``column_max`` (strip_width) of the float
    type, ``offsets`` (>= rows) too."""
    dtype = _typed_tile(src_emb, dst_t, row, column, out)
    if dtype is None or not isinstance(rows, types.Integer) or scale != dtype:
        return None
    if not (isinstance(column_max, types.Array) and column_max.ndim == 1 and column_max.layout == "C"):
        return None
    if column_max.dtype != dtype:
        return None
    with_offsets = not isinstance(offsets, types.NoneType)
    if with_offsets and not (isinstance(offsets, types.Array) and offsets.ndim == 1 and offsets.layout == "C"):
        return None
    if with_offsets and offsets.dtype != dtype:
        return None
    signature = types.none(src_emb, dst_t, row, column, out, rows, offsets, scale, column_max)
    return signature, _tile_codegen(dtype, with_offsets)


def _tile_codegen(dtype, with_offsets):
    """The code of ``tile_dots`` (with_offsets None) or of ``tile_dots_max``."""
    lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
    vectors = VECTORS

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        element = context.get_value_type(dtype)
        vec = ir.VectorType(element, lanes)
        a, b, o = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 1, 4))
        row0 = context.cast(builder, args[2], signature.args[2], types.int64)
        col0 = context.cast(builder, args[3], signature.args[3], types.int64)
        depth = cgutils.unpack_tuple(builder, a.shape, 2)[1]
        b_width = cgutils.unpack_tuple(builder, b.shape, 2)[1]
        o_width = cgutils.unpack_tuple(builder, o.shape, 2)[1]
        suffix = f"v{lanes}f{dtype.bitwidth}"
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.{suffix}"
        )
        a_rows = [
            builder.gep(a.data, [builder.mul(builder.add(row0, ir.Constant(i64, r)), depth)]) for r in range(ROWS)
        ]
        b_start = builder.gep(b.data, [col0])
        zero = ir.Constant(vec, [0.0] * lanes)
        entry = builder.block
        loop = builder.append_basic_block("tile.loop")
        done = builder.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_signed(">", depth, ir.Constant(i64, 0)), loop, done)
        # the loop over d: ROWS x vectors accumulators, carried in phis (registers)
        builder.position_at_end(loop)
        d = builder.phi(i64)
        d.add_incoming(ir.Constant(i64, 0), entry)
        accumulators = [[builder.phi(vec) for _ in range(vectors)] for _ in range(ROWS)]
        for phis in accumulators:
            for phi in phis:
                phi.add_incoming(zero, entry)
        b_row = builder.gep(b_start, [builder.mul(d, b_width)])
        b_vectors = [
            builder.load(builder.bitcast(builder.gep(b_row, [ir.Constant(i64, v * lanes)]), vec.as_pointer()), align=4)
            for v in range(vectors)
        ]
        updated = []
        for r in range(ROWS):
            x = _broadcast(builder, builder.load(builder.gep(a_rows[r], [d])), vec)
            updated.append([builder.call(fma, [x, b_vectors[v], accumulators[r][v]]) for v in range(vectors)])
        d_next = builder.add(d, ir.Constant(i64, 1))
        d.add_incoming(d_next, loop)
        for r in range(ROWS):
            for v in range(vectors):
                accumulators[r][v].add_incoming(updated[r][v], loop)
        builder.cbranch(builder.icmp_signed("<", d_next, depth), loop, done)
        # the tile, stored once
        builder.position_at_end(done)
        results = []
        for r in range(ROWS):
            for v in range(vectors):
                phi = builder.phi(vec)
                phi.add_incoming(zero, entry)
                phi.add_incoming(updated[r][v], loop)
                results.append(phi)
        for r in range(ROWS):
            out_row = builder.gep(o.data, [builder.mul(builder.add(row0, ir.Constant(i64, r)), o_width)])
            for v in range(vectors):
                pointer = builder.bitcast(builder.gep(out_row, [ir.Constant(i64, v * lanes)]), vec.as_pointer())
                builder.store(results[r * vectors + v], pointer, align=4)
        if with_offsets is not None:
            _column_max_epilogue(context, builder, signature, args, results, vec, vectors, with_offsets)
        return context.get_dummy_value()

    return codegen


def _column_max_epilogue(context, builder, signature, args, results, vec, vectors, with_offsets):
    """``tile_dots_max``'s update of column_max from the tile's accumulators ``results`` (ROWS x vectors),
    row by row in order; rows at or beyond ``rows`` (the padding) pass as -inf."""
    i64 = ir.IntType(64)
    lanes = vec.count
    row0 = context.cast(builder, args[2], signature.args[2], types.int64)
    rows = context.cast(builder, args[5], signature.args[5], types.int64)
    scale = _broadcast(builder, args[7], vec)
    maxima = context.make_array(signature.args[8])(context, builder, args[8])
    pointers = [
        builder.bitcast(builder.gep(maxima.data, [ir.Constant(i64, v * lanes)]), vec.as_pointer())
        for v in range(vectors)
    ]
    column_max = [builder.load(pointer, align=4) for pointer in pointers]
    if with_offsets:
        offsets = context.make_array(signature.args[6])(context, builder, args[6])
    suffix = f"v{lanes}{vec.element.intrinsic_name}"
    maxnum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec]), f"llvm.maxnum.{suffix}")
    minus_inf = ir.Constant(vec, [float("-inf")] * lanes)
    last = builder.sub(rows, ir.Constant(i64, 1))
    for r in range(ROWS):
        i = builder.add(row0, ir.Constant(i64, r))
        inside = builder.icmp_signed("<", i, rows)
        if with_offsets:
            # a padding row reads the last offset (in bounds) and is then masked
            offset = builder.load(builder.gep(offsets.data, [builder.select(inside, i, last)]))
            offset = _broadcast(builder, offset, vec)
        for v in range(vectors):
            value = results[r * vectors + v]
            if with_offsets:
                value = builder.fadd(offset, builder.fmul(value, scale))
            value = builder.select(inside, value, minus_inf)
            column_max[v] = builder.call(maxnum, [value, column_max[v]], fastmath=("nnan", "nsz"))
    for v in range(vectors):
        builder.store(column_max[v], pointers[v], align=4)


def _broadcast(builder, scalar, vec):
    """``scalar`` in every lane of a vector of type ``vec``."""
    lanes = vec.count
    x = builder.insert_element(ir.Constant(vec, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        x, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    )


# chains of a running-sums tile, each over a strip's VECTORS vectors of columns: three registers per
# chain and vector (sum, target, count), 24 of AVX-512's 32 or 12 of AVX2's 16
CHAIN_TILES = (4, 2, 1) if VECTOR_BYTES == 64 else (2, 1)


def _running_sums(chains, count):
    @intrinsic
    def running_sums(typingctx, weights, prev_weights, targets, out, chain, column):
        """For n < chains and the VECTORS vectors of columns j = column, column + 1, ...: the running sums
        s_i = sum_{i' <= i} prev_weights[chain + n, i'] * weights[i', j] over the rows i (a product, then a
        sum, in order of i: no FMA), kept in registers. ``count``: out[chain + n, j] = the number of
        rows whose s_i is at most targets[chain + n, j] (out int32); else out[chain + n, j] = the total
        (targets unread). The columns must be in bounds (the caller pads to whole strips). 2-D
        C-contiguous arrays: weights (K, width), prev_weights (N, K), targets and out (N, width)."""
        arrays = (weights, prev_weights, targets, out)
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return None
        dtype = weights.dtype
        if dtype not in (types.float32, types.float64) or out.dtype != (types.int32 if count else dtype):
            return None
        if prev_weights.dtype != dtype or targets.dtype != dtype:
            return None
        if not (isinstance(chain, types.Integer) and isinstance(column, types.Integer)):
            return None
        lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        tile = [(n, v) for n in range(chains) for v in range(VECTORS)]

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            vec = ir.VectorType(context.get_value_type(dtype), lanes)
            ivec = ir.VectorType(ir.IntType(32), lanes)
            w, a, tg, o = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(4))
            chain0 = context.cast(builder, args[4], signature.args[4], types.int64)
            col0 = context.cast(builder, args[5], signature.args[5], types.int64)
            rows = cgutils.unpack_tuple(builder, a.shape, 2)[1]
            w_width = cgutils.unpack_tuple(builder, w.shape, 2)[1]
            t_width = cgutils.unpack_tuple(builder, tg.shape, 2)[1]
            o_width = cgutils.unpack_tuple(builder, o.shape, 2)[1]

            def vector_at(data, row, width, v, vtype):
                offset = builder.add(builder.mul(row, width), builder.add(col0, ir.Constant(i64, v * lanes)))
                return builder.bitcast(builder.gep(data, [offset]), vtype.as_pointer())

            chain_rows = [builder.add(chain0, ir.Constant(i64, n)) for n in range(chains)]
            a_rows = [builder.gep(a.data, [builder.mul(r, rows)]) for r in chain_rows]
            if count:
                targets_of = {
                    (n, v): builder.load(vector_at(tg.data, chain_rows[n], t_width, v, vec), align=4) for n, v in tile
                }
            zero = ir.Constant(vec, [0.0] * lanes)
            izero = ir.Constant(ivec, [0] * lanes)
            entry = builder.block
            loop = builder.append_basic_block("running.loop")
            done = builder.append_basic_block("running.done")
            builder.cbranch(builder.icmp_signed(">", rows, ir.Constant(i64, 0)), loop, done)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            i.add_incoming(ir.Constant(i64, 0), entry)
            sums = {key: builder.phi(vec) for key in tile}
            tallies = {key: builder.phi(ivec) for key in tile} if count else {}
            for key in tile:
                sums[key].add_incoming(zero, entry)
                if count:
                    tallies[key].add_incoming(izero, entry)
            row = [builder.load(vector_at(w.data, i, w_width, v, vec), align=4) for v in range(VECTORS)]
            factors = [_broadcast(builder, builder.load(builder.gep(a_rows[n], [i])), vec) for n in range(chains)]
            new_sums, new_tallies = {}, {}
            for n, v in tile:
                total = builder.fadd(sums[n, v], builder.fmul(factors[n], row[v]))  # no flags: rounded twice
                new_sums[n, v] = total
                if count:
                    reached = builder.fcmp_ordered("<=", total, targets_of[n, v])
                    new_tallies[n, v] = builder.add(tallies[n, v], builder.zext(reached, ivec))
            i_next = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(i_next, loop)
            for key in tile:
                sums[key].add_incoming(new_sums[key], loop)
                if count:
                    tallies[key].add_incoming(new_tallies[key], loop)
            builder.cbranch(builder.icmp_signed("<", i_next, rows), loop, done)
            builder.position_at_end(done)
            kept, first, last = (new_tallies, izero, ivec) if count else (new_sums, zero, vec)
            results = {key: builder.phi(last) for key in tile}
            for key in tile:
                results[key].add_incoming(first, entry)
                results[key].add_incoming(kept[key], loop)
            for n, v in tile:
                builder.store(results[n, v], vector_at(o.data, chain_rows[n], o_width, v, last), align=4)
            return context.get_dummy_value()

        return types.none(weights, prev_weights, targets, out, chain, column), codegen

    return running_sums


_counts = {n: _running_sums(n, True) for n in (4, 2, 1)}
_totals = {n: _running_sums(n, False) for n in (4, 2, 1)}
counts_4, counts_2, counts_1 = (_counts[n] for n in (4, 2, 1))
totals_4, totals_2, totals_1 = (_totals[n] for n in (4, 2, 1))


@njit(cache=True, inline="always")
def _each_chain_tile(tile_4, tile_2, tile_1, weights, prev_weights, targets, out):
    """A ``running_sums`` tile for every chain (rows of prev_weights, in tiles of CHAIN_TILES) and every
    strip of columns of ``weights`` (whose width is whole strips)."""
    chains = prev_weights.shape[0]
    step = VECTORS * VECTOR_BYTES // weights.itemsize
    for column in range(0, weights.shape[1], step):
        chain = 0
        if CHAIN_TILES[0] == 4:
            while chain + 4 <= chains:
                tile_4(weights, prev_weights, targets, out, chain, column)
                chain += 4
        while chain + 2 <= chains:
            tile_2(weights, prev_weights, targets, out, chain, column)
            chain += 2
        if chain < chains:
            tile_1(weights, prev_weights, targets, out, chain, column)


@njit(cache=True, inline="always")
def column_totals(weights, prev_weights, totals):
    """totals[n, j] = sum_i prev_weights[n, i] * weights[i, j], summed in order of i (``running_sums``)."""
    _each_chain_tile(totals_4, totals_2, totals_1, weights, prev_weights, totals, totals)


@njit(cache=True, inline="always")
def crossing_counts(weights, prev_weights, targets, counts):
    """counts[n, j] = the number of rows i whose running sum (as ``column_totals`` sums) is at most
    targets[n, j]."""
    _each_chain_tile(counts_4, counts_2, counts_1, weights, prev_weights, targets, counts)


@njit(cache=True, inline="always")
def padded_rows(K):
    """K rounded up to whole tiles of ROWS."""
    return -(-K // ROWS) * ROWS


@njit(cache=True, inline="always")
def strip_width(values):
    """Columns of a strip for the float type of the array ``values``."""
    return STRIP_F32 if values.itemsize == 4 else STRIP_F64


@njit(cache=True, inline="always")
def gather_operands(src_rows, dst_rows, E1, E2, src_emb, dst_t):
    """src_emb[i] = E1[src_rows[i]] and dst_t[:, j] = E2[dst_rows[j]]; the padding rows and columns
    beyond K stay as the caller made them (zeros).

    The E2 rows are first copied whole into src_emb, then transposed from there (in L1): a transposing
    copy straight from the table measured twice as slow at the write-up's size, its strided stores
    holding back the loads of the next rows, which come from L3 or memory."""
    D = E1.shape[1]
    for j in range(dst_rows.shape[0]):
        dst = E2[dst_rows[j]]
        for d in range(D):
            src_emb[j, d] = dst[d]
    for d in range(D):
        for j in range(dst_rows.shape[0]):
            dst_t[d, j] = src_emb[j, d]
    for i in range(src_rows.shape[0]):
        src = E1[src_rows[i]]
        for d in range(D):
            src_emb[i, d] = src[d]


@njit(cache=True, inline="always")
def prefetch_operands(src_rows, dst_rows, E1, E2):
    """Hints that bring the next step's rows E1[src_rows] and E2[dst_rows] into L2 while this step
    computes, so that its ``gather_operands`` does not wait on memory for each row."""
    for i in range(src_rows.shape[0]):
        prefetch_row(E1, src_rows[i])
    for j in range(dst_rows.shape[0]):
        prefetch_row(E2, dst_rows[j])


@njit(cache=True, inline="always")
def strip_dots(src_emb, dst_t, column, rows, strip):
    """strip[i, c] = src_emb[i] . dst_t[:, column + c] for i < rows (rounded up to whole tiles)."""
    for row in range(0, rows, ROWS):
        tile_dots(src_emb, dst_t, row, column, strip)


@njit(cache=True, inline="always")
def strip_dots_max(src_emb, dst_t, column, rows, strip, offsets, scale, column_max):
    """``strip_dots``, and column_max[c] = max_{i < rows} offsets[i] + strip[i, c] * scale (offsets None:
    max_i strip[i, c]), taken row by row in order from each tile's registers (``tile_dots_max``)."""
    for c in range(column_max.shape[0]):
        column_max[c] = -np.inf
    for row in range(0, rows, ROWS):
        tile_dots_max(src_emb, dst_t, row, column, strip, rows, offsets, scale, column_max)


@njit(cache=True, inline="always")
def workspace(K, D, values):
    """A sequence's scratch for its steps' blocks, of the float type of ``values``: (src_emb (K_rows, D),
    dst_t (D, K_cols), strip (K_rows, strip_width), and two (strip_width) vectors for a strip's
    reductions), the padding zeroed. The two vectors are separate arrays: as views of one, LLVM does
    not vectorise loops that read one and write the other."""
    width = strip_width(values)
    rows = padded_rows(K)
    src_emb = np.zeros((rows, D), dtype=values.dtype)
    dst_t = np.zeros((D, -(-K // width) * width), dtype=values.dtype)
    strip = np.empty((rows, width), dtype=values.dtype)
    return src_emb, dst_t, strip, np.empty(width, dtype=values.dtype), np.empty(width, dtype=values.dtype)


@njit(cache=True, inline="always")
def transition_block(src_rows, dst_rows, E1, E2, work, trans):
    """trans (K, K) = the step's whole block, strip by strip, for the kernels that keep it (the backward
    passes); the same bits as the strips the fused kernels reduce."""
    src_emb, dst_t, strip, _, _ = work
    gather_operands(src_rows, dst_rows, E1, E2, src_emb, dst_t)
    K = trans.shape[0]
    width = strip.shape[1]
    for column in range(0, K, width):
        strip_dots(src_emb, dst_t, column, K, strip)
        for i in range(K):
            for c in range(min(width, K - column)):
                trans[i, column + c] = strip[i, c]
