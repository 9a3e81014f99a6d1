"""The device functions of ``_portable`` (compiled for the CPU), on their own."""

import numpy as np
import pytest

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
