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

    return SimpleNamespace(
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
