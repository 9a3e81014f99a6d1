"""GPU Viterbi (``cpu/decode.py``'s counterpart) on precomputed transition blocks.

``viterbi_start`` (a block per sequence) finds each position's emission shift and writes step 0;
``viterbi_steps`` runs the steps of one chunk of transition blocks (``transitions.py``): the K columns of
a sequence are split over ``split`` blocks of a cooperative grid, which meet at a grid barrier after
every step, and each thread takes the max over i of ``history[t - 1, i] + trans[i, j]`` for its columns
(K^2 work per step, reading the step's block once, coalesced in j); ``viterbi_finish`` (a thread per
sequence) backtracks and writes the step scores.

The n best paths (list Viterbi, docs/design.md §4 "N best") run the same way: ``nbest_start``,
``nbest_steps`` on the same chunks and grid, a thread per column keeping its list of n prefixes in the
order of ``_portable.keep_best``, and ``nbest_finish`` (a thread per sequence, ``_portable.nbest_paths``).
The lists are exact and in a total order, so they do not depend on the order predecessors are visited in.
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
    exchange_load4 = blk.exchange_load4
    keep_best = blk.keep_best
    nbest_paths = blk.nbest_paths
    POS_INF = blk.POS_INF
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

    # ---------------------------------------------------------------------------------------------
    # the n best paths
    # ---------------------------------------------------------------------------------------------
    @family.kernel((t.f3, t.i1, t.f2, t.f2, t.f4))
    def nbest_start(scores, lengths, shift, cum_shift, best):
        """A block per sequence b: the emission shifts (as ``viterbi_start``) and position 0's lists,
        best[b, 0, j] = (scores[b, 0, j] - shift[b, 0], -inf, ...)."""
        b = cuda.blockIdx.x
        K = scores.shape[2]
        n = best.shape[3]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        position_shifts(scores, b, lengths[b], shift[b], cum_shift[b], scratch)
        cuda.syncthreads()
        for e in range(cuda.threadIdx.x, K * n, cuda.blockDim.x):
            j = e // n
            best[b, 0, j, e - j * n] = scores[b, 0, j] - shift[b, 0] if e == j * n else NEG_INF

    @family.kernel((t.f1, t.int64, t.int64, t.f3, t.f2, t.i1, t.int64, t.f4, t.int32[:, :, :, ::1]))
    def nbest_steps(trans, chunk, t0, scores, shift, lengths, split, best, from_entry):
        """Steps t = t0 + s of a chunk of transition blocks (``trans``: (B, chunk, K, K) flattened): the
        list best[b, t, j] (n) holds the n best of best[b, t - 1, i, r] + trans[b, s, i, j] over (i, r),
        plus scores[b, t, j] - shift[b, t], in ``keep_best``'s order, with from_entry = i * n + r
        (``cpu/decode.py: _nbest_step``'s lists; a column whose emission is -inf stays empty).

        Block g serves columns as ``viterbi_steps`` does, a thread per column. The thread reads its
        column of the block once (coalesced over j) against the predecessors' best prefixes (shared
        memory, K values) and reads a predecessor's list only where its best prefix reaches the column's
        n-th value; a list's ranks are read while they can still enter. Dynamic shared memory: K values.
        """
        B, T, K = scores.shape
        n = best.shape[3]
        tid = cuda.threadIdx.x
        groups, first_col, last_col = split_span(K, split)
        stride = uint32(K)
        heads = cuda.shared.array(0, nbtype)
        steps = min(chunk, T - t0)
        for first in range(0, B, groups):
            b = first + cuda.blockIdx.x // split
            length = lengths[b] if b < B else 0
            for s in range(steps):
                step = t0 + s
                if step < length:
                    for i in range(tid, K, cuda.blockDim.x):
                        heads[i] = exchange_load4(best, b, step - 1, i, 0)
                    cuda.syncthreads()
                    row0 = uint32((b * chunk + s) * K * K)
                    for j in range(first_col + tid, last_col, cuda.blockDim.x):
                        values = best[b, step, j]
                        entries = from_entry[b, step, j]
                        for r in range(n):
                            values[r] = NEG_INF
                        emission = scores[b, step, j] - shift[b, step]
                        lowest = POS_INF if emission == NEG_INF else NEG_INF  # +inf: nothing enters
                        kept = 0
                        offset = row0 + uint32(j)
                        i = uint32(0)
                        while i < stride:  # unsigned 32-bit counters, as in viterbi_steps
                            transition = trans[offset]
                            offset += stride
                            if heads[i] + transition >= lowest:  # else no rank of i's list enters
                                for r in range(n):
                                    value = exchange_load4(best, b, step - 1, i, r) + transition
                                    if value == NEG_INF or value < lowest:
                                        break
                                    kept, entered = keep_best(values, entries, kept, value, i * n + r)
                                    if not entered:
                                        break  # i's later ranks are no better and come after it
                                    lowest = values[n - 1]
                            i += uint32(1)
                        for r in range(kept):
                            values[r] += emission
                step_barrier(split)

    @family.kernel((t.i3, t.i1, t.f2, t.f4, t.int32[:, :, :, ::1], t.f2, t.i2, t.i3, t.i3, t.f2, t.i1), threads=64)
    def nbest_finish(
        tokens, lengths, cum_shift, best, from_entry, ends, end_entries, out_beam_idx, out_tokens, out_score, out_count
    ):
        """A thread per sequence: the n best of the last position's lists and their backtraces
        (``_portable.nbest_paths``); ``ends`` / ``end_entries`` (B, n) are scratch."""
        b = cuda.grid(1)
        if b >= tokens.shape[0]:
            return
        last = lengths[b] - 1
        out_count[b] = nbest_paths(
            best[b, last],
            from_entry[b],
            tokens[b],
            last + 1,
            cum_shift[b, last],
            ends[b],
            end_entries[b],
            out_beam_idx[b],
            out_tokens[b],
            out_score[b],
        )

    return family
