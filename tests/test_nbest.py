"""viterbi_nbest: the n best distinct beam paths, against enumeration of every path."""

import itertools

import numpy as np
import pytest
import reference as ref
from conftest import make_problem

import viterbi_numba as vn


def enumerated_best(scores, tokens, E1, E2, lengths):
    """Per sequence: every path of finite score as (score, path), best first; equal scores in the order
    the kernel documents (lower last slot, then recursively the earlier prefix)."""
    trans = ref.transitions(tokens, E1, E2)
    out = []
    for b, length in enumerate(lengths):
        paths = itertools.product(range(scores.shape[2]), repeat=int(length))
        scored = [(ref.path_score(scores, trans, b, y), y) for y in paths]
        finite = [(s, y) for s, y in scored if np.isfinite(s)]
        out.append(sorted(finite, key=lambda item: (-item[0], tuple(reversed(item[1])))))
    return out


@pytest.mark.parametrize("n", [1, 5, 27, 100])
def test_the_n_best_are_the_best_of_all_paths(n):
    rng = np.random.default_rng(3)
    scores, tokens, E1, E2 = make_problem(rng, 3, 4, 3, V=8)
    lengths = np.array([4, 2, 3])
    got = vn.viterbi_nbest(scores, tokens, E1, E2, n, lengths)
    want = enumerated_best(scores, tokens, E1, E2, lengths)
    assert got.beam_idx.shape == got.tokens.shape == (3, 4, n) and got.score.shape == (3, n)
    for b, length in enumerate(lengths):
        count = min(n, 3**length)
        assert got.count[b] == count
        np.testing.assert_allclose(got.score[b, :count], [s for s, _ in want[b][:count]], rtol=1e-12)
        assert [tuple(got.beam_idx[b, :length, k]) for k in range(count)] == [y for _, y in want[b][:count]]
        np.testing.assert_array_equal(
            got.tokens[b, :length, :count], np.take_along_axis(tokens[b, :length], got.beam_idx[b, :length, :count], 1)
        )
        assert np.all(got.beam_idx[b, length:] == vn.PAD) and np.all(got.beam_idx[b, :, count:] == vn.PAD)
        assert np.all(got.tokens[b, :, count:] == vn.PAD) and np.all(got.score[b, count:] == -np.inf)
    # the scores are the paths' own S(y), and the first path is Viterbi's
    paths = got.beam_idx[:, :, :1]  # PAD after each length is ignored
    np.testing.assert_allclose(vn.sequence_score(scores, tokens, E1, E2, paths, lengths)[:, 0], got.score[:, 0])
    np.testing.assert_array_equal(got.beam_idx[:, :, 0], vn.viterbi_decode(scores, tokens, E1, E2, lengths).beam_idx)


def test_minus_infinity_slots_leave_fewer_paths():
    rng = np.random.default_rng(4)
    scores, tokens, E1, E2 = make_problem(rng, 2, 3, 3, V=8)
    scores[0, 1, :2] = -np.inf  # sequence 0 has 3 * 1 * 3 = 9 paths
    scores[1, :, 0] = -np.inf  # sequence 1 has 2 ** 3 = 8
    got = vn.viterbi_nbest(scores, tokens, E1, E2, 12)
    np.testing.assert_array_equal(got.count, [9, 8])
    want = enumerated_best(scores, tokens, E1, E2, [3, 3])
    for b in range(2):
        count = got.count[b]
        np.testing.assert_allclose(got.score[b, :count], [s for s, _ in want[b]], rtol=1e-12)
        assert [tuple(got.beam_idx[b, :, k]) for k in range(count)] == [y for _, y in want[b]]


def test_ties_follow_the_documented_order():
    # zero tables and integer scores: many paths share a score
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 2, (2, 3, 3)).astype(np.float64)
    tokens = np.tile(np.arange(3), (2, 3, 1))
    E = np.zeros((3, 2))
    got = vn.viterbi_nbest(scores, tokens, E, E, 27)
    want = enumerated_best(scores, tokens, E, E, [3, 3])
    for b in range(2):
        assert [tuple(got.beam_idx[b, :, k]) for k in range(27)] == [y for _, y in want[b]]


def test_float32_gives_the_float64_paths():
    rng = np.random.default_rng(6)
    scores, tokens, E1, E2 = make_problem(rng, 2, 5, 4, V=10)
    wide = vn.viterbi_nbest(scores, tokens, E1, E2, 20)
    narrow = vn.viterbi_nbest(scores.astype(np.float32), tokens, E1.astype(np.float32), E2.astype(np.float32), 20)
    assert narrow.score.dtype == np.float32
    np.testing.assert_allclose(narrow.score, wide.score, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(narrow.beam_idx, wide.beam_idx)


@pytest.mark.parametrize(
    "n, error, match",
    [
        (0, ValueError, "n must be at least 1"),
        (1025, ValueError, "n must be at most 1024"),
        (2.0, TypeError, "n must be an integer"),
    ],
)
def test_bad_n_is_named(n, error, match):
    scores, tokens, E1, E2 = make_problem(np.random.default_rng(7), 1, 2, 2, V=4)
    with pytest.raises(error, match=match):
        vn.viterbi_nbest(scores, tokens, E1, E2, n)
