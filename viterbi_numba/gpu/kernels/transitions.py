"""Transition blocks of a chunk of steps, computed at once over the whole card (docs/design.md §7).

``trans[b, s, i, j] = E1[tokens[b, t - 1, i]] . E2[tokens[b, t, j]]`` at step ``t = t0 + s``: a batched,
register-tiled product. One block per TILE x TILE tile of one step's (K, K) block: the block stages
DEPTH entries of the tile's TILE rows of each table in shared memory, and each thread keeps a SUB x SUB
square of the tile in registers (rows ``ty + EDGE * r``, columns ``tx + EDGE * c``, so a warp reads
consecutive shared words and writes consecutive columns). The rank is a compile-time constant, so every
loop here unrolls. The recursions then read each step's block instead of recomputing its K^2 D products,
and the N chains of a sequence share it.
"""

from __future__ import annotations

from numba import config, cuda, uint32, uint64

from .block import Family

# A 16 x 16 thread block computes a 64 x 64 tile (in the simulator, which runs a thread per Python
# thread, 2 x 2 threads compute an 8 x 8 tile).
EDGE = 2 if config.ENABLE_CUDASIM else 16
SUB = 4
TILE = EDGE * SUB
THREADS = EDGE * EDGE
DEPTH = 8  # rank entries staged per pass (every rank of block.RANKS is a multiple)
STRIDE = TILE + 1  # a staged column's length: one word of padding keeps the stores conflict-free
STAGE = DEPTH * STRIDE  # shared-memory values per staged table
OUTPUTS = SUB * SUB  # a thread's outputs


def tiles_per_step(K: int) -> int:
    """Blocks of one step's (K, K) transition block."""
    edge = -(-K // TILE)
    return edge * edge


def build(blk) -> Family:
    """This family's kernels for the float dtype and rank of ``blk`` (``block.build(dtype, rank)``)."""
    t = blk.types
    ZERO = blk.ZERO
    RANK = blk.RANK
    nbtype = blk.nbtype
    family = Family()

    @family.kernel((t.i3, t.f2, t.f2, t.i1, t.int64, t.int64, t.f1), threads=THREADS)
    def transitions_kernel(tokens, E1, E2, lengths, chunk, t0, out):
        """out[b, s] (K, K) for the steps t = t0 + s of a chunk (out: (B, chunk, K, K) flattened, so the
        recursions step through a column with one 32-bit add); steps at or past lengths[b] are skipped
        (their blocks are never read). Grid: B * chunk * tiles_per_step(K) blocks of THREADS threads."""
        B, _, K = tokens.shape
        S = chunk
        D = E1.shape[1]
        tiles = (K + TILE - 1) // TILE
        rest = cuda.blockIdx.x
        tile_j = rest % tiles
        rest //= tiles
        tile_i = rest % tiles
        rest //= tiles
        s = rest % S
        b = rest // S
        step = t0 + s
        if step >= lengths[b]:
            return  # the whole block leaves together: no barrier is skipped by part of it
        tid = cuda.threadIdx.x
        tx = tid % EDGE
        ty = tid // EDGE
        row_base = uint32(ty)
        col_base = uint32(tx)
        row0 = tile_i * TILE
        col0 = tile_j * TILE
        rows = cuda.shared.array(STAGE, nbtype)  # rows[dd * STRIDE + r]: E1[token of row0 + r]
        cols = cuda.shared.array(STAGE, nbtype)
        acc = cuda.local.array(OUTPUTS, nbtype)
        a = cuda.local.array(SUB, nbtype)
        c = cuda.local.array(SUB, nbtype)
        for e in range(OUTPUTS):
            acc[e] = ZERO
        for d0 in range(0, RANK, DEPTH):
            cuda.syncthreads()  # every thread is done with the previous stage
            for e0 in range(0, TILE * DEPTH, THREADS):
                e = e0 + tid
                r = e // DEPTH
                dd = e - r * DEPTH
                d = d0 + dd
                i = row0 + r
                j = col0 + r
                rows[dd * STRIDE + r] = E1[tokens[b, step - 1, i], d] if i < K and d < D else ZERO
                cols[dd * STRIDE + r] = E2[tokens[b, step, j], d] if j < K and d < D else ZERO
            cuda.syncthreads()
            row_at = row_base
            col_at = col_base
            for _ in range(DEPTH):
                for q in range(SUB):  # unsigned running indices: a register plus a constant per load
                    a[q] = rows[row_at + uint32(EDGE * q)]
                    c[q] = cols[col_at + uint32(EDGE * q)]
                row_at += uint32(STRIDE)
                col_at += uint32(STRIDE)
                for r in range(SUB):
                    for q in range(SUB):
                        acc[r * SUB + q] += a[r] * c[q]
        block0 = uint64((b * S + s) * K) * uint64(K)
        for r in range(SUB):
            i = row0 + ty + EDGE * r
            for q in range(SUB):
                j = col0 + tx + EDGE * q
                if i < K and j < K:
                    out[block0 + uint64(i * K + j)] = acc[r * SUB + q]

    return family
