"""CPU kernels of exact CRF inference: forward algorithm, forward-filtering backward-sampling (FFBS),
marginals and gradients by forward-backward (docs/design.md §4).

Like ``cpu/decode.py``, these trust their inputs (``viterbi_numba._validate`` checks them) and work per sequence on
thread-local scratch. With temperature tau the model is p(y) = exp(S(y) / tau) / Z_tau.

Forward, kept normalised in log space: ``alpha[t]`` (K) is log alpha_t minus its maximum, so every
step's values are <= 0 with a 0 among them, and the removed maxima add up in a float64 ``log_norm``.
Step t, with logits[i, j] = alpha[t-1, i] + trans[i, j] / tau:

    col_max[t, j] = max_i logits[i, j]
    col_sum[t, j] = sum_i exp(logits[i, j] - col_max[t, j])            (>= 1: no underflow to 0)
    log alpha_t[j] = col_max[t, j] + log col_sum[t, j] + s[t, j] / tau (+ removed maxima)

Backward, in probability space: with node marginals mu_t, the edge marginal of step t is
xi[i, j] = q[i, j] mu_t[j], where q[i, j] = exp(logits[i, j] - col_max[t, j]) / col_sum[t, j] is
p(y_{t-1} = i | y_t = j) — the same conditional that FFBS samples from — and mu_{t-1}[i] = sum_j xi[i, j].
Only products of numbers in [0, 1] appear: no log, no NaN, and a -inf beam slot has marginal 0.
The gradient of log Z_tau is mu / tau for the beam scores and, through
trans[i, j] = E1[tok[t-1, i]] . E2[tok[t, j]], (xi @ E2 rows) / tau and (xi^T @ E1 rows) / tau for the
gathered table rows, which are then added into (V, D) gradients — no (T, K, K) array is ever kept.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _portable
from .._portable import PAD
from .decode import _FASTMATH, portable, softmax_pick
from .intrinsics import fast_exp, fmax
from .tiles import gather_operands, prefetch_operands, strip_dots_max, strip_width, transition_block, workspace

uniform_pair = portable.uniform_pair
gumbel = portable.gumbel
distinct_uniforms = portable.distinct_uniforms
expand_node = portable.expand_node
distinct_sample = portable.distinct_sample


# --------------------------------------------------------------------------------------------------
# forward algorithm
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _column_max(prev, trans, inv_temp, col_max):
    """col_max[j] = max_i prev[i] + trans[i, j] * inv_temp; rows with prev[i] = -inf (unreachable beam
    slots) are skipped."""
    K = prev.shape[0]
    for j in range(K):
        col_max[j] = -np.inf
    for i in range(K):
        a = prev[i]
        if a != -np.inf:
            row = trans[i]
            for j in range(K):
                col_max[j] = fmax(a + row[j] * inv_temp, col_max[j])


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _column_sums(prev, trans, inv_temp, col_max, col_sum):
    """col_sum[j] = sum_i exp(prev[i] + trans[i, j] * inv_temp - col_max[j]) over a whole block, rows with
    prev[i] = -inf skipped (``_forward_step`` on a block that is kept)."""
    K = prev.shape[0]
    for j in range(K):
        col_sum[j] = 0.0
    for i in range(K):
        a = prev[i]
        if a != -np.inf:
            row = trans[i]
            for j in range(K):
                col_sum[j] += fast_exp(a + row[j] * inv_temp - col_max[j])


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _forward_step(prev, src_rows, dst_rows, E1, E2, work, inv_temp, col_max, col_sum):
    """col_max[j] = max_i prev[i] + trans[i, j] * inv_temp; col_sum[j] = sum_i exp(that - col_max[j]), for
    the step's block trans = E1[src_rows] E2[dst_rows]^T, made and reduced strip by strip (``tiles``):
    each strip's maxima are taken from the tiles' registers as they are made, then its sums while it
    is in L1, both in order of i.

    A row with prev[i] = -inf (an unreachable beam slot) adds exactly 0: its logits are -inf, which
    ``fmax`` passes over and ``fast_exp`` maps to 0, so the sums have the bits of a loop that skips
    them. (With such a test in the row loop the step measured about twice as slow.)
    """
    src_emb, dst_t, strip, top, total = work
    gather_operands(src_rows, dst_rows, E1, E2, src_emb, dst_t)
    K = prev.shape[0]
    width = strip_width(prev)
    for column in range(0, K, width):
        strip_dots_max(src_emb, dst_t, column, K, strip, prev, inv_temp, top)
        for c in range(width):
            total[c] = 0.0
        for i in range(K):
            a = prev[i]
            row = strip[i]
            for c in range(width):
                total[c] += fast_exp(a + row[c] * inv_temp - top[c])
        for c in range(min(width, K - column)):
            col_max[column + c] = top[c]
            col_sum[column + c] = total[c]


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _forward_begin(scores_0, inv_temp, alpha_0):
    """alpha_0 = (scores_0 - max) * inv_temp; returns the removed maximum, max * inv_temp (float64)."""
    K = scores_0.shape[0]
    shift = scores_0[0]
    for j in range(1, K):
        shift = max(shift, scores_0[j])
    for j in range(K):
        alpha_0[j] = (scores_0[j] - shift) * inv_temp
    return np.float64(shift) * np.float64(inv_temp)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _forward_position(scores_t, inv_temp, col_max_t, col_sum_t, alpha_t):
    """alpha_t from the step's column maxima and sums and the position's scores, normalised to a maximum
    of 0; returns what was removed (float64), for the log normaliser."""
    K = scores_t.shape[0]
    shift = scores_t[0]
    for j in range(1, K):
        shift = max(shift, scores_t[j])
    top = -np.inf
    for j in range(K):
        value = col_max_t[j] + np.log(col_sum_t[j]) + (scores_t[j] - shift) * inv_temp
        alpha_t[j] = value
        top = max(top, value)
    for j in range(K):
        alpha_t[j] -= top
    return np.float64(top) + np.float64(shift) * np.float64(inv_temp)


@njit(cache=True, inline="always")
def _log_total(alpha_last):
    """log sum_j exp(alpha_last[j]) in float64."""
    total = 0.0
    for j in range(alpha_last.shape[0]):
        total += np.exp(np.float64(alpha_last[j]))
    return np.log(total)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _forward(scores_b, tokens_b, E1, E2, length, inv_temp, work, alpha, col_max, col_sum):
    """Forward pass of one sequence; fills alpha, col_max, col_sum (T, K) up to ``length``; returns log Z.

    scores_b, tokens_b: (T, K). The log normaliser is accumulated in float64.
    """
    log_norm = _forward_begin(scores_b[0], inv_temp, alpha[0])
    for t in range(1, length):
        if t + 1 < length:
            prefetch_operands(tokens_b[t], tokens_b[t + 1], E1, E2)
        _forward_step(alpha[t - 1], tokens_b[t - 1], tokens_b[t], E1, E2, work, inv_temp, col_max[t], col_sum[t])
        log_norm += _forward_position(scores_b[t], inv_temp, col_max[t], col_sum[t], alpha[t])
    return log_norm + _log_total(alpha[length - 1])


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def forward_kernel(scores, tokens, E1, E2, lengths, inv_temp, out_log_z, alpha, col_max, col_sum):
    """Forward pass of every sequence: out_log_z[b] = log Z_tau (float64) and the state the backward
    pass needs, alpha, col_max, col_sum (B, T, K) (see the module docstring; valid up to each length)."""
    B, T, K = scores.shape
    D = E1.shape[1]
    for b in prange(B):
        work = workspace(K, D, scores)
        out_log_z[b] = _forward(
            scores[b], tokens[b], E1, E2, lengths[b], inv_temp, work, alpha[b], col_max[b], col_sum[b]
        )


# --------------------------------------------------------------------------------------------------
# exact sampling: forward filtering, backward sampling
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _uniform(uniforms, use_uniforms, seed_lo, seed_hi, b, t, n):
    """The uniform that draws y_t of sample n of sequence b: replayed, or the first of Philox's pair for
    state 0 on the exact sampler's stream."""
    if use_uniforms:
        return uniforms[b, t, n]
    u0, _ = uniform_pair(seed_lo, seed_hi, _portable.STREAM_EXACT_SAMPLER, b, t, 0, n)
    return u0


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
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
    """Backward sampling of N = out_beam_idx.shape[2] exact samples per sequence from ``forward_kernel``'s
    log_z and alpha (FFBS, docs/design.md §4).

    y_{L-1} ~ softmax(alpha[L-1]); y_{t-1} ~ softmax_i(alpha[t-1, i] + trans[i, y_t] / tau), each by the
    inverse CDF with the uniform U[b, t, n] of the drawn position t; the N samples' columns trans[:, y_t]
    come from one small gemm per step. log_prob = S(y) / tau - log Z_tau, with S(y) summed in float64.
    """
    B, T, K = scores.shape
    N = out_beam_idx.shape[2]
    D = E1.shape[1]
    dtype = scores.dtype
    one = scores.dtype.type(1)  # the logits are tempered already; a typed 1 keeps float32 exps float32
    for b in prange(B):
        length = lengths[b]
        src_emb = np.empty((K, D), dtype=dtype)
        logits = np.empty(K, dtype=dtype)
        weights = np.empty(K, dtype=dtype)
        sampled_rows = np.empty((N, D), dtype=dtype)  # E2 rows of the N tokens drawn at position t
        columns = np.empty((K, N), dtype=dtype)  # trans[i, y_t] of every sample
        path_score = np.zeros(N, dtype=np.float64)
        for n in range(N):
            u = _uniform(uniforms, use_uniforms, seed_lo, seed_hi, b, length - 1, n)
            y = softmax_pick(alpha[b, length - 1], one, u, weights)
            out_beam_idx[b, length - 1, n] = y
            path_score[n] = scores[b, length - 1, y]
        for t in range(length - 1, 0, -1):
            src_rows = tokens[b, t - 1]
            for i in range(K):
                src = E1[src_rows[i]]
                for d in range(D):
                    src_emb[i, d] = src[d]
            for n in range(N):
                dst = E2[tokens[b, t, out_beam_idx[b, t, n]]]
                for d in range(D):
                    sampled_rows[n, d] = dst[d]
            np.dot(src_emb, sampled_rows.T, columns)
            for n in range(N):
                for i in range(K):
                    logits[i] = alpha[b, t - 1, i] + columns[i, n] * inv_temp
                x = softmax_pick(logits, one, _uniform(uniforms, use_uniforms, seed_lo, seed_hi, b, t - 1, n), weights)
                out_beam_idx[b, t - 1, n] = x
                # S(y) gets the transition in float64, independent of the gemm's rounding
                dot = np.float64(0.0)
                for d in range(D):
                    dot += np.float64(src_emb[x, d]) * np.float64(sampled_rows[n, d])
                path_score[n] += dot + scores[b, t - 1, x]
        for n in range(N):
            out_log_prob[b, n] = path_score[n] * inv_temp - log_z[b]
            for t in range(T):
                if t < length:
                    out_tokens[b, t, n] = tokens[b, t, out_beam_idx[b, t, n]]
                else:
                    out_beam_idx[b, t, n] = PAD
                    out_tokens[b, t, n] = PAD


