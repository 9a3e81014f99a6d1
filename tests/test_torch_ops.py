"""The PyTorch operators (adapters/torch_ops.py): opcheck of every operator, and the modules under
torch.compile(fullgraph=True), torch.export and torch.autocast."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from viterbi_numba.adapters import torch_ops  # noqa: E402
from viterbi_numba.adapters.torch import DynamicCRF, StochasticViterbiSamples, seed_tensor  # noqa: E402

ops = torch.ops.viterbi_numba
B, T, V, K, D, N = 3, 5, 9, 4, 3, 4


def _crf(dtype=torch.float64, beam=K):
    torch.manual_seed(0)
    crf = DynamicCRF(V, low_rank=D, beam_size=beam).to(dtype)
    with torch.no_grad():
        for table in (crf.E1.weight, crf.E2.weight):
            table.mul_(0.5)
    return crf


def _inputs(dtype=torch.float64, grad=True, batch=B, steps=T):
    """Beam scores and tokens of random emissions, tables, lengths (one sequence shorter)."""
    gen = torch.Generator().manual_seed(1)
    emissions = torch.randn(batch, steps, V, dtype=dtype, generator=gen)
    scores, tokens = ops.topk_beam(emissions, K)
    E1, E2 = (0.5 * torch.randn(V, D, dtype=dtype, generator=gen) for _ in range(2))
    lengths = torch.full((batch,), steps, dtype=torch.int64)
    lengths[-1] = max(1, steps - 3)
    leaves = [t.detach().clone().requires_grad_(grad) for t in (emissions, scores, E1, E2)]
    return (*leaves, tokens, lengths)


def _opcheck_cases():
    emissions, scores, E1, E2, tokens, lengths = _inputs()
    seed = torch.tensor(7)
    plain = [t.detach() for t in (scores, E1, E2)]
    forward = ops.log_partition(*plain[:1], tokens, *plain[1:], lengths, 0.8)
    sample = ops.stochastic_viterbi(*plain[:1], tokens, *plain[1:], lengths, N, 0.8, seed)
    paths = ops.crf_sample(*plain[:1], tokens, *plain[1:], lengths, N, 0.8, seed)[1]
    uniforms = torch.rand(B, T - 1, K, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    distinct_uniforms = torch.rand(
        B, T, N + 1, 2 * (N + 1), dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    scores32 = scores.detach().float().requires_grad_()
    return {
        "topk_beam": (emissions, K),
        "topk_beam forced": (emissions, K, tokens[:, :, -1]),
        "viterbi_decode": (*plain[:1], tokens, *plain[1:], lengths, False),
        "viterbi_decode fairseq": (*plain[:1], tokens, *plain[1:], None, True),
        "viterbi_nbest": (*plain[:1], tokens, *plain[1:], 5, lengths),
        "stochastic_viterbi": (scores, tokens, E1, E2, lengths, N, 0.8, seed),
        "stochastic_viterbi replayed": (scores, tokens, E1, E2, None, N, 1.0, None, uniforms),
        "stochastic_viterbi_backward": (torch.randn_like(sample[0]), sample[0], sample[4], tokens, *plain[1:], lengths),
        "crf_sample": (scores, tokens, E1, E2, lengths, N, 0.8, seed),
        "crf_sample float32": (scores32, tokens, E1.float(), E2, lengths, 2, 1.0, seed),
        "crf_sample_distinct": (scores, tokens, E1, E2, lengths, N, 0.8, seed),
        # the last sequence (length 2) has K**2 = 16 paths: count 16, then PAD paths with log_prob -inf
        "crf_sample_distinct every path": (scores, tokens, E1, E2, lengths, K**2 + 4, 0.8, seed),
        "crf_sample_distinct replayed": (scores, tokens, E1, E2, None, N, 1.0, None, distinct_uniforms),
        "crf_sample_distinct float32": (scores32, tokens, E1.float(), E2, None, 2, 1.0, seed),
        "log_partition": (scores, tokens, E1, E2, lengths, 0.8),
        "marginals": (*plain[:1], tokens, *plain[1:], lengths, 0.8),
        "log_likelihood": (emissions, tokens[:, :, 1], E1, E2, K, lengths, 1.0),
        "crf_paths_backward": (
            torch.randn(B, N, dtype=torch.float64),
            paths,
            *plain[:1],
            tokens,
            *plain[1:],
            lengths,
            0.8,
            *forward[1:],
        ),
        "log_partition_backward": (
            torch.randn(B, dtype=torch.float64),
            *plain[:1],
            tokens,
            *plain[1:],
            lengths,
            0.8,
            *forward[1:],
        ),
        "lengths_from_masks": (torch.arange(T)[None, :] < lengths[:, None],),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck_every_operator(case):
    args = _opcheck_cases()[case]
    op = getattr(ops, case.split()[0]).default
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_draw_seed_is_an_operator_of_the_default_generator():
    assert torch.library.opcheck(ops.draw_seed.default, (), test_utils=("test_schema", "test_faketensor"))
    torch.manual_seed(3)
    first = ops.draw_seed()
    torch.manual_seed(3)
    assert first.dtype == torch.int64 and first.dim() == 0 and torch.equal(first, ops.draw_seed())
    assert not torch.equal(first, ops.draw_seed())
    assert torch.Tag.nondeterministic_seeded in ops.draw_seed.default.tags  # never merged by a compiler


def test_operators_without_a_gradient_take_inputs_that_require_one():
    _, scores, E1, E2, tokens, lengths = _inputs()
    assert E1.requires_grad
    assert ops.viterbi_decode(scores, tokens, E1, E2, lengths, False)[0].shape == (B, T)
    assert ops.viterbi_nbest(scores, tokens, E1, E2, 3, lengths)[2].shape == (B, 3)
    assert ops.marginals(scores, tokens, E1, E2, lengths, 1.0).shape == scores.shape


def test_every_operator_has_cpu_and_cuda_kernels():
    for name in dir(ops):
        packet = getattr(ops, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket) or name == "draw_seed":
            continue
        qualified = f"viterbi_numba::{name}"
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key), (qualified, key)


def test_the_samplers_are_functions_of_their_seed():
    _, scores, E1, E2, tokens, lengths = _inputs()
    for op in (ops.crf_sample, ops.stochastic_viterbi, ops.crf_sample_distinct):
        a = op(scores, tokens, E1, E2, lengths, N, 1.0, torch.tensor(5))
        b = op(scores, tokens, E1, E2, lengths, N, 1.0, torch.tensor(5))
        c = op(scores, tokens, E1, E2, lengths, N, 1.0, torch.tensor(6))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(a[1], c[1])


def test_operators_agree_with_the_array_api():
    import viterbi_numba as vn

    _, scores, E1, E2, tokens, lengths = _inputs()
    arrays = [t.detach().numpy() for t in (scores, tokens, E1, E2, lengths)]
    log_prob, beam_idx, _, log_z, *_ = ops.crf_sample(scores, tokens, E1, E2, lengths, N, 0.8, torch.tensor(9))
    want = vn.crf_sample(*arrays[:4], N, 0.8, arrays[4], seed=9)
    np.testing.assert_array_equal(beam_idx.numpy(), want.beam_idx)
    np.testing.assert_allclose(log_prob.detach().numpy(), want.log_prob, rtol=1e-12)
    np.testing.assert_allclose(log_z.numpy(), vn.log_partition(*arrays[:4], 0.8, arrays[4]), rtol=1e-12)
    grads = torch.autograd.grad(log_prob.sum(), (scores, E1, E2))
    forward = vn.crf_forward(*arrays[:4], 0.8, arrays[4])
    for got, expected in zip(grads, forward.paths_grad(want.beam_idx)):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    # without replacement: every output is the array API's, and the gradient its paths_grad
    distinct = ops.crf_sample_distinct(scores, tokens, E1, E2, lengths, N, 0.8, torch.tensor(9))
    want = vn.crf_sample(*arrays[:4], N, 0.8, arrays[4], seed=9, replacement=False)
    fields = ("log_prob", "beam_idx", "tokens", "weights", "kappa", "count")
    for name, got in zip(fields, distinct):
        np.testing.assert_array_equal(got.detach().numpy(), getattr(want, name), err_msg=name)
    assert (want.count == N).all()  # every column drawn: paths_grad takes them all
    weights = torch.randn(B, N, dtype=torch.float64)
    grads = torch.autograd.grad((distinct[0] * weights).sum(), (scores, E1, E2))
    for got, expected in zip(grads, forward.paths_grad(want.beam_idx, weights.numpy())):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert not any(t.requires_grad for t in distinct[1:])  # only log_prob is differentiable


def test_distinct_samples_beyond_the_count_get_no_gradient():
    _, scores, E1, E2, tokens, lengths = _inputs()
    paths = K ** int(lengths[-1])  # the short last sequence has 16 paths, fewer than drawn
    num_samples = paths + 4
    log_prob, beam_idx, _, weights, _, count, *_ = ops.crf_sample_distinct(
        scores, tokens, E1, E2, lengths, num_samples, 0.8, torch.tensor(3)
    )
    assert count.tolist() == [num_samples, num_samples, paths]
    assert (beam_idx[-1, :, paths:] == -1).all() and torch.isinf(log_prob[-1, paths:]).all()
    assert (weights[-1, paths:] == 0).all()
    grad_in = torch.randn(B, num_samples, dtype=torch.float64)
    # the same loss without the -inf entries: the reference gradient, reached through drawn paths only
    drawn = torch.arange(num_samples)[None, :] < count[:, None]
    want = torch.autograd.grad(log_prob[drawn] @ grad_in[drawn], (scores, E1, E2), retain_graph=True)
    for beyond in (1.0, float("nan")):  # a gradient beyond the count, even NaN, is ignored
        grad_out = torch.where(drawn, grad_in, torch.full_like(grad_in, beyond))
        got = torch.autograd.grad(log_prob, (scores, E1, E2), grad_out, retain_graph=True)
        for have, expected in zip(got, want):
            assert torch.isfinite(have).all()
            torch.testing.assert_close(have, expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_operators():
    emissions, scores, E1, E2, tokens, lengths = _inputs()

    def log_z(s, e1, e2):
        return ops.log_partition(s, tokens, e1, e2, lengths, 0.7)[0]

    def sample_log_prob(s, e1, e2):
        return ops.crf_sample(s, tokens, e1, e2, lengths, 3, 0.7, torch.tensor(4))[0]

    def distinct_log_prob(s, e1, e2):
        return ops.crf_sample_distinct(s, tokens, e1, e2, lengths, 3, 0.7, torch.tensor(4))[0]

    def likelihood(em, e1, e2):
        return ops.log_likelihood(em, tokens[:, :, 2], e1, e2, K, lengths, 1.0)[0]

    for fn, leaves in (
        (log_z, (scores, E1, E2)),
        (sample_log_prob, (scores, E1, E2)),
        (distinct_log_prob, (scores, E1, E2)),
        (likelihood, (emissions, E1, E2)),
    ):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# compile, export, autocast
# --------------------------------------------------------------------------------------------------
def _grpo_step(crf, emissions, masks, targets, clip=0.2, group=8):
    """One GRPO step's loss: ``group`` exact samples, re-scored with ``forward`` (old and new log-probs),
    rewards against ``targets``, group-normalised advantages, the clipped PPO loss."""
    batch, steps, _ = emissions.shape
    tokens, _ = crf.sample(emissions.detach(), group, masks=masks)
    flat = tokens.permute(0, 2, 1).reshape(batch * group, steps)
    repeated = emissions.repeat_interleave(group, 0)
    flat_masks = masks.repeat_interleave(group, 0)
    old_log_prob = crf(repeated.detach(), flat, masks=flat_masks).detach()
    log_prob = crf(repeated, flat, masks=flat_masks)
    hits = ((flat == targets.repeat_interleave(group, 0)) & flat_masks).sum(1).to(emissions.dtype)
    rewards = (hits / flat_masks.sum(1)).view(batch, group)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()
    return loss, tokens


def _step_data(batch, steps, dtype=torch.float64):
    gen = torch.Generator().manual_seed(batch * 100 + steps)
    emissions = torch.randn(batch, steps, V, dtype=dtype, generator=gen, requires_grad=True)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps
    masks = torch.arange(steps)[None, :] < lengths[:, None]
    return emissions, masks, torch.randint(0, V, (batch, steps), generator=gen)


def _run(step, crf, data, seed):
    torch.manual_seed(seed)
    crf.zero_grad()
    emissions = data[0].detach().clone().requires_grad_()
    loss, tokens = step(crf, emissions, *data[1:])
    loss.backward()
    return loss.detach(), tokens, emissions.grad, crf.E1.weight.grad.clone(), crf.E2.weight.grad.clone()


def test_a_compiled_grpo_step_has_no_graph_break_and_gives_the_eager_results():
    torch._dynamo.reset()
    crf = _crf()
    compiled = torch.compile(_grpo_step, fullgraph=True)  # fullgraph: a graph break is an error
    data = _step_data(B, T)
    eager = _run(_grpo_step, crf, data, seed=5)
    got = _run(compiled, crf, data, seed=5)
    assert torch.equal(eager[1], got[1])  # the same samples: the seeds come from draw_seed
    for want, have in zip(eager[:1] + eager[2:], got[:1] + got[2:]):
        torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in eager[2:])
    # another seed gives other samples, compiled too
    assert not torch.equal(_run(compiled, crf, data, seed=6)[1], got[1])


def test_batch_and_length_changes_do_not_recompile_every_call():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    crf = _crf()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_grpo_step, backend=counter, fullgraph=True)
    shapes = [(3, 5), (4, 7), (2, 6), (5, 9), (3, 8)]
    for batch, steps in shapes:
        data = _step_data(batch, steps)
        eager = _run(_grpo_step, crf, data, seed=1)
        got = _run(compiled, crf, data, seed=1)
        assert torch.equal(eager[1], got[1])
        torch.testing.assert_close(got[2], eager[2], rtol=1e-6, atol=1e-6)
    # the first shape compiles a static graph, the second a dynamic one that serves every later shape
    assert counter.frame_count == 2, counter.frame_count


class _Decoder(torch.nn.Module):
    """A model whose forward ends in DynamicCRF.forward_decoder."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, V)
        self.crf = _crf(torch.float32)

    def forward(self, features, masks):
        return self.crf.forward_decoder(self.encoder(features), masks=masks)


