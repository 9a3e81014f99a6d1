"""Exact CRF inference (viterbi_numba.crf) against brute-force enumeration, the NumPy reference and
chi-square tests; gradients also against PyTorch autograd of a plain forward algorithm."""

import numpy as np
import pytest
import reference as ref
from conftest import chi_square_pvalue, make_problem, path_counts
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from viterbi_numba import (
    PAD,
    CRFForward,
    crf_forward,
    crf_sample,
    log_likelihood,
    log_likelihood_grad,
    log_partition,
    log_partition_grad,
    marginals,
    sequence_score,
    stochastic_viterbi,
    topk_beam,
    viterbi_decode,
)

TOL = {np.float32: 2e-5, np.float64: 1e-11}
MARGIN = {np.float32: 1e-4, np.float64: 1e-9}  # as in test_stochastic_viterbi: picks safe from rounding

tiny_problems = dict(
    B=st.integers(1, 3),
    T=st.integers(1, 4),
    K=st.integers(1, 4),
    D=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
    temperature=st.sampled_from([1.0, 0.5, 2.0, 0.1]),
    padded=st.booleans(),
)


def _tiny(B, T, K, D, seed, dtype, padded):
    rng = np.random.default_rng(seed)
    scores, tokens, E1, E2 = make_problem(rng, B, T, K, D=D, dtype=dtype)
    lengths = rng.integers(1, T + 1, B) if padded else None
    return rng, (scores, tokens, E1, E2), lengths


