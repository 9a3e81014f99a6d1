"""stochastic_viterbi: the write-up's sampler, against the reference, exact enumeration and its invariances."""

import numpy as np
import pytest
import reference as ref
from conftest import chi_square_pvalue, make_problem, path_counts
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from viterbi_numba import PAD, stochastic_viterbi, stochastic_viterbi_backward, viterbi_decode

TOL = {np.float32: 1e-5, np.float64: 1e-12}
# Uniforms are kept this far (relative to the column total) from every CDF step, so float32 rounding
# cannot move a pick; float64 needs far less room.
MARGIN = {np.float32: 1e-4, np.float64: 1e-9}


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    K=st.integers(1, 8),
    N=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
    temperature=st.sampled_from([1.0, 0.5, 2.0]),
    padded=st.booleans(),
)
def test_matches_reference_given_uniforms(B, T, K, N, seed, dtype, temperature, padded):
    rng = np.random.default_rng(seed)
    scores, tokens, E1, E2 = make_problem(rng, B, T, K, dtype=dtype)
    lengths = rng.integers(1, T + 1, B) if padded else None
    want = ref.stochastic_viterbi(
        scores,
        tokens,
        E1,
        E2,
        temperature=temperature,
        lengths=lengths,
        num_samples=N or 1,
        rng=rng,
        margin=MARGIN[dtype],
    )
    uniforms = want[-1] if N is not None else want[-1][..., 0]
    got = stochastic_viterbi(
        scores, tokens, E1, E2, num_samples=N, temperature=temperature, lengths=lengths, uniforms=uniforms
    )
    if N is None:  # the write-up's single-sample shapes
        assert got.beam_probs.shape == (B, T, K) and got.beam_idx.shape == (B, T, 1)
        assert got.tokens.shape == (B, T) and got.backpointers.shape == (B, T - 1, K)
        want = [w[..., 0] if w.ndim in (3, 4) else w for w in want[:-1]]
        want[1] = want[1][..., None] if want[1].ndim == 2 else want[1]
        want[5] = want[5][:, 0]
    beam_probs, beam_idx, path_tokens, path_scores, backpointers, score = want[:6]
    np.testing.assert_array_equal(got.backpointers, backpointers)
    np.testing.assert_array_equal(got.beam_idx, beam_idx.reshape(got.beam_idx.shape))
    np.testing.assert_array_equal(got.tokens, path_tokens)
    tol = TOL[dtype]
    np.testing.assert_allclose(got.path_scores, path_scores, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(got.beam_probs, beam_probs, rtol=tol * 10, atol=tol)
    np.testing.assert_allclose(got.score, score, rtol=tol, atol=tol * 10)
    assert got.beam_probs.dtype == dtype and got.path_scores.dtype == dtype


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_chi_square_against_exact_enumeration(temperature):
    rng = np.random.default_rng(7)
    scores, tokens, E1, E2 = make_problem(rng, 1, 3, 3, scale=0.7)
    exact = ref.stochastic_viterbi_path_distribution(scores, tokens, E1, E2, temperature)
    assert abs(sum(exact.values()) - 1) < 1e-12
    draws = stochastic_viterbi(scores, tokens, E1, E2, num_samples=40_000, temperature=temperature, seed=11)
    counts = path_counts(draws.beam_idx[0])
    assert chi_square_pvalue(counts, exact) > 1e-3
    # power: the same draws are clearly not samples of the CRF (DESIGN §3: a different distribution)
    crf = ref.crf_path_distribution(scores, tokens, E1, E2, temperature)
    assert chi_square_pvalue({k: counts.get(k, 0) for k in crf}, crf) < 1e-6


def test_two_sample_chi_square_against_reference_with_numpy_uniforms():
    rng = np.random.default_rng(8)
    scores, tokens, E1, E2 = make_problem(rng, 1, 4, 3, scale=0.7)
    N = 20_000
    ours = stochastic_viterbi(scores, tokens, E1, E2, num_samples=N, seed=3).beam_idx[0]
    theirs = ref.stochastic_viterbi(scores, tokens, E1, E2, uniforms=rng.random((1, 3, 3, N)))[1][0]
    a, b = path_counts(ours), path_counts(theirs)
    keys = sorted(set(a) | set(b))
    table = np.array([[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]])
    table = table[:, table.sum(axis=0) >= 10]
    assert stats.chi2_contingency(table).pvalue > 1e-3
    # power check: a sampler at another temperature is told apart by the same test
    other = stochastic_viterbi(scores, tokens, E1, E2, num_samples=N, temperature=0.6, seed=3).beam_idx[0]
    c = path_counts(other)
    keys = sorted(set(a) | set(c))
    table = np.array([[a.get(k, 0) for k in keys], [c.get(k, 0) for k in keys]])
    table = table[:, table.sum(axis=0) >= 10]
    assert stats.chi2_contingency(table).pvalue < 1e-6


def test_sampled_path_score_is_its_crf_score(rng):
    scores, tokens, E1, E2 = make_problem(rng, 3, 7, 5)
    got = stochastic_viterbi(scores, tokens, E1, E2, num_samples=4, seed=1)
    trans = ref.transitions(tokens, E1, E2)
    for b in range(3):
        for n in range(4):
            assert got.score[b, n] == pytest.approx(ref.path_score(scores, trans, b, got.beam_idx[b, :, n]), rel=1e-12)


def test_padded_batch_equals_each_sequence_alone(rng):
    scores, tokens, E1, E2 = make_problem(rng, 3, 8, 5)
    lengths = np.array([8, 1, 4])
    uniforms = rng.random((3, 7, 5, 2))
    batch = stochastic_viterbi(scores, tokens, E1, E2, num_samples=2, lengths=lengths, uniforms=uniforms)
    for b, L in enumerate(lengths):
        alone = stochastic_viterbi(
            scores[b : b + 1, :L], tokens[b : b + 1, :L], E1, E2, num_samples=2, uniforms=uniforms[b : b + 1, : L - 1]
        )
        np.testing.assert_array_equal(batch.beam_idx[b, :L], alone.beam_idx[0])
        np.testing.assert_array_equal(batch.tokens[b, :L], alone.tokens[0])
        np.testing.assert_array_equal(batch.beam_probs[b, :L], alone.beam_probs[0])
        np.testing.assert_array_equal(batch.backpointers[b, : L - 1], alone.backpointers[0])
        assert (batch.beam_idx[b, L:] == PAD).all() and (batch.tokens[b, L:] == PAD).all()
        assert (batch.beam_probs[b, L:] == 0).all()
        assert (batch.backpointers[b, L - 1 :] == np.arange(5)[:, None]).all()  # identity
        np.testing.assert_array_equal(batch.score[b], alone.score[0])


def test_seeded_results_do_not_depend_on_padding_length(rng):
    scores, tokens, E1, E2 = make_problem(rng, 2, 6, 5)
    lengths = np.array([6, 4])
    short = stochastic_viterbi(scores, tokens, E1, E2, num_samples=3, lengths=lengths, seed=42)
    pad_scores = np.concatenate([scores, rng.standard_normal((2, 3, 5))], axis=1)
    pad_tokens = np.concatenate([tokens, tokens[:, :3]], axis=1)
    long = stochastic_viterbi(pad_scores, pad_tokens, E1, E2, num_samples=3, lengths=lengths, seed=42)
    np.testing.assert_array_equal(short.tokens, long.tokens[:, :6])
    np.testing.assert_array_equal(short.beam_probs, long.beam_probs[:, :6])


def test_beam_probs_are_distributions(rng):
    scores, tokens, E1, E2 = make_problem(rng, 2, 6, 7, dtype=np.float32)
    got = stochastic_viterbi(scores, tokens, E1, E2, num_samples=2, lengths=[6, 3], seed=0)
    sums = got.beam_probs.sum(axis=2)
    np.testing.assert_allclose(sums[0], 1, rtol=1e-5)
    np.testing.assert_allclose(sums[1, :3], 1, rtol=1e-5)
    assert (sums[1, 3:] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cold_temperature_is_viterbi_and_finite(rng, dtype):
    scores, tokens, E1, E2 = make_problem(rng, 4, 10, 8, dtype=dtype)
    got = stochastic_viterbi(scores, tokens, E1, E2, num_samples=3, temperature=1e-3, seed=9)
    assert np.isfinite(got.beam_probs).all() and np.isfinite(got.path_scores).all()
    best = viterbi_decode(scores, tokens, E1, E2)
    for n in range(3):
        np.testing.assert_array_equal(got.beam_idx[:, :, n], best.beam_idx)


@pytest.mark.parametrize("constant", [1e3, 1e6])
def test_constant_shift_keeps_the_samples(rng, constant):
    scores, tokens, E1, E2 = make_problem(rng, 3, 9, 6)
    uniforms = rng.random((3, 8, 6, 2))
    base = stochastic_viterbi(scores, tokens, E1, E2, num_samples=2, uniforms=uniforms)
    shifted = stochastic_viterbi(scores + constant, tokens, E1, E2, num_samples=2, uniforms=uniforms)
    np.testing.assert_array_equal(base.backpointers, shifted.backpointers)
    np.testing.assert_array_equal(base.beam_idx, shifted.beam_idx)


def test_large_beam_underflow_fallback(rng):
    """Widely spread scores make the factored weights underflow; picks must still follow the reference."""
    scores, tokens, E1, E2 = make_problem(rng, 2, 5, 16, scale=40.0, dtype=np.float32)
    E1 *= 6
    E2 *= 6
    want = ref.stochastic_viterbi(scores, tokens, E1, E2, num_samples=2, rng=rng, margin=1e-4)
    got = stochastic_viterbi(scores, tokens, E1, E2, num_samples=2, uniforms=want[-1])
    np.testing.assert_array_equal(got.backpointers, want[4])
    assert np.isfinite(got.beam_probs).all()


def test_non_contiguous_and_float16_inputs(rng):
    scores, tokens, E1, E2 = make_problem(rng, 3, 6, 5)
    uniforms = rng.random((3, 5, 5, 2))
    want = stochastic_viterbi(scores, tokens, E1, E2, num_samples=2, uniforms=uniforms)
    got = stochastic_viterbi(
        np.asfortranarray(scores),
        np.asfortranarray(tokens),
        np.asfortranarray(E1),
        E2,
        num_samples=2,
        uniforms=np.asfortranarray(uniforms),
    )
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    half = stochastic_viterbi(
        scores.astype(np.float16), tokens, E1.astype(np.float16), E2.astype(np.float16), num_samples=2, seed=3
    )
    assert half.beam_probs.dtype == np.float32 and half.score.dtype == np.float32


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-6), (np.float32, 1e-4)])
@pytest.mark.parametrize("num_samples", [None, 3])
def test_backward_matches_torch_autograd_of_the_writeups_algorithm(rng, dtype, tol, num_samples):
    torch = pytest.importorskip("torch")
    from stochastic_viterbi_torch import stochastic_viterbi_torch

    B, T, K, V, D = 3, 7, 6, 25, 4
    scores, tokens, E1, E2 = make_problem(rng, B, T, K, V=V, D=D, dtype=dtype)
    lengths = np.array([7, 4, 1])
    N = num_samples or 1
    want = ref.stochastic_viterbi(
        scores, tokens, E1, E2, temperature=0.8, lengths=lengths, num_samples=N, rng=rng, margin=MARGIN[dtype]
    )
    uniforms = want[-1]
    got = stochastic_viterbi(
        scores,
        tokens,
        E1,
        E2,
        num_samples=num_samples,
        temperature=0.8,
        lengths=lengths,
        uniforms=uniforms if num_samples else uniforms[..., 0],
    )
    leaves = [torch.tensor(a, requires_grad=True) for a in (scores, E1, E2)]
    beam_probs, beam_idx = stochastic_viterbi_torch(
        leaves[0], torch.tensor(tokens), leaves[1], leaves[2], torch.tensor(uniforms), temperature=0.8, lengths=lengths
    )
    weights = rng.standard_normal(beam_probs.shape)
    (beam_probs * torch.tensor(weights)).sum().backward()
    shape = got.beam_probs.shape
    np.testing.assert_allclose(got.beam_probs, beam_probs.detach().numpy().reshape(shape), rtol=tol, atol=tol)
    inside = np.arange(T)[None, :, None] < lengths[:, None, None]
    np.testing.assert_array_equal(got.beam_idx.reshape(B, T, N), np.where(inside, beam_idx.numpy(), PAD))
    grad = stochastic_viterbi_backward(weights.reshape(shape), got, tokens, E1, E2, lengths=lengths)
    for ours, leaf in zip(grad, leaves):
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, leaf.grad.numpy(), rtol=tol, atol=tol)
    assert (grad.grad_scores[1, 4:] == 0).all() and (grad.grad_scores[2, 1:] == 0).all()