# --------------------------------------------------------------------------------------------------
# sampling without replacement: a stochastic beam search over FFBS's factorisation
# --------------------------------------------------------------------------------------------------
@njit(cache=True, parallel=True, fastmath=_FASTMATH)
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
    out_beam_idx,
    out_tokens,
    out_log_prob,
    out_perturbed,
    out_kappa,
    out_weights,
    out_count,
):
    """N = out_beam_idx.shape[2] samples without replacement per sequence (docs/design.md §4): a beam of
    M = N + 1 suffixes y_{L-1} .. y_t, each with its log-probability phi (float64, the sum of FFBS's log
    conditionals) and perturbed value G, kept in decreasing order of G. Every step draws each suffix's
    children top-down in decreasing order of G (``_portable.expand_node``: a child by the inverse CDF of
    its conditional among those not drawn, its G a truncated Gumbel below the last) while they can
    enter the M largest, with the uniforms ``uniforms[b, t, m, 2k:2k + 2]`` of the k-th child of place m
    or those of (b, t, k, m) on the distinct sampler's stream. The root's G is a standard Gumbel, so
    that the paths' G are independent Gumbels of location log p(y). The first N complete paths are the
    sample, in order of G; out_kappa[b] is the (N+1)-th G (-inf when the beam has N or fewer paths),
    out_weights = p(y) / q(y) with q(y) = 1 - exp(-exp(log p(y) - kappa)), and log_prob = S(y) / tau -
    log Z (as ``sample_kernel``). Paths beyond out_count[b] are PAD, -inf and 0.
    """
    B, T, K = scores.shape
    N = out_beam_idx.shape[2]
    M = N + 1
    D = E1.shape[1]
    dtype = scores.dtype
    draws = (uniforms, use_uniforms, seed_lo, seed_hi)
    for b in prange(B):
        length = lengths[b]
        src_emb = np.empty((K, D), dtype=dtype)
        state_rows = np.empty((M, D), dtype=dtype)  # E2 rows of the beam's states at position t + 1
        columns = np.empty((K, M), dtype=dtype)  # trans[i, state of place m]
        states = np.zeros(M, dtype=np.int64)
        phi = np.zeros(M, dtype=np.float64)
        perturbed = np.zeros(M, dtype=np.float64)
        logits = np.empty(K, dtype=np.float64)
        masses = np.empty(K, dtype=np.float64)
        prefix = np.empty(K, dtype=np.float64)
        picked = np.empty(M, dtype=np.int64)
        kept_G = np.empty(M, dtype=np.float64)
        kept_entry = np.empty(M, dtype=np.int64)
        child_phi = np.empty(M * M, dtype=np.float64)  # by (place, k)
        history = np.empty((length, M), dtype=np.int64)  # entry (parent place * K + state) per position
        # the root: no state, phi = 0 and G a standard Gumbel (the largest of all paths' perturbed log p),
        # drawn with the pick uniform of place 1 at the last position, which that position never expands
        root, _ = distinct_uniforms(uniforms, use_uniforms, seed_lo, seed_hi, b, length - 1, 1, 0)
        perturbed[0] = gumbel(root)
        size = 1
        for t in range(length - 1, -1, -1):
            if t < length - 1:  # the transitions from position t into the beam's states at t + 1
                for i in range(K):
                    src = E1[tokens[b, t, i]]
                    for d in range(D):
                        src_emb[i, d] = src[d]
                for m in range(size):
                    dst = E2[tokens[b, t + 1, states[m]]]
                    for d in range(D):
                        state_rows[m, d] = dst[d]
                np.dot(src_emb, state_rows.T, columns)
            kept = 0
            for m in range(size):
                if kept == M and perturbed[m] < kept_G[M - 1]:
                    break  # the beam is ordered by G, and a node's children have smaller G
                shift = 0.0  # the root's conditional is softmax(alpha[L-1]), whose terms are at most 1
                if t < length - 1:  # the forward pass's column of the node's state normalises it
                    y = states[m]
                    shift = np.float64(col_max[b, t + 1, y]) + np.log(np.float64(col_sum[b, t + 1, y]))
                    for i in range(K):
                        logits[i] = np.float64(alpha[b, t, i]) + np.float64(columns[i, m]) * np.float64(inv_temp)
                else:
                    for i in range(K):
                        logits[i] = alpha[b, t, i]
                for i in range(K):
                    masses[i] = np.exp(logits[i] - shift)
                total = 0.0
                for i in range(K):
                    total += masses[i]
                    prefix[i] = total
                kept = expand_node(
                    masses, prefix, logits, shift + np.log(total), phi[m], perturbed[m], m, picked, draws, b, t,
                    kept_G, kept_entry, child_phi, kept,
                )  # fmt: skip
            for k in range(kept):
                entry = kept_entry[k] // M  # place * K + state
                history[t, k] = entry
                states[k] = entry % K
                phi[k] = child_phi[(entry // K) * M + kept_entry[k] % M]
                perturbed[k] = kept_G[k]
            size = kept
        count = min(size, N)
        out_count[b] = count
        kappa = perturbed[N] if size > N else -np.inf
        out_kappa[b] = kappa
        for k in range(N):
            out_log_prob[b, k], out_perturbed[b, k], out_weights[b, k] = distinct_sample(
                scores[b], tokens[b], E1, E2, history, k, count, length, np.float64(inv_temp), log_z[b],
                perturbed[k], kappa, out_beam_idx[b, :, k], out_tokens[b, :, k],
            )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# forward-backward: marginals and gradients
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _full_block(src_rows, dst_rows, E1, E2, work, dst_emb, trans):
    """trans (K, K) = the step's block (``tiles.transition_block``) and dst_emb[j] = E2[dst_rows[j]], for
    the kernels that multiply xi by the table rows (the E1 rows are work[0][:K])."""
    transition_block(src_rows, dst_rows, E1, E2, work, trans)
    D = E2.shape[1]
    for j in range(dst_rows.shape[0]):
        dst = E2[dst_rows[j]]
        for d in range(D):
            dst_emb[j, d] = dst[d]


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _xi_times(xi, rows, out):
    """out = xi @ rows for xi (K, K), rows (K, D).

    Four columns of xi per pass, each output row updated once per pass: on the development machine this
    runs at 0.23 ms for K=256, D=32 where single-threaded OpenBLAS takes 0.41 ms (a narrow output is its
    weak shape). The summation order is fixed, so results do not depend on the thread count.
    """
    K, D = rows.shape
    out[:] = 0.0
    j = 0
    while j + 4 <= K:
        b0 = rows[j]
        b1 = rows[j + 1]
        b2 = rows[j + 2]
        b3 = rows[j + 3]
        for i in range(K):
            x = xi[i]
            a0, a1, a2, a3 = x[j], x[j + 1], x[j + 2], x[j + 3]
            o = out[i]
            for d in range(D):
                o[d] += (a0 * b0[d] + a1 * b1[d]) + (a2 * b2[d] + a3 * b3[d])
        j += 4
    done = j
    for j in range(done, K):
        b = rows[j]
        for i in range(K):
            a = xi[i, j]
            o = out[i]
            for d in range(D):
                o[d] += a * b[d]


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _xi_t_times(xi, rows, out):
    """out = xi.T @ rows for xi (K, K), rows (K, D): four rows of xi per pass (0.19 ms vs OpenBLAS's 0.41)."""
    K, D = rows.shape
    out[:] = 0.0
    i = 0
    while i + 4 <= K:
        b0 = rows[i]
        b1 = rows[i + 1]
        b2 = rows[i + 2]
        b3 = rows[i + 3]
        x0 = xi[i]
        x1 = xi[i + 1]
        x2 = xi[i + 2]
        x3 = xi[i + 3]
        for j in range(K):
            a0, a1, a2, a3 = x0[j], x1[j], x2[j], x3[j]
            o = out[j]
            for d in range(D):
                o[d] += (a0 * b0[d] + a1 * b1[d]) + (a2 * b2[d] + a3 * b3[d])
        i += 4
    done = i
    for i in range(done, K):
        b = rows[i]
        x = xi[i]
        for j in range(K):
            a = x[j]
            o = out[j]
            for d in range(D):
                o[d] += a * b[d]


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def backward_kernel(
    tokens,
    E1,
    E2,
    lengths,
    inv_temp,
    alpha,
    col_max,
    col_sum,
    first,
    count,
    want_rows,
    out_marginals,
    grad_src,
    grad_dst,
):
    """Backward pass of sequences b = first .. first+count-1 from ``forward_kernel``'s state: node
    marginals and, with ``want_rows``, the gradient of log Z_tau with respect to the gathered table
    rows, times tau:

    grad_src[c, t] (K, D) = sum_j xi_t[i, j] E2[tok[t+1, j]]  (the E1 rows of position t, t < L-1)
    grad_dst[c, t] (K, D) = sum_i xi_{t-1}[i, j] E1[tok[t-1, i]]  (the E2 rows of position t, t >= 1)

    for c = b - first (``scatter_rows``'s layout). out_marginals[b] (T, K) is 0 at padded positions.
    Each step recomputes its transition block (one gemm) rather than keeping T of them.
    """
    B, T, K = tokens.shape
    D = E1.shape[1]
    dtype = alpha.dtype
    for c in prange(count):
        b = first + c
        length = lengths[b]
        work = workspace(K, D, alpha)
        src_emb = work[0][:K]
        dst_emb = np.empty((K, D), dtype=dtype)
        trans = np.empty((K, K), dtype=dtype)
        ratio = np.empty(K, dtype=dtype)
        ones = np.ones(K, dtype=dtype)
        mu = out_marginals[b]
        # mu_{L-1} = softmax(alpha[L-1]) (its maximum is 0, so the total is >= 1)
        total = 0.0
        for j in range(K):
            mu[length - 1, j] = fast_exp(alpha[b, length - 1, j])
            total += mu[length - 1, j]
        for j in range(K):
            mu[length - 1, j] /= total
        for t in range(length - 1, 0, -1):
            _full_block(tokens[b, t - 1], tokens[b, t], E1, E2, work, dst_emb, trans)
            for j in range(K):
                ratio[j] = mu[t, j] / col_sum[b, t, j]
            # trans becomes xi in place: xi[i, j] = exp(logits[i, j] - col_max[j]) * mu_t[j] / col_sum[j]
            for i in range(K):
                a = alpha[b, t - 1, i]
                row = trans[i]
                if a == -np.inf:
                    for j in range(K):
                        row[j] = 0.0
                else:
                    for j in range(K):
                        row[j] = fast_exp(a + row[j] * inv_temp - col_max[b, t, j]) * ratio[j]
            np.dot(trans, ones, mu[t - 1])  # row sums: mu_{t-1}
            if want_rows:
                _xi_times(trans, dst_emb, grad_src[c, t - 1])
                _xi_t_times(trans, src_emb, grad_dst[c, t])
        for t in range(length, T):
            for j in range(K):
                mu[t, j] = 0.0


@njit(cache=True)
def add_path_rows(path_tokens, lengths, scale, E1, E2, grad_E1, grad_E2):
    """The table gradient of scale[b] * S(y) for token paths y (B, T): for every transition y_t -> y_{t+1},
    grad_E1[y_t] += scale[b] * E2[y_{t+1}] and grad_E2[y_{t+1}] += scale[b] * E1[y_t]."""
    B = path_tokens.shape[0]
    D = E1.shape[1]
    for b in range(B):
        s = scale[b]
        for t in range(lengths[b] - 1):
            u = path_tokens[b, t]
            v = path_tokens[b, t + 1]
            for d in range(D):
                grad_E1[u, d] += s * E2[v, d]
                grad_E2[v, d] += s * E1[u, d]


@njit(cache=True, parallel=True)
def sequence_score_kernel(scores, tokens, E1, E2, lengths, beam_idx, out_score):
    """out_score[b, n] = S(y) (float64 sums) for the beam path beam_idx[b, :, n] up to lengths[b]."""
    B, T, N = beam_idx.shape
    D = E1.shape[1]
    for b in prange(B):
        for n in range(N):
            y = beam_idx[b, 0, n]
            total = np.float64(scores[b, 0, y])
            for t in range(1, lengths[b]):
                x = y
                y = beam_idx[b, t, n]
                src = E1[tokens[b, t - 1, x]]
                dst = E2[tokens[b, t, y]]
                for d in range(D):
                    total += np.float64(src[d]) * np.float64(dst[d])
                total += scores[b, t, y]
            out_score[b, n] = total


# --------------------------------------------------------------------------------------------------
# entropy: expectations of log p along the backward factorisation
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _conditionals(alpha_prev, trans, inv_temp, col_max_t, col_sum_t, log_sums, inv_sums, cond, log_cond):
    """cond[i, j] = p(y_{t-1} = i | y_t = j) from the forward state, and log_cond its log; an unreachable
    row (alpha_prev[i] = -inf) gets cond 0 and log_cond 0 (it never contributes, and 0 * log 0 is 0)."""
    K = alpha_prev.shape[0]
    for j in range(K):
        log_sums[j] = np.log(col_sum_t[j])
        inv_sums[j] = 1.0 / col_sum_t[j]  # K divisions, not K^2
    for i in range(K):
        a = alpha_prev[i]
        row, cond_row, log_row = trans[i], cond[i], log_cond[i]
        if a == -np.inf:
            for j in range(K):
                cond_row[j] = 0.0
                log_row[j] = 0.0
        else:
            for j in range(K):
                z = a + row[j] * inv_temp - col_max_t[j]
                cond_row[j] = fast_exp(z) * inv_sums[j]
                log_row[j] = z - log_sums[j]


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _log_ratios(log_cond, q_alpha_prev, q_trans, inv_temp, q_col_max_t, q_col_sum_t, log_sums, own):
    """log_cond[i, j] = own * log_cond[i, j] - log q(y_{t-1} = i | y_t = j): the step's log ratio of p's
    and q's backward conditionals for own = 1 (read only where p's conditional is > 0; a row q cannot
    reach gives +inf there), minus q's log conditional for own = 0 (the cross-entropy)."""
    K = q_alpha_prev.shape[0]
    for j in range(K):
        log_sums[j] = np.log(q_col_sum_t[j])
    for i in range(K):
        a = q_alpha_prev[i]
        row, log_row = q_trans[i], log_cond[i]
        for j in range(K):
            log_row[j] = own * log_row[j] - (a + row[j] * inv_temp - q_col_max_t[j] - log_sums[j])


@njit(cache=True, inline="always")
def _last_position(alpha_last, mu, log_mu):
    """mu = softmax(alpha_last) and log_mu its log (-inf at a -inf slot)."""
    K = alpha_last.shape[0]
    total = 0.0
    for j in range(K):
        mu[j] = fast_exp(alpha_last[j])
        total += mu[j]
    log_total = np.log(total)
    for j in range(K):
        mu[j] /= total
        log_mu[j] = alpha_last[j] - log_total


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _sums_and_prefix_ratios(
    prev, trans, inv_temp, col_max, col_sum, prefix_prev, prefix, own, use_q, q_prev, q_trans, q_top
):
    """The forward step's column sums (``_forward_step``'s second pass, after ``_column_max``) and, from
    the same exponentials e[i, j], the forward sweep of ``log_ratio_kernel``:

    prefix[j] = sum_i c(i | j) (prefix_prev[i] + own log c(i | j) - log c_q(i | j))
              = sum_i e[i, j] (prefix_prev[i] + own z[i, j] - log c_q(i | j)) / col_sum[j] - own log col_sum[j]

    with z = prev[i] + trans[i, j] * inv_temp - col_max[j], c = e / col_sum and, with ``use_q``, q's log
    conditional q_prev[i] + q_trans[i, j] * inv_temp - q_top[j] (q_top: q's col_max + log col_sum)."""
    K = prev.shape[0]
    zero = col_sum.dtype.type(0)  # a float64 literal would widen float32 arithmetic
    for j in range(K):
        col_sum[j] = 0.0
        prefix[j] = 0.0
    for i in range(K):
        a = prev[i]
        if a != -np.inf:
            row = trans[i]
            base = prefix_prev[i]
            q_a = q_prev[i]
            q_row = q_trans[i]
            for j in range(K):
                z = a + row[j] * inv_temp - col_max[j]
                e = fast_exp(z)
                col_sum[j] += e
                term = base + own * z
                if use_q:
                    term -= q_a + q_row[j] * inv_temp - q_top[j]
                prefix[j] += e * term if e > 0 else zero  # 0 log 0 = 0, and no 0 * inf
    for j in range(K):
        prefix[j] = prefix[j] / col_sum[j] - own * np.log(col_sum[j])


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def forward_ratio_kernel(
    scores,
    tokens,
    E1,
    E2,
    q_scores,
    q_E1,
    q_E2,
    lengths,
    inv_temp,
    use_q,
    own,
    out_log_z,
    alpha,
    col_max,
    col_sum,
    q_log_z,
    q_alpha,
    q_col_max,
    q_col_sum,
    prefix_ratios,
):
    """``forward_kernel`` for p and, with ``use_q``, for q (a CRF on the same beam tokens), and the forward
    sweep of ``log_ratio_kernel`` into prefix_ratios (B, T, K) (0 on entry), step by step on the same
    transition blocks: prefix_ratios[b, t, j] = E_p[own log p - log q of y_0 .. y_t | y_t = j], and p's
    exponentials serve both its column sums and the sweep (``_sums_and_prefix_ratios``). Without q, the q
    arrays are not touched."""
    B, T, K = scores.shape
    D = E1.shape[1]
    Dq = q_E1.shape[1]
    dtype = scores.dtype
    for b in prange(B):
        length = lengths[b]
        work = workspace(K, D, E1)
        trans = np.empty((K, K), dtype=dtype)
        q_work = workspace(K, Dq, E1)
        q_trans = np.zeros((K, K), dtype=dtype)
        q_top = np.zeros(K, dtype=dtype)
        q_prev = np.zeros(K, dtype=dtype)
        prefix = prefix_ratios[b]
        log_norm = _forward_begin(scores[b, 0], inv_temp, alpha[b, 0])
        q_log_norm = _forward_begin(q_scores[b, 0], inv_temp, q_alpha[b, 0]) if use_q else 0.0
        for t in range(1, length):
            if use_q:
                transition_block(tokens[b, t - 1], tokens[b, t], q_E1, q_E2, q_work, q_trans)
                _column_max(q_alpha[b, t - 1], q_trans, inv_temp, q_col_max[b, t])
                _column_sums(q_alpha[b, t - 1], q_trans, inv_temp, q_col_max[b, t], q_col_sum[b, t])
                for j in range(K):
                    q_top[j] = q_col_max[b, t, j] + np.log(q_col_sum[b, t, j])
                    q_prev[j] = q_alpha[b, t - 1, j]
                q_log_norm += _forward_position(
                    q_scores[b, t], inv_temp, q_col_max[b, t], q_col_sum[b, t], q_alpha[b, t]
                )
            transition_block(tokens[b, t - 1], tokens[b, t], E1, E2, work, trans)
            _column_max(alpha[b, t - 1], trans, inv_temp, col_max[b, t])
            _sums_and_prefix_ratios(
                alpha[b, t - 1], trans, inv_temp, col_max[b, t], col_sum[b, t], prefix[t - 1], prefix[t], own, use_q,
                q_prev, q_trans, q_top,
            )  # fmt: skip
            log_norm += _forward_position(scores[b, t], inv_temp, col_max[b, t], col_sum[b, t], alpha[b, t])
        out_log_z[b] = log_norm + _log_total(alpha[b, length - 1])
        if use_q:
            q_log_z[b] = q_log_norm + _log_total(q_alpha[b, length - 1])


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def log_ratio_kernel(
    tokens,
    E1,
    E2,
    lengths,
    inv_temp,
    alpha,
    col_max,
    col_sum,
    q_E1,
    q_E2,
    q_alpha,
    q_col_max,
    q_col_sum,
    use_q,
    own,
    have_prefix,
    prefix_ratios,
    first,
    count,
    want_grads,
    out_expected,
    cov_nodes,
    grad_src,
    grad_dst,
    marginals,
    q_grad_src,
    q_grad_dst,
):
    """E_p[own * log p(y) - log q(y)] of sequences b = first .. first+count-1 (the KL divergence for
    own = 1, the cross-entropy for own = 0; without ``use_q``, E_p[log p(y)] = -H), from
    ``forward_kernel``'s state of p (and of q, a CRF on the same beam tokens with tables q_E1, q_E2),
    and, with ``want_grads`` (and own = 1):

    * ``cov_nodes[b]`` (T, K): Cov_p([y_t = k], log p - log q); the edge covariances contracted with
      p's table rows into ``grad_src`` / ``grad_dst`` (``backward_kernel``'s layout). d/d p's
      potential of E_p[log p - log q] is Cov / tau.
    * with ``use_q``: q's node marginals minus p's, ``marginals[b]``, and q's edge marginals minus p's
      contracted with q's rows into ``q_grad_src`` / ``q_grad_dst``: d KL / d q's potential is that / tau.

    log p (and log q) are summed along the backward factorisation p(y) = mu_{L-1}(y_{L-1}) prod_t
    c_t(y_{t-1} | y_t): normalised logs, never the path scores, so nothing cancels; the value is a sum
    of conditional entropies (KL divergences), >= 0 up to rounding. The covariances come from a forward
    sweep F_t(j) = E[log ratio of y_0..y_t | y_t = j] and a backward sweep G_t(j) = mu_t(j) E[the
    rest | y_t = j] (docs/design.md §4). With ``have_prefix``, F is ``prefix_ratios[b]`` as
    ``forward_ratio_kernel`` left it (the forward sweep is not run again). The value needs the forward
    sweep only; the gradients add the backward sweep.
    """
    B, T, K = tokens.shape
    D = E1.shape[1]
    Dq = q_E1.shape[1]
    dtype = alpha.dtype
    zero = dtype.type(0)  # a float64 literal would widen float32 arithmetic
    for c in prange(count):
        b = first + c
        length = lengths[b]
        work = workspace(K, D, E1)
        src_emb = work[0][:K]
        dst_emb = np.empty((K, D), dtype=dtype)
        trans = np.empty((K, K), dtype=dtype)
        q_work = workspace(K, Dq, E1)
        q_src_emb = q_work[0][:K]
        q_dst_emb = np.empty((K, Dq), dtype=dtype)
        q_trans = np.empty((K, K), dtype=dtype)
        cond = np.empty((K, K), dtype=dtype)
        log_cond = np.empty((K, K), dtype=dtype)
        xi = np.empty((K, K), dtype=dtype)
        mu = np.empty(K, dtype=dtype)
        mu_prev = np.empty(K, dtype=dtype)
        ghat = np.empty(K, dtype=dtype)
        ghat_prev = np.empty(K, dtype=dtype)
        log_last = np.empty(K, dtype=dtype)
        q_mu = np.empty(K, dtype=dtype)
        q_mu_prev = np.empty(K, dtype=dtype)
        q_log_last = np.empty(K, dtype=dtype)
        log_sums = np.empty(K, dtype=dtype)
        inv_sums = np.empty(K, dtype=dtype)
        ones = np.ones(K, dtype=dtype)
        _last_position(alpha[b, length - 1], mu, log_last)
        if use_q:
            _last_position(q_alpha[b, length - 1], q_mu, q_log_last)
        for j in range(K):  # the last position's log ratio where p reaches (+inf where q does not)
            if mu[j] > 0:
                log_last[j] = own * log_last[j] - (q_log_last[j] if use_q else zero)
            else:
                log_last[j] = zero
        F = prefix_ratios[b] if have_prefix else np.zeros((T, K), dtype=dtype)
        if not have_prefix:  # forward sweep: F[t, j] = sum_i c_t(i | j) (F[t-1, i] + log ratio_t(i, j))
            for t in range(1, length):
                _full_block(tokens[b, t - 1], tokens[b, t], E1, E2, work, dst_emb, trans)
                _conditionals(
                    alpha[b, t - 1], trans, inv_temp, col_max[b, t], col_sum[b, t], log_sums, inv_sums, cond, log_cond
                )
                if use_q:
                    _full_block(tokens[b, t - 1], tokens[b, t], q_E1, q_E2, q_work, q_dst_emb, q_trans)
                    _log_ratios(
                        log_cond, q_alpha[b, t - 1], q_trans, inv_temp, q_col_max[b, t], q_col_sum[b, t], log_sums, own
                    )
                for i in range(K):
                    f = F[t - 1, i]
                    cond_row, log_row = cond[i], log_cond[i]
                    for j in range(K):
                        p = cond_row[j]
                        F[t, j] += p * (f + log_row[j]) if p > 0 else zero
        expected = 0.0
        for j in range(K):
            if mu[j] > 0:
                expected += np.float64(mu[j]) * (np.float64(F[length - 1, j]) + np.float64(log_last[j]))
        out_expected[b] = expected
        if not want_grads:
            continue
        mean = dtype.type(expected)
        nodes = cov_nodes[b]
        for j in range(K):
            ghat[j] = mu[j] * log_last[j]
            nodes[length - 1, j] = mu[j] * (F[length - 1, j] - mean) + ghat[j]
            if use_q:
                marginals[b, length - 1, j] = q_mu[j] - mu[j]
        # backward sweep, last position first
        for t in range(length - 1, 0, -1):
            _full_block(tokens[b, t - 1], tokens[b, t], E1, E2, work, dst_emb, trans)
            _conditionals(
                alpha[b, t - 1], trans, inv_temp, col_max[b, t], col_sum[b, t], log_sums, inv_sums, cond, log_cond
            )
            if use_q:
                _full_block(tokens[b, t - 1], tokens[b, t], q_E1, q_E2, q_work, q_dst_emb, q_trans)
                _log_ratios(
                    log_cond, q_alpha[b, t - 1], q_trans, inv_temp, q_col_max[b, t], q_col_sum[b, t], log_sums, own
                )
            for i in range(K):
                f = F[t - 1, i] - mean
                cond_row, log_row = cond[i], log_cond[i]
                edge_row = trans[i]  # becomes the edge covariances
                xi_row = xi[i]
                for j in range(K):  # no branch and no running sum, so it vectorises: row sums by gemv
                    p = cond_row[j]
                    x = p * mu[j]
                    term = x * (log_row[j] if p > 0 else zero) + p * ghat[j]  # 0 log 0 = 0, and no 0 * inf
                    cond_row[j] = term
                    edge_row[j] = x * f + term
                    xi_row[j] = x
            np.dot(cond, ones, ghat_prev)
            np.dot(xi, ones, mu_prev)
            _xi_times(trans, dst_emb, grad_src[c, t - 1])
            _xi_t_times(trans, src_emb, grad_dst[c, t])
            if use_q:  # q's edge marginals minus p's, contracted with q's rows; q's node marginals
                for j in range(K):
                    inv_sums[j] = q_mu[j] / q_col_sum[b, t, j]
                for i in range(K):  # q_trans becomes q's edge marginals
                    a = q_alpha[b, t - 1, i]
                    row = q_trans[i]
                    if a == -np.inf:
                        for j in range(K):
                            row[j] = zero
                    else:
                        for j in range(K):
                            row[j] = fast_exp(a + row[j] * inv_temp - q_col_max[b, t, j]) * inv_sums[j]
                np.dot(q_trans, ones, q_mu_prev)
                for i in range(K):
                    row, xi_row = q_trans[i], xi[i]
                    for j in range(K):
                        xi_row[j] = row[j] - xi_row[j]
                _xi_times(xi, q_dst_emb, q_grad_src[c, t - 1])
                _xi_t_times(xi, q_src_emb, q_grad_dst[c, t])
            for i in range(K):
                nodes[t - 1, i] = mu_prev[i] * (F[t - 1, i] - mean) + ghat_prev[i]
                if use_q:
                    marginals[b, t - 1, i] = q_mu_prev[i] - mu_prev[i]
            mu, mu_prev = mu_prev, mu
            q_mu, q_mu_prev = q_mu_prev, q_mu
            ghat, ghat_prev = ghat_prev, ghat
        if want_grads:
            for t in range(length, T):
                for j in range(K):
                    nodes[t, j] = 0.0
                    if use_q:
                        marginals[b, t, j] = 0.0
