"""The CPU kernels' own device functions: the vectorisable float32 exp, the softmax pick, the keys and masks
of top-K and the prefetch hint."""

import math

import numpy as np
import pytest
from cpu_helpers import fast_exp_array
from numba import njit

from viterbi_numba.cpu import decode as cpu_decode
from viterbi_numba.cpu import intrinsics


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ordered_keys_order_like_the_values(dtype):
    """ordered_key is monotonic over every kind of float (-inf, normals, subnormals, both zeros, +inf),
    reads -0.0 as +0.0, and key_value maps a key back to its value."""
    from numba import njit

    from viterbi_numba.cpu.intrinsics import key_value, ordered_key

    @njit
    def keys_and_back(values):
        keys = np.empty(values.shape[0], np.int64)
        back = np.empty_like(values)
        for i in range(values.shape[0]):
            keys[i] = ordered_key(values[i])
            back[i] = key_value(keys[i], values[i])
        return keys, back

    info = np.finfo(dtype)
    special = [-np.inf, -info.max, -1.5, -info.tiny, -info.smallest_subnormal, -0.0, 0.0]
    special += [info.smallest_subnormal, info.tiny, 1.5, info.max, np.inf]
    values = np.sort(np.concatenate([np.array(special, dtype), np.random.default_rng(0).standard_normal(500)]))
    values = values.astype(dtype)
    keys, back = keys_and_back(values)
    assert (np.diff(keys) >= 0).all()
    assert ((np.diff(keys) == 0) == (np.diff(values) == 0)).all()  # equal keys exactly for equal values
    np.testing.assert_array_equal(back, values)
    assert keys[np.flatnonzero(values == 0)].tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_at_least_and_lowest_bit(dtype):
    from numba import njit

    from viterbi_numba.cpu.intrinsics import MASK_BYTES, lowest_bit, mask_at_least

    @njit
    def reaching(row, start, threshold):
        mask = mask_at_least(row, start, threshold)
        found = []
        while mask:
            found.append(start + lowest_bit(mask))
            mask &= mask - np.uint64(1)
        return found

    lanes = MASK_BYTES // np.dtype(dtype).itemsize
    row = np.random.default_rng(1).standard_normal(3 * lanes).astype(dtype)
    row[lanes + 2] = -np.inf
    for start in (0, 1, lanes, 2 * lanes):
        for threshold in (-np.inf, 0.0, float(row[start + 3])):
            want = [start + i for i in range(lanes) if row[start + i] >= threshold]
            assert reaching(row, start, threshold) == want


@njit(cache=True)
def _prefetch_every_row(table):
    for row in range(table.shape[0]):
        intrinsics.prefetch_row(table, row)
    return table.sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (5, 17), (3, 100)])
def test_prefetch_row_is_only_a_hint(dtype, shape):
    """prefetch_row compiles for tables of either float type whose rows span part of a cache line, one
    or several (down to the last row), and changes nothing."""
    table = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    before = table.copy()
    assert _prefetch_every_row(table) == before.sum()
    np.testing.assert_array_equal(table, before)
