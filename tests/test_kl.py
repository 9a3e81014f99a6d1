"""crf_kl, crf_kl_grad and crf_cross_entropy (two beam CRFs on one beam), against enumeration and
torch autograd of enumeration."""

import itertools

import numpy as np
import pytest
import reference as ref
from conftest import make_problem

import viterbi_numba as vn

torch = pytest.importorskip("torch")


def _torch_log_probs(scores, tokens, E1, E2, temperature, length, b):
    K = scores.shape[2]
    logits = []
    for y in itertools.product(range(K), repeat=length):
        s = scores[b, 0, y[0]]
        for t in range(1, length):
            s = s + scores[b, t, y[t]] + (E1[tokens[b, t - 1, y[t - 1]]] * E2[tokens[b, t, y[t]]]).sum()
        logits.append(s / temperature)
    logits = torch.stack(logits)
    return logits - torch.logsumexp(logits, 0)


def _torch_kl(p, q, tokens, temperature, lengths):
    out = []
    for b in range(len(lengths)):
        log_p = _torch_log_probs(*p[:1], tokens, *p[1:], temperature, int(lengths[b]), b)
        log_q = _torch_log_probs(*q[:1], tokens, *q[1:], temperature, int(lengths[b]), b)
        out.append((log_p.exp() * (log_p - log_q)).sum())
    return torch.stack(out)


def _two_crfs(seed, B=3, T=4, K=3, V=7, D=2, Dq=3):
    rng = np.random.default_rng(seed)
    scores_p, tokens, E1_p, E2_p = make_problem(rng, B, T, K, V=V, D=D)
    scores_q = scores_p + 0.5 * rng.standard_normal(scores_p.shape)
    E1_q, E2_q = (0.6 * rng.standard_normal((V + 2, Dq)) for _ in range(2))  # q's own (V_q, D_q)
    return scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 3e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_and_gradients_match_enumeration(dtype, tol, temperature):
    scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q = _two_crfs(4)
    lengths = np.array([4, 2, 3])
    weights = np.array([1.0, -0.5, 2.0])
    want = ref.crf_kl(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, temperature, lengths)
    floats = [a.astype(dtype) for a in (scores_p, scores_q)]
    tables = [a.astype(dtype) for a in (E1_p, E2_p, E1_q, E2_q)]
    np.testing.assert_allclose(vn.crf_kl(*floats, tokens, *tables, temperature, lengths), want, rtol=tol, atol=tol)
    got = vn.crf_kl_grad(*floats, tokens, *tables, temperature, lengths, weights)
    leaves = [torch.tensor(a, requires_grad=True) for a in (scores_p, E1_p, E2_p, scores_q, E1_q, E2_q)]
    kl = _torch_kl(leaves[:3], leaves[3:], tokens, temperature, lengths)
    (kl * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(got.kl, kl.detach().numpy(), rtol=tol, atol=tol)
    names = ("grad_scores_p", "grad_E1_p", "grad_E2_p", "grad_scores_q", "grad_E1_q", "grad_E2_q")
    for name, leaf in zip(names, leaves):
        np.testing.assert_allclose(getattr(got, name), leaf.grad.numpy(), rtol=tol, atol=tol, err_msg=name)
    # cross-entropy = H(p) + KL
    cross = vn.crf_cross_entropy(*floats, tokens, *tables, temperature, lengths)
    entropy = ref.crf_entropy(scores_p, tokens, E1_p, E2_p, temperature, lengths)
    np.testing.assert_allclose(cross, entropy + want, rtol=tol, atol=tol)


def test_kl_is_zero_for_the_same_crf_and_positive_otherwise():
    scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q = _two_crfs(6, B=4, T=6, K=5, V=9, D=3)
    lengths = np.array([6, 1, 4, 6])
    same = vn.crf_kl_grad(scores_p, scores_p, tokens, E1_p, E2_p, E1_p, E2_p, 0.8, lengths)
    assert np.all(np.abs(same.kl) < 1e-12)
    for name in same._fields[1:]:
        assert np.abs(getattr(same, name)).max() < 1e-12, name  # a minimum: every gradient vanishes
    kl = vn.crf_kl(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, 0.8, lengths)
    assert np.all(kl[[0, 2, 3]] > 0) and np.all(kl >= 0)


def test_kl_errors_name_the_side():
    scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q = _two_crfs(1)
    with pytest.raises(ValueError, match="E1_q and E2_q must have the same shape"):
        vn.crf_kl(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q[:, :2])
    bad = scores_q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="scores_q"):
        vn.crf_kl(scores_p, bad, tokens, E1_p, E2_p, E1_q, E2_q)
    with pytest.raises(ValueError, match="tokens"):
        vn.crf_kl(scores_p, scores_q, tokens, E1_p, E2_p, E1_q[:3], E2_q[:3])  # q's vocabulary is too small
    with pytest.raises(ValueError, match=r"grad_output must have shape \(3,\)"):
        vn.crf_kl_grad(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, grad_output=np.ones(2))


