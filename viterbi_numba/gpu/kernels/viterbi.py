"""GPU Viterbi: one block per sequence runs the whole time loop (``cpu/decode.py``'s counterpart)."""

from __future__ import annotations

from numba import cuda

from .block import MAX_D, MAX_THREADS, Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    ZERO = blk.ZERO
    NEG_INF = blk.NEG_INF
    nbtype = blk.nbtype
    stage_rows = blk.stage_rows
    dot_tile = blk.dot_tile
    load_own = blk.load_own
    position_shifts = blk.position_shifts
    path_increments = blk.path_increments
    backtrace = blk.backtrace
    fairseq_step_scores = blk.fairseq_step_scores
    family = Family()

    @family.kernel(t.beam + (t.boolean, t.int64, t.f2, t.f2, t.f3, t.int32[:, :, ::1], t.i2, t.i2, t.f1, t.f2))
    @cuda.jit
    def viterbi_kernel(
        scores,
        tokens,
        E1,
        E2,
        lengths,
        fairseq_steps,
        tile_rows,
        shift,
        cum_shift,
        history,
        back,
        out_beam_idx,
        out_tokens,
        out_score,
        out_step_scores,
    ):
        """One block per sequence; same results as ``cpu/decode.py``'s ``viterbi_kernel`` (ties to the
        lowest index, the same ``step_scores`` rule).

        history (B, T, K): shifted cumulative scores; back (B, T, K): back-pointers (global scratch).
        """
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T = scores.shape[1]
        K = scores.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        prev = shared[:K]
        tile = shared[K:]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        position_shifts(scores, b, length, shift[b], cum_shift[b], scratch)
        cuda.syncthreads()
        for j in range(tid, K, threads):
            prev[j] = scores[b, 0, j] - shift[b, 0]
            history[b, 0, j] = prev[j]
        cuda.syncthreads()
        for t in range(1, length):
            for base in range(0, K, threads):
                j = base + tid
                best = NEG_INF
                arg = -1
                if j < K:
                    load_own(own, E2, tokens[b, t, j], D)
                for start in range(0, K, tile_rows):
                    rows = min(tile_rows, K - start)
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if j < K:
                        for r in range(rows):
                            cand = prev[start + r] + dot_tile(tile, r, own, D)
                            if cand > best or arg < 0:
                                best = cand
                                arg = start + r
                if j < K:
                    history[b, t, j] = best + (scores[b, t, j] - shift[b, t])
                    back[b, t, j] = arg
            cuda.syncthreads()
            for j in range(tid, K, threads):
                prev[j] = history[b, t, j]
            cuda.syncthreads()
        if tid == 0:
            y = backtrace(prev, back[b, 1:], tokens[b], length, out_beam_idx[b], out_tokens[b])
            score = prev[y] + cum_shift[b, length - 1]
            out_score[b] = score
            if fairseq_steps:
                fairseq_step_scores(history[b], cum_shift[b], out_beam_idx[b], length, score, out_step_scores[b])
            else:
                path_increments(scores[b], tokens[b], E1, E2, out_beam_idx[b], length, out_step_scores[b])
            for t in range(length, T):
                out_step_scores[b, t] = ZERO

    return family
