"""The GPU backend: launch geometry and the kernel launches, on arrays ``_validate`` has normalised.

:class:`GPUOps` has the same methods, with the same signatures, as ``cpu.ops.CPUOps``; one is made per
call for the caller's array library (``gpu/arrays.py``), which allocates every result and gives the
stream. Nothing here validates or waits for the GPU: top-K flags NaN in the call's checks, which
``call()`` reads back once, at the end of the call, with every other check's flag. No host memory is
copied to the device either, so a call on device inputs inside ``skip_gpu_checks()`` can be captured in
a CUDA graph.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
from numba import config

from .._validate import BeamCRF, Draws, SamplerGradInputs, emission_values
from ..results import (
    Beam,
    CRFSample,
    DistinctSample,
    EntropyGrad,
    KLGrad,
    NBestResult,
    PartitionGrad,
    SamplerGrad,
    StochasticViterbiResult,
    ViterbiResult,
)
from .arrays import DeviceArrays, grid, multiprocessors
from .kernels import kernels
from .kernels.block import MAX_THREADS, SHARED_BUDGET, TRANSITIONS_BUDGET, block_limits, rank_for, threads_for
from .kernels.crf import PRODUCT_THREADS, ROW_LANES, product_tiles
from .kernels.topk import ENTRIES, LOADS
from .kernels.transitions import THREADS as TRANSITION_THREADS
from .kernels.transitions import tiles_per_step

PAIRS_PER_BLOCK = 128  # the fewest (column, thread) pairs of a split recursion block: a warp per scheduler
PARTS = 8  # threads that share one column's predecessors in the Viterbi and forward steps
ROUND_LANES = 2 if config.ENABLE_CUDASIM else 32  # columns a round of a recursion block covers at least


def topk_region(k: int) -> int:
    """Half of top-K's buffer (a power of two, k or more, at least two chunks of the row: ``topk.LOADS``
    entries per thread each): the buffer holds the k kept and, after them, room for the candidates of
    at least two chunks, so a select comes only every few chunks' survivors."""
    region = 2 * LOADS * block_limits()[1]
    while region < k:
        region *= 2
    return region


