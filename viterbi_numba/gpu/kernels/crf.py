"""GPU exact inference (docs/design.md §4): forward pass, backward sampling (FFBS), backward pass
(marginals and table gradients), path scores and path gradients."""

from __future__ import annotations

import math

from numba import cuda, int64, uint32

from ... import _portable
from .block import MAX_THREADS, PAD, Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    ZERO = blk.ZERO
    NEG_INF = blk.NEG_INF
    nbtype = blk.nbtype
    draw_pair = blk.draw_pair
    block_sum = blk.block_sum
    strided_max = blk.strided_max
    block_pick = blk.block_pick
    stage_rows = blk.stage_rows
    dot_tile = blk.dot_tile
    load_own = blk.load_own
    dot_row = blk.dot_row
    RANK = blk.RANK
    compensated_add = blk.compensated_add
    fast_exp = blk.fast_exp
    step_barrier = blk.step_barrier
    exchange_load = blk.exchange_load
    family = Family()

    # ---------------------------------------------------------------------------------------------
    # exact inference: forward, FFBS, backward
    # ---------------------------------------------------------------------------------------------
    @family.kernel((t.f3, t.i1, t.f, t.f2, t.f3, t.f2))
    def forward_start(scores, lengths, inv_temp, shift, raw, norm):
        """A block per sequence b: shift[b, t] = max_k scores[b, t, k], raw[b, 0] = (scores[b, 0] -
        shift[b, 0]) * inv_temp and norm[b] = (shift[b, 0] * inv_temp, 0), the log normaliser so far and
        its compensation."""
        b = cuda.blockIdx.x
        T = scores.shape[1]
        K = scores.shape[2]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        for step in range(min(lengths[b], T)):
            m = strided_max(scores[b, step], K, scratch)
            if cuda.threadIdx.x == 0:
                shift[b, step] = m
        cuda.syncthreads()
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            raw[b, 0, j] = (scores[b, 0, j] - shift[b, 0]) * inv_temp
        if cuda.threadIdx.x == 0:
            norm[b, 0] = shift[b, 0] * inv_temp
            norm[b, 1] = ZERO

    @cuda.jit(device=True)
    def normalise_step(raw, b, step, inv_temp, shift, prev, scratch, norm, owner):
        """prev[:] = raw[b, step] - top (top = its max, every block of the sequence finds the same), and
        the owner block adds top + shift[b, step] * inv_temp (step > 0) to the log normaliser norm[b]."""
        K = raw.shape[2]
        tid = cuda.threadIdx.x
        for i in range(tid, K, cuda.blockDim.x):
            prev[i] = exchange_load(raw, b, step, i)
        cuda.syncthreads()
        top = strided_max(prev, K, scratch)
        for i in range(tid, K, cuda.blockDim.x):
            prev[i] -= top
        cuda.syncthreads()
        if owner and tid == 0:
            add = top + shift[b, step] * inv_temp if step > 0 else top
            total, error = compensated_add(norm[b, 0], norm[b, 1], add)
            norm[b, 0] = total
            norm[b, 1] = error

    @family.kernel((t.f1, t.int64, t.int64, t.f3, t.f2, t.i1, t.f, t.int64, t.int64) + (t.f3, t.f3, t.f3, t.f3, t.f2))
    def forward_steps(
        trans, chunk, t0, scores, shift, lengths, inv_temp, split, parts, raw, alpha, col_max, col_sum, norm
    ):
        """Steps t = t0 + s of a chunk of transition blocks (``trans``: (B, chunk, K, K) flattened;
        ``cpu/crf.py``'s forward_kernel): the step's predecessors alpha[b, t - 1] = raw[b, t - 1] - max
        (written by the block that owns each column), then for each column j one online log-sum-exp over i
        of alpha[b, t - 1, i] + trans[i, j] * inv_temp (its maximum col_max and rescaled sum col_sum, kept
        for the backward pass) and raw[b, t, j]. Columns are split over ``split`` blocks and each column's
        predecessors over ``parts`` threads, as in ``viterbi_steps``; dynamic shared memory: K values."""
        B, T, K = scores.shape
        tid = cuda.threadIdx.x
        part = cuda.blockIdx.x % split
        groups = cuda.gridDim.x // split
        width = (K + split - 1) // split
        first_col = part * width
        last_col = min(K, first_col + width)
        lanes = cuda.blockDim.x // parts
        piece = (K + parts - 1) // parts
        lane = tid % lanes
        mine = tid // lanes
        low = min(K, mine * piece)
        high = min(K, low + piece)
        stop = uint32(high)
        stride = uint32(K)  # a chunk holds fewer than 2**32 values (TRANSITIONS_BUDGET)
        prev = cuda.shared.array(0, nbtype)
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        part_max = cuda.shared.array(MAX_THREADS, nbtype)
        part_sum = cuda.shared.array(MAX_THREADS, nbtype)
        steps = min(chunk, T - t0)
        for first in range(0, B, groups):
            b = first + cuda.blockIdx.x // split
            length = lengths[b] if b < B else 0
            for s in range(steps):
                step = t0 + s
                if step < length:
                    normalise_step(raw, b, step - 1, inv_temp, shift, prev, scratch, norm, part == 0)
                    for j in range(first_col + tid, last_col, cuda.blockDim.x):
                        alpha[b, step - 1, j] = prev[j]
                    row0 = uint32((b * chunk + s) * K * K)
                    for base in range(first_col, last_col, lanes):
                        j = base + lane
                        m = NEG_INF
                        total = ZERO
                        if j < last_col and low < high:
                            # two passes over the part's predecessors (its maximum, then the sum of
                            # exponentials): cheaper per entry than one online pass, which rescales
                            column = row0 + uint32(low * K + j)
                            offset = column
                            i = uint32(low)
                            while i < stop:  # unsigned 32-bit counters: no wraparound code per access
                                m = max(m, prev[i] + trans[offset] * inv_temp)
                                offset += stride
                                i += uint32(1)
                            if m != NEG_INF:
                                offset = column
                                i = uint32(low)
                                while i < stop:
                                    total += fast_exp(prev[i] + trans[offset] * inv_temp - m)
                                    offset += stride
                                    i += uint32(1)
                        part_max[tid] = m
                        part_sum[tid] = total
                        cuda.syncthreads()
                        if mine == 0 and j < last_col:
                            for q in range(1, parts):
                                other = part_max[q * lanes + lane]
                                if other != NEG_INF:  # merge two log-sum-exp partials
                                    if other > m:
                                        total = total * math.exp(m - other) + part_sum[q * lanes + lane]
                                        m = other
                                    else:
                                        total += part_sum[q * lanes + lane] * math.exp(other - m)
                            col_max[b, step, j] = m
                            col_sum[b, step, j] = total
                            raw[b, step, j] = m + math.log(total) + (scores[b, step, j] - shift[b, step]) * inv_temp
                        cuda.syncthreads()
                step_barrier(split)

    @family.kernel((t.i1, t.f, t.f2, t.f3, t.f3, t.f2, t.f1))
    def forward_finish(lengths, inv_temp, shift, raw, alpha, norm, out_log_z):
        """A block per sequence: alpha at the last position and log Z_tau = log normaliser + log sum exp."""
        b = cuda.blockIdx.x
        K = raw.shape[2]
        length = lengths[b]
        prev = cuda.shared.array(0, nbtype)
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        normalise_step(raw, b, length - 1, inv_temp, shift, prev, scratch, norm, True)
        partial = ZERO
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            alpha[b, length - 1, j] = prev[j]
            partial += math.exp(prev[j])
        total = block_sum(partial, scratch)
        if cuda.threadIdx.x == 0:
            out_log_z[b] = norm[b, 0] + (math.log(total) - norm[b, 1])

    @family.kernel(t.beam + (t.f, t.f1, t.f3, t.int64, t.int64, t.f3, t.boolean, t.i3, t.i3, t.f2))
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
        """One block per (sequence b, sample n): backward sampling from the forward pass's alpha
        (``cpu/crf.py``'s counterpart); log_prob = S(y) * inv_temp - log Z_tau."""
        B, T, K = scores.shape
        N = out_beam_idx.shape[2]
        chain = cuda.blockIdx.x
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        logits = shared[:K]
        weights = shared[K : 2 * K]
        row = cuda.local.array(RANK, nbtype)
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
            load_own(row, E2, tokens[b, t, y])
            for i in range(tid, K, threads):
                logits[i] = alpha[b, t - 1, i] + dot_row(E1, tokens[b, t - 1, i], row) * inv_temp
            cuda.syncthreads()
            if use_uniforms:
                u = uniforms[b, t - 1, n]
            else:
                u, _ = draw_pair(seed_lo, seed_hi, _portable.STREAM_EXACT_SAMPLER, b, t - 1, 0, n)
            y = block_pick(logits, weights, K, u, scratch, int_scratch)
            dot = dot_row(E1, tokens[b, t - 1, y], row)
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
        own = cuda.local.array(RANK, nbtype)
        acc = cuda.local.array(RANK, nbtype)
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
                            load_own(own, E1, tokens[b, t - 1, mine])
                        else:
                            load_own(own, E2, tokens[b, t, mine])
                        for d in range(RANK):
                            acc[d] = ZERO
                    for start in range(0, K, tile_rows):
                        rows = min(tile_rows, K - start)
                        if side == 0:
                            stage_rows(tile, E2, tokens[b, t], start, rows)
                        else:
                            stage_rows(tile, E1, tokens[b, t - 1], start, rows)
                        if mine < K:
                            for r in range(rows):
                                other = start + r
                                i = mine if side == 0 else other
                                j = other if side == 0 else mine
                                if prev[i] != NEG_INF:
                                    x = math.exp(prev[i] + dot_tile(tile, r, own) * inv_temp - top[j]) * ratio[j]
                                    row_sum += x
                                    if want_rows:
                                        for d in range(RANK):
                                            acc[d] += x * tile[r * RANK + d]
                    if mine < K:
                        if side == 0:
                            mu[t - 1, mine] = row_sum
                        if want_rows:
                            target = grad_E1 if side == 0 else grad_E2
                            token = tokens[b, t - 1, mine] if side == 0 else tokens[b, t, mine]
                            for d in range(RANK):
                                if d < D:
                                    cuda.atomic.add(target, (token, d), scale * acc[d])

    @family.kernel((t.i3, t.i3, t.i1, t.f2, t.f2, t.f2, t.f3, t.f2, t.f2))
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