def test_torch_export_of_a_module_that_decodes():
    model = _Decoder()
    features = torch.randn(B, T, 6)
    masks = torch.arange(T)[None, :] < torch.tensor([T, 2, 4])[:, None]
    batch = torch.export.Dim("batch", min=2)
    steps = torch.export.Dim("steps", min=2)
    exported = torch.export.export(
        model, (features, masks), dynamic_shapes=({0: batch, 1: steps}, {0: batch, 1: steps})
    )
    targets = {str(node.target) for module in exported.graph_module.modules() for node in module.graph.nodes}
    assert "viterbi_numba.viterbi_decode.default" in targets, targets  # the operator, not its internals
    for args in ((features, masks), (torch.randn(4, 7, 6), torch.ones(4, 7, dtype=torch.bool))):
        for got, want in zip(exported.module()(*args), model(*args)):
            torch.testing.assert_close(got, want)


def test_autocast_bfloat16_around_the_loss():
    crf = _crf(torch.float32)
    encoder = torch.nn.Linear(6, V)
    features = torch.randn(B, T, 6)
    targets = torch.randint(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emissions = encoder(features)
        assert emissions.dtype == torch.bfloat16
        log_likelihood = crf(emissions, targets)
        tokens, log_prob = crf.sample(emissions, 4)
        scores, decoded = crf.forward_decoder(emissions)
        loss = -(log_likelihood.sum() + log_prob.sum())
    # computed in float32 (the tables' dtype): float results in float32, ids in int64
    assert log_likelihood.dtype == log_prob.dtype == scores.dtype == torch.float32
    assert tokens.dtype == decoded.dtype == torch.int64
    loss.backward()
    assert encoder.weight.grad.dtype == torch.float32 and torch.isfinite(encoder.weight.grad).all()
    assert crf.E1.weight.grad.dtype == torch.float32
    # the same as computing from the bfloat16 emissions in float32 by hand
    want = crf(emissions.detach().float(), targets)
    torch.testing.assert_close(log_likelihood.detach(), want.detach())


def test_compiled_writeup_sampler_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = StochasticViterbiSamples(V, low_rank=D, beam_size=K, num_samples=3).double()
    emissions = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)

    def loss(emissions):
        beam_probs, beam_idx, tokens = module(emissions)
        return (beam_probs * torch.linspace(0, 1, beam_probs.numel()).view_as(beam_probs)).sum(), tokens

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        torch.manual_seed(2)
        value, tokens = fn(emissions)
        (grad,) = torch.autograd.grad(value, emissions)
        results.append((value, tokens, grad))
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][2], results[0][2])