def chains_per_block(K: int, N: int, dtype: np.dtype) -> int:
    """The chains one ``chains_steps`` block serves: as many as keep their K previous scores in half the
    shared-memory budget."""
    return int(max(1, min(N, (SHARED_BUDGET // 2) // (K * dtype.itemsize), MAX_THREADS)))


def dynamic_shared(name: str, K: int, dtype: Any, N: int = 1, k: int = 1) -> int:
    """Bytes of dynamic shared memory a launch of kernel ``name`` asks for (beam K, N samples, top-k)."""
    itemsize = np.dtype(dtype).itemsize
    values = {
        "viterbi_steps": K,
        "nbest_steps": K,
        "forward_steps": K,
        "forward_finish": K,
        "chains_steps": K * chains_per_block(K, N, np.dtype(dtype)),
        "sample_kernel": 2 * K,
        "backward_steps": 2 * K,
        "ratio_forward_steps": 3 * K,
        "ratio_backward_steps": 5 * K,
        "stochastic_viterbi_backward_kernel": 2 * K,
    }
    if name == "topk_kernel":
        return 2 * topk_region(k) * (itemsize + 8)  # keys and int64 ids
    return values.get(name, 0) * itemsize


def _chunk_steps(B: int, T: int, K: int, dtype: np.dtype, sides: int = 1) -> int:
    """Steps per chunk of (K, K) blocks (transitions, xi, edge weights): within TRANSITIONS_BUDGET bytes for
    the chunks of ``sides`` CRFs together."""
    return int(max(1, min(T - 1, TRANSITIONS_BUDGET // max(1, sides * B * K * K * dtype.itemsize))))


def _co_resident(kernel: Any, signature: tuple, threads: int, shared: int) -> int:
    """Blocks of ``kernel`` a cooperative grid can hold at once (the simulator runs one)."""
    if config.ENABLE_CUDASIM:
        return 1
    return int(kernel.compile(signature).max_cooperative_grid_blocks(threads, shared))


class Recursion(NamedTuple):
    """How a recursion's steps are laid out: ``split`` blocks share each unit's columns (a sequence, or a
    group of a sequence's chains), ``blocks`` blocks in the cooperative grid (a multiple of split; units
    beyond blocks // split are served in rounds), ``threads`` per block, and ``parts`` threads share each
    column's predecessors (Viterbi and forward; the chains' threads run over (column, chain) instead)."""

    split: int
    blocks: int
    threads: int
    parts: int


def recursion_layout(units: int, K: int, per_column: int, sms: int, capacity: Any) -> Recursion:
    """Split each unit's K columns over enough blocks to give every multiprocessor one (each block at
    least PAIRS_PER_BLOCK threads' work), with ``per_column`` threads per column; ``capacity(threads)`` is
    how many blocks fit the grid at once. ``parts``: the threads per column when they share its
    predecessors, keeping a warp's lanes on consecutive columns (in the simulator, whose blocks have at
    most 4 threads, on 2 columns, so that parts > 1 runs there too; the chains' kernel ignores it)."""
    split = max(1, min(K, -(-K * per_column // PAIRS_PER_BLOCK), -(-sms // max(units, 1))))
    threads = threads_for(-(-K // split) * per_column)
    most = max(1, capacity(threads))
    split = min(split, most)
    split = -(-K // -(-K // split))  # no part without a column
    lanes = min(-(-K // split), ROUND_LANES, threads)
    parts = max(1, min(per_column, threads // lanes))
    return Recursion(split, min(units, most // split) * split, threads, parts)


class ForwardState(NamedTuple):
    """The validated beam and the forward pass's device arrays."""

    crf: BeamCRF
    inv_temp: Any
    log_z: Any  # (B,) native, compute dtype
    log_z_view: Any
    alpha: Any  # (B, T, K) views
    col_max: Any
    col_sum: Any
    natives: tuple[Any, Any, Any]  # alpha, col_max, col_sum as the caller's library's arrays

    @property
    def saved(self) -> tuple[Any, Any, Any, Any]:
        return (self.log_z, *self.natives)


class _ForwardRun:
    """One forward pass on the GPU while its chunks of transition blocks come (``GPUOps.crf_forward``):
    ``forward_start`` when made, ``forward_steps`` per chunk, ``forward_finish`` at the end."""

    def __init__(self, ops: GPUOps, crf: BeamCRF, inv_temp: Any):
        lib = ops.lib
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        self.ops, self.crf, self.inv_temp = ops, crf, inv_temp
        self.log_z = lib.empty((B,), dtype)
        self.saved = [lib.zeros((B, T, K), dtype) for _ in range(3)]  # padded positions: 0, not stale memory
        self.alpha, self.col_max, self.col_sum = (view for _, view in self.saved)
        self.raw = lib.empty((B, T, K), dtype)[1]
        self.shift, self.norm = lib.empty((B, T), dtype)[1], lib.empty((B, 2), dtype)[1]
        if B:
            kernels(dtype).forward_start[B, threads_for(K), lib.stream](
                crf.scores, crf.lengths, inv_temp, self.shift, self.raw, self.norm
            )
            self.steps, self.layout = ops._recursion("forward_steps", dtype, B, K, PARTS)

    def chunk(self, t0: int, chunk: int, trans: Any) -> None:
        crf = self.crf
        self.steps(
            trans, chunk, t0, crf.scores, self.shift, crf.lengths, self.inv_temp, self.layout.split, self.layout.parts,
            self.raw, self.alpha, self.col_max, self.col_sum, self.norm,
        )  # fmt: skip

    def finish(self) -> ForwardState:
        crf, lib = self.crf, self.ops.lib
        B, _, K = crf.scores.shape
        if B:
            kernels(crf.dtype).forward_finish[
                B, threads_for(K), lib.stream, dynamic_shared("forward_finish", K, crf.dtype)
            ](crf.lengths, self.inv_temp, self.shift, self.raw, self.alpha, self.norm, self.log_z[1])
        natives = (self.saved[0][0], self.saved[1][0], self.saved[2][0])
        return ForwardState(
            crf, self.inv_temp, self.log_z[0], self.log_z[1], self.alpha, self.col_max, self.col_sum, natives
        )


class GPUOps:
    """The GPU backend's operations for the library of a GPU array ``sample``."""

    def __init__(self, sample: Any):
        self.arrays = DeviceArrays(sample)
        self.lib = self.arrays.lib

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """The span of one public call: its value checks' flags are read back at its end, once, after
        every kernel of the call is queued (not inside ``skip_gpu_checks()``), and the first failure
        raised. A call that raises before its end (a bad option or shape) reads them first, so that an
        earlier input's value error comes first, as on the CPU."""
        try:
            yield
        except Exception:
            self.arrays.verify()
            raise
        self.arrays.verify()

    def _replay(self, draws: Draws, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """Device uniforms of ``shape`` in the compute dtype, or a 1-element stand-in when drawing by seed."""
        if draws.uniforms is None:
            return self.lib.zeros((1,) * len(shape), dtype)[1]
        return draws.uniforms.reshape(shape)

    def _weight_scale(self, weights: Any, inv_temp: Any, sign: float) -> tuple[Any, Any]:
        """(weights * inv_temp (B, N), sign * its row sums (B,)) for device weights (B, N)."""
        B, N = weights.shape
        scale = self.lib.empty((B, N), weights.dtype)[1]
        rows = self.lib.empty((B,), weights.dtype)[1]
        if B:
            kernels(weights.dtype).weight_scale[grid(B, 64), 64, self.lib.stream](
                weights, inv_temp, weights.dtype.type(sign), scale, rows
            )
        return scale, rows

    # --- decoding ---------------------------------------------------------------------------------
    def topk_beam(self, emissions: Any, k: int, force_tokens: Any) -> Beam:
        lib = self.lib
        B, T, _ = emissions.shape
        forced = lib.zeros((1, 1), np.int64)[1] if force_tokens is None else force_tokens
        scores_native, scores = lib.empty((B, T, k), emissions.dtype)
        tokens_native, tokens = lib.empty((B, T, k), np.int64)
        checks = self.arrays.checks()
        flags, slot = checks.slot(emission_values, emissions)
        threads = block_limits()[1]
        region = topk_region(k)
        assert 2 * region <= ENTRIES * threads, "top-K's buffer must fit ENTRIES per thread"
        shared = dynamic_shared("topk_kernel", emissions.shape[2], emissions.dtype, k=k)
        if B * T:
            kernels(emissions.dtype).topk_kernel[B * T, threads, lib.stream, shared](
                emissions, k, region, forced, force_tokens is not None, scores, tokens, flags, slot
            )
        checks.settle()
        return Beam(scores_native, tokens_native)

    def gather_beam(self, emissions: Any, tokens: Any) -> Any:
        out = self.lib.empty(tokens.shape, emissions.dtype)
        if tokens.size:
            kernels(emissions.dtype).gather_beam[grid(tokens.size), 256, self.lib.stream](emissions, tokens, out[1])
        return out[0]

    def _transition_chunks(self, crf: BeamCRF, reverse: bool = False, sides: int = 1) -> Any:
        """Yield (t0, chunk, trans): the transition blocks (B, chunk, K, K), flattened, of the steps t0 ..
        t0 + chunk - 1, computed over the whole card, ``chunk`` steps at a time so that a chunk (of each
        of ``sides`` CRFs stepped together) stays within TRANSITIONS_BUDGET bytes; the last chunk first
        with ``reverse``."""
        lib = self.lib
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        chunk = _chunk_steps(B, T, K, dtype, sides)
        trans = lib.empty((B * chunk * K * K,), dtype)[1]
        product = kernels(dtype, rank_for(crf.E1.shape[1])).transitions_kernel
        starts = range(1, T, chunk)
        for t0 in reversed(starts) if reverse else starts:
            product[B * chunk * tiles_per_step(K), TRANSITION_THREADS, lib.stream](
                crf.tokens, crf.E1, crf.E2, crf.lengths, chunk, t0, trans
            )
            yield t0, chunk, trans

    def _recursion(self, name: str, dtype: np.dtype, units: int, K: int, per_column: int, N: int = 1) -> tuple:
        """(launch, layout) of recursion kernel ``name`` for ``units`` units of K columns: ``launch`` is the
        kernel configured for its cooperative grid (``recursion_layout``) and dynamic shared memory."""
        kernel = getattr(kernels(dtype), name)
        shared = dynamic_shared(name, K, dtype, N)
        signature = kernels(dtype).signatures[name]
        layout = recursion_layout(
            units, K, per_column, multiprocessors(), lambda threads: _co_resident(kernel, signature, threads, shared)
        )
        return kernel[layout.blocks, layout.threads, self.lib.stream, shared], layout

    def viterbi_decode(self, crf: BeamCRF, fairseq_steps: bool) -> ViterbiResult:
        lib = self.lib
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        compiled = kernels(dtype)
        beam_idx = lib.empty((B, T), np.int64)
        path_tokens = lib.empty((B, T), np.int64)
        score = lib.empty((B,), dtype)
        step_scores = lib.empty((B, T), dtype)
        shift, cum_shift = (lib.empty((B, T), dtype)[1] for _ in range(2))
        history = lib.empty((B, T, K), dtype)[1]
        back = lib.empty((B, T, K), np.int32)[1]
        if not B:
            return ViterbiResult(beam_idx[0], path_tokens[0], score[0], step_scores[0])
        compiled.viterbi_start[B, threads_for(K), lib.stream](crf.scores, crf.lengths, shift, cum_shift, history)
        steps, layout = self._recursion("viterbi_steps", dtype, B, K, PARTS)
        for t0, chunk, trans in self._transition_chunks(crf):
            steps(trans, chunk, t0, crf.scores, shift, crf.lengths, layout.split, layout.parts, history, back)
        compiled.viterbi_finish[grid(B, 64), 64, lib.stream](
            crf.scores,
            crf.tokens,
            crf.E1,
            crf.E2,
            crf.lengths,
            fairseq_steps,
            cum_shift,
            history,
            back,
            beam_idx[1],
            path_tokens[1],
            score[1],
            step_scores[1],
        )
        return ViterbiResult(beam_idx[0], path_tokens[0], score[0], step_scores[0])

    def viterbi_nbest(self, crf: BeamCRF, n: int) -> NBestResult:
        lib = self.lib
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        compiled = kernels(dtype)
        beam_idx, path_tokens = (lib.empty((B, T, n), np.int64) for _ in range(2))
        score = lib.empty((B, n), dtype)
        count = lib.empty((B,), np.int64)
        shift, cum_shift = (lib.empty((B, T), dtype)[1] for _ in range(2))
        best = lib.empty((B, T, K, n), dtype)[1]  # each (position, slot)'s list of shifted prefix scores
        from_entry = lib.empty((B, T, K, n), np.int32)[1]  # slot * n + rank of the prefix each one extends
        if not B:
            return NBestResult(beam_idx[0], path_tokens[0], score[0], count[0])
        compiled.nbest_start[B, threads_for(K), lib.stream](crf.scores, crf.lengths, shift, cum_shift, best)
        steps, layout = self._recursion("nbest_steps", dtype, B, K, 1)
        for t0, chunk, trans in self._transition_chunks(crf):
            steps(trans, chunk, t0, crf.scores, shift, crf.lengths, layout.split, best, from_entry)
        compiled.nbest_finish[grid(B, 64), 64, lib.stream](
            crf.tokens,
            crf.lengths,
            cum_shift,
            best,
            from_entry,
            lib.empty((B, n), dtype)[1],
            lib.empty((B, n), np.int64)[1],
            beam_idx[1],
            path_tokens[1],
            score[1],
            count[1],
        )
        return NBestResult(beam_idx[0], path_tokens[0], score[0], count[0])

    def stochastic_viterbi(
        self, crf: BeamCRF, num_samples: int, inv_temp: Any, draws: Draws
    ) -> StochasticViterbiResult:
        lib = self.lib
        B, T, K = crf.scores.shape
        N = num_samples
        dtype = crf.dtype
        compiled = kernels(dtype)
        replay = self._replay(draws, (B, T - 1, K, N), dtype)
        beam_probs = lib.empty((B, T, K, N), dtype)
        beam_idx = lib.empty((B, T, N), np.int64)
        path_tokens = lib.empty((B, T, N), np.int64)
        path_scores = lib.empty((B, T, K, N), dtype)
        backpointers = lib.empty((B, T - 1, K, N), np.int64)
        score = lib.empty((B, N), dtype)
        shift, cum_shift = (lib.empty((B, T), dtype)[1] for _ in range(2))
        if B:
            compiled.chains_start[B, threads_for(K * N), lib.stream](
                crf.scores, crf.lengths, shift, cum_shift, beam_probs[1], path_scores[1]
            )
            chains = chains_per_block(K, N, dtype)
            steps, layout = self._recursion("chains_steps", dtype, B * -(-N // chains), K, chains, N)
            for t0, chunk, trans in self._transition_chunks(crf):
                steps(
                    trans,
                    chunk,
                    t0,
                    crf.scores,
                    shift,
                    cum_shift,
                    crf.lengths,
                    inv_temp,
                    draws.seed & 0xFFFFFFFF,
                    draws.seed >> 32,
                    replay,
                    draws.uniforms is not None,
                    layout.split,
                    chains,
                    beam_probs[1],
                    path_scores[1],
                    backpointers[1],
                )
            compiled.chains_finish[grid(B * N, 64), 64, lib.stream](
                crf.tokens,
                crf.lengths,
                cum_shift,
                beam_probs[1],
                backpointers[1],
                beam_idx[1],
                path_tokens[1],
                score[1],
            )
            compiled.chains_normalise[grid(B * T * N, 64), 64, lib.stream](
                crf.lengths, beam_probs[1], path_scores[1], backpointers[1]
            )
        return StochasticViterbiResult(
            beam_probs[0], beam_idx[0], path_tokens[0], path_scores[0], backpointers[0], score[0]
        )

    def stochastic_viterbi_backward(self, inputs: SamplerGradInputs) -> SamplerGrad:
        """The chains' recursion (a block per chain) gives grad_scores and each sampled edge's weight; then,
        chunk by chunk of steps, the edges' (K, K) weight blocks and their table gradients as the same two
        products per step as the backward pass (``crf.xi_products``)."""
        lib = self.lib
        crf = inputs.crf
        B, T, K, N = inputs.beam_probs.shape
        dtype = crf.dtype
        compiled = kernels(dtype)
        products = kernels(dtype, rank_for(crf.E1.shape[1]))  # the only kernels here that read factor rows
        grad_scores = lib.zeros((B, T, K), dtype)
        grad_E1 = lib.zeros(crf.E1.shape, dtype)
        grad_E2 = lib.zeros(crf.E1.shape, dtype)
        if not B * N:
            return SamplerGrad(grad_scores[0], grad_E1[0], grad_E2[0])
        weights = lib.empty((B, T, K, N), dtype)[1]
        shared = dynamic_shared("stochastic_viterbi_backward_kernel", K, dtype)
        compiled.stochastic_viterbi_backward_kernel[B * N, threads_for(K), lib.stream, shared](
            inputs.beam_probs, inputs.backpointers, crf.lengths, inputs.grad_beam_probs, grad_scores[1], weights
        )
        chunk = _chunk_steps(B, T, K, dtype)
        edges = lib.empty((B * chunk * K * K,), dtype)[1]
        ones = lib.full((B,), 1, dtype)[1]
        for t0 in range(1, T, chunk):
            compiled.fill[grid(edges.size), 256, lib.stream](edges, dtype.type(0))
            compiled.chain_edges[grid(B * chunk * K * N), 256, lib.stream](
                weights, inputs.backpointers, crf.lengths, chunk, t0, edges
            )
            for product, grad in ((products.xi_rows, grad_E1[1]), (products.xi_columns, grad_E2[1])):
                product[B * chunk * product_tiles(K), PRODUCT_THREADS, lib.stream](
                    edges, chunk, t0, crf.tokens, crf.E1, crf.E2, crf.lengths, ones, grad
                )
        return SamplerGrad(grad_scores[0], grad_E1[0], grad_E2[0])

    # --- exact inference ----------------------------------------------------------------------------
    def crf_forward(self, crf: BeamCRF, inv_temp: Any) -> ForwardState:
        run = _ForwardRun(self, crf, inv_temp)
        for t0, chunk, trans in self._transition_chunks(crf) if crf.scores.shape[0] else ():
            run.chunk(t0, chunk, trans)
        return run.finish()

    def forward_log_ratio(
        self, crf: BeamCRF, q_crf: Optional[BeamCRF], inv_temp: Any, own: float
    ) -> tuple[ForwardState, Optional[ForwardState], Any]:
        """The forward passes of p and q (None: p alone) and the expected log ratios of their prefixes
        (B, T, K) view: chunk by chunk, each CRF's transition blocks serve its forward steps and then the
        forward sweep (``ratio_forward_steps``)."""
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        runs = [_ForwardRun(self, side, inv_temp) for side in (crf, q_crf) if side is not None]
        prefix_ratios = self.lib.zeros((B, T, K), dtype)[1]
        if B:
            sweep, layout = self._recursion("ratio_forward_steps", dtype, B, K, PARTS)
            for t0, chunk, trans, q_trans in self._chunk_pairs(crf, q_crf, False):
                for run, blocks in zip(runs, (trans, q_trans)):
                    run.chunk(t0, chunk, blocks)
                sweep(
                    trans, q_trans, chunk, t0, crf.lengths, inv_temp, dtype.type(own), layout.split, layout.parts,
                    q_crf is not None, runs[0].alpha, runs[0].col_max, runs[0].col_sum, runs[-1].alpha,
                    runs[-1].col_max, runs[-1].col_sum, prefix_ratios,
                )  # fmt: skip
        states = [run.finish() for run in runs]
        return states[0], states[1] if q_crf is not None else None, prefix_ratios

    def _chunk_pairs(self, crf: BeamCRF, q_crf: Optional[BeamCRF], reverse: bool) -> Any:
        """(t0, chunk, p's blocks, q's blocks) of the same steps (``_transition_chunks``; without q, q's
        blocks are p's)."""
        if q_crf is None:
            return ((t0, chunk, trans, trans) for t0, chunk, trans in self._transition_chunks(crf, reverse))
        pairs = zip(self._transition_chunks(crf, reverse, 2), self._transition_chunks(q_crf, reverse, 2))
        return ((t0, chunk, trans, q_trans) for (t0, chunk, trans), (_, _, q_trans) in pairs)

    def restore_forward(self, crf: BeamCRF, inv_temp: Any, views: tuple, natives: tuple) -> ForwardState:
        """The ForwardState of saved arrays: ``views`` as ``_validate.saved_forward`` made them, ``natives``
        the caller's arrays they view (log_z, alpha, col_max, col_sum)."""
        log_z, alpha, col_max, col_sum = views
        return ForwardState(crf, inv_temp, natives[0], log_z, alpha, col_max, col_sum, tuple(natives[1:]))

    def crf_sample(self, state: ForwardState, num_samples: int, draws: Draws) -> CRFSample:
        lib = self.lib
        crf = state.crf
        B, T, K = crf.scores.shape
        D = crf.E1.shape[1]
        dtype = crf.dtype
        replay = self._replay(draws, (B, T, num_samples), dtype)
        beam_idx = lib.empty((B, T, num_samples), np.int64)
        path_tokens = lib.empty((B, T, num_samples), np.int64)
        log_prob = lib.empty((B, num_samples), dtype)
        if B:
            kernels(dtype, rank_for(D)).sample_kernel[
                B * num_samples, threads_for(K), lib.stream, dynamic_shared("sample_kernel", K, dtype)
            ](
                crf.scores,
                crf.tokens,
                crf.E1,
                crf.E2,
                crf.lengths,
                state.inv_temp,
                state.log_z_view,
                state.alpha,
                draws.seed & 0xFFFFFFFF,
                draws.seed >> 32,
                replay,
                draws.uniforms is not None,
                beam_idx[1],
                path_tokens[1],
                log_prob[1],
            )
        return CRFSample(beam_idx[0], path_tokens[0], log_prob[0])

    def distinct_sample(self, state: ForwardState, num_samples: int, draws: Draws) -> DistinctSample:
        lib = self.lib
        crf = state.crf
        B, T, K = crf.scores.shape
        N = num_samples
        M = N + 1
        dtype = crf.dtype
        replay = self._replay(draws, (B, T, M, 2 * M), dtype)
        beam_idx, path_tokens = (lib.empty((B, T, N), np.int64) for _ in range(2))
        log_prob, perturbed, weights = (lib.empty((B, N), dtype) for _ in range(3))
        kappa = lib.empty((B,), dtype)
        count = lib.empty((B,), np.int64)

        def scratch(shape: tuple, scratch_dtype: Any = np.float64) -> Any:
            return lib.empty(shape, scratch_dtype)[1]

        if B:
            kernels(dtype, rank_for(crf.E1.shape[1])).distinct_sample_kernel[B, threads_for(K), lib.stream](
                crf.scores, crf.tokens, crf.E1, crf.E2, crf.lengths, state.inv_temp, state.log_z_view, state.alpha,
                state.col_max, state.col_sum, draws.seed & 0xFFFFFFFF, draws.seed >> 32, replay,
                draws.uniforms is not None, scratch((B, K)), scratch((B, K)), scratch((B, K)),
                scratch((B, M), np.int64), scratch((B, M)), scratch((B, M), np.int64), scratch((B, M * M)),
                scratch((B, M)), scratch((B, M)), scratch((B, M), np.int64), scratch((B, T, M), np.int64), beam_idx[1],
                path_tokens[1], log_prob[1], perturbed[1], kappa[1], weights[1], count[1],
            )  # fmt: skip
        return DistinctSample(beam_idx[0], path_tokens[0], log_prob[0], perturbed[0], kappa[0], weights[0], count[0])

    def _backward(self, state: ForwardState, row_scale: Optional[Any]) -> tuple[Any, Any, Any]:
        """(marginals, grad_E1, grad_E2) as (native, view) pairs (the gradients None without the device
        ``row_scale`` (B,)); the table gradients are those of sum_b row_scale[b] * tau * log Z_tau[b].

        Chunk by chunk of steps, last chunk first: the chunk's transition blocks, then xi and the
        marginals step by step (``backward_steps``, overwriting the blocks with xi), then the rows'
        gradients of the whole chunk at once (``xi_products``, one launch per side)."""
        lib = self.lib
        crf = state.crf
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        compiled = kernels(dtype)
        products = kernels(dtype, rank_for(crf.E1.shape[1]))  # the only kernels here that read factor rows
        mu = lib.empty((B, T, K), dtype)
        want_rows = row_scale is not None
        grad_E1 = lib.zeros(crf.E1.shape if want_rows else (1, 1), dtype)
        grad_E2 = lib.zeros(crf.E1.shape if want_rows else (1, 1), dtype)
        if not B:
            return (mu, grad_E1, grad_E2) if want_rows else (mu, None, None)
        compiled.backward_start[B, threads_for(K), lib.stream](crf.lengths, state.alpha, mu[1])
        steps, layout = self._recursion("backward_steps", dtype, B, K, ROW_LANES)
        for t0, chunk, xi in self._transition_chunks(crf, reverse=True):
            steps(
                xi,
                chunk,
                t0,
                crf.lengths,
                state.inv_temp,
                layout.split,
                want_rows,
                state.alpha,
                state.col_max,
                state.col_sum,
                mu[1],
            )
            if want_rows:
                for product, grad in ((products.xi_rows, grad_E1[1]), (products.xi_columns, grad_E2[1])):
                    product[B * chunk * product_tiles(K), PRODUCT_THREADS, lib.stream](
                        xi, chunk, t0, crf.tokens, crf.E1, crf.E2, crf.lengths, row_scale, grad
                    )
        if not want_rows:
            return mu, None, None
        return mu, grad_E1, grad_E2

    def _scale_rows(self, values: Any, scale: Any) -> Any:
        """values (B, T, K) times the device scale[b], as a new native array."""
        out = self.lib.empty(values.shape, values.dtype)
        if values.size:
            kernels(values.dtype).scale_rows[grid(values.size), 256, self.lib.stream](values, scale, out[1])
        return out

    def marginals(self, state: ForwardState) -> Any:
        return self._backward(state, None)[0][0]

    def log_partition_grad(self, state: ForwardState, weights: Any) -> PartitionGrad:
        B = weights.shape[0]
        _, scale = self._weight_scale(weights.reshape(B, 1), state.inv_temp, 1.0)
        mu, grad_E1, grad_E2 = self._backward(state, scale)
        return PartitionGrad(state.log_z, mu[0], self._scale_rows(mu[1], scale)[0], grad_E1[0], grad_E2[0])

    def paths_grad(self, state: ForwardState, paths: Any, weights: Any) -> tuple[Any, Any, Any]:
        """(grad_scores, grad_E1, grad_E2) of sum_{b,n} weights[b, n] * (S(y_bn) / tau - log Z_tau[b]) for
        device beam paths (B, T, N) and device weights (B, N)."""
        lib = self.lib
        crf = state.crf
        scale, rows = self._weight_scale(weights, state.inv_temp, -1.0)  # rows: -sum_n scale[b, n]
        mu, grad_E1, grad_E2 = self._backward(state, rows)
        grad_scores = self._scale_rows(mu[1], rows)
        B, T, N = paths.shape
        if B * N:
            kernels(crf.dtype).add_paths[grid(B * N, 64), 64, lib.stream](
                paths, crf.tokens, crf.lengths, scale, crf.E1, crf.E2, grad_scores[1], grad_E1[1], grad_E2[1]
            )
        return grad_scores[0], grad_E1[0], grad_E2[0]

    def _log_ratio(
        self,
        state: ForwardState,
        q_state: Optional[ForwardState],
        own: float,
        sign: float,
        weights: Optional[Any],
        prefix_ratios: Optional[Any] = None,
    ) -> tuple[Any, ...]:
        """sign * E_p[own * log p - log q] (B,) as a native array (q None: without the log q term) and,
        for device weights (B,), the gradients of sum_b weights[b] * sign * E_p[log p - log q] (own = 1)
        as (grad_scores, grad_E1, grad_E2, grad_scores_q, grad_E1_q, grad_E2_q) natives, q's None without q.

        The forward sweep (``ratio_forward_steps``, on both CRFs' transition blocks chunk by chunk) and
        ``ratio_last`` give the value; the gradients take the backward sweep (``ratio_backward_steps``,
        last chunk first), which turns each chunk's blocks into edge terms that ``xi_rows`` and
        ``xi_columns`` contract with each side's table rows (docs/design.md §4). ``prefix_ratios``:
        ``forward_log_ratio``'s, for the same own (the forward sweep is not run again)."""
        lib = self.lib
        crf = state.crf
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        use_q = q_state is not None
        q = q_state if q_state is not None else state
        want_grads = weights is not None
        value = lib.empty((B,), dtype)
        grads = [lib.zeros((B, T, K) if want_grads and want else (1, 1, 1), dtype) for want in (True, use_q)]
        tables = [
            lib.zeros(side.E1.shape if want_grads and want else (1, 1), dtype)
            for side, want in ((crf, True), (crf, True), (q.crf, use_q), (q.crf, use_q))
        ]  # p's E1, E2, then q's (scores: p's, q's)
        if B:
            self._run_log_ratio(state, q, use_q, own, sign, weights, prefix_ratios, value[1], grads, tables)
        if not want_grads:
            return (value[0],)
        p_grads = (grads[0][0], tables[0][0], tables[1][0])
        q_grads = (grads[1][0], tables[2][0], tables[3][0]) if use_q else (None, None, None)
        return (value[0],) + p_grads + q_grads

    def _run_log_ratio(
        self, state: ForwardState, q: ForwardState, use_q: bool, own: float, sign: float, weights: Any,
        prefix_ratios: Any, value: Any, grads: list, tables: list,
    ) -> None:  # fmt: skip
        """The launches of ``_log_ratio`` (B > 0) into its outputs' views."""
        lib = self.lib
        crf = state.crf
        B, T, K = crf.scores.shape
        dtype = crf.dtype
        want_grads = weights is not None
        mean = lib.empty((B,), dtype)[1]
        p_q = (state.alpha, state.col_max, state.col_sum, q.alpha, q.col_max, q.col_sum)
        q_crf = q.crf if use_q else None
        if prefix_ratios is None:
            prefix_ratios = lib.zeros((B, T, K), dtype)[1]
            forward, layout = self._recursion("ratio_forward_steps", dtype, B, K, PARTS)
            for t0, chunk, trans, q_trans in self._chunk_pairs(crf, q_crf, False):
                forward(
                    trans, q_trans, chunk, t0, crf.lengths, state.inv_temp, dtype.type(own), layout.split,
                    layout.parts, use_q, *p_q, prefix_ratios,
                )  # fmt: skip
        scale = self._weight_scale(weights.reshape(B, 1), state.inv_temp, sign)[1] if want_grads else mean
        sweep_state = [lib.empty((B, T, K) if want_grads else (1, 1, 1), dtype)[1] for _ in range(3)]  # mu, ghat, q_mu
        kernels(dtype).ratio_last[B, threads_for(K), lib.stream](
            crf.lengths, state.alpha, q.alpha, use_q, dtype.type(own), prefix_ratios, want_grads, scale,
            dtype.type(sign), mean, value, *sweep_state, grads[0][1], grads[1][1],
        )  # fmt: skip
        if not want_grads:
            return
        backward, layout = self._recursion("ratio_backward_steps", dtype, B, K, ROW_LANES)
        for t0, chunk, edges, q_edges in self._chunk_pairs(crf, q_crf, True):
            backward(
                edges, q_edges, chunk, t0, crf.lengths, state.inv_temp, layout.split, use_q, *p_q, prefix_ratios, mean,
                scale, *sweep_state, grads[0][1], grads[1][1],
            )  # fmt: skip
            for side, blocks, first in ((crf, edges, 0), (q.crf, q_edges, 2))[: 1 + use_q]:
                products = kernels(dtype, rank_for(side.E1.shape[1]))
                for product, grad in ((products.xi_rows, tables[first]), (products.xi_columns, tables[first + 1])):
                    product[B * chunk * product_tiles(K), PRODUCT_THREADS, lib.stream](
                        blocks, chunk, t0, side.tokens, side.E1, side.E2, crf.lengths, scale, grad[1]
                    )

    def entropy(self, state: ForwardState, weights: Optional[Any], prefix_ratios: Optional[Any] = None) -> EntropyGrad:
        if weights is None:
            return EntropyGrad(self._log_ratio(state, None, 1.0, -1.0, None, prefix_ratios)[0], None, None, None)
        return EntropyGrad(*self._log_ratio(state, None, 1.0, -1.0, weights, prefix_ratios)[:4])

    def kl(
        self, state: ForwardState, q_state: ForwardState, weights: Optional[Any], prefix_ratios: Optional[Any] = None
    ) -> KLGrad:
        if weights is None:
            return KLGrad(self._log_ratio(state, q_state, 1.0, 1.0, None, prefix_ratios)[0], *(None,) * 6)
        return KLGrad(*self._log_ratio(state, q_state, 1.0, 1.0, weights, prefix_ratios))

    def cross_entropy(self, state: ForwardState, q_state: ForwardState, prefix_ratios: Optional[Any] = None) -> Any:
        return self._log_ratio(state, q_state, 0.0, 1.0, None, prefix_ratios)[0]

    def _path_scores(self, crf: BeamCRF, paths: Any) -> tuple[Any, Any]:
        B, _, N = paths.shape
        out = self.lib.empty((B, N), crf.dtype)
        if B * N:
            kernels(crf.dtype).sequence_score_kernel[grid(B * N, 64), 64, self.lib.stream](
                crf.scores, crf.tokens, crf.E1, crf.E2, crf.lengths, paths, out[1]
            )
        return out

    def sequence_score(self, crf: BeamCRF, paths: Any) -> Any:
        return self._path_scores(crf, paths)[0]

    def target_slots(self, crf: BeamCRF, targets: Any) -> Any:
        B, T, _ = crf.scores.shape
        slots = self.lib.empty((B, T, 1), np.int64)[1]
        if B * T:
            kernels(crf.dtype).find_slots[grid(B * T, 64), 64, self.lib.stream](crf.tokens, targets, slots)
        return slots

    def path_log_prob(self, state: ForwardState, paths: Any) -> Any:
        crf = state.crf
        B, _, N = paths.shape
        numerator = self._path_scores(crf, paths)[1]
        out = self.lib.empty((B, N), crf.dtype)
        if B * N:
            kernels(crf.dtype).path_log_prob[grid(B * N, 64), 64, self.lib.stream](
                numerator, state.log_z_view, state.inv_temp, out[1]
            )
        return out[0]
