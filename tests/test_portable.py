"""The device functions of ``_portable`` (compiled for the CPU) and the CPU kernels' float32 exp and
softmax pick, on their own."""

import math

import numpy as np
import pytest
from cpu_helpers import fast_exp_array

from viterbi_numba.cpu import decode as cpu_decode

pick = cpu_decode.inverse_cdf_pick


@pytest.mark.parametrize(
    "prefix, target, expected",
    [
        ([0.1, 0.5, 1.0], 0.0, 0),  # smallest i with target < prefix[i]
        ([0.1, 0.5, 1.0], 0.1, 1),  # equal to a step: the next one
        ([0.1, 0.5, 1.0], 0.99, 2),
        ([0.0, 0.0, 1.0], 0.0, 2),  # zero-weight states are never picked
        ([0.1, 0.5, 0.5], 0.5, 1),  # target at the total: clamp to the last positive weight
        ([0.1, 0.5, 0.5], 0.7, 1),
        ([0.0, 0.0, 0.0], 0.0, 0),  # nothing positive: 0, never out of range
    ],
)
def test_inverse_cdf_pick(prefix, target, expected):
    assert pick(np.array(prefix), target, len(prefix)) == expected


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


def test_compensated_add_keeps_what_a_plain_float32_sum_loses():
    compensated_add = cpu_decode.portable.compensated_add
    total = error = np.float32(0)
    plain = np.float32(0)
    for _ in range(100_000):
        total, error = compensated_add(total, error, np.float32(0.1))
        plain = np.float32(plain + np.float32(0.1))
    exact = 100_000 * float(np.float32(0.1))
    assert abs(float(total) - exact) < 1e-3 < abs(float(plain) - exact)


def test_path_increments_sum_to_the_path_score(rng):
    import reference as ref
    from conftest import make_problem

    scores, tokens, E1, E2 = make_problem(rng, 1, 5, 3, D=2)
    path = np.array([2, 0, 1, 1, 0])
    out = np.full(5, np.nan)
    cpu_decode.path_increments(scores[0], tokens[0], E1, E2, path, 4, out)
    assert np.isnan(out[4])  # the caller fills the padded positions
    want = ref.path_score(scores, ref.transitions(tokens, E1, E2), 0, path[:4])
    np.testing.assert_allclose(out[:4].sum(), want, rtol=1e-12)
    assert out[0] == scores[0, 0, 2]
