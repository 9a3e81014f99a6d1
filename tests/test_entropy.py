"""crf_entropy and crf_entropy_grad (the exact entropy of the beam CRF and its gradients), against
enumeration, torch autograd of enumeration, and samples."""

import itertools

import numpy as np
import pytest
import reference as ref
from conftest import make_problem

import viterbi_numba as vn

torch = pytest.importorskip("torch")


def _torch_entropy(scores, tokens, E1, E2, temperature, lengths):
    """H(p_tau) of each sequence by enumeration in torch (autograd differentiates it); -inf scores
    are dropped from the paths (p = 0) so that autograd sees no 0 * inf."""
    B, _, K = scores.shape
    out = []
    for b in range(B):
        logits = []
        for y in itertools.product(range(K), repeat=int(lengths[b])):
            if any(not np.isfinite(float(scores[b, t, k].detach())) for t, k in enumerate(y)):
                continue
            s = scores[b, 0, y[0]]
            for t in range(1, len(y)):
                s = s + scores[b, t, y[t]] + (E1[tokens[b, t - 1, y[t - 1]]] * E2[tokens[b, t, y[t]]]).sum()
            logits.append(s / temperature)
        logits = torch.stack(logits)
        log_p = logits - torch.logsumexp(logits, 0)
        out.append(-(log_p.exp() * log_p).sum())
    return torch.stack(out)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dead_slot", [False, True])
def test_entropy_and_gradients_match_enumeration(dtype, tol, temperature, dead_slot):
    rng = np.random.default_rng(3)
    B, T, K, V, D = 3, 4, 3, 7, 2
    scores, tokens, E1, E2 = make_problem(rng, B, T, K, V=V, D=D)
    if dead_slot:
        scores[2, 1, 2] = -np.inf  # a -inf beam slot: probability 0, gradient 0
    lengths = np.array([4, 2, 3])
    weights = np.array([1.0, -0.5, 2.0])
    want = ref.crf_entropy(scores, tokens, E1, E2, temperature, lengths)
    args = [a.astype(dtype) for a in (scores, tokens, E1, E2)]
    args[1] = tokens
    np.testing.assert_allclose(vn.crf_entropy(*args, temperature, lengths), want, rtol=tol, atol=tol)
    got = vn.crf_entropy_grad(*args, temperature, lengths, weights)
    leaves = [torch.tensor(a, requires_grad=True) for a in (scores, E1, E2)]
    H = _torch_entropy(leaves[0], tokens, *leaves[1:], temperature, lengths)
    (H * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(got.entropy, H.detach().numpy(), rtol=tol, atol=tol)
    want_scores = np.nan_to_num(leaves[0].grad.numpy())
    np.testing.assert_allclose(got.grad_scores, want_scores, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.grad_E1, leaves[1].grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(got.grad_E2, leaves[2].grad.numpy(), rtol=tol, atol=tol)
    assert np.all(got.grad_scores[1, 2:] == 0)  # padded positions
    if dead_slot:
        assert got.grad_scores[2, 1, 2] == 0


def test_entropy_gradient_matches_finite_differences():
    rng = np.random.default_rng(8)
    scores, tokens, E1, E2 = make_problem(rng, 2, 5, 3, V=6, D=2)
    lengths = np.array([5, 3])
    tau = 0.8
    got = vn.crf_entropy_grad(scores, tokens, E1, E2, tau, lengths)
    h = 1e-6
    for slot, (array, analytic) in enumerate(zip((scores, E1, E2), got[1:])):
        for index in list(np.ndindex(array.shape))[::3]:
            plus, minus = array.copy(), array.copy()
            plus[index] += h
            minus[index] -= h
            args = [scores, E1, E2]
            args[slot] = plus
            up = vn.crf_entropy(args[0], tokens, args[1], args[2], tau, lengths).sum()
            args[slot] = minus
            down = vn.crf_entropy(args[0], tokens, args[1], args[2], tau, lengths).sum()
            assert analytic[index] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-7), (slot, index)


def test_entropy_bounds_and_the_greedy_limit():
    rng = np.random.default_rng(5)
    B, T, K = 4, 6, 5
    scores, tokens, E1, E2 = make_problem(rng, B, T, K)
    lengths = np.array([6, 1, 3, 6])
    H = vn.crf_entropy(scores, tokens, E1, E2, 1.0, lengths)
    assert np.all(H >= 0) and np.all(H <= lengths * np.log(K) + 1e-12)  # at most log(number of paths)
    # uniform scores and zero tables: every path equally likely, H = L log K exactly
    flat = vn.crf_entropy(np.zeros_like(scores), tokens, 0 * E1, 0 * E2, 1.0, lengths)
    np.testing.assert_allclose(flat, lengths * np.log(K), rtol=1e-12)
    # tau -> 0: the CRF concentrates on the Viterbi path, H -> 0 with no NaN, gradients finite
    for tau in (1e-2, 1e-4, 1e-8):
        grad = vn.crf_entropy_grad(scores, tokens, E1, E2, tau, lengths)
        assert np.all(np.isfinite(grad.entropy)) and np.all(grad.entropy >= -1e-12)
        assert all(np.all(np.isfinite(g)) for g in grad[1:])
    assert np.all(vn.crf_entropy(scores, tokens, E1, E2, 1e-8, lengths) < 1e-6)
    # large scores (a spread of 1e4) stay finite in both dtypes
    for dtype in (np.float64, np.float32):
        big = (scores * 1e4).astype(dtype)
        grad = vn.crf_entropy_grad(big, tokens, E1.astype(dtype), E2.astype(dtype), 1.0, lengths)
        assert np.all(np.isfinite(grad.entropy)) and np.all(grad.entropy >= -1e-6)
        assert all(np.all(np.isfinite(g)) for g in grad[1:])


def test_entropy_is_the_mean_surprisal_of_samples():
    """-log p of exact samples averages to H within its standard error (4 SE)."""
    rng = np.random.default_rng(11)
    scores, tokens, E1, E2 = make_problem(rng, 2, 8, 6)
    tau = 0.9
    H = vn.crf_entropy(scores, tokens, E1, E2, tau)
    draws = vn.crf_sample(scores, tokens, E1, E2, 20000, tau, seed=4)
    surprisal = -draws.log_prob
    se = surprisal.std(axis=1) / np.sqrt(surprisal.shape[1])
    assert np.all(np.abs(surprisal.mean(axis=1) - H) < 4 * se)
    # the same test rejects the entropy of a slightly different CRF (tau 5 % higher)
    other = vn.crf_entropy(scores, tokens, E1, E2, tau * 1.05)
    assert np.any(np.abs(surprisal.mean(axis=1) - other) > 4 * se)


def test_kept_forward_pass_entropy():
    rng = np.random.default_rng(2)
    scores, tokens, E1, E2 = make_problem(rng, 2, 4, 3)
    forward = vn.crf_forward(scores, tokens, E1, E2, 0.7)
    # crf_entropy sums the same terms in another order (with its forward pass, docs/design.md §4)
    np.testing.assert_allclose(forward.entropy(), vn.crf_entropy(scores, tokens, E1, E2, 0.7), rtol=1e-13)
    kept, direct = (
        forward.entropy_grad(np.array([1.0, -2.0])),
        vn.crf_entropy_grad(scores, tokens, E1, E2, 0.7, grad_output=np.array([1.0, -2.0])),
    )
    for name in direct._fields:
        np.testing.assert_allclose(getattr(kept, name), getattr(direct, name), rtol=1e-12, atol=1e-13, err_msg=name)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2,\)"):
        forward.entropy_grad(np.ones(3))