@pytest.mark.parametrize("side", ["p", "q"])
def test_every_bad_input_names_its_side(side):
    arrays = dict(zip(("scores_p", "scores_q", "tokens", "E1_p", "E2_p", "E1_q", "E2_q"), _two_crfs(2)))

    def call(**changes):
        return vn.crf_kl(
            **{**arrays, **{f"{k}_{side}" if k in ("scores", "E1", "E2") else k: v for k, v in changes.items()}}
        )

    scores = arrays[f"scores_{side}"].copy()
    scores[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=rf"scores_{side} contains NaN or \+inf \(first at batch 1, position 2\)"):
        call(scores=scores)
    E1 = arrays[f"E1_{side}"]
    with pytest.raises(ValueError, match=rf"E1_{side} and E2_{side} must have the same shape"):
        call(E1=E1[:, :1])
    with pytest.raises(TypeError, match=rf"E2_{side} must be a floating-point array"):
        call(E2=arrays[f"E2_{side}"].astype(np.int32))
    bad = E1.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=rf"E1_{side} contains NaN or inf"):
        call(E1=bad)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        call(lengths=np.array([0, 4, 4]))
    with pytest.raises(ValueError, match="temperature must be"):
        call(temperature=0.0)


def test_kept_forward_passes_give_the_kl_and_check_the_reference():
    scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q = _two_crfs(9)
    lengths = np.array([4, 3, 2])
    p = vn.crf_forward(scores_p, tokens, E1_p, E2_p, 0.8, lengths)
    q = vn.crf_forward(scores_q, tokens, E1_q, E2_q, 0.8, lengths)
    want = vn.crf_kl_grad(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, 0.8, lengths, np.array([1.0, 2.0, 0.5]))
    got = p.kl_grad(q, np.array([1.0, 2.0, 0.5]))
    for name in want._fields:  # crf_kl_grad's forward sweep runs with its forward passes: another order
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(p.kl(q), want.kl, rtol=1e-13)
    with pytest.raises(TypeError, match="reference must be a CRFForward"):
        p.kl(scores_q)
    with pytest.raises(ValueError, match="reference must have this pass's temperature"):
        p.kl(vn.crf_forward(scores_q, tokens, E1_q, E2_q, 0.9, lengths))
    with pytest.raises(ValueError, match=r"reference must be a forward pass on this beam's shape"):
        p.kl(vn.crf_forward(scores_q[:2], tokens[:2], E1_q, E2_q, 0.8, lengths[:2]))
    with pytest.raises(TypeError, match="reference must be computed in this pass's dtype"):
        p.kl(vn.crf_forward(scores_q.astype(np.float32), tokens, E1_q.astype(np.float32), E2_q.astype(np.float32), 0.8))
    small = vn.crf_forward(scores_q, tokens % 3, E1_q[:3], E2_q[:3], 0.8, lengths)  # q's vocabulary is 3 tokens
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 3\) \(rows of the reference's E1/E2\)"):
        p.kl(small)


@pytest.mark.parametrize("T", [1, 3])
def test_kl_is_infinite_where_q_cannot_end_a_path_p_can(T):
    """A last-position slot that q scores -inf and p does not: KL = +inf (a sum of conditional KLs whose
    last term is infinite), not a finite number."""
    scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q = _two_crfs(5, B=2, T=T, K=3, V=7, D=2)
    scores_q[0, T - 1, 1] = -np.inf
    kl = vn.crf_kl(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q)
    assert kl[0] == np.inf and np.isfinite(kl[1]) and kl[1] > 0
    want = ref.crf_kl(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, 1.0, None)
    np.testing.assert_allclose(kl[1], want[1], rtol=1e-10)
    assert vn.crf_cross_entropy(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q)[0] == np.inf
    p = vn.crf_forward(scores_p, tokens, E1_p, E2_p)
    assert p.kl(vn.crf_forward(scores_q, tokens, E1_q, E2_q))[0] == np.inf


def test_gather_beam_reads_a_reference_on_the_policy_beam():
    rng = np.random.default_rng(12)
    emissions, reference = rng.standard_normal((2, 2, 3, 40))
    beam = vn.topk_beam(emissions, 5)
    scores_q = vn.gather_beam(reference, beam.tokens)
    np.testing.assert_array_equal(scores_q, np.take_along_axis(reference, beam.tokens, 2))
    np.testing.assert_array_equal(vn.gather_beam(emissions, beam.tokens), beam.scores)  # its own beam scores
    assert vn.gather_beam(reference.astype(np.float16), beam.tokens).dtype == np.float32
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 40\) \(columns of emissions\)"):
        vn.gather_beam(reference, beam.tokens + 1)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T, K\) = \(2, 3, K\)"):
        vn.gather_beam(reference, beam.tokens[:1])
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        vn.gather_beam(reference, beam.tokens.astype(float))
    with pytest.raises(TypeError, match="emissions must be a floating-point array"):
        vn.gather_beam(beam.tokens, beam.tokens)
