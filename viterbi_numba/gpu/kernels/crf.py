"""GPU exact inference (docs/design.md §4): forward pass, backward sampling (FFBS), backward pass
(marginals and table gradients), path scores and path gradients."""

from __future__ import annotations

import math
from typing import Any

from numba import config, cuda, float64, int64, uint32

from ... import _portable
from .block import FULL_MASK, MAX_THREADS, PAD, Family

# xi_rows, xi_columns: a block of PRODUCT_EDGE^2 threads computes PRODUCT_TILE output rows x the rank, each thread
# PRODUCT_SUB rows x RANK // PRODUCT_EDGE entries (in the simulator, 2 x 2 threads)
PRODUCT_EDGE = 2 if config.ENABLE_CUDASIM else 16
PRODUCT_THREADS = PRODUCT_EDGE * PRODUCT_EDGE
PRODUCT_SUB = 4
PRODUCT_TILE = PRODUCT_EDGE * PRODUCT_SUB
PRODUCT_STRIDE = PRODUCT_TILE + 1  # one word of padding per staged column keeps the stores conflict-free
PRODUCT_DEPTH = 16  # reduction entries staged per pass
PRODUCT_STAGE = PRODUCT_DEPTH * PRODUCT_STRIDE
ROW_LANES = 2 if config.ENABLE_CUDASIM else 32  # backward_steps: threads sharing a row (a warp)


