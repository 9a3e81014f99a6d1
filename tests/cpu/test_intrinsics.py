"""The CPU kernels' own device functions: the vectorisable float32 exp and the softmax pick."""

import math

import numpy as np
import pytest
from cpu_helpers import fast_exp_array

from viterbi_numba.cpu import decode as cpu_decode


def test_fast_exp_accuracy_and_limits():
    x = np.linspace(-86.99, 0.0, 2_000_001).astype(np.float32)
    got = fast_exp_array(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 3e-7
    edge = np.array([-np.inf, -1e30, -87.0, -87.5, 0.0], np.float32)
    np.testing.assert_array_equal(fast_exp_array(edge), [0, 0, 0, 0, 1])


def test_float64_exp_is_math_exp():
    x = np.linspace(-700, 0, 1001)
    np.testing.assert_array_equal(fast_exp_array(x), [math.exp(v) for v in x])


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e30])
def test_softmax_pick_never_reads_its_scratch(garbage):
    """``prefix`` is uninitialised scratch in the kernels (np.empty): whatever it holds must not matter.
    (It once started its running sum from prefix[0] * 0, which is NaN for NaN or inf garbage, and made
    crf_sample differ in about 1 process in 30.)"""
    logits = np.array([-3.0, -1.0, 2.0, 0.5])
    for u in (0.0, 0.3, 0.9, 0.999):
        want = cpu_decode.softmax_pick(logits, 1.0, u, np.zeros(4))
        assert cpu_decode.softmax_pick(logits, 1.0, u, np.full(4, garbage)) == want
    assert cpu_decode.softmax_pick(logits, 1.0, 0.5, np.full(4, garbage)) == 2
