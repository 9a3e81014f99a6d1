"""Small @njit wrappers that let the tests call the CPU kernels' device functions on their own."""

import numpy as np
from numba import njit, prange

from viterbi_numba.cpu.decode import chain_uniforms
from viterbi_numba.cpu.intrinsics import fast_exp


@njit(cache=True)
def fast_exp_array(values):
    """fast_exp element-wise over a 1-D array."""
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        out[i] = fast_exp(values[i])
    return out


@njit(cache=True, parallel=True)
def fill_uniforms(seed_lo, seed_hi, stream, out):
    """out[b, t, j, n] = the uniform that stochastic Viterbi draws for (b, step t+1, state j, chain n)."""
    B, S, K, N = out.shape
    for b in prange(B):
        for t in range(S):
            for n in range(N):
                chain_uniforms(seed_lo, seed_hi, stream, b, t, n, out[b, t, :, n])
