"""crf_sample(replacement=False): exact sampling without replacement, against the law computed by
enumeration, with power checks, and the priority-sampling estimator's unbiasedness."""

import itertools

import numpy as np
import pytest
import reference as ref
from conftest import make_problem
from scipy import stats

import viterbi_numba as vn
from viterbi_numba import _portable
from viterbi_numba.cpu.decode import portable


def tiled(copies, seed=3, K=2, T=3):
    """One small sequence repeated ``copies`` times (each copy draws its own numbers), and its paths'
    probabilities by enumeration."""
    scores, tokens, E1, E2 = make_problem(np.random.default_rng(seed), 1, T, K, V=6)
    paths, log_probs, _ = ref.crf_enumerate(scores, tokens, E1, E2, 0, T)
    tile = lambda a: np.repeat(a, copies, axis=0)  # noqa: E731
    return (tile(scores), tile(tokens), E1, E2), [tuple(p) for p in paths], np.exp(log_probs)


def swor_law(probs, N):
    """P(ordered N-tuple of distinct path indices) of a draw without replacement."""
    law = {}
    for tup in itertools.permutations(range(len(probs)), N):
        p, left = 1.0, 1.0
        for k in tup:
            p *= probs[k] / left
            left -= probs[k]
        law[tup] = p
    return law


def chi_square(observed, law, draws):
    """p-value of a chi-square test of tuple counts against ``law`` (cells with expected < 5 pooled)."""
    keys = sorted(law, key=lambda k: -law[k])
    expected = np.array([law[k] * draws for k in keys])
    counts = np.array([observed.get(k, 0) for k in keys], dtype=float)
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    counts = np.append(counts[~small], counts[small].sum() + (draws - sum(observed.get(k, 0) for k in keys)))
    return stats.chisquare(counts, expected).pvalue


def tuples(beam_idx, paths):
    index = {p: n for n, p in enumerate(paths)}
    out = {}
    for b in range(beam_idx.shape[0]):
        key = tuple(index[tuple(beam_idx[b, :, n])] for n in range(beam_idx.shape[2]))
        out[key] = out.get(key, 0) + 1
    return out


def test_the_ordered_sample_follows_the_law_of_a_draw_without_replacement():
    draws = 40000
    inputs, paths, probs = tiled(draws)
    got = vn.crf_sample(*inputs, 3, seed=11, replacement=False)
    assert np.all(got.count == 3)
    assert all(len(set(map(tuple, got.beam_idx[b].T))) == 3 for b in range(200))  # distinct
    law = swor_law(probs, 3)
    assert chi_square(tuples(got.beam_idx, paths), law, draws) > 1e-3
    # power: pairs drawn with replacement and kept when distinct follow another law, which the same
    # test rejects (P(y1, y2) proportional to p(y1) p(y2) instead of p(y1) p(y2) / (1 - p(y1)))
    pairs = vn.crf_sample(*inputs, 2, seed=12).beam_idx
    distinct = [b for b in range(draws) if tuple(pairs[b, :, 0]) != tuple(pairs[b, :, 1])]
    assert chi_square(tuples(pairs[distinct], paths), swor_law(probs, 2), len(distinct)) < 1e-6
    own = vn.crf_sample(*inputs, 2, seed=13, replacement=False).beam_idx
    assert chi_square(tuples(own, paths), swor_law(probs, 2), draws) > 1e-3


def test_the_priority_estimate_is_unbiased():
    draws = 20000
    inputs, paths, probs = tiled(draws, seed=5, K=3, T=3)  # 27 paths, 4 drawn
    f = np.random.default_rng(0).standard_normal(len(paths))
    index = {p: n for n, p in enumerate(paths)}
    got = vn.crf_sample(*inputs, 4, seed=21, replacement=False)
    drawn = np.array([[index[tuple(got.beam_idx[b, :, n])] for n in range(4)] for b in range(draws)])
    values = f[drawn]
    estimates = (got.weights * values).sum(axis=1)
    exact = float(probs @ f)
    se = estimates.std() / np.sqrt(draws)
    assert abs(estimates.mean() - exact) < 4 * se
    naive = values.mean(axis=1)  # the plain mean of distinct samples is biased, and the test sees it
    assert abs(naive.mean() - exact) > 4 * naive.std() / np.sqrt(draws)
    # the inclusion probabilities: q = p / weight lies in (0, 1], and log_prob is each path's own
    q = np.exp(got.log_prob) / got.weights
    assert np.all((q > 0) & (q <= 1 + 1e-12))
    np.testing.assert_allclose(got.log_prob, np.log(probs)[drawn], rtol=1e-10)
    assert np.all(np.diff(got.perturbed, axis=1) <= 0) and np.all(got.perturbed[:, -1] >= got.kappa)


