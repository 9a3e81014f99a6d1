"""Device functions shared by every backend, written once as plain Python.

``build(jit)`` compiles them with one target's decorator and returns them as a namespace:
``build(numba.njit(...))`` for the CPU kernels, ``build(cuda.jit(device=True))`` for the GPU ones.
Each function only does scalar integer/float arithmetic and indexing, so both targets accept it, and
the same inputs give the same bits on both.

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
STREAM_SEED_SAMPLER = 0
STREAM_EXACT_SAMPLER = 1


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
            np.uint64(j_pair), np.uint64(t), np.uint64(b), np.uint64(n),
            np.uint64(seed_lo), np.uint64(seed_hi) ^ np.uint64(stream),
        )
        u0 = (np.float64(x0 >> _SHIFT5) * _TWO26 + np.float64(x1 >> _SHIFT6)) * _TWO_M53
        u1 = (np.float64(x2 >> _SHIFT5) * _TWO26 + np.float64(x3 >> _SHIFT6)) * _TWO_M53
        return u0, u1

    @jit
    def uniform_pair_f32(seed_lo, seed_hi, stream, b, t, j_pair, n):
        """``uniform_pair`` in float32 without float64 arithmetic (for float32 GPU kernels): each is the
        top 24 bits of the float64 uniform, so the two differ by less than 2**-24."""
        x0, x1, x2, x3 = philox4x32(
            np.uint64(j_pair), np.uint64(t), np.uint64(b), np.uint64(n),
            np.uint64(seed_lo), np.uint64(seed_hi) ^ np.uint64(stream),
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

    return SimpleNamespace(
        philox4x32=philox4x32,
        uniform_pair=uniform_pair,
        uniform_pair_f32=uniform_pair_f32,
        chain_uniforms=chain_uniforms,
        inverse_cdf_pick=inverse_cdf_pick,
    )
