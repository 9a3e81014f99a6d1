"""GPU stochastic Viterbi (the write-up's sampler, docs/design.md §3) and its backward pass: one block
per (sequence, sample) chain."""

from __future__ import annotations

import math

from numba import cuda, int32

from ... import _portable
from .block import MAX_D, MAX_THREADS, Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    ZERO = blk.ZERO
    NEG_INF = blk.NEG_INF
    nbtype = blk.nbtype
    draw_pair = blk.draw_pair
    block_sum = blk.block_sum
    strided_max = blk.strided_max
    stage_rows = blk.stage_rows
    dot_tile = blk.dot_tile
    load_own = blk.load_own
    position_shifts = blk.position_shifts
    online_logsumexp = blk.online_logsumexp
    backtrace = blk.backtrace
    family = Family()

    # ---------------------------------------------------------------------------------------------
    # the write-up's stochastic Viterbi
    # ---------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def softmax_column(values, out, n, scratch):
        """out[:, n] = softmax(values) over the block (values: shared, K)."""
        K = out.shape[0]
        m = strided_max(values, K, scratch)
        partial = ZERO
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            partial += math.exp(values[j] - m)
        total = block_sum(partial, scratch)
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            out[j, n] = math.exp(values[j] - m) / total

    @family.kernel(
        t.beam + (t.f, t.int64, t.int64, t.f4, t.boolean, t.int64, t.f2, t.f2, t.f4, t.i3, t.i3, t.f4, t.i4, t.f2)
    )
    @cuda.jit
    def stochastic_viterbi_kernel(
        scores,
        tokens,
        E1,
        E2,
        lengths,
        inv_temp,
        seed_lo,
        seed_hi,
        uniforms,
        use_uniforms,
        tile_rows,
        shift,
        cum_shift,
        out_beam_probs,
        out_beam_idx,
        out_tokens,
        out_path_scores,
        out_backpointers,
        out_score,
    ):
        """One block per chain (sequence b, sample n = out_beam_idx.shape[2] of them) (docs/design.md §3).

        The sampling step: thread j draws the predecessor of state j from
        softmax_i((prev[i] + trans[i, j]) * inv_temp) with the uniform U[b, t-1, j, n], in two passes over
        tiles of factor rows: an online maximum and total, then the running sum up to the crossing
        (the block stops loading tiles once every thread has found its pick). Transitions are computed
        on the fly, so the chains of a sequence share nothing and run side by side.
        """
        chain = cuda.blockIdx.x
        N = out_beam_idx.shape[2]
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T = scores.shape[1]
        K = scores.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        prev = shared[:K]
        new = shared[K : 2 * K]
        tile = shared[2 * K :]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        position_shifts(scores, b, length, shift[chain], cum_shift[chain], scratch)  # each chain's own copy
        cuda.syncthreads()
        for j in range(tid, K, threads):
            prev[j] = scores[b, 0, j] - shift[chain, 0]
            out_path_scores[b, 0, j, n] = scores[b, 0, j]
        cuda.syncthreads()
        softmax_column(prev, out_beam_probs[b, 0], n, scratch)
        for t in range(1, length):
            emission_shift = shift[chain, t]
            for base in range(0, K, threads):
                j = base + tid
                if j < K:
                    load_own(own, E2, tokens[b, t, j], D)
                m = NEG_INF
                total = ZERO
                for start in range(0, K, tile_rows):  # pass 1: maximum and total, online
                    rows = min(tile_rows, K - start)
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if j < K:
                        for r in range(rows):
                            m, total = online_logsumexp(m, total, prev[start + r] + dot_tile(tile, r, own, D), inv_temp)
                u = ZERO
                if j < K:
                    if use_uniforms:
                        u = uniforms[b, t - 1, j, n]
                    else:
                        u0, u1 = draw_pair(seed_lo, seed_hi, _portable.STREAM_STOCHASTIC_VITERBI, b, t - 1, j // 2, n)
                        u = u0 if j % 2 == 0 else u1
                target = u * total
                running = ZERO
                pick = -1 if j < K else 0
                last = 0
                picked = ZERO
                for start in range(0, K, tile_rows):  # pass 2: running sum to the crossing
                    rows = min(tile_rows, K - start)
                    if cuda.syncthreads_and(int32(1 if pick >= 0 else 0)):
                        break
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if pick < 0:
                        for r in range(rows):
                            x = prev[start + r] + dot_tile(tile, r, own, D)
                            w = math.exp((x - m) * inv_temp)
                            running += w
                            if w > ZERO:
                                last = start + r
                                picked = x
                            if target < running:
                                pick = start + r
                                picked = x
                                break
                if j < K:
                    if pick < 0:  # rounding left no crossing: the last slot with a positive weight
                        pick = last
                    new[j] = picked + (scores[b, t, j] - emission_shift)
                    out_backpointers[b, t - 1, j, n] = pick
            cuda.syncthreads()
            for j in range(tid, K, threads):
                prev[j] = new[j]
                out_path_scores[b, t, j, n] = new[j] + cum_shift[chain, t]
            cuda.syncthreads()
            softmax_column(prev, out_beam_probs[b, t], n, scratch)
        cuda.syncthreads()
        for t in range(length, T):
            for j in range(tid, K, threads):
                out_beam_probs[b, t, j, n] = ZERO
                out_path_scores[b, t, j, n] = prev[j] + cum_shift[chain, t]
                out_backpointers[b, t - 1, j, n] = j
        cuda.syncthreads()
        if tid == 0:
            y = backtrace(
                prev, out_backpointers[b, :, :, n], tokens[b], length, out_beam_idx[b, :, n], out_tokens[b, :, n]
            )
            out_score[b, n] = prev[y] + cum_shift[chain, length - 1]

    @family.kernel((t.f4, t.i4, t.i3, t.f2, t.f2, t.i1, t.f4, t.f3, t.f2, t.f2))
    @cuda.jit
    def stochastic_viterbi_backward_kernel(
        beam_probs, backpointers, tokens, E1, E2, lengths, grad_beam_probs, out_grad_scores, grad_E1, grad_E2
    ):
        """One block per (sequence b, chain n): the write-up autograd's gradient (``cpu/decode.py``'s counterpart),
        added atomically into out_grad_scores (B, T, K) and grad_E1/grad_E2 (V, D), zeroed before."""
        B, T, K, N = beam_probs.shape
        chain = cuda.blockIdx.x
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        D = E1.shape[1]
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
                if a != ZERO:
                    i = backpointers[b, t - 1, j, n]
                    cuda.atomic.add(incoming, i, a)
                    src = tokens[b, t - 1, i]
                    dst = tokens[b, t, j]
                    for d in range(D):
                        cuda.atomic.add(grad_E1, (src, d), a * E2[dst, d])
                        cuda.atomic.add(grad_E2, (dst, d), a * E1[src, d])
            cuda.syncthreads()
            for j in range(tid, K, threads):
                upstream[j] = incoming[j]
            cuda.syncthreads()

    return family
