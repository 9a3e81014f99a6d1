"""GPU exact inference (docs/design.md §4): forward pass, backward sampling (FFBS), backward pass
(marginals and table gradients), path scores and path gradients."""

from __future__ import annotations

import math

from numba import cuda, int64

from ... import _portable
from .block import MAX_D, MAX_THREADS, PAD, Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    ZERO = blk.ZERO
    ONE = blk.ONE
    NEG_INF = blk.NEG_INF
    nbtype = blk.nbtype
    draw_pair = blk.draw_pair
    block_max = blk.block_max
    block_sum = blk.block_sum
    strided_max = blk.strided_max
    block_pick = blk.block_pick
    stage_rows = blk.stage_rows
    dot_tile = blk.dot_tile
    load_own = blk.load_own
    compensated_add = blk.compensated_add
    online_logsumexp = blk.online_logsumexp
    family = Family()

    # ---------------------------------------------------------------------------------------------
    # exact inference: forward, FFBS, backward
    # ---------------------------------------------------------------------------------------------
    @family.kernel(t.beam + (t.f, t.int64, t.f1, t.f3, t.f3, t.f3))
    @cuda.jit
    def forward_kernel(scores, tokens, E1, E2, lengths, inv_temp, tile_rows, out_log_z, alpha, col_max, col_sum):
        """One block per sequence: ``cpu/crf.py``'s forward_kernel alpha, col_max, col_sum (B, T, K) and
        log Z_tau. Each column's log-sum-exp is one online pass (running maximum, rescaled sum); the
        removed maxima are added with compensation (float32 keeps about float64's precision there)."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        K = scores.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        prev = shared[:K]
        tile = shared[K:]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        shift = strided_max(scores[b, 0], K, scratch)
        for j in range(tid, K, threads):
            prev[j] = (scores[b, 0, j] - shift) * inv_temp
            alpha[b, 0, j] = prev[j]
        log_norm = shift * inv_temp
        error = ZERO
        for t in range(1, length):
            shift = strided_max(scores[b, t], K, scratch)
            top = NEG_INF
            for base in range(0, K, threads):
                j = base + tid
                m = NEG_INF
                total = ZERO
                if j < K:
                    load_own(own, E2, tokens[b, t, j], D)
                for start in range(0, K, tile_rows):
                    rows = min(tile_rows, K - start)
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if j < K:
                        for r in range(rows):
                            a = prev[start + r]
                            if a != NEG_INF:
                                m, total = online_logsumexp(m, total, a + dot_tile(tile, r, own, D) * inv_temp, ONE)
                if j < K:
                    col_max[b, t, j] = m
                    col_sum[b, t, j] = total
                    value = m + math.log(total) + (scores[b, t, j] - shift) * inv_temp
                    alpha[b, t, j] = value
                    top = max(top, value)
            top = block_max(top, scratch)
            for j in range(tid, K, threads):
                prev[j] = alpha[b, t, j] - top
                alpha[b, t, j] = prev[j]
            log_norm, error = compensated_add(log_norm, error, top + shift * inv_temp)
            cuda.syncthreads()
        partial = ZERO
        for j in range(tid, K, threads):
            partial += math.exp(prev[j])
        total = block_sum(partial, scratch)
        if tid == 0:
            out_log_z[b] = log_norm + (math.log(total) - error)

    @family.kernel(t.beam + (t.f, t.f1, t.f3, t.int64, t.int64, t.f3, t.boolean, t.i3, t.i3, t.f2))
    @cuda.jit
    def sample_kernel(
        scores,
        tokens,
        E1,
        E2,
        lengths,
        inv_temp,
        log_z,
        alpha,
        seed_lo,
        seed_hi,
        uniforms,
        use_uniforms,
        out_beam_idx,
        out_tokens,
        out_log_prob,
    ):
        """One block per (sequence b, sample n): backward sampling from ``forward_kernel``'s alpha
        (``cpu/crf.py``'s counterpart); log_prob = S(y) * inv_temp - log Z_tau."""
        B, T, K = scores.shape
        N = out_beam_idx.shape[2]
        D = E1.shape[1]
        chain = cuda.blockIdx.x
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        logits = shared[:K]
        weights = shared[K : 2 * K]
        row = shared[2 * K : 2 * K + D]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        int_scratch = cuda.shared.array(MAX_THREADS, int64)
        if use_uniforms:
            u = uniforms[b, length - 1, n]
        else:
            u, _ = draw_pair(seed_lo, seed_hi, _portable.STREAM_EXACT_SAMPLER, b, length - 1, 0, n)
        for i in range(tid, K, threads):
            logits[i] = alpha[b, length - 1, i]
        cuda.syncthreads()
        y = block_pick(logits, weights, K, u, scratch, int_scratch)
        path_score = scores[b, length - 1, y]
        error = ZERO
        for t in range(length - 1, 0, -1):
            if tid == 0:
                out_beam_idx[b, t, n] = y
            for d in range(tid, D, threads):
                row[d] = E2[tokens[b, t, y], d]
            cuda.syncthreads()
            for i in range(tid, K, threads):
                src = tokens[b, t - 1, i]
                dot = ZERO
                for d in range(D):
                    dot += E1[src, d] * row[d]
                logits[i] = alpha[b, t - 1, i] + dot * inv_temp
            cuda.syncthreads()
            if use_uniforms:
                u = uniforms[b, t - 1, n]
            else:
                u, _ = draw_pair(seed_lo, seed_hi, _portable.STREAM_EXACT_SAMPLER, b, t - 1, 0, n)
            y = block_pick(logits, weights, K, u, scratch, int_scratch)
            src = tokens[b, t - 1, y]
            dot = ZERO
            for d in range(D):
                dot += E1[src, d] * row[d]
            path_score, error = compensated_add(path_score, error, dot + scores[b, t - 1, y])
            cuda.syncthreads()
        if tid == 0:
            out_beam_idx[b, 0, n] = y
            out_log_prob[b, n] = path_score * inv_temp - log_z[b]
        cuda.syncthreads()
        for t in range(tid, T, threads):
            if t < length:
                out_tokens[b, t, n] = tokens[b, t, out_beam_idx[b, t, n]]
            else:
                out_beam_idx[b, t, n] = PAD
                out_tokens[b, t, n] = PAD

    @family.kernel((t.i3, t.f2, t.f2, t.i1, t.f, t.f3, t.f3, t.f3, t.int64, t.f1, t.boolean, t.f3, t.f2, t.f2))
    @cuda.jit
    def backward_kernel(
        tokens,
        E1,
        E2,
        lengths,
        inv_temp,
        alpha,
        col_max,
        col_sum,
        tile_rows,
        row_scale,
        want_rows,
        out_marginals,
        grad_E1,
        grad_E2,
    ):
        """One block per sequence: node marginals and, with ``want_rows``, row_scale[b] times the
        (table-row) gradient of tau * log Z_tau added atomically into grad_E1/grad_E2 (V, D).

        xi[i, j] = exp(alpha[t-1, i] + trans[i, j] * inv_temp - col_max[t, j]) * mu_t[j] / col_sum[t, j]
        (as in ``cpu/crf.py``). Pass 1, a thread per predecessor i: mu_{t-1}[i] = sum_j xi
        and the E1-row gradient sum_j xi E2[tok[t, j]]; pass 2, a thread per j: the E2-row gradient
        sum_i xi E1[tok[t-1, i]]. Both recompute trans from tiles of factor rows.
        """
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T = tokens.shape[1]
        K = tokens.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        scale = row_scale[b]
        shared = cuda.shared.array(0, nbtype)
        ratio = shared[:K]
        prev = shared[K : 2 * K]
        top = shared[2 * K : 3 * K]
        tile = shared[3 * K :]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        acc = cuda.local.array(MAX_D, nbtype)
        mu = out_marginals[b]
        partial = ZERO
        for j in range(tid, K, threads):
            partial += math.exp(alpha[b, length - 1, j])
        total = block_sum(partial, scratch)
        for j in range(tid, K, threads):
            mu[length - 1, j] = math.exp(alpha[b, length - 1, j]) / total
        for t in range(length, T):
            for j in range(tid, K, threads):
                mu[t, j] = ZERO
        for t in range(length - 1, 0, -1):
            cuda.syncthreads()
            for j in range(tid, K, threads):
                ratio[j] = mu[t, j] / col_sum[b, t, j]
                top[j] = col_max[b, t, j]
                prev[j] = alpha[b, t - 1, j]
            for side in range(2 if want_rows else 1):
                # side 0: thread per i over tiles of E2 rows; side 1: thread per j over tiles of E1 rows
                for base in range(0, K, threads):
                    mine = base + tid
                    row_sum = ZERO
                    if mine < K:
                        if side == 0:
                            load_own(own, E1, tokens[b, t - 1, mine], D)
                        else:
                            load_own(own, E2, tokens[b, t, mine], D)
                        for d in range(D):
                            acc[d] = ZERO
                    for start in range(0, K, tile_rows):
                        rows = min(tile_rows, K - start)
                        if side == 0:
                            stage_rows(tile, E2, tokens[b, t], start, rows, D)
                        else:
                            stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                        if mine < K:
                            for r in range(rows):
                                other = start + r
                                i = mine if side == 0 else other
                                j = other if side == 0 else mine
                                if prev[i] != NEG_INF:
                                    x = math.exp(prev[i] + dot_tile(tile, r, own, D) * inv_temp - top[j]) * ratio[j]
                                    row_sum += x
                                    if want_rows:
                                        for d in range(D):
                                            acc[d] += x * tile[r * D + d]
                    if mine < K:
                        if side == 0:
                            mu[t - 1, mine] = row_sum
                        if want_rows:
                            target = grad_E1 if side == 0 else grad_E2
                            token = tokens[b, t - 1, mine] if side == 0 else tokens[b, t, mine]
                            for d in range(D):
                                cuda.atomic.add(target, (token, d), scale * acc[d])

    @family.kernel((t.i3, t.i3, t.i1, t.f2, t.f2, t.f2, t.f3, t.f2, t.f2))
    @cuda.jit
    def add_paths(beam_idx, tokens, lengths, scale, E1, E2, grad_scores, grad_E1, grad_E2):
        """A thread per (b, n): grad_scores[b, t, y_t] += scale[b, n] and the table rows of scale[b, n] * S(y)
        (``cpu/crf.py``'s ``add_path_rows`` plus the slot gradient), atomically."""
        B, T, N = beam_idx.shape
        D = E1.shape[1]
        chain = cuda.grid(1)
        if chain >= B * N:
            return
        b = chain // N
        n = chain - b * N
        s = scale[b, n]
        for t in range(lengths[b]):
            cuda.atomic.add(grad_scores, (b, t, beam_idx[b, t, n]), s)
            if t > 0:
                u = tokens[b, t - 1, beam_idx[b, t - 1, n]]
                v = tokens[b, t, beam_idx[b, t, n]]
                for d in range(D):
                    cuda.atomic.add(grad_E1, (u, d), s * E2[v, d])
                    cuda.atomic.add(grad_E2, (v, d), s * E1[u, d])

    @family.kernel(t.beam + (t.i3, t.f2))
    @cuda.jit
    def sequence_score_kernel(scores, tokens, E1, E2, lengths, beam_idx, out_score):
        """A thread per (b, n): out_score[b, n] = S(y) for the beam path beam_idx[b, :, n] (compensated sum)."""
        B, T, N = beam_idx.shape
        D = E1.shape[1]
        chain = cuda.grid(1)
        if chain >= B * N:
            return
        b = chain // N
        n = chain - b * N
        y = beam_idx[b, 0, n]
        total = scores[b, 0, y]
        error = ZERO
        for t in range(1, lengths[b]):
            x = y
            y = beam_idx[b, t, n]
            src = tokens[b, t - 1, x]
            dst = tokens[b, t, y]
            dot = ZERO
            for d in range(D):
                dot += E1[src, d] * E2[dst, d]
            total, error = compensated_add(total, error, dot + scores[b, t, y])
        out_score[b, n] = total

    return family
