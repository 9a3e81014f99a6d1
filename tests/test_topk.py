"""topk_beam against the NumPy reference and torch.topk's contract."""

import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from viterbi_numba import topk_beam


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 4),
    V=st.integers(1, 40),
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float64]),
    ties=st.booleans(),
)
def test_matches_reference(B, T, V, data, dtype, ties):
    k = data.draw(st.integers(1, V))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    emissions = rng.standard_normal((B, T, V))
    if ties:  # few distinct values: ties must go to the lower token id
        emissions = np.round(emissions)
    emissions = emissions.astype(dtype)
    got = topk_beam(emissions, k)
    want_scores, want_tokens = ref.topk(emissions, k)
    np.testing.assert_array_equal(got.tokens, want_tokens)
    np.testing.assert_array_equal(got.scores, want_scores)
    assert got.scores.dtype == dtype and got.tokens.dtype == np.int64


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 4), V=st.integers(1, 30), data=st.data())
def test_force_tokens_match_reference(B, T, V, data):
    k = data.draw(st.integers(1, V))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    emissions = rng.standard_normal((B, T, V))
    forced = rng.integers(0, V, (B, T))
    got = topk_beam(emissions, k, force_tokens=forced)
    want_scores, want_tokens = ref.topk(emissions, k, forced)
    np.testing.assert_array_equal(got.tokens, want_tokens)
    np.testing.assert_array_equal(got.scores, want_scores)
    assert (got.tokens == forced[:, :, None]).any(axis=2).all()


def test_writeup_size_against_numpy_sort(rng):
    emissions = rng.standard_normal((2, 3, 30000)).astype(np.float32)
    got = topk_beam(emissions, 256)
    order = np.argsort(-emissions, axis=2, kind="stable")[:, :, :256]
    np.testing.assert_array_equal(got.tokens, order)
    np.testing.assert_array_equal(got.scores, np.take_along_axis(emissions, order, 2))


def test_float16_is_computed_in_float32(rng):
    emissions = rng.standard_normal((1, 2, 10)).astype(np.float16)
    got = topk_beam(emissions, 3)
    assert got.scores.dtype == np.float32
    np.testing.assert_array_equal(got.tokens, ref.topk(emissions.astype(np.float32), 3)[1])


def test_neg_inf_is_allowed_and_ranks_last(rng):
    emissions = rng.standard_normal((1, 1, 6))
    emissions[0, 0, [1, 4]] = -np.inf
    got = topk_beam(emissions, 6)
    assert list(got.tokens[0, 0, -2:]) == [1, 4]


def test_non_contiguous_input(rng):
    base = rng.standard_normal((12, 3, 2))
    emissions = base.transpose(2, 1, 0)  # (2, 3, 12), strided
    assert not emissions.flags.c_contiguous
    got = topk_beam(emissions, 5)
    want = topk_beam(np.ascontiguousarray(emissions), 5)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_empty_batch():
    got = topk_beam(np.zeros((0, 3, 5), np.float32), 2)
    assert got.scores.shape == (0, 3, 2) and got.tokens.shape == (0, 3, 2)


@pytest.mark.parametrize(
    "V, k",
    [(30000, 64), (30000, 256), (32 * 257, 256), (32 * 257 + 5, 256), (4 * 64 * 7 + 3, 64), (3000, 1024)],
)
def test_long_rows_with_the_block_filter_and_forcing(rng, V, k):
    """Long rows take the block-maxima filter (blocks of 32 entries, or fewer when the row has under
    128 k entries; barely more blocks than k in the third and fourth cases); it must stay exact on rows
    built against it: ties everywhere (the threshold is a value many entries share), one block holding
    all the large entries, an ascending row, and forced tokens below the threshold."""
    emissions = rng.standard_normal((2, 3, V))
    emissions[0, 0] = np.round(emissions[0, 0])  # five distinct values: ties at the threshold
    emissions[0, 1, :32] += 10.0  # one block holds the 32 largest entries
    emissions[1, 1] = np.sort(emissions[1, 1])  # ascending
    emissions[1, 2] = np.round(emissions[1, 2] * 2) / 2
    forced = rng.integers(0, V, (2, 3))
    forced[0, 0] = int(np.argmin(emissions[0, 0]))  # far below the threshold
    for force in (None, forced):
        got = topk_beam(emissions, k, force_tokens=force)
        want_scores, want_tokens = ref.topk(emissions, k, force)
        np.testing.assert_array_equal(got.tokens, want_tokens)
        np.testing.assert_array_equal(got.scores, want_scores)


def test_a_tie_across_the_kth_place_changes_the_token_set():
    """The README's example: torch.topk and topk_beam keep different tokens when a tie falls across the
    K-th place, so the beam CRF over the two beams differs (its log Z here); without such a tie the
    token sets agree."""
    torch = pytest.importorskip("torch")
    from viterbi_numba import log_partition

    emissions = np.array([[[2.0, 5.0, 2.0, 2.0, 1.0], [0.0, 3.0, 1.0, 0.5, 0.0]]])
    ours = topk_beam(emissions, 2)
    theirs = torch.topk(torch.from_numpy(emissions), 2, 2)
    assert list(ours.tokens[0, 0]) == [1, 0]
    assert sorted(theirs.indices.numpy()[0, 0]) == [1, 2]  # torch 2.13, CPU: another of the tied tokens
    E1 = np.arange(10.0).reshape(5, 2) / 10
    E2 = E1[::-1].copy()
    z_ours = log_partition(ours.scores, ours.tokens, E1, E2)
    z_theirs = log_partition(theirs.values.numpy(), theirs.indices.numpy(), E1, E2)
    assert abs(z_ours[0] - z_theirs[0]) > 1e-3
    no_tie = emissions.copy()
    no_tie[0, 0, 2] = 3.0
    assert set(topk_beam(no_tie, 2).tokens[0, 0]) == set(
        torch.topk(torch.from_numpy(no_tie), 2, 2).indices.numpy()[0, 0]
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_rows_with_signed_zeros_extremes_and_neg_inf(rng, dtype):
    """The filter works on integer keys of the floats: -0.0 must tie with +0.0 (lower id first), the
    largest finite magnitudes and -inf must keep their order, and a bisection over the whole key range
    (both signs' extremes in one row) must not overflow."""
    V, k = 9000, 64
    info = np.finfo(dtype)
    emissions = rng.standard_normal((2, 2, V)).astype(dtype)
    emissions[0, 0] = np.where(rng.random(V) < 0.5, -0.0, 0.0)  # one value, two bit patterns
    emissions[0, 1, rng.integers(0, V, 40)] = info.max
    emissions[0, 1, rng.integers(0, V, 40)] = -info.max
    emissions[0, 1, rng.integers(0, V, 3000)] = -np.inf
    emissions[1, 0] = np.where(rng.random(V) < 0.99, -np.inf, emissions[1, 0])  # fewer than k finite
    emissions[1, 1] = np.where(rng.random(V) < 0.5, info.tiny, -info.tiny)
    got = topk_beam(emissions, k)
    order = np.argsort(-emissions, axis=2, kind="stable")[:, :, :k]
    np.testing.assert_array_equal(got.tokens, order)
    np.testing.assert_array_equal(got.scores, np.take_along_axis(emissions, order, 2))