@settings(max_examples=40, deadline=None)
@given(**tiny_problems)
def test_log_partition_marginals_and_gradients_match_enumeration(B, T, K, D, seed, dtype, temperature, padded):
    rng, problem, lengths = _tiny(B, T, K, D, seed, dtype, padded)
    log_z, mu, gE1, gE2 = ref.crf_exact(*problem, temperature, lengths)
    tol = TOL[dtype]
    got_log_z = log_partition(*problem, temperature=temperature, lengths=lengths)
    assert got_log_z.dtype == dtype
    np.testing.assert_allclose(got_log_z, log_z, rtol=tol, atol=tol)
    np.testing.assert_allclose(marginals(*problem, temperature=temperature, lengths=lengths), mu, atol=tol)
    weights = rng.standard_normal(B)
    grad = log_partition_grad(*problem, temperature=temperature, lengths=lengths, grad_output=weights.astype(dtype))
    np.testing.assert_allclose(grad.log_z, log_z, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad.marginals, mu, atol=tol)
    np.testing.assert_allclose(grad.grad_scores, mu * weights[:, None, None] / temperature, rtol=tol, atol=tol * 10)
    # the table gradient is linear in the weights: check it one sequence at a time
    gE1 = gE2 = 0
    for b in range(B):
        one = slice(b, b + 1)
        _, _, g1, g2 = ref.crf_exact(
            *[a[one] for a in problem[:2]], *problem[2:], temperature, None if lengths is None else lengths[one]
        )
        gE1 = gE1 + weights[b] * g1
        gE2 = gE2 + weights[b] * g2
    np.testing.assert_allclose(grad.grad_E1, gE1, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(grad.grad_E2, gE2, rtol=tol * 10, atol=tol * 10)


@settings(max_examples=25, deadline=None)
@given(**tiny_problems)
def test_viterbi_and_sample_log_probs_match_enumeration(B, T, K, D, seed, dtype, temperature, padded):
    rng, problem, lengths = _tiny(B, T, K, D, seed, dtype, padded)
    best = viterbi_decode(*problem, lengths=lengths)
    sample = crf_sample(*problem, num_samples=6, temperature=temperature, lengths=lengths, seed=seed)
    for b in range(B):
        L = T if lengths is None else int(lengths[b])
        paths, log_probs, _ = ref.crf_enumerate(*problem, b, L, temperature)
        log_prob_of = dict(zip(paths, log_probs))
        top = max(log_probs)
        assert log_prob_of[tuple(best.beam_idx[b, :L])] >= top - 1e-4  # a best path (ties allowed)
        for n in range(6):
            path = tuple(int(y) for y in sample.beam_idx[b, :L, n])
            assert sample.log_prob[b, n] == pytest.approx(log_prob_of[path], rel=TOL[dtype] * 10, abs=TOL[dtype] * 10)
            assert (sample.beam_idx[b, L:, n] == PAD).all() and (sample.tokens[b, L:, n] == PAD).all()
            np.testing.assert_array_equal(sample.tokens[b, :L, n], problem[1][b, np.arange(L), list(path)])


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 7),
    K=st.integers(1, 9),
    N=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
    temperature=st.sampled_from([1.0, 0.5, 2.0]),
    padded=st.booleans(),
)
def test_samples_match_reference_given_uniforms(B, T, K, N, seed, dtype, temperature, padded):
    rng = np.random.default_rng(seed)
    problem = make_problem(rng, B, T, K, dtype=dtype)
    lengths = rng.integers(1, T + 1, B) if padded else None
    beam_idx, log_prob, uniforms = ref.crf_sample(
        *problem, temperature=temperature, lengths=lengths, num_samples=N, rng=rng, margin=MARGIN[dtype]
    )
    got = crf_sample(*problem, num_samples=N, temperature=temperature, lengths=lengths, uniforms=uniforms)
    np.testing.assert_array_equal(got.beam_idx, beam_idx)
    np.testing.assert_allclose(got.log_prob, log_prob, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    assert got.log_prob.dtype == dtype


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_chi_square_against_enumerated_crf(temperature):
    rng = np.random.default_rng(21)
    problem = make_problem(rng, 1, 4, 3, scale=0.7)
    crf = ref.crf_path_distribution(*problem, temperature)
    draws = crf_sample(*problem, num_samples=60_000, temperature=temperature, seed=5)
    counts = path_counts(draws.beam_idx[0])
    p_crf = chi_square_pvalue(counts, crf)
    # power: the same test tells the CRF from the write-up's sampler and from the CRF at another temperature
    writeup_sampler = ref.stochastic_viterbi_path_distribution(*problem, temperature)
    p_writeup = chi_square_pvalue({key: c for key, c in counts.items() if key in writeup_sampler}, writeup_sampler)
    p_other = chi_square_pvalue(counts, ref.crf_path_distribution(*problem, temperature * 1.25))
    message = f"p(CRF) = {p_crf:.3g}, p(stochastic Viterbi) = {p_writeup:.3g}, p(CRF at 1.25 tau) = {p_other:.3g}"
    assert p_crf > 1e-3 and p_writeup < 1e-6 and p_other < 1e-6, message


def test_samples_of_one_call_are_independent():
    rng = np.random.default_rng(22)
    problem = make_problem(rng, 1, 3, 3, scale=0.7)
    N = 40_000
    paths = crf_sample(*problem, num_samples=N, seed=8).beam_idx[0]  # (T, N)
    codes = paths[0] * 9 + paths[1] * 3 + paths[2]  # one integer per path

    def pvalue(a, b):
        table = np.zeros((27, 27))
        np.add.at(table, (a, b), 1)
        keep_rows, keep_cols = table.sum(1) >= 20, table.sum(0) >= 20
        return stats.chi2_contingency(table[keep_rows][:, keep_cols]).pvalue

    p_next, p_half = pvalue(codes[0::2], codes[1::2]), pvalue(codes[: N // 2], codes[N // 2 :])
    # power: a sequence whose every second sample repeats the one before is caught
    dependent = codes.copy()
    dependent[1::2] = np.where(rng.random(N // 2) < 0.1, codes[0::2], codes[1::2])
    p_dependent = pvalue(dependent[0::2], dependent[1::2])
    message = f"p(n, n+1) = {p_next:.3g}, p(n, n+N/2) = {p_half:.3g}, p(10% repeats) = {p_dependent:.3g}"
    assert p_next > 1e-3 and p_half > 1e-3 and p_dependent < 1e-6, message


def test_seed_replays_and_uniforms_replay(rng):
    problem = make_problem(rng, 3, 6, 5, dtype=np.float32)
    lengths = np.array([6, 2, 5])
    first = crf_sample(*problem, num_samples=4, lengths=lengths, seed=2**63 + 5)
    again = crf_sample(*problem, num_samples=4, lengths=lengths, seed=2**63 + 5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    uniforms = ref.exact_sampler_uniforms(2**63 + 5, (3, 6, 4))
    replay = crf_sample(*problem, num_samples=4, lengths=lengths, uniforms=uniforms)
    for a, b in zip(first, replay):
        np.testing.assert_array_equal(a, b)
    other = crf_sample(*problem, num_samples=4, lengths=lengths, seed=6)
    assert not np.array_equal(first.beam_idx, other.beam_idx)


def test_padded_batch_equals_each_sequence_alone(rng):
    problem = make_problem(rng, 3, 7, 5)
    lengths = np.array([7, 1, 4])
    uniforms = rng.random((3, 7, 3))
    batch = crf_sample(*problem, num_samples=3, lengths=lengths, uniforms=uniforms)
    log_z = log_partition(*problem, lengths=lengths)
    mu = marginals(*problem, lengths=lengths)
    scores, tokens, E1, E2 = problem
    for b, L in enumerate(lengths):
        alone = (scores[b : b + 1, :L], tokens[b : b + 1, :L], E1, E2)
        one = crf_sample(*alone, num_samples=3, uniforms=uniforms[b : b + 1, :L])
        np.testing.assert_array_equal(batch.beam_idx[b, :L], one.beam_idx[0])
        np.testing.assert_array_equal(batch.log_prob[b], one.log_prob[0])
        np.testing.assert_array_equal(log_z[b], log_partition(*alone)[0])
        np.testing.assert_array_equal(mu[b, :L], marginals(*alone)[0])
        assert (mu[b, L:] == 0).all()


def test_sequence_score_matches_path_scores(rng):
    problem = make_problem(rng, 3, 6, 5)
    lengths = np.array([6, 3, 1])
    paths = rng.integers(0, 5, (3, 6, 4))
    paths[1, 3:] = PAD
    trans = ref.transitions(problem[1], problem[2], problem[3])
    got = sequence_score(*problem, paths, lengths=lengths)
    for b, L in enumerate(lengths):
        for n in range(4):
            assert got[b, n] == pytest.approx(ref.path_score(problem[0], trans, b, paths[b, :L, n]), rel=1e-12)
    np.testing.assert_array_equal(sequence_score(*problem, paths[:, :, 0], lengths=lengths), got[:, 0])
    # stochastic Viterbi's own score of its path agrees
    seeded = stochastic_viterbi(*problem, num_samples=2, lengths=lengths, seed=4)
    np.testing.assert_allclose(sequence_score(*problem, seeded.beam_idx, lengths=lengths), seeded.score, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_likelihood_is_fairseq_forward(rng, dtype):
    B, T, V, k = 3, 6, 40, 5
    emissions = rng.standard_normal((B, T, V)).astype(dtype)
    _, tokens, E1, E2 = make_problem(rng, B, T, k, V=V, dtype=dtype)
    targets = rng.integers(0, V, (B, T))
    lengths = np.array([6, 4, 1])
    for temperature in (1.0, 0.5):
        want = ref.log_likelihood(emissions, targets, E1, E2, k, lengths, temperature)
        got = log_likelihood(emissions, targets, E1, E2, k, lengths=lengths, temperature=temperature)
        np.testing.assert_allclose(got, want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
        assert got.dtype == dtype and (got < 0).all()
    # a target that is every position's best token is its own beam's top slot; log p <= 0 still
    best = emissions.argmax(2)
    assert (log_likelihood(emissions, best, E1, E2, k) <= 0).all()
    # with k = V the beam is everything: the likelihood is exact and sums to 1 over all sequences
    small = emissions[:1, :3, :4]
    table = E1[:4], E2[:4]
    total = sum(np.exp(float(log_likelihood(small, np.array([y]), *table, 4)[0])) for y in np.ndindex(4, 4, 4))
    assert total == pytest.approx(1.0, rel=1e-4 if dtype == np.float32 else 1e-10)


def test_log_likelihood_grad_matches_finite_differences(rng):
    B, T, V, k = 2, 5, 12, 4
    emissions = rng.standard_normal((B, T, V))
    _, _, E1, E2 = make_problem(rng, B, T, k, V=V)
    targets = rng.integers(0, V, (B, T))
    lengths = np.array([5, 3])
    weights = np.array([0.7, -1.3])
    grad = log_likelihood_grad(emissions, targets, E1, E2, k, lengths=lengths, temperature=0.8, grad_output=weights)
    np.testing.assert_array_equal(grad.log_likelihood, log_likelihood(emissions, targets, E1, E2, k, lengths, 0.8))

    def objective(em, e1, e2):
        return float(weights @ log_likelihood(em, targets, e1, e2, k, lengths=lengths, temperature=0.8))

    dense = np.zeros_like(emissions)
    np.put_along_axis(dense, grad.beam_tokens, grad.grad_scores, axis=2)
    h = 1e-6
    for array, analytic in ((emissions, dense), (E1, grad.grad_E1), (E2, grad.grad_E2)):
        for index in list(zip(*np.nonzero(analytic)))[:12] + [tuple(rng.integers(0, s) for s in array.shape)]:
            plus, minus = array.copy(), array.copy()
            plus[index] += h
            minus[index] -= h
            args = [emissions, E1, E2]
            slot = [a is array for a in args].index(True)
            numeric = (
                objective(*[plus if i == slot else a for i, a in enumerate(args)])
                - objective(*[minus if i == slot else a for i, a in enumerate(args)])
            ) / (2 * h)
            assert analytic[index] == pytest.approx(numeric, rel=1e-5, abs=1e-7), index


def test_kept_forward_pass_gives_what_the_functions_give(rng):
    """crf_forward's state object: the same bits as the one-call functions it stands for."""
    scores, tokens, E1, E2 = make_problem(rng, 3, 5, 4)
    lengths = np.array([5, 2, 4])
    weights = np.array([0.5, -1.0, 2.0])
    forward = crf_forward(scores, tokens, E1, E2, temperature=0.7, lengths=lengths)
    assert forward.batch_shape == (3, 5, 4)
    np.testing.assert_array_equal(forward.log_z, log_partition(scores, tokens, E1, E2, 0.7, lengths))
    np.testing.assert_array_equal(forward.marginals(), marginals(scores, tokens, E1, E2, 0.7, lengths))
    for got, want in zip(forward.sample(6, seed=4), crf_sample(scores, tokens, E1, E2, 6, 0.7, lengths, seed=4)):
        np.testing.assert_array_equal(got, want)
    got = forward.log_partition_grad(grad_output=weights)
    want = log_partition_grad(scores, tokens, E1, E2, 0.7, lengths, grad_output=weights)
    for name in want._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        forward.sample(0)
    with pytest.raises(ValueError, match=r"weights must have shape \(3, 6\) \(B, N\)"):
        forward.paths_grad(np.zeros((3, 5, 6), np.int64), np.ones((3, 5)))


def test_a_saved_forward_pass_rebuilds_without_running_again(rng):
    """CRFForward.saved / from_saved (what the PyTorch operators keep between forward and backward):
    the rebuilt pass gives the first pass's marginals and gradients bit for bit, and its samples."""
    scores, tokens, E1, E2 = make_problem(rng, 3, 5, 4)
    lengths = np.array([5, 2, 4])
    first = crf_forward(scores, tokens, E1, E2, temperature=0.7, lengths=lengths)
    saved = first.saved
    assert [array.shape for array in saved] == [(3,), (3, 5, 4), (3, 5, 4), (3, 5, 4)]
    assert all(not array[1, 2:].any() for array in saved[1:])  # padded positions hold 0, not stale memory
    again = CRFForward.from_saved(scores, tokens, E1, E2, saved, temperature=0.7, lengths=lengths)
    np.testing.assert_array_equal(again.log_z, first.log_z)
    np.testing.assert_array_equal(again.marginals(), first.marginals())
    paths = first.sample(4, seed=3).beam_idx
    for got, want in zip(again.paths_grad(paths), first.paths_grad(paths)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again.sample(4, seed=3).beam_idx, paths)
    # shapes, token ids and lengths are checked again; a wrong saved array is named
    with pytest.raises(ValueError, match=r"saved col_sum must have shape \(3, 5, 4\)"):
        CRFForward.from_saved(scores, tokens, E1, E2, (*saved[:3], saved[3][:, :4]), 0.7, lengths)
    with pytest.raises(TypeError, match="saved must be the 4 arrays"):
        CRFForward.from_saved(scores, tokens, E1, E2, saved[:3], 0.7, lengths)
    with pytest.raises(ValueError, match="tokens"):
        CRFForward.from_saved(scores, tokens + 100, E1, E2, saved, 0.7, lengths)
    with pytest.raises(ValueError, match="lengths"):
        CRFForward.from_saved(scores, tokens, E1, E2, saved, 0.7, lengths + 1)


def test_paths_grad_matches_finite_differences(rng):
    """CRFForward.paths_grad: the gradient of sum_{b,n} w[b, n] log p(y_bn) for given paths (PAD after the
    length, as crf_sample returns them) with respect to the beam scores and both tables."""
    scores, tokens, E1, E2 = make_problem(rng, 2, 4, 3, V=7, D=2)
    lengths = np.array([4, 3])
    tau = 0.6
    paths = crf_sample(scores, tokens, E1, E2, 3, tau, lengths, seed=2).beam_idx
    weights = rng.standard_normal((2, 3))
    grads = crf_forward(scores, tokens, E1, E2, tau, lengths).paths_grad(paths, weights)

    def objective(sc, e1, e2):
        log_p = (
            sequence_score(sc, tokens, e1, e2, paths, lengths) / tau
            - log_partition(sc, tokens, e1, e2, tau, lengths)[:, None]
        )
        return float((weights * log_p).sum())

    h = 1e-6
    for slot, (array, analytic) in enumerate(zip((scores, E1, E2), grads)):
        for index in np.ndindex(array.shape):
            args = [scores, E1, E2]
            plus, minus = array.copy(), array.copy()
            plus[index] += h
            minus[index] -= h
            numeric = (
                objective(*args[:slot], plus, *args[slot + 1 :]) - objective(*args[:slot], minus, *args[slot + 1 :])
            ) / (2 * h)
            assert analytic[index] == pytest.approx(numeric, rel=1e-5, abs=1e-7), (slot, index)
    single = crf_forward(scores, tokens, E1, E2, tau, lengths).paths_grad(paths[:, :, 0], weights[:, 0])
    alone = crf_forward(scores, tokens, E1, E2, tau, lengths).paths_grad(paths[:, :, :1], weights[:, :1])
    for a, b in zip(single, alone):
        np.testing.assert_array_equal(a, b)


def _torch_forward(torch, scores, tokens, E1, E2, temperature, lengths):
    """log Z_tau of each sequence by the plain forward algorithm in torch (autograd does the gradients)."""
    B, T, K = scores.shape
    out = []
    for b in range(B):
        L = int(lengths[b])
        alpha = scores[b, 0] / temperature
        for t in range(1, L):
            trans = E1[tokens[b, t - 1]] @ E2[tokens[b, t]].T
            alpha = torch.logsumexp(alpha[:, None] + trans / temperature, dim=0) + scores[b, t] / temperature
        out.append(torch.logsumexp(alpha, dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_match_torch_autograd(rng, dtype):
    torch = pytest.importorskip("torch")
    B, T, K, V, D = 3, 9, 7, 30, 5
    scores, tokens, E1, E2 = make_problem(rng, B, T, K, V=V, D=D, dtype=dtype)
    scores[0, 2, 3] = -np.inf  # a dead beam slot: zero marginal and gradient, no NaN
    lengths = np.array([9, 5, 2])
    weights = rng.standard_normal(B).astype(dtype)
    tensors = [torch.tensor(a, requires_grad=True) for a in (scores, E1, E2)]
    log_z = _torch_forward(torch, tensors[0], torch.tensor(tokens), tensors[1], tensors[2], 0.7, lengths)
    (log_z * torch.tensor(weights)).sum().backward()
    got = log_partition_grad(scores, tokens, E1, E2, temperature=0.7, lengths=lengths, grad_output=weights)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(got.log_z, log_z.detach().numpy(), rtol=tol)
    for ours, tensor in zip((got.grad_scores, got.grad_E1, got.grad_E2), tensors):
        np.testing.assert_allclose(ours, tensor.grad.numpy(), rtol=tol, atol=tol)
    assert got.grad_scores[0, 2, 3] == 0 and np.isfinite(got.grad_scores).all()


def test_dead_beam_slots_are_never_sampled(rng):
    problem = make_problem(rng, 2, 6, 6, dtype=np.float32)
    problem[0][:, :, 4:] = -np.inf
    draws = crf_sample(*problem, num_samples=500, seed=1)
    assert (draws.beam_idx < 4).all() and np.isfinite(draws.log_prob).all()
    mu = marginals(*problem)
    assert (mu[:, :, 4:] == 0).all() and np.isfinite(mu).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("temperature", [1e-2, 1.0, 1e2])
def test_extreme_scores_and_temperatures_stay_finite(rng, dtype, temperature):
    """Scores spread over 1e4 and offset by 1e4: finite, accurate results, or, where T (score spread +
    |E1| |E2|) / tau (3e7 at tau = 0.01) is beyond float32's range for exact inference, a ValueError."""
    scores, tokens, E1, E2 = make_problem(rng, 3, 8, 6, dtype=dtype, scale=1e4)
    scores[1] += dtype(1e4)
    scores[2] -= dtype(1e4)
    if dtype == np.float32 and temperature == 1e-2:
        with pytest.raises(ValueError, match="temperature 0.01 is too small for exact inference in float32"):
            log_partition(scores, tokens, E1, E2, temperature=temperature)
        return
    log_z = log_partition(scores, tokens, E1, E2, temperature=temperature)
    np.testing.assert_allclose(log_z, ref.log_partition(scores, tokens, E1, E2, temperature), rtol=1e-6)
    mu = marginals(scores, tokens, E1, E2, temperature=temperature)
    np.testing.assert_allclose(mu.sum(2), 1, rtol=1e-4)
    draws = crf_sample(scores, tokens, E1, E2, num_samples=4, temperature=temperature, seed=3)
    grad = log_partition_grad(scores, tokens, E1, E2, temperature=temperature)
    for array in (log_z, mu, draws.log_prob, grad.grad_scores, grad.grad_E1, grad.grad_E2):
        assert np.isfinite(array).all()
    assert (draws.log_prob <= 1e-2).all(), draws.log_prob


def test_float32_log_partition_at_the_seeds_size():
    """B=8, T=97, K=256, V=30000, D=32: float32 log Z within 1e-4 relative of float64 (the write-up's size)."""
    rng = np.random.default_rng(3)
    B, T, V, K, D = 8, 97, 30000, 256, 32
    beam = topk_beam(rng.standard_normal((B, T, 4 * K), dtype=np.float32) * 3, K)
    tokens = rng.integers(0, V, (B, T, K))  # any ids: repeats are allowed in a beam
    E1 = (rng.standard_normal((V, D)) * 0.3).astype(np.float32)
    E2 = (rng.standard_normal((V, D)) * 0.3).astype(np.float32)
    low = log_partition(beam.scores, tokens, E1, E2)
    high = log_partition(beam.scores.astype(np.float64), tokens, E1, E2)
    assert np.abs(low / high - 1).max() < 1e-4, np.abs(low / high - 1).max()
