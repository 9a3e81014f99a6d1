"""Pure NumPy reference of every operation, written from DESIGN §3 — the oracle of the tests.

Everything here is plain loops and array expressions in float64, with no shared code from the package.
"""

from __future__ import annotations

import itertools

import numpy as np

PAD = -1


# ------------------------------------------------------------------------------------------------
# Philox4x32-10 in Python integers (Salmon et al. 2011), and the uniform of (seed, stream, b, t, j, n)
# ------------------------------------------------------------------------------------------------
def philox4x32(counter, key):
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c3 ^ k1) & mask, p0 & mask
        k0 = (k0 + 0x9E3779B9) & mask
        k1 = (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def uniform(seed, stream, b, t, j, n):
    """The documented uniform: words (2 (j % 2), 2 (j % 2) + 1) of Philox((j // 2, t, b, n), key)."""
    words = philox4x32((j // 2, t, b, n), (seed & 0xFFFFFFFF, (seed >> 32) ^ stream))
    hi, lo = words[2 * (j % 2)], words[2 * (j % 2) + 1]
    return ((hi >> 5) * 2**26 + (lo >> 6)) / 2**53


def uniforms_for_seed(seed, shape, stream=0):
    """(B, T-1, K, N) uniforms that ``seed`` gives stochastic Viterbi."""
    B, S, K, N = shape
    out = np.empty(shape)
    for b, t, j, n in itertools.product(range(B), range(S), range(K), range(N)):
        out[b, t, j, n] = uniform(seed, stream, b, t, j, n)
    return out


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def topk(emissions, k, force_tokens=None):
    """Best-first top-k per row (ties: lower id first); forced tokens replace the k-th best if absent."""
    B, T, V = emissions.shape
    scores = np.empty((B, T, k), emissions.dtype)
    tokens = np.empty((B, T, k), np.int64)
    for b in range(B):
        for t in range(T):
            row = emissions[b, t]
            order = list(np.lexsort((np.arange(V), -row.astype(np.float64))))
            chosen = order[:k]
            if force_tokens is not None:
                f = int(force_tokens[b, t])
                if f not in chosen:
                    chosen = [i for i in order if i != f][: k - 1] + [f]
                    chosen = sorted(chosen, key=lambda i: (-float(row[i]), i))
            scores[b, t] = row[chosen]
            tokens[b, t] = chosen
    return scores, tokens


def transitions(tokens, E1, E2):
    """(B, T-1, K, K) float64: E1[tok[t-1, i]] . E2[tok[t, j]]."""
    left = E1.astype(np.float64)[tokens[:, :-1]]
    right = E2.astype(np.float64)[tokens[:, 1:]]
    return np.einsum("btid,btjd->btij", left, right)


def path_score(scores, trans, b, path):
    """S(y) for one sequence b and beam path y."""
    total = sum(float(scores[b, t, y]) for t, y in enumerate(path))
    return total + sum(float(trans[b, t - 1, path[t - 1], path[t]]) for t in range(1, len(path)))


def step_increments(scores, tokens, E1, E2, beam_idx, lengths=None):
    """(B, T) increments of S(y) along beam paths (B, T): s[0, y_0], then s[t, y_t] + trans[t-1, y_{t-1}, y_t];
    0 at and after each length."""
    B, T, _ = scores.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    trans = transitions(tokens, E1, E2)
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(int(lengths[b])):
            y = beam_idx[b, t]
            out[b, t] = float(scores[b, t, y]) + (float(trans[b, t - 1, beam_idx[b, t - 1], y]) if t else 0.0)
    return out


def viterbi(scores, tokens, E1, E2, lengths=None):
    """fairseq forward_decoder, with prefix masks; returns (beam_idx, tokens, score, fairseq's step_scores)."""
    scores = scores.astype(np.float64)
    B, T, K = scores.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    trans = transitions(tokens, E1, E2)
    beam_idx = np.full((B, T), PAD)
    out_tokens = np.full((B, T), PAD)
    best = np.empty(B)
    step_scores = np.zeros((B, T))
    for b in range(B):
        L = int(lengths[b])
        score = scores[b, 0].copy()
        history, back = [score], []
        for t in range(1, L):
            cand = score[:, None] + trans[b, t - 1]  # (i, j)
            index = np.argmax(cand, axis=0)  # first maximum: lowest i
            score = cand[index, np.arange(K)] + scores[b, t]
            history.append(score)
            back.append(index)
        y = int(np.argmax(score))
        best[b] = score[y]
        path, cumulative = [y], [score[y]]
        for index, hist in zip(reversed(back), reversed(history[:-1])):
            cumulative.append(hist[path[-1]])  # fairseq reads step t at the index of step t+1
            path.append(int(index[path[-1]]))
        path.reverse()
        cumulative.reverse()
        beam_idx[b, :L] = path
        out_tokens[b, :L] = tokens[b, np.arange(L), path]
        step_scores[b, :L] = np.diff(cumulative, prepend=0.0)
    return beam_idx, out_tokens, best, step_scores


def brute_force_best(scores, tokens, E1, E2):
    """Best path and score per sequence by enumerating all K^T beam paths."""
    B, T, K = scores.shape
    trans = transitions(tokens, E1, E2)
    results = []
    for b in range(B):
        best = max(itertools.product(range(K), repeat=T), key=lambda y: path_score(scores, trans, b, y))
        results.append((list(best), path_score(scores, trans, b, best)))
    return results


def _softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def stochastic_viterbi(
    scores, tokens, E1, E2, uniforms=None, temperature=1.0, lengths=None, num_samples=1, rng=None, margin=0.0
):
    """The write-up's sampler (DESIGN §3), N chains in the last axis, in float64.

    The predecessor of state j is the smallest i with u * total < cdf[i] (clamped to the last i with
    positive probability). ``uniforms`` (B, T-1, K, N) drives it; when None they are drawn from ``rng``
    as the run goes, each redrawn while u * total lies within ``margin * total`` of a CDF step, so that a
    kernel with slightly different rounding must still make the same picks.
    Returns (beam_probs, beam_idx, tokens, path_scores, backpointers, score, uniforms).
    """
    scores = scores.astype(np.float64)
    B, T, K = scores.shape
    N = num_samples if uniforms is None else uniforms.shape[3]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    trans = transitions(tokens, E1, E2)
    used = np.zeros((B, max(T - 1, 0), K, N)) if uniforms is None else uniforms
    beam_probs = np.zeros((B, T, K, N))
    path_scores = np.empty((B, T, K, N))
    backpointers = np.broadcast_to(np.arange(K)[None, None, :, None], (B, max(T - 1, 0), K, N)).copy()
    beam_idx = np.full((B, T, N), PAD)
    out_tokens = np.full((B, T, N), PAD)
    final = np.empty((B, N))
    for b in range(B):
        L = int(lengths[b])
        for n in range(N):
            score = scores[b, 0].copy()
            path_scores[b, 0, :, n] = score
            beam_probs[b, 0, :, n] = _softmax(score, 0)
            for t in range(1, L):
                logits = score[:, None] + trans[b, t - 1]  # (i, j)
                probs = _softmax(logits / temperature, 0)
                cdf = np.cumsum(probs, axis=0)
                total = cdf[-1]
                if uniforms is None:
                    u = rng.random(K)
                    while True:
                        near = (np.abs(u[None, :] * total[None, :] - cdf) < margin * total[None, :]).any(axis=0)
                        if not near.any():
                            break
                        u[near] = rng.random(int(near.sum()))
                    used[b, t - 1, :, n] = u
                u = used[b, t - 1, :, n]
                picks = np.empty(K, np.int64)
                for j in range(K):
                    above = np.nonzero(u[j] * total[j] < cdf[:, j])[0]
                    picks[j] = above[0] if above.size else np.nonzero(probs[:, j] > 0)[0][-1]
                score = logits[picks, np.arange(K)] + scores[b, t]
                backpointers[b, t - 1, :, n] = picks
                path_scores[b, t, :, n] = score
                beam_probs[b, t, :, n] = _softmax(score, 0)
            path_scores[b, L:, :, n] = score
            y = int(np.argmax(score))
            final[b, n] = score[y]
            for t in range(L - 1, -1, -1):
                beam_idx[b, t, n] = y
                out_tokens[b, t, n] = tokens[b, t, y]
                if t > 0:
                    y = int(backpointers[b, t - 1, y, n])
    return beam_probs, beam_idx, out_tokens, path_scores, backpointers, final, used


def stochastic_viterbi_path_distribution(scores, tokens, E1, E2, temperature=1.0):
    """Exact distribution of stochastic Viterbi's path (B = 1) by enumerating every predecessor draw.

    Returns {path tuple: probability}. Feasible only for tiny K and T.
    """
    _, T, K = scores.shape
    trans = transitions(tokens, E1, E2)[0]
    scores = scores[0].astype(np.float64)
    dist = {}

    def walk(t, score, backs, prob):
        if prob == 0.0:
            return
        if t == T:
            y = int(np.argmax(score))
            path = [y]
            for back in reversed(backs):
                path.append(int(back[path[-1]]))
            key = tuple(reversed(path))
            dist[key] = dist.get(key, 0.0) + prob
            return
        logits = score[:, None] + trans[t - 1]
        probs = _softmax(logits / temperature, 0)
        for picks in itertools.product(range(K), repeat=K):
            p = prob * np.prod(probs[list(picks), np.arange(K)])
            walk(t + 1, logits[list(picks), np.arange(K)] + scores[t], backs + [np.array(picks)], p)

    walk(1, scores[0].copy(), [], 1.0)
    return dist


def crf_path_distribution(scores, tokens, E1, E2, temperature=1.0):
    """p(y) proportional to exp(S(y) / temperature) over all beam paths (B = 1)."""
    _, T, K = scores.shape
    trans = transitions(tokens, E1, E2)
    paths = list(itertools.product(range(K), repeat=T))
    logits = np.array([path_score(scores, trans, 0, y) for y in paths]) / temperature
    probs = _softmax(logits, 0)
    return dict(zip(paths, probs))


# ------------------------------------------------------------------------------------------------
# exact CRF inference (DESIGN §4)
# ------------------------------------------------------------------------------------------------
def _logsumexp(x, axis=None):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out.squeeze() if axis is None else np.squeeze(out, axis=axis)


def crf_enumerate(scores, tokens, E1, E2, b, length, temperature=1.0):
    """All K^length beam paths of sequence b with their log p_tau(y); returns (paths, log_probs, log Z)."""
    K = scores.shape[2]
    trans = transitions(tokens, E1, E2)
    paths = list(itertools.product(range(K), repeat=length))
    logits = np.array([path_score(scores, trans, b, y) for y in paths]) / temperature
    log_z = _logsumexp(logits)
    return paths, logits - log_z, log_z


def crf_exact(scores, tokens, E1, E2, temperature=1.0, lengths=None):
    """By enumeration: log Z (B,), node marginals (B, T, K), and the gradients of sum_b log Z_tau[b] with
    respect to the tables, E[d S(y) / d E] / tau, as (V, D) arrays. Returns (log_z, marginals, gE1, gE2)."""
    B, T, K = scores.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    E1 = E1.astype(np.float64)
    E2 = E2.astype(np.float64)
    log_z = np.empty(B)
    mu = np.zeros((B, T, K))
    gE1 = np.zeros_like(E1)
    gE2 = np.zeros_like(E2)
    for b in range(B):
        L = int(lengths[b])
        paths, log_probs, log_z[b] = crf_enumerate(scores, tokens, E1, E2, b, L, temperature)
        for y, lp in zip(paths, log_probs):
            p = np.exp(lp)
            for t in range(L):
                mu[b, t, y[t]] += p
            for t in range(1, L):
                u, v = tokens[b, t - 1, y[t - 1]], tokens[b, t, y[t]]
                gE1[u] += p * E2[v] / temperature
                gE2[v] += p * E1[u] / temperature
    return log_z, mu, gE1, gE2


def log_partition(scores, tokens, E1, E2, temperature=1.0, lengths=None):
    """log Z_tau by the plain forward recursion in float64 (for sizes too big to enumerate)."""
    B, T, K = scores.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    trans = transitions(tokens, E1, E2)
    out = np.empty(B)
    for b in range(B):
        alpha = scores[b, 0].astype(np.float64) / temperature
        for t in range(1, int(lengths[b])):
            alpha = _logsumexp(alpha[:, None] + trans[b, t - 1] / temperature, axis=0) + scores[b, t] / temperature
        out[b] = _logsumexp(alpha)
    return out


def crf_sample(
    scores, tokens, E1, E2, uniforms=None, temperature=1.0, lengths=None, num_samples=1, rng=None, margin=0.0
):
    """Forward filtering, backward sampling in float64; returns (beam_idx (B,T,N), log_prob (B,N), uniforms).

    ``uniforms[b, t, n]`` draws position t of sample n (the last position first) by the inverse CDF.
    When ``uniforms`` is None they are drawn from ``rng``, each redrawn while u * total lies within
    ``margin * total`` of a CDF step (see :func:`stochastic_viterbi`).
    """
    scores = scores.astype(np.float64)
    B, T, K = scores.shape
    N = num_samples if uniforms is None else uniforms.shape[2]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    trans = transitions(tokens, E1, E2) / temperature
    used = np.zeros((B, T, N)) if uniforms is None else uniforms
    beam_idx = np.full((B, T, N), PAD)
    log_prob = np.empty((B, N))

    def draw(logits, b, t, n):
        probs = np.exp(logits - logits.max())
        cdf = np.cumsum(probs)
        if uniforms is None:
            u = rng.random()
            while (np.abs(u * cdf[-1] - cdf) < margin * cdf[-1]).any():
                u = rng.random()
            used[b, t, n] = u
        above = np.nonzero(used[b, t, n] * cdf[-1] < cdf)[0]
        return int(above[0]) if above.size else int(np.nonzero(probs > 0)[0][-1])

    for b in range(B):
        L = int(lengths[b])
        alphas = [scores[b, 0] / temperature]
        for t in range(1, L):
            alphas.append(_logsumexp(alphas[-1][:, None] + trans[b, t - 1], axis=0) + scores[b, t] / temperature)
        log_z = _logsumexp(alphas[-1])
        for n in range(N):
            y = draw(alphas[L - 1], b, L - 1, n)
            beam_idx[b, L - 1, n] = y
            for t in range(L - 1, 0, -1):
                y = draw(alphas[t - 1] + trans[b, t - 1, :, y], b, t - 1, n)
                beam_idx[b, t - 1, n] = y
            path = beam_idx[b, :L, n]
            log_prob[b, n] = path_score(scores, trans * temperature, b, path) / temperature - log_z
    return beam_idx, log_prob, used


def exact_sampler_uniforms(seed, shape):
    """(B, T, N) uniforms that ``seed`` gives crf_sample: the documented uniform of (b, t, state 0, n)
    on the exact sampler's stream (1)."""
    B, T, N = shape
    out = np.empty(shape)
    for b, t, n in itertools.product(range(B), range(T), range(N)):
        out[b, t, n] = uniform(seed, 1, b, t, 0, n)
    return out


def log_likelihood(emissions, targets, E1, E2, k, lengths=None, temperature=1.0):
    """fairseq DynamicCRF.forward: S(targets) / tau - log Z_tau over the beam with the targets forced in."""
    B, T, V = emissions.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    beam_scores, beam_tokens = topk(emissions, k, force_tokens=targets)
    numerator = np.empty(B)
    for b in range(B):
        L = int(lengths[b])
        y = targets[b, :L]
        numerator[b] = emissions[b, np.arange(L), y].astype(np.float64).sum()
        numerator[b] += sum(E1[y[t - 1]].astype(np.float64) @ E2[y[t]].astype(np.float64) for t in range(1, L))
    return numerator / temperature - log_partition(beam_scores, beam_tokens, E1, E2, temperature, lengths)


def crf_entropy(scores, tokens, E1, E2, temperature=1.0, lengths=None):
    """H(p_tau) (B,) by enumeration of every beam path: -sum_y p log p (terms with p = 0 are 0)."""
    B, T, _ = scores.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    out = np.empty(B)
    for b in range(B):
        _, log_probs, _ = crf_enumerate(scores, tokens, E1, E2, b, int(lengths[b]), temperature)
        finite = np.isfinite(log_probs)
        out[b] = -np.sum(np.exp(log_probs[finite]) * log_probs[finite])
    return out


def crf_kl(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, temperature=1.0, lengths=None):
    """KL(p || q) (B,) by enumeration of every beam path (terms with p = 0 are 0)."""
    B, T, _ = scores_p.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    out = np.empty(B)
    for b in range(B):
        L = int(lengths[b])
        _, log_p, _ = crf_enumerate(scores_p, tokens, E1_p, E2_p, b, L, temperature)
        _, log_q, _ = crf_enumerate(scores_q, tokens, E1_q, E2_q, b, L, temperature)
        live = np.isfinite(log_p)
        out[b] = np.sum(np.exp(log_p[live]) * (log_p[live] - log_q[live]))
    return out