def product_tiles(K: int) -> int:
    """Blocks of ``xi_products`` per step."""
    return -(-K // PRODUCT_TILE)


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
    dot_row = blk.dot_row
    RANK = blk.RANK
    compensated_add = blk.compensated_add
    fast_exp = blk.fast_exp
    step_barrier = blk.step_barrier
    exchange_load = blk.exchange_load
    split_span = blk.split_span
    predecessor_share = blk.predecessor_share
    gumbel = blk.gumbel
    distinct_uniforms = blk.distinct_uniforms
    expand_node = blk.expand_node
    distinct_sample = blk.distinct_sample
    d2 = float64[:, ::1]
    ROW_STRIDE = RANK + 1
    ROW_STAGE = PRODUCT_DEPTH * ROW_STRIDE
    RANK_SUB = max(1, RANK // PRODUCT_EDGE)  # a thread's entries of an output row
    PRODUCT_OUTPUTS = PRODUCT_SUB * RANK_SUB
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
        groups, first_col, last_col = split_span(K, split)
        lanes, lane, mine, low, high = predecessor_share(K, parts)
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
                    normalise_step(raw, b, step - 1, inv_temp, shift, prev, scratch, norm, first_col == 0)
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
        row = cuda.shared.array(RANK, nbtype)  # the chosen state's E2 row, read by every thread
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
            for d in range(tid, RANK, threads):
                row[d] = E2[tokens[b, t, y], d] if d < E2.shape[1] else ZERO
            cuda.syncthreads()
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

    @family.kernel(
        t.beam
        + (t.f, t.f1, t.f3, t.f3, t.f3, t.int64, t.int64, t.f4, t.boolean, d2, d2, d2, t.i2, d2, t.i2, d2)
        + (d2, d2, t.i2, t.i3, t.i3, t.i3, t.f2, t.f2, t.f1, t.f2, t.i1)
    )
    def distinct_sample_kernel(
        scores,
        tokens,
        E1,
        E2,
        lengths,
        inv_temp,
        log_z,
        alpha,
        col_max,
        col_sum,
        seed_lo,
        seed_hi,
        uniforms,
        use_uniforms,
        logits,
        masses,
        prefix,
        picked,
        kept_G,
        kept_entry,
        child_phi,
        beam_phi,
        beam_G,
        beam_state,
        history,
        out_beam_idx,
        out_tokens,
        out_log_prob,
        out_perturbed,
        out_kappa,
        out_weights,
        out_count,
    ):
        """A block per sequence b: N = out_beam_idx.shape[2] samples without replacement, the stochastic
        beam search of ``cpu/crf.py: distinct_sample_kernel`` (docs/design.md §4) with the same float64
        arithmetic, so that a seed draws the same samples on both targets. Per step, the beam's places in
        order: the threads compute the node's conditional (logits and masses (B, K) float64, a thread per
        state), then thread 0 sums them in order into ``prefix`` and draws the node's children top-down
        into the kept list (``_portable.expand_node``: kept_G, kept_entry (B, M), child_phi (B, M^2),
        picked (B, M)), which needs no reduction. beam_phi / beam_G / beam_state (B, M) hold the beam,
        history (B, T, M) the kept entries (place * K + state) per position.
        """
        B, T, K = scores.shape
        N = out_beam_idx.shape[2]
        M = N + 1
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        length = lengths[b]
        row = cuda.shared.array(RANK, nbtype)  # the node's E2 row, read by every thread
        shared_kept = cuda.shared.array(1, int64)
        draws = (uniforms, use_uniforms, seed_lo, seed_hi)
        if tid == 0:  # the root: no state, phi = 0 and a standard Gumbel (the pick uniform of place 1)
            root, _ = distinct_uniforms(uniforms, use_uniforms, seed_lo, seed_hi, b, length - 1, 1, 0)
            beam_phi[b, 0] = 0.0
            beam_G[b, 0] = gumbel(root)
        cuda.syncthreads()
        size = 1
        for t in range(length - 1, -1, -1):
            kept = 0
            for m in range(size):
                if kept == M and beam_G[b, m] < kept_G[b, M - 1]:
                    break  # the beam is ordered by G, and a node's children have smaller G
                shift = 0.0  # the root's conditional is softmax(alpha[L-1]), whose terms are at most 1
                if t < length - 1:  # the forward pass's column of the node's state normalises it
                    y = beam_state[b, m]
                    shift = float64(col_max[b, t + 1, y]) + math.log(float64(col_sum[b, t + 1, y]))
                    for d in range(tid, RANK, threads):
                        row[d] = E2[tokens[b, t + 1, y], d] if d < E2.shape[1] else ZERO
                    cuda.syncthreads()
                for i in range(tid, K, threads):
                    logit = float64(alpha[b, t, i])
                    if t < length - 1:
                        logit += float64(dot_row(E1, tokens[b, t, i], row)) * float64(inv_temp)
                    logits[b, i] = logit
                    masses[b, i] = math.exp(logit - shift)
                cuda.syncthreads()
                if tid == 0:
                    total = 0.0
                    for i in range(K):
                        total += masses[b, i]
                        prefix[b, i] = total
                    shared_kept[0] = expand_node(
                        masses[b], prefix[b], logits[b], shift + math.log(total), beam_phi[b, m], beam_G[b, m], m,
                        picked[b], draws, b, t, kept_G[b], kept_entry[b], child_phi[b], kept,
                    )  # fmt: skip
                cuda.syncthreads()
                kept = shared_kept[0]
            cuda.syncthreads()  # every thread has read the beam's G for its last test before it changes
            for k in range(tid, kept, threads):
                entry = kept_entry[b, k] // M  # place * K + state
                history[b, t, k] = entry
                beam_state[b, k] = entry % K
                beam_phi[b, k] = child_phi[b, (entry // K) * M + kept_entry[b, k] % M]
                beam_G[b, k] = kept_G[b, k]
            cuda.syncthreads()
            size = kept
        count = min(size, N)
        kappa = beam_G[b, N] if size > N else -math.inf
        if tid == 0:
            out_count[b] = count
            out_kappa[b] = kappa
        for k in range(tid, N, threads):
            out_log_prob[b, k], out_perturbed[b, k], out_weights[b, k] = distinct_sample(
                scores[b], tokens[b], E1, E2, history[b], k, count, length, float64(inv_temp), float64(log_z[b]),
                beam_G[b, k], kappa, out_beam_idx[b, :, k], out_tokens[b, :, k],
            )  # fmt: skip

    @family.kernel((t.i1, t.f3, t.f3))
    def backward_start(lengths, alpha, marginals):
        """A block per sequence: marginals[b, length - 1] = softmax(alpha[b, length - 1]), zero after."""
        b = cuda.blockIdx.x
        T = alpha.shape[1]
        K = alpha.shape[2]
        length = lengths[b]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        partial = ZERO
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            partial += math.exp(alpha[b, length - 1, j])
        total = block_sum(partial, scratch)
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            marginals[b, length - 1, j] = math.exp(alpha[b, length - 1, j]) / total
            for step in range(length, T):
                marginals[b, step, j] = ZERO

    @family.kernel((t.f1, t.int64, t.int64, t.i1, t.f, t.int64, t.boolean, t.f3, t.f3, t.f3, t.f3))
    def backward_steps(xi, chunk, t0, lengths, inv_temp, split, keep, alpha, col_max, col_sum, marginals):
        """Steps t = t0 + chunk - 1 down to t0 of the backward pass (``cpu/crf.py``'s counterpart):
        xi[i, j] = exp(alpha[t - 1, i] + trans[i, j] * inv_temp - col_max[t, j]) * mu_t[j] / col_sum[t, j]
        and mu_{t-1}[i] = sum_j xi[i, j] into marginals. ``xi`` holds the chunk's transition blocks
        (flattened) on entry and, with ``keep``, each step's xi on exit (``xi_products`` turns them into
        the table gradients). The K rows are split over ``split`` blocks of a cooperative grid that meet
        after every step; ROW_LANES threads (a warp) share a row, reading consecutive columns."""
        B, T, K = alpha.shape
        tid = cuda.threadIdx.x
        groups, first_row, last_row = split_span(K, split)
        rows_per_round = cuda.blockDim.x // ROW_LANES
        lane = tid % ROW_LANES
        slot = tid // ROW_LANES
        columns = uint32(K)
        shared = cuda.shared.array(0, nbtype)
        ratio = shared[:K]
        top = shared[K : 2 * K]
        sums = cuda.shared.array(MAX_THREADS, nbtype)
        steps = min(chunk, T - t0)
        for first in range(0, B, groups):
            b = first + cuda.blockIdx.x // split
            length = lengths[b] if b < B else 0
            for s in range(steps - 1, -1, -1):
                step = t0 + s
                if step < length:
                    for j in range(tid, K, cuda.blockDim.x):
                        ratio[j] = exchange_load(marginals, b, step, j) / col_sum[b, step, j]
                        top[j] = col_max[b, step, j]
                    cuda.syncthreads()
                    block0 = uint32((b * chunk + s) * K * K)
                    for base in range(first_row, last_row, rows_per_round):
                        i = base + slot
                        partial = ZERO
                        if i < last_row:
                            a = alpha[b, step - 1, i]
                            offset = block0 + uint32(i * K + lane)
                            j = uint32(lane)
                            if a == NEG_INF:  # a predecessor no path reaches: a row of zeros
                                while keep and j < columns:
                                    xi[offset] = ZERO
                                    offset += uint32(ROW_LANES)
                                    j += uint32(ROW_LANES)
                            else:  # a constant stride, so the loop unrolls
                                while j < columns:
                                    x = fast_exp(a + xi[offset] * inv_temp - top[j]) * ratio[j]
                                    if keep:
                                        xi[offset] = x
                                    partial += x
                                    offset += uint32(ROW_LANES)
                                    j += uint32(ROW_LANES)
                        sums[tid] = partial
                        cuda.syncthreads()
                        if lane == 0 and i < last_row:
                            total = ZERO
                            for q in range(ROW_LANES):
                                total += sums[slot * ROW_LANES + q]
                            marginals[b, step - 1, i] = total
                        cuda.syncthreads()
                step_barrier(split)

    # ---------------------------------------------------------------------------------------------
    # entropy and KL: E_p[own * log p - log q] along the backward factorisation (docs/design.md §4)
    # ---------------------------------------------------------------------------------------------
    if config.ENABLE_CUDASIM:

        @cuda.jit(device=True)
        def row_sum(value, sums):
            """The sum of ``value`` over the ROW_LANES threads that share a row, to each of them (the
            simulator has no shuffles: through ``sums``, shared, blockDim). Every thread must call it."""
            tid = cuda.threadIdx.x
            sums[tid] = value
            cuda.syncthreads()
            base = tid - tid % ROW_LANES
            total = ZERO
            for other in range(ROW_LANES):
                total += sums[base + other]
            cuda.syncthreads()
            return total

    else:

        @cuda.jit(device=True)
        def row_sum(value, sums):
            """The sum of ``value`` over the ROW_LANES threads (a warp) that share a row, to each of them:
            a butterfly of shuffles, no shared memory and no barrier. Every thread must call it."""
            offset = ROW_LANES // 2
            while offset > 0:
                value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
                offset //= 2
            return value

    @family.kernel(
        (t.f1, t.f1, t.int64, t.int64, t.i1, t.f, t.f, t.int64, t.int64, t.boolean) + (t.f3, t.f3, t.f3) * 2 + (t.f3,)
    )
    def ratio_forward_steps(
        trans,
        q_trans,
        chunk,
        t0,
        lengths,
        inv_temp,
        own,
        split,
        parts,
        use_q,
        alpha,
        col_max,
        col_sum,
        q_alpha,
        q_col_max,
        q_col_sum,
        prefix_ratios,
    ):
        """Steps t = t0 + s of the forward sweep of ``cpu/crf.py``'s log_ratio_kernel: prefix_ratios[b, t, j] =
        sum_i c(i | j) (prefix_ratios[b, t - 1, i] + own * log c(i | j) - log c_q(i | j)), the expected log
        ratio of y_0 .. y_t given y_t = j, with p's backward conditional c(i | j) = exp(alpha[t - 1, i] +
        trans[i, j] * inv_temp - col_max[t, j] - log col_sum[t, j]) and q's (``q_trans``, with ``use_q``)
        alike. One pass per column (its normaliser is known); terms with c = 0 are skipped (0 log 0 = 0).
        Columns and predecessors are shared out as in ``forward_steps``; dynamic shared memory: 3 K values."""
        B, T, K = alpha.shape
        tid = cuda.threadIdx.x
        groups, first_col, last_col = split_span(K, split)
        lanes, lane, mine, low, high = predecessor_share(K, parts)
        stop = uint32(high)
        stride = uint32(K)
        shared = cuda.shared.array(0, nbtype)
        prev = shared[:K]
        a_prev = shared[K : 2 * K]
        q_prev = shared[2 * K : 3 * K]
        part_sum = cuda.shared.array(MAX_THREADS, nbtype)
        steps = min(chunk, T - t0)
        for first in range(0, B, groups):
            b = first + cuda.blockIdx.x // split
            length = lengths[b] if b < B else 0
            for s in range(steps):
                step = t0 + s
                if step < length:
                    for i in range(tid, K, cuda.blockDim.x):
                        prev[i] = exchange_load(prefix_ratios, b, step - 1, i)
                        a_prev[i] = alpha[b, step - 1, i]
                        q_prev[i] = q_alpha[b, step - 1, i] if use_q else ZERO
                    cuda.syncthreads()
                    row0 = uint32((b * chunk + s) * K * K)
                    for base in range(first_col, last_col, lanes):
                        j = base + lane
                        total = ZERO
                        if j < last_col and low < high:
                            top = col_max[b, step, j] + math.log(col_sum[b, step, j])
                            q_top = q_col_max[b, step, j] + math.log(q_col_sum[b, step, j]) if use_q else ZERO
                            offset = row0 + uint32(low * K + j)
                            i = uint32(low)
                            while i < stop:
                                log_c = a_prev[i] + trans[offset] * inv_temp - top
                                c = fast_exp(log_c)
                                if c > ZERO:  # also skips an unreachable predecessor (alpha = -inf)
                                    term = own * log_c
                                    if use_q:
                                        term -= q_prev[i] + q_trans[offset] * inv_temp - q_top
                                    total += c * (prev[i] + term)
                                offset += stride
                                i += uint32(1)
                        part_sum[tid] = total
                        cuda.syncthreads()
                        if mine == 0 and j < last_col:
                            for part in range(1, parts):
                                total += part_sum[part * lanes + lane]
                            prefix_ratios[b, step, j] = total
                        cuda.syncthreads()
                step_barrier(split)

    @family.kernel((t.i1, t.f3, t.f3, t.boolean, t.f, t.f3, t.boolean, t.f1, t.f, t.f1, t.f1) + (t.f3,) * 5)
    def ratio_last(
        lengths,
        alpha,
        q_alpha,
        use_q,
        own,
        prefix_ratios,
        want_grads,
        scale,
        sign,
        out_mean,
        out_value,
        mu,
        ghat,
        q_mu,
        grad_scores,
        grad_scores_q,
    ):
        """A block per sequence, after the forward sweep: with mu = softmax(alpha[L - 1]) and the last
        position's log ratio r_j = own * log mu_j - log mu_q_j, out_mean[b] = E = sum_j mu_j (prefix_ratios[b,
        L - 1, j] + r_j) and out_value[b] = sign * E. With ``want_grads``, the backward sweep's start:
        mu, ghat = mu * r and q_mu at L - 1, and the node gradients there, scale[b] * (mu (prefix_ratios - E)
        + ghat) and scale[b] * (q_mu - mu)."""
        b = cuda.blockIdx.x
        K = alpha.shape[2]
        last = lengths[b] - 1
        tid = cuda.threadIdx.x
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        partial = ZERO
        q_partial = ZERO
        for j in range(tid, K, cuda.blockDim.x):
            partial += math.exp(alpha[b, last, j])
            if use_q:
                q_partial += math.exp(q_alpha[b, last, j])
        log_total = math.log(block_sum(partial, scratch))  # >= 1: alpha's maximum is 0
        q_log_total = math.log(block_sum(q_partial, scratch)) if use_q else ZERO
        partial = ZERO
        for j in range(tid, K, cuda.blockDim.x):
            p = math.exp(alpha[b, last, j] - log_total)
            if p > ZERO:
                ratio = own * (alpha[b, last, j] - log_total)
                if use_q:
                    ratio -= q_alpha[b, last, j] - q_log_total
                partial += p * (prefix_ratios[b, last, j] + ratio)
        mean = block_sum(partial, scratch)
        if tid == 0:
            out_mean[b] = mean
            out_value[b] = sign * mean
        if want_grads:
            factor = scale[b]
            for j in range(tid, K, cuda.blockDim.x):
                p = math.exp(alpha[b, last, j] - log_total)
                share = ZERO
                node = ZERO
                if p > ZERO:
                    share = own * (alpha[b, last, j] - log_total)
                    if use_q:
                        share -= q_alpha[b, last, j] - q_log_total
                    share *= p
                    node = p * (prefix_ratios[b, last, j] - mean) + share
                mu[b, last, j] = p
                ghat[b, last, j] = share
                grad_scores[b, last, j] = factor * node
                if use_q:
                    q_p = math.exp(q_alpha[b, last, j] - q_log_total)
                    q_mu[b, last, j] = q_p
                    grad_scores_q[b, last, j] = factor * (q_p - p)

    @family.kernel(
        (t.f1, t.f1, t.int64, t.int64, t.i1, t.f, t.int64, t.boolean)
        + (t.f3, t.f3, t.f3) * 2
        + (t.f3, t.f1, t.f1)
        + (t.f3,) * 5
    )
    def ratio_backward_steps(
        edges,
        q_edges,
        chunk,
        t0,
        lengths,
        inv_temp,
        split,
        use_q,
        alpha,
        col_max,
        col_sum,
        q_alpha,
        q_col_max,
        q_col_sum,
        prefix_ratios,
        mean,
        scale,
        mu,
        ghat,
        q_mu,
        grad_scores,
        grad_scores_q,
    ):
        """Steps t = t0 + chunk - 1 down to t0 of the backward sweep of ``cpu/crf.py``'s log_ratio_kernel,
        with own = 1 (the gradients of the entropy and the KL). For row i, with c = c(i | j), r = log c -
        log c_q (log c without ``use_q``), x = c mu_t[j] and f = prefix_ratios[b, t - 1, i] - mean[b]:

        edges[i, j] = x (f + r) + c ghat_t[j]  (the edge covariance, in place of p's transitions)
        ghat_{t-1}[i] = sum_j x r + c ghat_t[j],  mu_{t-1}[i] = sum_j x

        and with ``use_q`` q_edges[i, j] = c_q mu_q_t[j] - x (q's edge marginal minus p's, in place of q's
        transitions) and mu_q_{t-1}[i] = sum_j c_q mu_q_t[j]. The node gradients of position t - 1 go to
        grad_scores (scale[b] (mu f + ghat)) and grad_scores_q (scale[b] (mu_q - mu)); ``xi_rows`` and
        ``xi_columns`` turn the edge blocks into the table gradients. Rows are shared out as in
        ``backward_steps``, a warp per row, whose sums meet in shuffles; dynamic shared memory: 5 K values."""
        B, T, K = alpha.shape
        tid = cuda.threadIdx.x
        groups, first_row, last_row = split_span(K, split)
        rows_per_round = cuda.blockDim.x // ROW_LANES
        lane = tid % ROW_LANES
        slot = tid // ROW_LANES
        columns = uint32(K)
        shared = cuda.shared.array(0, nbtype)
        top = shared[:K]
        mu_t = shared[K : 2 * K]
        ghat_t = shared[2 * K : 3 * K]
        q_top = shared[3 * K : 4 * K]
        q_mu_t = shared[4 * K : 5 * K]
        sums = cuda.shared.array(MAX_THREADS, nbtype)
        steps = min(chunk, T - t0)
        for first in range(0, B, groups):
            b = first + cuda.blockIdx.x // split
            length = lengths[b] if b < B else 0
            for s in range(steps - 1, -1, -1):
                step = t0 + s
                if step < length:
                    for j in range(tid, K, cuda.blockDim.x):
                        top[j] = col_max[b, step, j] + math.log(col_sum[b, step, j])
                        mu_t[j] = exchange_load(mu, b, step, j)
                        ghat_t[j] = exchange_load(ghat, b, step, j)
                        if use_q:
                            q_top[j] = q_col_max[b, step, j] + math.log(q_col_sum[b, step, j])
                            q_mu_t[j] = exchange_load(q_mu, b, step, j)
                    cuda.syncthreads()
                    centre = mean[b]
                    factor = scale[b]
                    block0 = uint32((b * chunk + s) * K * K)
                    for base in range(first_row, last_row, rows_per_round):
                        i = base + slot
                        g = ZERO
                        m = ZERO
                        q_m = ZERO
                        f = ZERO
                        if i < last_row:
                            a = alpha[b, step - 1, i]
                            q_a = q_alpha[b, step - 1, i] if use_q else ZERO
                            f = prefix_ratios[b, step - 1, i] - centre
                            offset = block0 + uint32(i * K + lane)
                            j = uint32(lane)
                            while j < columns:
                                log_c = a + edges[offset] * inv_temp - top[j]
                                c = fast_exp(log_c)
                                x = c * mu_t[j]
                                edge = ZERO
                                log_c_q = ZERO
                                if use_q:
                                    log_c_q = q_a + q_edges[offset] * inv_temp - q_top[j]
                                    x_q = fast_exp(log_c_q) * q_mu_t[j]
                                    q_edges[offset] = x_q - x
                                    q_m += x_q
                                if c > ZERO:  # also a row no path reaches (alpha = -inf): zeros
                                    log_c -= log_c_q
                                    share = c * ghat_t[j]
                                    edge = x * (f + log_c) + share
                                    g += x * log_c + share
                                    m += x
                                edges[offset] = edge
                                offset += uint32(ROW_LANES)
                                j += uint32(ROW_LANES)
                        g = row_sum(g, sums)
                        m = row_sum(m, sums)
                        if use_q:
                            q_m = row_sum(q_m, sums)
                        if lane == 0 and i < last_row:
                            mu[b, step - 1, i] = m
                            ghat[b, step - 1, i] = g
                            grad_scores[b, step - 1, i] = factor * (m * f + g)
                            if use_q:
                                q_mu[b, step - 1, i] = q_m
                                grad_scores_q[b, step - 1, i] = factor * (q_m - m)
                step_barrier(split)

    def products(side: int, name: str) -> Any:
        """A kernel for one side of the table gradients (``side`` is fixed at compile time)."""

        def kernel(xi, chunk, t0, tokens, E1, E2, lengths, scale, grad):
            """The table gradients of a chunk's (K, K) weight blocks (xi from ``backward_steps``, or the
            sampler's edge weights), two products per step: ``xi_rows`` adds scale[b] * sum_j xi[i, j]
            E2[tokens[b, t, j]] to grad (grad_E1) at row tokens[b, t - 1, i]; ``xi_columns`` adds
            scale[b] * sum_i xi[i, j] E1[tokens[b, t - 1, i]] to grad (grad_E2) at row tokens[b, t, j].
            One block per PRODUCT_TILE output rows of a step, each thread a register tile of rows x rank
            entries; the reduction dimension is staged in shared memory PRODUCT_DEPTH at a time. Each
            sum reaches the table with one atomic add per (row, d), a warp's lanes on consecutive d."""
            B, _, K = tokens.shape
            D = E1.shape[1]
            tiles = (K + PRODUCT_TILE - 1) // PRODUCT_TILE
            rest = cuda.blockIdx.x
            tile = rest % tiles
            rest //= tiles
            s = rest % chunk
            b = rest // chunk
            step = t0 + s
            if step >= lengths[b]:
                return  # the whole block leaves together
            tid = cuda.threadIdx.x
            tx = tid % PRODUCT_EDGE
            ty = tid // PRODUCT_EDGE
            row_base = uint32(ty)
            col_base = uint32(tx)
            row0 = tile * PRODUCT_TILE
            block0 = (b * chunk + s) * K * K
            weights = cuda.shared.array(PRODUCT_STAGE, nbtype)  # weights[dd * PRODUCT_STRIDE + r]
            rows = cuda.shared.array(ROW_STAGE, nbtype)  # rows[dd * ROW_STRIDE + d]: the other side's table
            acc = cuda.local.array(PRODUCT_OUTPUTS, nbtype)
            entry = cuda.local.array(RANK_SUB, nbtype)
            for e in range(PRODUCT_OUTPUTS):
                acc[e] = ZERO
            for k0 in range(0, K, PRODUCT_DEPTH):
                cuda.syncthreads()
                for e in range(tid, PRODUCT_TILE * PRODUCT_DEPTH, PRODUCT_THREADS):
                    if side == 0:  # xi[row0 + r, k0 + dd]: consecutive threads read consecutive columns
                        r = e // PRODUCT_DEPTH
                        dd = e - r * PRODUCT_DEPTH
                        i = row0 + r
                        k = k0 + dd
                        value = xi[block0 + i * K + k] if i < K and k < K else ZERO
                    else:  # xi[k0 + dd, row0 + r]: consecutive threads read consecutive columns
                        dd = e // PRODUCT_TILE
                        r = e - dd * PRODUCT_TILE
                        k = k0 + dd
                        j = row0 + r
                        value = xi[block0 + k * K + j] if j < K and k < K else ZERO
                    weights[dd * PRODUCT_STRIDE + r] = value
                for e in range(tid, PRODUCT_DEPTH * RANK, PRODUCT_THREADS):
                    dd = e // RANK
                    d = e - dd * RANK
                    k = k0 + dd
                    value = ZERO
                    if k < K and d < D:
                        value = E2[tokens[b, step, k], d] if side == 0 else E1[tokens[b, step - 1, k], d]
                    rows[dd * ROW_STRIDE + d] = value
                cuda.syncthreads()
                weight_at = row_base
                row_at = col_base
                for _ in range(PRODUCT_DEPTH):
                    for q in range(RANK_SUB):  # unsigned running indices: a register plus a constant per load
                        entry[q] = rows[row_at + uint32(PRODUCT_EDGE * q)]
                    for r in range(PRODUCT_SUB):
                        w = weights[weight_at + uint32(PRODUCT_EDGE * r)]
                        for q in range(RANK_SUB):
                            acc[r * RANK_SUB + q] += w * entry[q]
                    weight_at += uint32(PRODUCT_STRIDE)
                    row_at += uint32(ROW_STRIDE)
            factor = scale[b]
            for r in range(PRODUCT_SUB):
                own = row0 + ty + PRODUCT_EDGE * r
                if own < K:
                    token = tokens[b, step - 1, own] if side == 0 else tokens[b, step, own]
                    for q in range(RANK_SUB):
                        d = tx + PRODUCT_EDGE * q
                        if d < D:
                            cuda.atomic.add(grad, (token, d), factor * acc[r * RANK_SUB + q])

        kernel.__name__ = name
        signature = (t.f1, t.int64, t.int64, t.i3, t.f2, t.f2, t.i1, t.f1, t.f2)
        return family.kernel(signature, threads=PRODUCT_THREADS)(kernel)

    products(0, "xi_rows")
    products(1, "xi_columns")

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
