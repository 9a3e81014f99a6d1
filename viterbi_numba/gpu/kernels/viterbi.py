"""GPU Viterbi (``cpu/decode.py``'s counterpart) on precomputed transition blocks.

``viterbi_start`` (a block per sequence) finds each position's emission shift and writes step 0;
``viterbi_steps`` runs the steps of one chunk of transition blocks (``transitions.py``): the K columns of
a sequence are split over ``split`` blocks of a cooperative grid, which meet at a grid barrier after
every step, and each thread takes the max over i of ``history[t - 1, i] + trans[i, j]`` for its columns
(K^2 work per step, reading the step's block once, coalesced in j); ``viterbi_finish`` (a thread per
sequence) backtracks and writes the step scores.
"""

from __future__ import annotations

from numba import cuda

from .block import MAX_THREADS, Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    ZERO = blk.ZERO
    NEG_INF = blk.NEG_INF
    nbtype = blk.nbtype
    position_shifts = blk.position_shifts
    path_increments = blk.path_increments
    backtrace = blk.backtrace
    fairseq_step_scores = blk.fairseq_step_scores
    step_barrier = blk.step_barrier
    exchange_load = blk.exchange_load
    family = Family()

    @family.kernel((t.f3, t.i1, t.f2, t.f2, t.f3))
    def viterbi_start(scores, lengths, shift, cum_shift, history):
        """A block per sequence b: shift[b, t] = max_k scores[b, t, k], cum_shift their running sum, and
        history[b, 0] = scores[b, 0] - shift[b, 0]."""
        b = cuda.blockIdx.x
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        position_shifts(scores, b, lengths[b], shift[b], cum_shift[b], scratch)
        cuda.syncthreads()
        for j in range(cuda.threadIdx.x, scores.shape[2], cuda.blockDim.x):
            history[b, 0, j] = scores[b, 0, j] - shift[b, 0]

    @family.kernel((t.f4, t.int64, t.f3, t.f2, t.i1, t.int64, t.f3, t.int32[:, :, ::1]))
    def viterbi_steps(trans, t0, scores, shift, lengths, split, history, back):
        """Steps t = t0 + s of the chunk trans (B, S, K, K): history[b, t, j] = max_i (history[b, t - 1, i] +
        trans[b, s, i, j]) + scores[b, t, j] - shift[b, t] and back[b, t, j] its argmax (ties to the lowest
        i, as on the CPU). Block g serves column part g % split of sequences g // split, + groups, ...;
        dynamic shared memory: K values."""
        B, S, K, _ = trans.shape
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        part = cuda.blockIdx.x % split
        groups = cuda.gridDim.x // split
        width = (K + split - 1) // split
        first_col = part * width
        last_col = min(K, first_col + width)
        prev = cuda.shared.array(0, nbtype)
        for first in range(0, B, groups):
            b = first + cuda.blockIdx.x // split
            length = lengths[b] if b < B else 0
            for s in range(S):
                step = t0 + s
                if step < length:
                    for i in range(tid, K, threads):
                        prev[i] = exchange_load(history, b, step - 1, i)
                    cuda.syncthreads()
                    for j in range(first_col + tid, last_col, threads):
                        best = NEG_INF
                        arg = -1
                        for i in range(K):
                            cand = prev[i] + trans[b, s, i, j]
                            if cand > best or arg < 0:
                                best = cand
                                arg = i
                        history[b, step, j] = best + (scores[b, step, j] - shift[b, step])
                        back[b, step, j] = arg
                step_barrier(split)

    @family.kernel(t.beam + (t.boolean, t.f2, t.f3, t.int32[:, :, ::1], t.i2, t.i2, t.f1, t.f2), threads=64)
    def viterbi_finish(
        scores,
        tokens,
        E1,
        E2,
        lengths,
        fairseq_steps,
        cum_shift,
        history,
        back,
        out_beam_idx,
        out_tokens,
        out_score,
        out_step_scores,
    ):
        """A thread per sequence: the backtrace, the path's score and its step scores (``cpu/decode.py``'s
        rule), PAD and zero step scores after the length."""
        b = cuda.grid(1)
        if b >= scores.shape[0]:
            return
        T = scores.shape[1]
        length = lengths[b]
        last = history[b, length - 1]
        y = backtrace(last, back[b, 1:], tokens[b], length, out_beam_idx[b], out_tokens[b])
        score = last[y] + cum_shift[b, length - 1]
        out_score[b] = score
        if fairseq_steps:
            fairseq_step_scores(history[b], cum_shift[b], out_beam_idx[b], length, score, out_step_scores[b])
        else:
            path_increments(scores[b], tokens[b], E1, E2, out_beam_idx[b], length, out_step_scores[b])
        for step in range(length, T):
            out_step_scores[b, step] = ZERO

    return family