def test_every_path_when_there_are_too_few():
    scores, tokens, E1, E2 = make_problem(np.random.default_rng(2), 2, 3, 3, V=8)
    lengths = np.array([3, 2])
    scores[0, 1, 0] = -np.inf  # 3 * 2 * 3 = 18 paths; sequence 1 has 9
    got = vn.crf_sample(scores, tokens, E1, E2, 20, lengths=lengths, seed=1, replacement=False)
    np.testing.assert_array_equal(got.count, [18, 9])
    assert np.all(got.kappa == -np.inf)
    for b, count in enumerate(got.count):
        drawn = {tuple(got.beam_idx[b, : lengths[b], n]) for n in range(count)}
        assert len(drawn) == count
        np.testing.assert_allclose(got.weights[b, :count].sum(), 1.0, rtol=1e-12)  # every p, so sum 1
        np.testing.assert_allclose(got.weights[b, :count], np.exp(got.log_prob[b, :count]), rtol=1e-12)
        assert np.all(got.beam_idx[b, :, count:] == vn.PAD) and np.all(got.log_prob[b, count:] == -np.inf)
        assert np.all(got.beam_idx[b, lengths[b] :] == vn.PAD) and np.all(got.weights[b, count:] == 0)


def test_seed_and_replayed_numbers_reproduce_the_draw():
    """A seed's draw is the replay of its own Philox numbers in the documented layout: uniforms[b, t, m, 2k]
    and [2k + 1] are the pair (k, t, b, m) of the distinct sampler's stream."""
    scores, tokens, E1, E2 = make_problem(np.random.default_rng(4), 3, 4, 5, V=12)
    first = vn.crf_sample(scores, tokens, E1, E2, 4, 0.7, seed=9, replacement=False)
    again = vn.crf_forward(scores, tokens, E1, E2, 0.7).sample(4, seed=9, replacement=False)
    for name in first._fields:
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    uniforms = np.empty((3, 4, 5, 10))
    for b, t, m, k in np.ndindex(3, 4, 5, 5):
        uniforms[b, t, m, 2 * k : 2 * k + 2] = portable.uniform_pair(
            9, 0, _portable.STREAM_DISTINCT_SAMPLER, b, t, k, m
        )
    replayed = vn.crf_sample(scores, tokens, E1, E2, 4, 0.7, uniforms=uniforms, replacement=False)
    for name in first._fields:
        np.testing.assert_array_equal(getattr(replayed, name), getattr(first, name))
    other = vn.crf_sample(scores, tokens, E1, E2, 4, 0.7, uniforms=uniforms[::-1].copy(), replacement=False)
    assert not np.array_equal(other.beam_idx, first.beam_idx)
    with pytest.raises(ValueError, match=r"uniforms must have shape \(3, 4, 5, 10\) \(B, T, N \+ 1, 2 \(N \+ 1\)\)"):
        vn.crf_sample(scores, tokens, E1, E2, 4, uniforms=uniforms[:, :, :, :8], replacement=False)
    with pytest.raises(TypeError, match="replacement must be a bool"):
        vn.crf_sample(scores, tokens, E1, E2, 4, seed=1, replacement="no")


def test_a_smaller_draw_is_the_start_of_a_larger_one():
    """The kept beams are nested (docs/design.md §4): with the same seed, the draw of N is the first N
    of the draw of any larger N, perturbed values included."""
    scores, tokens, E1, E2 = make_problem(np.random.default_rng(8), 3, 5, 6, V=20)
    large = vn.crf_sample(scores, tokens, E1, E2, 7, seed=3, replacement=False)
    for N in (1, 3, 6):
        small = vn.crf_sample(scores, tokens, E1, E2, N, seed=3, replacement=False)
        np.testing.assert_array_equal(small.beam_idx, large.beam_idx[:, :, :N])
        np.testing.assert_array_equal(small.perturbed, large.perturbed[:, :N])
        assert np.all(small.kappa >= large.kappa)
