"""GPU stochastic Viterbi (the write-up's sampler, docs/design.md §3) on precomputed transition blocks, and
its backward pass (one block per (sequence, sample) chain)."""

from __future__ import annotations

import math

from numba import cuda, int32, uint32

from ... import _portable
from .block import MAX_THREADS, Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    ZERO = blk.ZERO
    NEG_INF = blk.NEG_INF
    nbtype = blk.nbtype
    draw_pair = blk.draw_pair
    block_sum = blk.block_sum
    position_shifts = blk.position_shifts
    step_barrier = blk.step_barrier
    exchange_load4 = blk.exchange_load4
    split_span = blk.split_span
    fast_exp = blk.fast_exp
    backtrace = blk.backtrace
    family = Family()

    # ---------------------------------------------------------------------------------------------
    # the write-up's stochastic Viterbi: start, the steps of each chunk of transitions, finish, normalise
    # ---------------------------------------------------------------------------------------------
    @family.kernel((t.f3, t.i1, t.f2, t.f2, t.f4, t.f4))
    def chains_start(scores, lengths, shift, cum_shift, out_beam_probs, out_path_scores):
        """A block per sequence b: the emission shifts and their running sums (as ``viterbi_start``), and
        step 0 of every chain: beam_probs[b, 0, j, n] holds the shifted score scores[b, 0, j] - shift[b, 0]
        (``chains_normalise`` turns each column into probabilities at the end), path_scores the score."""
        b = cuda.blockIdx.x
        K = scores.shape[2]
        N = out_beam_probs.shape[3]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        position_shifts(scores, b, lengths[b], shift[b], cum_shift[b], scratch)
        cuda.syncthreads()
        for e in range(cuda.threadIdx.x, K * N, cuda.blockDim.x):
            j = e // N
            n = e - j * N
            out_beam_probs[b, 0, j, n] = scores[b, 0, j] - shift[b, 0]
            out_path_scores[b, 0, j, n] = scores[b, 0, j]

    @family.kernel(
        (t.f1, t.int64, t.int64, t.f3, t.f2, t.f2, t.i1, t.f, t.int64, t.int64, t.f4, t.boolean, t.int64, t.int64)
        + (t.f4, t.f4, t.i4)
    )
    def chains_steps(
        trans,
        chunk,
        t0,
        scores,
        shift,
        cum_shift,
        lengths,
        inv_temp,
        seed_lo,
        seed_hi,
        uniforms,
        use_uniforms,
        split,
        chains_per_block,
        out_beam_probs,
        out_path_scores,
        out_backpointers,
    ):
        """Steps t = t0 + s of a chunk of transition blocks (``trans``: (B, chunk, K, K) flattened) for every chain (docs/design.md §3): the
        predecessor of state j in chain n is drawn from softmax_i((prev[i, n] + trans[i, j]) * inv_temp)
        with the uniform U[b, t - 1, j, n], in three passes over i (the maximum, the total, the running sum
        up to the crossing: cheaper per entry than an online pass, which rescales). A block serves ``chains_per_block`` chains of one sequence and
        one of ``split`` parts of its columns; its threads run over (j, n) pairs with n fastest, so the
        lanes of a warp share trans[i, j] and store consecutive entries. The chains' previous scores are
        staged in shared memory (K * chains_per_block values); blocks meet at a grid barrier after every
        step (``viterbi_steps``)."""
        B, T, K = scores.shape
        N = out_beam_probs.shape[3]
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        NC = chains_per_block
        chain_groups = (N + NC - 1) // NC
        units, first_col, last_col = split_span(K, split)
        stop = uint32(K)
        stride = uint32(K)  # a chunk holds fewer than 2**32 values (TRANSITIONS_BUDGET)
        chains_stride = uint32(NC)
        prev = cuda.shared.array(0, nbtype)
        for first in range(0, B * chain_groups, units):
            unit = first + cuda.blockIdx.x // split
            b = unit // chain_groups
            n0 = (unit - b * chain_groups) * NC
            length = lengths[b] if b < B else 0
            for s in range(min(chunk, T - t0)):
                step = t0 + s
                if step < length:
                    for e in range(tid, K * NC, threads):
                        i = e // NC
                        n = n0 + e - i * NC
                        prev[e] = exchange_load4(out_beam_probs, b, step - 1, i, n) if n < N else ZERO
                    cuda.syncthreads()
                    emission_shift = shift[b, step]
                    for e in range(tid, (last_col - first_col) * NC, threads):
                        j = first_col + e // NC
                        c = e % NC
                        n = n0 + c
                        if n < N:
                            column = uint32((b * chunk + s) * K * K + j)
                            offset = column
                            m = NEG_INF
                            i = uint32(0)
                            slot = uint32(c)
                            while i < stop:  # pass 1: the maximum
                                m = max(m, prev[slot] + trans[offset])
                                offset += stride
                                slot += chains_stride
                                i += uint32(1)
                            total = ZERO
                            if m != NEG_INF:
                                offset = column
                                i = uint32(0)
                                slot = uint32(c)
                                while i < stop:  # pass 2: the total
                                    total += fast_exp((prev[slot] + trans[offset] - m) * inv_temp)
                                    offset += stride
                                    slot += chains_stride
                                    i += uint32(1)
                            if use_uniforms:
                                u = uniforms[b, step - 1, j, n]
                            else:
                                u0, u1 = draw_pair(
                                    seed_lo, seed_hi, _portable.STREAM_STOCHASTIC_VITERBI, b, step - 1, j // 2, n
                                )
                                u = u0 if j % 2 == 0 else u1
                            target = u * total
                            running = ZERO
                            pick = int32(-1)
                            last = int32(0)
                            picked = ZERO
                            offset = column
                            i = uint32(0)
                            slot = uint32(c)
                            while i < stop:  # pass 3: running sum to the crossing
                                x = prev[slot] + trans[offset]
                                w = fast_exp((x - m) * inv_temp)
                                running += w
                                if w > ZERO:
                                    last = int32(i)
                                    picked = x
                                if target < running:
                                    pick = int32(i)
                                    picked = x
                                    break
                                offset += stride
                                slot += chains_stride
                                i += uint32(1)
                            if pick < 0:  # rounding left no crossing: the last slot with a positive weight
                                pick = last
                            new = picked + (scores[b, step, j] - emission_shift)
                            out_beam_probs[b, step, j, n] = new
                            out_path_scores[b, step, j, n] = new + cum_shift[b, step]
                            out_backpointers[b, step - 1, j, n] = pick
                step_barrier(split)

    @family.kernel((t.i3, t.i1, t.f2, t.f4, t.i4, t.i3, t.i3, t.f2), threads=64)
    def chains_finish(tokens, lengths, cum_shift, beam_probs, backpointers, out_beam_idx, out_tokens, out_score):
        """A thread per chain (b, n), before ``chains_normalise``: the backtrace from the best final state
        of beam_probs[b, length - 1, :, n] (still the shifted scores) and the path's score."""
        B, T, K, N = beam_probs.shape
        chain = cuda.grid(1)
        if chain >= B * N:
            return
        b = chain // N
        n = chain - b * N
        length = lengths[b]
        last = beam_probs[b, length - 1, :, n]
        y = backtrace(last, backpointers[b, :, :, n], tokens[b], length, out_beam_idx[b, :, n], out_tokens[b, :, n])
        out_score[b, n] = last[y] + cum_shift[b, length - 1]

    @family.kernel((t.i1, t.f4, t.f4, t.i4), threads=64)
    def chains_normalise(lengths, beam_probs, path_scores, backpointers):
        """A thread per column (b, t, n), after ``chains_finish``: beam_probs[b, t, :, n] becomes the
        softmax of the shifted scores it holds (zero at and after the length, where path_scores repeats
        the last position's and the backpointers are the identity)."""
        B, T, K, N = beam_probs.shape
        column = cuda.grid(1)
        if column >= B * T * N:
            return
        b = column // (T * N)
        rest = column - b * T * N
        step = rest // N
        n = rest - step * N
        length = lengths[b]
        if step < length:
            m = NEG_INF
            for j in range(K):
                m = max(m, beam_probs[b, step, j, n])
            total = ZERO
            for j in range(K):
                total += math.exp(beam_probs[b, step, j, n] - m)
            for j in range(K):
                beam_probs[b, step, j, n] = math.exp(beam_probs[b, step, j, n] - m) / total
        else:
            for j in range(K):
                beam_probs[b, step, j, n] = ZERO
                path_scores[b, step, j, n] = path_scores[b, length - 1, j, n]
                backpointers[b, step - 1, j, n] = j

    @family.kernel((t.f4, t.i4, t.i1, t.f4, t.f3, t.f4))
    def stochastic_viterbi_backward_kernel(
        beam_probs, backpointers, lengths, grad_beam_probs, out_grad_scores, out_weights
    ):
        """One block per (sequence b, chain n): the write-up autograd's gradient (``cpu/decode.py``'s
        counterpart) through the chain: added atomically into out_grad_scores (B, T, K), zeroed before, and
        the weight a of each sampled edge (backpointers[b, t - 1, j, n] -> j) in out_weights[b, t, j, n]
        (t >= 1), which ``chain_edges`` and ``crf.xi_products`` turn into the table gradients."""
        B, T, K, N = beam_probs.shape
        chain = cuda.blockIdx.x
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        upstream = shared[:K]
        incoming = shared[K : 2 * K]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        for j in range(tid, K, threads):
            upstream[j] = ZERO
        cuda.syncthreads()
        for t in range(length - 1, -1, -1):
            partial = ZERO
            for k in range(tid, K, threads):
                partial += beam_probs[b, t, k, n] * grad_beam_probs[b, t, k, n]
            inner = block_sum(partial, scratch)
            for k in range(tid, K, threads):
                p = beam_probs[b, t, k, n]
                upstream[k] += p * (grad_beam_probs[b, t, k, n] - inner)
                cuda.atomic.add(out_grad_scores, (b, t, k), upstream[k])
                incoming[k] = ZERO
            cuda.syncthreads()
            if t == 0:
                break
            for j in range(tid, K, threads):
                a = upstream[j]
                out_weights[b, t, j, n] = a
                if a != ZERO:
                    cuda.atomic.add(incoming, backpointers[b, t - 1, j, n], a)
            cuda.syncthreads()
            for j in range(tid, K, threads):
                upstream[j] = incoming[j]
            cuda.syncthreads()

    @family.kernel((t.f4, t.i4, t.i1, t.int64, t.int64, t.f1))
    def chain_edges(weights, backpointers, lengths, chunk, t0, edges):
        """edges (B, chunk, K, K) flattened, zeroed before: edges[b, s, i, j] = the sum over chains n whose
        backpointers[b, t - 1, j, n] is i of weights[b, t, j, n] at t = t0 + s (a grid-stride loop over
        (b, s, j, n), atomic adds)."""
        B, T, K, N = weights.shape
        total = B * chunk * K * N
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            n = e % N
            rest = e // N
            j = rest % K
            rest //= K
            s = rest % chunk
            b = rest // chunk
            step = t0 + s
            if step < lengths[b]:
                a = weights[b, step, j, n]
                if a != ZERO:
                    i = backpointers[b, step - 1, j, n]
                    cuda.atomic.add(edges, ((b * chunk + s) * K + i) * K + j, a)

    return family
