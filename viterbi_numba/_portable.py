"""Device functions written once as plain Python and compiled for both targets (docs/design.md §5, §8).

``build(jit)`` compiles them with one target's decorator and returns them as a namespace:
``build(numba.njit(...))`` for the CPU kernels, ``build(cuda.jit(device=True))`` for the GPU ones.
Each function only does scalar integer/float arithmetic and indexing, so both targets accept it, and
the same inputs give the same bits on both (up to the GPU's fused multiply-adds).

The random numbers come from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011), a counter-based generator: the uniform for (sequence b, step t, state j, sample n) is a pure
function of ``(seed, stream, b, t, j, n)``, so the result never depends on thread count or launch shape.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import numpy as np

# Philox4x32 round multipliers and Weyl key increments (Random123).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SHIFT5 = np.uint64(5)
_SHIFT6 = np.uint64(6)
_TWO26 = np.float64(67108864.0)  # 2**26
_TWO_M53 = np.float64(1.0 / 9007199254740992.0)  # 2**-53
_SHIFT8 = np.uint64(8)
_TWO_M24 = np.float32(1.0 / 16777216.0)  # 2**-24

# Stream ids: each random operation draws from its own key, so two operations never share numbers.
STREAM_STOCHASTIC_VITERBI = 0
STREAM_EXACT_SAMPLER = 1
STREAM_DISTINCT_SAMPLER = 2  # sampling without replacement: the Gumbel of child i of beam place m

PAD = -1  # index and token id at positions at or after a sequence's length


def build(jit: Callable) -> SimpleNamespace:
    """Compile the shared device functions with ``jit`` and return them in a namespace."""

    @jit
    def philox4x32(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 of the counter (c0..c3) under the key (k0, k1); all uint64 holding 32 bits."""
        for _ in range(10):
            p0 = _M0 * c0
            p1 = _M1 * c2
            hi0 = p0 >> _SHIFT32
            lo0 = p0 & _MASK32
            hi1 = p1 >> _SHIFT32
            lo1 = p1 & _MASK32
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        return c0, c1, c2, c3

    @jit
    def uniform_pair(seed_lo, seed_hi, stream, b, t, j_pair, n):
        """The two uniforms in [0, 1) (53 bits each) for states 2*j_pair and 2*j_pair+1.

        Counter = (j_pair, t, b, n); key = (seed_lo, seed_hi ^ stream).
        """
        x0, x1, x2, x3 = philox4x32(
            np.uint64(j_pair),
            np.uint64(t),
            np.uint64(b),
            np.uint64(n),
            np.uint64(seed_lo),
            np.uint64(seed_hi) ^ np.uint64(stream),
        )
        u0 = (np.float64(x0 >> _SHIFT5) * _TWO26 + np.float64(x1 >> _SHIFT6)) * _TWO_M53
        u1 = (np.float64(x2 >> _SHIFT5) * _TWO26 + np.float64(x3 >> _SHIFT6)) * _TWO_M53
        return u0, u1

    @jit
    def uniform_pair_f32(seed_lo, seed_hi, stream, b, t, j_pair, n):
        """``uniform_pair`` in float32 without float64 arithmetic (for float32 GPU kernels): each is the
        top 24 bits of the float64 uniform, so the two differ by less than 2**-24."""
        x0, x1, x2, x3 = philox4x32(
            np.uint64(j_pair),
            np.uint64(t),
            np.uint64(b),
            np.uint64(n),
            np.uint64(seed_lo),
            np.uint64(seed_hi) ^ np.uint64(stream),
        )
        return np.float32(x0 >> _SHIFT8) * _TWO_M24, np.float32(x2 >> _SHIFT8) * _TWO_M24

    @jit
    def chain_uniforms(seed_lo, seed_hi, stream, b, t, n, out):
        """out[j] = the uniform of (b, t, j, n) for every state j < len(out)."""
        K = out.shape[0]
        for j_pair in range((K + 1) // 2):
            u0, u1 = uniform_pair(seed_lo, seed_hi, stream, b, t, j_pair, n)
            out[2 * j_pair] = u0
            if 2 * j_pair + 1 < K:
                out[2 * j_pair + 1] = u1

    @jit
    def inverse_cdf_pick(prefix, target, count):
        """Smallest i < count with ``target < prefix[i]`` for a nondecreasing ``prefix``.

        When rounding leaves no such i (target at or above the total), clamp to the last i whose weight
        is positive; with no positive weight at all, 0. Never returns an index outside [0, count).
        """
        for i in range(count):
            if target < prefix[i]:
                return i
        previous = prefix[0] * 0  # zero of prefix's dtype
        last = 0
        for i in range(count):
            if prefix[i] > previous:
                last = i
            previous = prefix[i]
        return last

    @jit
    def ranks_above(key_a, id_a, key_b, id_b):
        """True when (key_a, id_a) comes first in a beam: a higher score, or an equal one and a lower id."""
        return key_a > key_b or (key_a == key_b and id_a < id_b)

    @jit
    def place_forced(keys, ids, k, own, forced):
        """Top-K's last step with a forced token: it was kept in slot 0 with key +inf above keys/ids[1:k]
        (sorted best first); move it down to the place of its own score ``own``."""
        pos = 0
        while pos + 1 < k and ranks_above(keys[pos + 1], ids[pos + 1], own, forced):
            keys[pos] = keys[pos + 1]
            ids[pos] = ids[pos + 1]
            pos += 1
        keys[pos] = own
        ids[pos] = forced

    @jit
    def backtrace(last_scores, backpointers, tokens_b, length, out_beam_idx, out_tokens):
        """The path that ends in the best final state (the lowest on ties) and follows
        ``backpointers[t - 1, j]``, the predecessor of state j at step t, into out_beam_idx / out_tokens
        (T,), with PAD at and after ``length``. Returns the final state."""
        K = last_scores.shape[0]
        y = 0
        for j in range(1, K):
            if last_scores[j] > last_scores[y]:
                y = j
        final = y
        for t in range(length - 1, -1, -1):
            out_beam_idx[t] = y
            out_tokens[t] = tokens_b[t, y]
            if t > 0:
                y = backpointers[t - 1, y]
        for t in range(length, out_beam_idx.shape[0]):
            out_beam_idx[t] = PAD
            out_tokens[t] = PAD
        return final

    @jit
    def fairseq_step_scores(history, cum_shift, path, length, score, out):
        """fairseq ``forward_decoder``'s step scores of a Viterbi path (T,) into out[:length]: with
        c[t] = history[t, path[t + 1]] + cum_shift[t], the cumulative score of step t read at the next
        step's slot (history: the shifted cumulative scores (T, K), cum_shift their shifts), and
        c[length - 1] = ``score``, out[t] = c[t] - c[t - 1] (c[-1] = 0). Where the next step's slot is
        -inf at step t (fairseq would read -inf there), c[t] is the path's own cumulative score instead,
        so every value is finite (docs/design.md §2)."""
        cumulative_next = score
        for t in range(length - 2, -1, -1):
            read = history[t, path[t + 1]]
            if not read - read == read - read:  # -inf: the slot is unreachable at step t
                read = history[t, path[t]]
            cumulative = read + cum_shift[t]
            out[t + 1] = cumulative_next - cumulative
            cumulative_next = cumulative
        out[0] = cumulative_next

    @jit
    def compensated_add(total, error, term):
        """(total + term, new error) by Kahan's compensated summation: float32 sums keep close to float64's
        precision over a sequence (``error`` starts at 0 and is subtracted from the final total)."""
        y = term - error
        s = total + y
        return s, (s - total) - y

    @jit
    def path_increments(scores_b, tokens_b, E1, E2, path, length, out):
        """out[t] for t < length: the increment of S(y) at step t for the beam path ``path`` (T,),
        s[0, y_0] at t = 0 and s[t, y_t] + E1[tok[t-1, y_{t-1}]] . E2[tok[t, y_t]] after (in the
        arrays' dtype); the caller fills the padded positions."""
        D = E1.shape[1]
        out[0] = scores_b[0, path[0]]
        for t in range(1, length):
            src = tokens_b[t - 1, path[t - 1]]
            dst = tokens_b[t, path[t]]
            total = scores_b[t, path[t]]
            for d in range(D):
                total += E1[src, d] * E2[dst, d]
            out[t] = total

    @jit
    def keep_best(values, entries, kept, value, entry):
        """Insert (value, entry) into the list values[:kept], which is ordered by value, best first, and
        among equal values by lower entry (the n best's slot * n + rank, the distinct sampler's
        place * K + state); at most len(values) are kept. Returns (the new length, whether it entered)."""
        n = values.shape[0]
        at = kept
        while at > 0 and (values[at - 1] < value or (values[at - 1] == value and entries[at - 1] > entry)):
            at -= 1
        if at >= n:
            return kept, False
        k = min(kept, n - 1)
        while k > at:
            values[k] = values[k - 1]
            entries[k] = entries[k - 1]
            k -= 1
        values[at] = value
        entries[at] = entry
        return min(kept + 1, n), True

    @jit
    def nbest_paths(last_lists, from_entry, tokens_b, length, end_shift, ends, end_entries, out_beam_idx, out_tokens,
                    out_score):  # fmt: skip
        """The list Viterbi's end (docs/design.md §4 "N best"): the n = len(ends) best of every (slot, rank)
        of the last position's lists ``last_lists`` (K, n; shifted scores, best first, -inf where a list
        is shorter), in ``keep_best``'s order, each backtracked through ``from_entry[t, j, r]`` (the
        slot * n + rank that entry (j, r) of position t extends) into out_beam_idx / out_tokens (T, n),
        with PAD after ``length`` and beyond the count; out_score (n) gets each score + ``end_shift``, -inf
        beyond the count. ``ends`` / ``end_entries`` (n) are scratch. Returns the count."""
        K, n = last_lists.shape
        T = out_beam_idx.shape[0]
        found = 0
        for j in range(K):
            for r in range(n):
                value = last_lists[j, r]
                if value == -math.inf:
                    break
                found, entered = keep_best(ends, end_entries, found, value, j * n + r)
                if not entered:
                    break
        for k in range(n):
            if k >= found:
                out_score[k] = -math.inf
                for t in range(T):
                    out_beam_idx[t, k] = PAD
                    out_tokens[t, k] = PAD
                continue
            out_score[k] = ends[k] + end_shift
            j = end_entries[k] // n
            r = end_entries[k] - j * n
            for t in range(length - 1, -1, -1):
                out_beam_idx[t, k] = j
                out_tokens[t, k] = tokens_b[t, j]
                if t > 0:
                    entry = from_entry[t, j, r]
                    j = entry // n
                    r = entry - j * n
            for t in range(length, T):
                out_beam_idx[t, k] = PAD
                out_tokens[t, k] = PAD
        return found

    @jit
    def gumbel(u):
        """A standard Gumbel of a uniform u in [0, 1)."""
        return -math.log(-math.log(max(u, 1e-300)))

    @jit
    def next_gumbel(previous, location, u):
        """The next largest of a node's children's perturbed values (docs/design.md §4): the largest of the
        children not drawn yet is a Gumbel of ``location`` (the node's phi + log of their mass) truncated
        to at most ``previous``, the last one drawn; by the inverse CDF of uniform u,
        -logaddexp(-previous, log(-log u) - location)."""
        a = -previous
        b = math.log(-math.log(max(u, 1e-300))) - location
        top = max(a, b)
        if top == -math.inf:  # u = 1 - 2**-53 can give log(-log u) = -inf: the value is ``previous``
            return previous
        return -(top + math.log1p(math.exp(-abs(a - b))))

    @jit
    def not_picked(picked, count, i):
        """Whether child i is not among picked[:count]."""
        for q in range(count):
            if picked[q] == i:
                return False
        return True

    @jit
    def pick_unpicked(prefix, masses, picked, count, target, scan):
        """The child a node draws next: the smallest i not among picked[:count] whose running mass over the
        children not picked (prefix[i] minus the masses[j] of the picked j <= i) exceeds ``target`` (a
        uniform times the mass not picked). A bisection of ``prefix`` (the running sums of ``masses``),
        repeated while the picked mass below the point grows; with ``scan`` (the mass left is too small
        for the running sums to resolve) a scan that sums the masses not picked afresh. Where rounding
        leaves no such i, the last child with a positive mass that is not picked."""
        K = prefix.shape[0]
        found = K
        if scan:
            running = 0.0
            for i in range(K):
                if not_picked(picked, count, i):
                    running += masses[i]
                    if running > target:
                        found = i
                        break
        else:
            below = 0.0
            while True:
                low = 0
                high = K
                goal = target + below
                while low < high:  # the smallest i with prefix[i] > goal
                    middle = (low + high) // 2
                    if prefix[middle] > goal:
                        high = middle
                    else:
                        low = middle + 1
                grown = 0.0
                taken = False
                for q in range(count):
                    if picked[q] <= low:
                        grown += masses[picked[q]]
                        taken = taken or picked[q] == low
                if grown == below:
                    if not taken:
                        found = low
                    break
                below = grown
        if found < K and masses[found] > 0.0:
            return found
        last = 0
        for i in range(K):
            if masses[i] > 0.0 and not_picked(picked, count, i):
                last = i
        return last

    @jit
    def distinct_uniforms(uniforms, use_uniforms, seed_lo, seed_hi, b, t, m, k):
        """(pick, Gumbel) uniforms of the k-th child drawn by the beam's node in place m at position t:
        replayed ``uniforms[b, t, m, 2k]`` and ``[b, t, m, 2k + 1]``, or Philox's pair (k, t, b, m) on the
        distinct sampler's stream."""
        if use_uniforms:
            return np.float64(uniforms[b, t, m, 2 * k]), np.float64(uniforms[b, t, m, 2 * k + 1])
        return uniform_pair(seed_lo, seed_hi, STREAM_DISTINCT_SAMPLER, b, t, k, m)

    @jit
    def expand_node(masses, prefix, logits, log_norm, node_phi, node_G, place, picked, draws, b, t, kept_G,
                    kept_entry, child_phi, kept):  # fmt: skip
        """Draw the children of the beam's node in place ``place`` (log-probability node_phi, perturbed value
        node_G) in decreasing order of their perturbed values, top-down (docs/design.md §4), into the
        beam being kept (kept_G, kept_entry: ``keep_best``'s list of M; entry (place * K + i) * M + k for
        the k-th child drawn, i its state), until one cannot enter it. ``masses`` (K): the children's
        unnormalised conditional probabilities, exp(logits - shift), ``prefix`` their running sums,
        ``log_norm`` = shift + log(total mass), so child i's phi is node_phi + logits[i] - log_norm, kept
        in child_phi[place * M + k]. ``draws`` = (uniforms, use_uniforms, seed_lo, seed_hi). ``picked``
        (M) is scratch. Returns the new length of the list."""
        K = masses.shape[0]
        M = kept_G.shape[0]
        uniforms, use_uniforms, seed_lo, seed_hi = draws
        total = prefix[K - 1]
        positive = 0
        for i in range(K):
            if masses[i] > 0.0:
                positive += 1
        remaining = total
        value = node_G
        for k in range(min(M, positive)):
            scan = remaining < 1e-8 * total
            if scan:  # the running sums cannot resolve the mass left: sum it afresh
                remaining = 0.0
                for i in range(K):
                    if not_picked(picked, k, i):
                        remaining += masses[i]
            u_pick, u_gumbel = distinct_uniforms(uniforms, use_uniforms, seed_lo, seed_hi, b, t, place, k)
            if k > 0:  # the largest of the children left: a Gumbel of their mass, at most the last one
                value = next_gumbel(value, node_phi + math.log(remaining / total), u_gumbel)
            if kept == M and value < kept_G[M - 1]:
                break  # neither this child nor a later one (all smaller) enters the beam
            i = pick_unpicked(prefix, masses, picked, k, u_pick * remaining, scan)
            picked[k] = i
            remaining -= masses[i]
            kept, entered = keep_best(kept_G, kept_entry, kept, value, (place * K + i) * M + k)
            if not entered:
                break
            child_phi[place * M + k] = node_phi + (logits[i] - log_norm)
        return kept

    @jit
    def priority_weight(log_prob, kappa):
        """p / q with q = P(G > kappa) = 1 - exp(-exp(log p - kappa)), the inclusion probability of a
        sample given the threshold kappa (priority sampling); log q is the gap itself when it is very
        negative and 0 when it is large (1 - exp(-exp(40)) rounds to 1)."""
        gap = log_prob - kappa
        if gap < -30.0:
            log_q = gap
        elif gap > 40.0:
            log_q = 0.0
        else:
            log_q = math.log(-math.expm1(-math.exp(gap)))
        return math.exp(log_prob - log_q)

    @jit
    def distinct_sample(scores_b, tokens_b, E1, E2, history_b, place, count, length, inv_temp, log_z, perturbed,
                        kappa, out_beam_idx, out_tokens):  # fmt: skip
        """Sample ``place`` of the distinct sampler's final beam: its path, read from ``history_b[t, place]``
        (parent place * K + state, the search having run from the last position down), into out_beam_idx /
        out_tokens (T,), PAD after ``length``; returns (log_prob, perturbed, weight), with log_prob =
        S(y) * inv_temp - log_z (S summed in float64) and the priority-sampling weight. A place at or
        beyond ``count`` is no sample: PAD throughout and (-inf, -inf, 0)."""
        K = scores_b.shape[1]
        D = E1.shape[1]
        T = out_beam_idx.shape[0]
        if place >= count:
            for t in range(T):
                out_beam_idx[t] = PAD
                out_tokens[t] = PAD
            return -math.inf, -math.inf, 0.0
        path_score = np.float64(0.0)
        x = 0
        for t in range(length):
            entry = history_b[t, place]
            y = entry % K
            place = entry // K
            out_beam_idx[t] = y
            out_tokens[t] = tokens_b[t, y]
            path_score += np.float64(scores_b[t, y])
            if t > 0:
                dot = np.float64(0.0)
                for d in range(D):
                    dot += np.float64(E1[tokens_b[t - 1, x], d]) * np.float64(E2[tokens_b[t, y], d])
                path_score += dot
            x = y
        for t in range(length, T):
            out_beam_idx[t] = PAD
            out_tokens[t] = PAD
        log_prob = path_score * inv_temp - log_z
        return log_prob, perturbed, priority_weight(log_prob, kappa)

    return SimpleNamespace(
        keep_best=keep_best,
        nbest_paths=nbest_paths,
        gumbel=gumbel,
        next_gumbel=next_gumbel,
        pick_unpicked=pick_unpicked,
        distinct_uniforms=distinct_uniforms,
        expand_node=expand_node,
        distinct_sample=distinct_sample,
        priority_weight=priority_weight,
        ranks_above=ranks_above,
        place_forced=place_forced,
        backtrace=backtrace,
        compensated_add=compensated_add,
        fairseq_step_scores=fairseq_step_scores,
        path_increments=path_increments,
        philox4x32=philox4x32,
        uniform_pair=uniform_pair,
        uniform_pair_f32=uniform_pair_f32,
        chain_uniforms=chain_uniforms,
        inverse_cdf_pick=inverse_cdf_pick,
    )