def test_compiled_code_draws_the_eager_seeds():
    # inductor replaces torch.randint in a graph by its own generator (other numbers); draw_seed stays
    torch._dynamo.reset()

    def draws(offset):
        return offset + seed_tensor(), offset + seed_tensor()

    compiled = torch.compile(draws, fullgraph=True)
    offset = torch.zeros((), dtype=torch.int64)
    torch.manual_seed(0)
    want = draws(offset)
    torch.manual_seed(0)
    got = compiled(offset)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and not torch.equal(got[0], got[1])


def test_seed_tensor_follows_its_generator():
    a = seed_tensor(torch.Generator().manual_seed(4))
    assert torch.equal(a, seed_tensor(torch.Generator().manual_seed(4))) and a.dtype == torch.int64
    assert torch_ops.compute_dtype(torch.zeros(1, dtype=torch.bfloat16), None) == torch.float32


def test_entropy_and_kl_operators_and_modules():
    import viterbi_numba as vn

    emissions, scores, E1, E2, tokens, lengths = _inputs()
    seed_scores = scores.detach()
    cases = {
        "crf_entropy": (scores, tokens, E1, E2, lengths, 0.8),
        "crf_kl": (scores, (0.5 * seed_scores).requires_grad_(), tokens, E1, E2, (E1 * 0.3).detach(), E2, lengths, 0.9),
    }
    for name, args in cases.items():
        assert set(torch.library.opcheck(getattr(ops, name).default, args).values()) == {"SUCCESS"}, name
    H = ops.crf_entropy(scores, tokens, E1, E2, lengths, 0.8)[0]
    arrays = [t.detach().numpy() for t in (scores, tokens, E1, E2)]
    np.testing.assert_allclose(H.detach().numpy(), vn.crf_entropy(*arrays, 0.8, lengths.numpy()), rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda s, e1, e2: ops.crf_entropy(s, tokens, e1, e2, lengths, 0.8)[0], (scores, E1, E2), eps=1e-6, atol=1e-6
    )
    other = (0.5 * seed_scores).requires_grad_()
    E1_q = E1.detach() * 0.3  # made before gradcheck moves E1 in place
    assert torch.autograd.gradcheck(
        lambda s, q, e1: ops.crf_kl(s, q, tokens, e1, E2, E1_q, E2, lengths, 0.9)[0],
        (scores, other, E1),
        eps=1e-6,
        atol=1e-6,
    )
    # the modules: an entropy bonus and a KL penalty to a frozen copy, compiled with the eager values
    crf = _crf()
    reference = _crf()
    with torch.no_grad():
        reference.E1.weight.mul_(0.5)
    reference.requires_grad_(False)
    masks = torch.arange(T)[None, :] < lengths[:, None]

    def regularisers(emissions):
        kl = crf.kl(emissions, reference, emissions.detach() * 0.9, masks=masks)
        return crf.entropy(emissions, masks=masks).sum() - kl.sum(), kl

    eager, kl = regularisers(emissions)
    assert torch.all(kl > 0)
    assert torch.allclose(crf.kl(emissions, crf, emissions), torch.zeros(B, dtype=torch.float64), atol=1e-12)
    compiled = torch.compile(regularisers, fullgraph=True, backend="aot_eager")(emissions)[0]
    torch.testing.assert_close(compiled, eager)
    (grad,) = torch.autograd.grad(eager, emissions)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
