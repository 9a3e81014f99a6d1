"""The PyTorch adapter: zero-copy conversion, the write-up's classes (outputs and autograd), fairseq's
DynamicCRF (log-likelihood, Viterbi, exact samples), masks, generators and gradcheck."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference as ref  # noqa: E402
from stochastic_viterbi_torch import stochastic_viterbi_torch  # noqa: E402

from viterbi_numba import PAD  # noqa: E402
from viterbi_numba.adapters.torch import (  # noqa: E402
    DistinctSamples,
    DynamicCRF,
    StochasticViterbiSample,
    StochasticViterbiSamples,
    as_numpy,
    lengths_from_masks,
    seed_from,
)

B, T, V, K, D = 3, 6, 40, 5, 4


def _writeup_state_dict(V, D, dtype=torch.float32):
    """The state_dict of the write-up's classes: two embeddings E1, E2 of (V, D) and nothing else."""
    tables = torch.nn.Module()
    tables.E1 = torch.nn.Embedding(V, D)
    tables.E2 = torch.nn.Embedding(V, D)
    return tables.to(dtype).state_dict()


def _module(cls, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    module = cls(V, low_rank=D, beam_size=K, **kwargs).to(dtype)
    module.load_state_dict(_writeup_state_dict(V, D, dtype))
    return module


def _masks(lengths):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_cpu_tensors_cross_without_copies():
    t = torch.randn(4, 5, dtype=torch.float32)
    view = as_numpy(t)
    assert view.ctypes.data == t.data_ptr()
    view[1, 2] = 7.0
    assert t[1, 2] == 7.0
    assert torch.from_numpy(view).data_ptr() == t.data_ptr()
    leaf = torch.randn(3, requires_grad=True)
    assert as_numpy(leaf).ctypes.data == leaf.data_ptr()
    assert as_numpy(t.to(torch.bfloat16)).dtype == np.float32
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        as_numpy(np.zeros(3))


def test_masks_become_lengths_and_bad_masks_are_errors():
    np.testing.assert_array_equal(lengths_from_masks(_masks([6, 1, 3]), B, T), [6, 1, 3])
    assert lengths_from_masks(None, B, T) is None
    bad = _masks([6, 2, 3]).clone()
    bad[1, 4] = True
    with pytest.raises(ValueError, match="prefix masks.*sequence 1"):
        lengths_from_masks(bad, B, T)
    bad = _masks([6, 2, 3]).clone()
    bad[2, 0] = False
    with pytest.raises(ValueError, match="first position.*sequence 2"):
        lengths_from_masks(bad, B, T)
    with pytest.raises(ValueError, match=r"masks must have shape \(3, 6\)"):
        lengths_from_masks(_masks([6, 2, 3])[:, :5], B, T)
    with pytest.raises(TypeError, match="masks must be a bool"):
        lengths_from_masks(_masks([6, 2, 3]).double(), B, T)


def test_writeup_classes_have_the_writeups_interface():
    emissions = torch.randn(B, T, V)
    one = StochasticViterbiSample(V, low_rank=D, beam_size=K)
    one.load_state_dict(_writeup_state_dict(V, D))
    beam_probs, beam_idx, tokens = one._compute_stochastic_viterbi_sample(emissions)
    assert beam_probs.shape == (B, T, K) and beam_idx.shape == (B, T, 1) and tokens.shape == (B, T)
    assert beam_probs.dtype == torch.float32 and beam_idx.dtype == torch.int64 and tokens.dtype == torch.int64
    grpo = StochasticViterbiSamples(V, low_rank=D, beam_size=K, num_samples=3)
    beam_probs, beam_idx, tokens = grpo._compute_grpo_samples(emissions, beam=4)
    assert beam_probs.shape == (B, T, 4, 3) and beam_idx.shape == (B, T, 3) and tokens.shape == (B, T, 3)
    assert set(grpo.state_dict()) == {"E1.weight", "E2.weight"}
    # the tokens are the beam's tokens at the sampled slots
    top = emissions.topk(4, 2)[1]
    np.testing.assert_array_equal(tokens.numpy(), top.gather(2, beam_idx).numpy())
    half = grpo._compute_grpo_samples(emissions.to(torch.bfloat16))[0]
    assert half.dtype == torch.float32  # computed in float32, as torch promotes bfloat16 with float32 tables


def test_generator_and_manual_seed_reproduce_the_draws():
    grpo = _module(StochasticViterbiSamples, torch.float32, num_samples=4)
    emissions = torch.randn(B, T, V)
    a = grpo._compute_grpo_samples(emissions, generator=torch.Generator().manual_seed(5))[1]
    b = grpo._compute_grpo_samples(emissions, generator=torch.Generator().manual_seed(5))[1]
    c = grpo._compute_grpo_samples(emissions, generator=torch.Generator().manual_seed(6))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = grpo._compute_grpo_samples(emissions)[1]
    torch.manual_seed(11)
    assert torch.equal(d, grpo._compute_grpo_samples(emissions)[1])
    assert seed_from(torch.Generator().manual_seed(1)) == seed_from(torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("cls", [StochasticViterbiSample, StochasticViterbiSamples])
def test_writeup_class_gradients_match_autograd_of_the_writeups_algorithm(dtype, tol, cls):
    rng = np.random.default_rng(3)
    module = _module(cls, dtype, temp=0.7, **({"num_samples": 3} if cls is StochasticViterbiSamples else {}))
    N = getattr(module, "num_samples", 1)
    emissions = torch.tensor(rng.standard_normal((B, T, V)), dtype=dtype, requires_grad=True)
    lengths = [6, 3, 1]
    # safe uniforms (far from every CDF step) for this beam, from the NumPy reference
    top = emissions.detach().topk(K, 2)
    tables = [w.detach().numpy() for w in (module.E1.weight, module.E2.weight)]
    uniforms = ref.stochastic_viterbi(
        top.values.numpy(),
        top.indices.numpy(),
        *tables,
        temperature=0.7,
        lengths=lengths,
        num_samples=N,
        rng=rng,
        margin=1e-9 if dtype == torch.float64 else 1e-4,
    )[-1]
    call = (
        module._compute_stochastic_viterbi_sample
        if N == 1 and cls is StochasticViterbiSample
        else module._compute_grpo_samples
    )
    given = uniforms[..., 0] if cls is StochasticViterbiSample else uniforms
    given = torch.tensor(given) if dtype == torch.float64 else given  # NumPy uniforms are taken too
    beam_probs, beam_idx, tokens = call(emissions, masks=_masks(lengths), uniforms=given)
    weights = torch.tensor(rng.standard_normal(beam_probs.shape), dtype=dtype)
    (beam_probs * weights).sum().backward()
    # the same computation in plain PyTorch, differentiated by autograd
    leaves = [t.detach().clone().requires_grad_() for t in (emissions, module.E1.weight, module.E2.weight)]
    want_probs, want_idx = stochastic_viterbi_torch(
        leaves[0].gather(2, top.indices),
        top.indices,
        leaves[1],
        leaves[2],
        torch.tensor(uniforms),
        temperature=0.7,
        lengths=lengths,
    )
    (want_probs.reshape(beam_probs.shape) * weights).sum().backward()
    torch.testing.assert_close(beam_probs, want_probs.reshape(beam_probs.shape), rtol=tol, atol=tol)
    inside = _masks(lengths)[:, :, None]
    assert torch.equal(beam_idx.reshape(B, T, N), torch.where(inside, want_idx, PAD))
    for ours, theirs in zip((emissions, module.E1.weight, module.E2.weight), leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=tol, atol=tol)


def _fairseq_log_likelihood(emissions, targets, E1, E2, k, masks):
    """fairseq's DynamicCRF.forward, written here from its definition: S(targets) minus a beam log Z."""
    numerator = emissions.gather(2, targets[:, :, None])[:, :, 0]
    numerator = torch.cat([numerator[:, :1], numerator[:, 1:] + (E1[targets[:, :-1]] * E2[targets[:, 1:]]).sum(2)], 1)
    numerator = (numerator * masks).sum(1)
    beam_tokens = emissions.detach().scatter(2, targets[:, :, None], float("inf")).topk(k, 2)[1]
    beam_scores = emissions.gather(2, beam_tokens)
    trans = torch.einsum("btid,btjd->btij", E1[beam_tokens[:, :-1]], E2[beam_tokens[:, 1:]])
    alpha = beam_scores[:, 0]
    for t in range(1, emissions.shape[1]):
        step = torch.logsumexp(alpha[:, :, None] + trans[:, t - 1], dim=1) + beam_scores[:, t]
        alpha = torch.where(masks[:, t : t + 1], step, alpha)
    return numerator - torch.logsumexp(alpha, dim=1)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_dynamic_crf_forward_matches_fairseq_with_gradients(dtype, tol):
    crf = _module(DynamicCRF, dtype)
    emissions = torch.randn(B, T, V, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    masks = _masks([6, 4, 2])
    weights = torch.randn(B, dtype=dtype)
    ours = crf(emissions, targets, masks)
    (ours * weights).sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (emissions, crf.E1.weight, crf.E2.weight)]
    theirs = _fairseq_log_likelihood(leaves[0], targets, leaves[1], leaves[2], K, masks)
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for a, b in zip((emissions, crf.E1.weight, crf.E2.weight), leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)


def test_dynamic_crf_forward_decoder_is_fairseqs_viterbi():
    crf = _module(DynamicCRF)
    emissions = torch.randn(B, T, V, dtype=torch.float64)
    lengths = [6, 4, 1]
    scores, tokens = crf.forward_decoder(emissions, _masks(lengths))
    top = emissions.topk(K, 2)
    tables = [w.detach().numpy() for w in (crf.E1.weight, crf.E2.weight)]
    beam_idx, want_tokens, _, step_scores = ref.viterbi(top.values.numpy(), top.indices.numpy(), *tables, lengths)
    np.testing.assert_allclose(scores.numpy(), step_scores, rtol=1e-12, atol=1e-12)
    for b, L in enumerate(lengths):
        np.testing.assert_array_equal(tokens[b, :L].numpy(), want_tokens[b, :L])
        # padded positions: fairseq's identity back-pointers keep the last real slot
        np.testing.assert_array_equal(tokens[b, L:].numpy(), top.indices[b, L:, beam_idx[b, L - 1]].numpy())
    assert scores.dtype == torch.float64 and tokens.dtype == torch.int64


def test_dynamic_crf_samples_rescore_to_the_same_values_and_gradients():
    crf = _module(DynamicCRF)
    emissions = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    masks = _masks([6, 3, 1])
    tokens, log_prob = crf.sample(emissions, 4, masks=masks, generator=torch.Generator().manual_seed(2))
    assert tokens.shape == (B, T, 4) and log_prob.shape == (B, 4)
    assert (tokens[1, 3:] == PAD).all() and (tokens[2, 1:] == PAD).all()
    weights = torch.randn(B, 4, dtype=torch.float64)
    (log_prob * weights).sum().backward()
    ours = [p.grad.clone() for p in (emissions, crf.E1.weight, crf.E2.weight)]
    for p in (emissions, crf.E1.weight, crf.E2.weight):
        p.grad = None
    total = 0
    for n in range(4):
        rescored = crf(emissions, tokens[:, :, n], masks)  # as sampled: PAD after each length
        torch.testing.assert_close(rescored, log_prob[:, n], rtol=1e-10, atol=1e-10)
        total = total + (rescored * weights[:, n]).sum()
    total.backward()
    for a, p in zip(ours, (emissions, crf.E1.weight, crf.E2.weight)):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-10)


def test_dynamic_crf_distinct_samples_rescore_to_the_same_values_and_gradients():
    crf = _module(DynamicCRF)
    emissions = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    masks = _masks([6, 3, 1])  # the last sequence has K = 5 paths, fewer than the 7 asked for
    draws = crf.sample(emissions, 7, masks=masks, generator=torch.Generator().manual_seed(2), replacement=False)
    assert isinstance(draws, DistinctSamples) and draws.tokens.shape == (B, T, 7)
    assert draws.log_prob.shape == draws.weights.shape == (B, 7) and draws.kappa.shape == (B,)
    assert draws.count.tolist() == [7, 7, K] and draws.kappa[-1] == -np.inf
    for b, count in enumerate(draws.count.tolist()):
        assert len({tuple(draws.tokens[b, :, n].tolist()) for n in range(count)}) == count  # distinct
    assert (draws.tokens[1, 3:] == PAD).all() and (draws.tokens[2, :, K:] == PAD).all()
    assert torch.isinf(draws.log_prob[2, K:]).all() and (draws.weights[2, K:] == 0).all()
    assert not any(t.requires_grad for t in (draws.weights, draws.kappa, draws.count))
    # the same generator seed draws the same samples, another seed others
    again = crf.sample(emissions, 7, masks=masks, generator=torch.Generator().manual_seed(2), replacement=False)
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    other = crf.sample(emissions, 7, masks=masks, generator=torch.Generator().manual_seed(3), replacement=False)
    assert not torch.equal(other.tokens, draws.tokens)
    # an incoming gradient on every entry, also beyond the count: those entries get none (no NaN)
    weights = torch.randn(B, 7, dtype=torch.float64)
    params = (emissions, crf.E1.weight, crf.E2.weight)
    ours = torch.autograd.grad(draws.log_prob, params, weights)
    total = 0
    for b, count in enumerate(draws.count.tolist()):
        for n in range(count):
            row = slice(b, b + 1)
            rescored = crf(emissions[row], draws.tokens[row, :, n], masks[row])
            torch.testing.assert_close(rescored[0], draws.log_prob[b, n], rtol=1e-10, atol=1e-10)
            total = total + rescored[0] * weights[b, n]
    for a, want in zip(ours, torch.autograd.grad(total, params)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, want, rtol=1e-10, atol=1e-10)


def test_dynamic_crf_nbest_rescores_best_first():
    crf = _module(DynamicCRF)
    emissions = torch.randn(B, T, V, dtype=torch.float64)
    masks = _masks([6, 3, 1])
    tokens, score, count = crf.nbest(emissions, 4, masks=masks)
    assert tokens.shape == (B, T, 4) and score.shape == (B, 4) and count.tolist() == [4, 4, 4]
    assert (tokens[1, 3:] == PAD).all() and (tokens[2, 1:] == PAD).all()
    assert (score[:, :-1] >= score[:, 1:]).all()
    assert len({tuple(tokens[0, :, n].tolist()) for n in range(4)}) == 4  # distinct sequences
    _, best_tokens = crf.forward_decoder(emissions, masks)
    torch.testing.assert_close(tokens[0, :, 0], best_tokens[0])  # the first is Viterbi's
    # S(y) of each: rescoring gives log p = S(y) - log Z, so the differences between the n agree
    rescored = torch.stack([crf(emissions, tokens[:, :, n], masks) for n in range(4)], 1)
    torch.testing.assert_close(rescored - rescored[:, :1], score - score[:, :1], rtol=1e-10, atol=1e-10)


def _with_tables(module, e1, e2, call):
    """call() with the module's E1/E2 weights replaced by the tensors e1, e2 (so gradcheck sees them)."""
    saved = module.E1.weight, module.E2.weight
    del module.E1.weight, module.E2.weight
    module.E1.weight, module.E2.weight = e1, e2
    try:
        return call()
    finally:
        del module.E1.weight, module.E2.weight
        module.E1.weight, module.E2.weight = saved


def test_gradcheck_every_differentiable_output():
    b, t, v, k, d = 2, 4, 9, 3, 2
    torch.manual_seed(1)
    emissions = torch.randn(b, t, v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (b, t))
    masks = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    crf = DynamicCRF(v, low_rank=d, beam_size=k).double()
    tables = (crf.E1.weight, crf.E2.weight)
    assert torch.autograd.gradcheck(
        lambda em, e1, e2: _with_tables(crf, e1, e2, lambda: crf(em, targets, masks)), (emissions, *tables)
    )
    assert torch.autograd.gradcheck(
        lambda em, e1, e2: _with_tables(
            crf,
            e1,
            e2,
            lambda: crf.sample(em, 3, temperature=0.7, masks=masks, generator=torch.Generator().manual_seed(3))[1],
        ),
        (emissions, *tables),
    )
    assert torch.autograd.gradcheck(
        lambda em, e1, e2: _with_tables(
            crf,
            e1,
            e2,
            lambda: (
                crf.sample(em, 3, masks=masks, generator=torch.Generator().manual_seed(3), replacement=False).log_prob
            ),
        ),
        (emissions, *tables),
    )
    writeup = StochasticViterbiSamples(v, low_rank=d, beam_size=k, num_samples=2).double()
    uniforms = torch.rand(b, t - 1, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(
        lambda em, e1, e2: _with_tables(
            writeup, e1, e2, lambda: writeup._compute_grpo_samples(em, masks=masks, uniforms=uniforms)[0]
        ),
        (emissions, writeup.E1.weight, writeup.E2.weight),
    )


def test_cuda_and_bad_inputs_are_clear_errors():
    crf = _module(DynamicCRF)
    with pytest.raises(ValueError, match=r"emissions must be a \(B, T, V\) floating-point tensor"):
        crf.forward_decoder(torch.randn(B, V, dtype=torch.float64))
    with pytest.raises(TypeError, match="emissions must be a torch.Tensor"):
        crf.forward_decoder(np.zeros((B, T, V)))
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        crf.sample(torch.randn(B, T, V, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        crf.sample(torch.randn(B, T, V, dtype=torch.float64), 0, replacement=False)
    with pytest.raises(TypeError, match="replacement must be a bool, got str"):
        crf.sample(torch.randn(B, T, V, dtype=torch.float64), 2, replacement="no")
    with pytest.raises(ValueError, match="targets must be token ids"):
        crf(torch.randn(B, T, V, dtype=torch.float64), torch.full((B, T), V))


def test_low_precision_inputs_are_computed_in_float32_with_gradients_in_their_dtype():
    crf = _module(DynamicCRF, torch.float32)
    emissions = torch.randn(B, T, V).to(torch.bfloat16).requires_grad_()
    ll = crf(emissions, torch.randint(0, V, (B, T)))
    assert ll.dtype == torch.float32
    ll.sum().backward()
    assert emissions.grad.dtype == torch.bfloat16 and torch.isfinite(emissions.grad.float()).all()
    tokens, log_prob = crf.sample(emissions.detach().half(), 2)
    assert log_prob.dtype == torch.float32 and tokens.dtype == torch.int64
    # a float64 table makes the whole call float64
    crf64 = _module(DynamicCRF, torch.float64)
    assert crf64.sample(emissions.detach(), 2)[1].dtype == torch.float64
