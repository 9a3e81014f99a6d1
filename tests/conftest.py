import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(__file__))


def make_problem(rng, B, T, K, V=None, D=4, dtype=np.float64, scale=1.0):
    """Random beam CRF inputs: scores (B,T,K), distinct tokens per position (B,T,K), E1/E2 (V,D)."""
    V = V or max(K + 3, 2 * K)
    scores = (rng.standard_normal((B, T, K)) * scale).astype(dtype)
    tokens = np.stack([np.stack([rng.choice(V, K, replace=False) for _ in range(T)]) for _ in range(B)])
    tokens = tokens.reshape(B, T, K).astype(np.int64)
    E1 = (rng.standard_normal((V, D)) * 0.7).astype(dtype)
    E2 = (rng.standard_normal((V, D)) * 0.7).astype(dtype)
    return scores, tokens, E1, E2


def path_counts(beam_idx):
    """Count paths over chains: beam_idx (T, N) -> {path tuple: count}."""
    paths, counts = np.unique(beam_idx.T, axis=0, return_counts=True)
    return {tuple(int(x) for x in p): int(c) for p, c in zip(paths, counts)}


def chi_square_pvalue(counts, probs):
    """Goodness of fit of observed path counts to exact path probabilities (bins with expected < 5 pooled)."""
    total = sum(counts.values())
    keys = sorted(probs, key=lambda key: -probs[key])
    observed, expected = [], []
    pool_obs = pool_exp = 0.0
    for key in keys:
        e = probs[key] * total
        if e >= 5:
            observed.append(counts.get(key, 0))
            expected.append(e)
        else:
            pool_obs += counts.get(key, 0)
            pool_exp += e
    assert sum(counts.get(key, 0) for key in counts if key not in probs) == 0, "a path of probability 0"
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    expected = np.array(expected) * (total / np.sum(expected))
    return stats.chisquare(observed, expected).pvalue


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# The GPU suite runs in a process of its own: tests/test_gpu_simulator.py starts it in the CUDA
# simulator; VITERBI_NUMBA_GPU_TESTS=1 runs it on a GPU.
_GPU_SUITE = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("VITERBI_NUMBA_GPU_TESTS") == "1"
collect_ignore = [] if _GPU_SUITE else ["gpu"]
