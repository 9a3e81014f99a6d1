import os
import sys

import numpy as np
import pytest

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


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
