"""GPU Viterbi (``cpu/decode.py``'s counterpart) on precomputed transition blocks.

``viterbi_start`` (a block per sequence) finds each position's emission shift and writes step 0;
``viterbi_steps`` runs the steps of one chunk of transition blocks (``transitions.py``): the K columns of
a sequence are split over ``split`` blocks of a cooperative grid, which meet at a grid barrier after
every step, and each thread takes the max over i of ``history[t - 1, i] + trans[i, j]`` for its columns
(K^2 work per step, reading the step's block once, coalesced in j); ``viterbi_finish`` (a thread per
sequence) backtracks and writes the step scores.
"""

from __future__ import annotations

from numba import cuda, int32, uint32

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
    split_span = blk.split_span
    predecessor_share = blk.predecessor_share
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

    @family.kernel((t.f1, t.int64, t.int64, t.f3, t.f2, t.i1, t.int64, t.int64, t.f3, t.int32[:, :, ::1]))
    def viterbi_steps(trans, chunk, t0, scores, shift, lengths, split, parts, history, back):
        """Steps t = t0 + s of a chunk of transition blocks (``trans``: (B, chunk, K, K) flattened):
        history[b, t, j] = max_i (history[b, t - 1, i] + trans[b, s, i, j]) + scores[b, t, j] - shift[b, t]
        and back[b, t, j] its argmax (ties to the lowest i, as on the CPU).

        Block g serves column part g % split of sequences g // split, + groups, ... A column's K
        predecessors are split over ``parts`` threads (a warp reads consecutive columns of one row i),
        whose partial maxima meet in shared memory in the order of i. Dynamic shared memory: K values.
        """
        B, T, K = scores.shape
        tid = cuda.threadIdx.x
        groups, first_col, last_col = split_span(K, split)
        lanes, lane, mine, low, high = predecessor_share(K, parts)
        stop = uint32(high)
        stride = uint32(K)  # a chunk holds fewer than 2**32 values (TRANSITIONS_BUDGET)
        prev = cuda.shared.array(0, nbtype)
        part_best = cuda.shared.array(MAX_THREADS, nbtype)
        part_arg = cuda.shared.array(MAX_THREADS, int32)
        steps = min(chunk, T - t0)
        for first in range(0, B, groups):
            b = first + cuda.blockIdx.x // split
            length = lengths[b] if b < B else 0
            for s in range(steps):
                step = t0 + s
                if step < length:
                    for i in range(tid, K, cuda.blockDim.x):
                        prev[i] = exchange_load(history, b, step - 1, i)
                    cuda.syncthreads()
                    row0 = uint32((b * chunk + s) * K * K)
                    for base in range(first_col, last_col, lanes):
                        j = base + lane
                        best = NEG_INF
                        arg = int32(-1)
                        if j < last_col and low < high:
                            offset = row0 + uint32(low * K + j)
                            best = prev[low] + trans[offset]
                            arg = int32(low)
                            i = uint32(low + 1)
                            while i < stop:  # unsigned 32-bit counters: no wraparound code per access
                                offset += stride
                                cand = prev[i] + trans[offset]
                                if cand > best:
                                    best = cand
                                    arg = int32(i)
                                i += uint32(1)
                        part_best[tid] = best
                        part_arg[tid] = arg
                        cuda.syncthreads()
                        if mine == 0 and j < last_col:
                            for q in range(1, parts):  # in order of i: a later part wins only when above
                                other = part_arg[q * lanes + lane]
                                if other >= 0 and part_best[q * lanes + lane] > best:
                                    best = part_best[q * lanes + lane]
                                    arg = other
                            history[b, step, j] = best + (scores[b, step, j] - shift[b, step])
                            back[b, step, j] = arg
                        cuda.syncthreads()
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
