"""The kernels as PyTorch operators: ``torch.ops.viterbi_numba.*``, custom operators of ``torch.library``.

Each operator takes and returns tensors only, has a fake (meta) implementation that gives the shapes
and dtypes of its results without reading data, one implementation for CPU and CUDA tensors (CPU tensors
cross as NumPy views of their memory; CUDA tensors go to the GPU kernels, which allocate the results with
torch and run on torch's current stream), and, where it is differentiable, a backward formula made of
the backward operators below. So ``torch.compile(fullgraph=True)``, ``torch.export``, ``opcheck`` and
AOT autograd see them as ordinary operators, and the modules of :mod:`viterbi_numba.adapters.torch` are
made of them.

Conventions (as the array API's, docs/design.md §2): float inputs are computed in one compute dtype,
float64 if any float input is float64, else float32 (float16 and bfloat16 in float32, so under
``torch.autocast`` the operators compute in float32), and every float result is in the compute dtype;
ids are int64; ``lengths`` (B,) int64 or None (all T). Gradients come back in each input's own dtype.

The samplers are pure functions of their inputs: their randomness is the ``seed``, a 0-dim int64 tensor
(:func:`draw_seed` draws one from torch's default generator), so an operator called twice with the same
seed returns the same samples, compiled or not.

Operators (floats in the compute dtype, ids int64):

* ``draw_seed()`` — a 0-dim int64 seed in [0, 2**63 - 1) from torch's default generator.
* ``lengths_from_masks(masks)`` — (B,) lengths of (B, T) prefix masks, checked.
* ``topk_beam`` — beam scores and tokens (B, T, K); differentiable (the scores).
* ``viterbi_decode`` — beam_idx, tokens (B, T), score (B,), step_scores (B, T).
* ``viterbi_nbest`` — beam_idx, tokens (B, T, n), score (B, n), count (B,).
* ``stochastic_viterbi`` — beam_probs (B, T, K, N), beam_idx, tokens (B, T, N), path_scores
  (B, T, K, N), backpointers (B, T-1, K, N), score (B, N); differentiable (beam_probs).
* ``crf_sample`` — log_prob (B, N), beam_idx, tokens (B, T, N), then the forward pass's saved state
  (log_z (B,), alpha, col_max, col_sum (B, T, K)); differentiable (log_prob).
* ``crf_sample_distinct`` — N distinct samples (without replacement): log_prob (B, N), beam_idx, tokens
  (B, T, N), the priority-sampling weights (B, N), kappa (B,), count (B,), then the saved state;
  differentiable (log_prob; beyond ``count`` the paths are PAD, log_prob -inf and the gradient 0).
* ``log_partition`` — log_z (B,), then the saved state; differentiable (log_z).
* ``marginals`` — (B, T, K).
* ``log_likelihood`` — log_likelihood (B,), beam_scores, beam_tokens (B, T, K), the targets' slots
  (B, T, 1), then the saved state; differentiable (log_likelihood).
* ``crf_entropy`` — H (B,), then the saved state; differentiable (H).
* ``crf_kl`` — KL(p || q) (B,) of two CRFs on one beam, then p's and q's saved states; differentiable
  (KL) with respect to both.
* ``stochastic_viterbi_backward``, ``crf_paths_backward``, ``log_partition_backward``,
  ``crf_entropy_backward`` — the backward formulas' operators: grad_scores (B, T, K), grad_E1, grad_E2
  (V, D); ``crf_kl_backward``: those of p, then of q.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

import viterbi_numba as vn

__all__ = ["as_numpy", "compute_dtype"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SEED_BOUND = 2**63 - 1
_LIBRARY = torch.library.Library("viterbi_numba", "DEF")


def _operator(kernel: Any = None, *, keys: tuple[str, ...] = ("CPU", "CUDA"), tags: tuple = ()) -> Any:
    """Defines ``viterbi_numba::<kernel's name>`` with the schema of ``kernel``'s type hints and ``kernel``
    as its implementation for the dispatch ``keys``; returns the operator.

    ``Library.define`` / ``impl`` rather than ``@torch.library.custom_op``, which makes the same kind of
    operator: the decorator's Python wrappers cost about 15 µs a call, these about 4 (docs/design.md §7).
    """
    if kernel is None:
        return lambda kernel: _operator(kernel, keys=keys, tags=tags)
    name = kernel.__name__
    _LIBRARY.define(name + torch.library.infer_schema(kernel, mutates_args=()), tags=tags)
    for key in keys:
        _LIBRARY.impl(name, kernel, key)
    return getattr(torch.ops.viterbi_numba, name).default


def _fake(operator: Any) -> Any:
    """Registers the decorated function as ``operator``'s fake (shapes and dtypes only)."""
    return torch.library.register_fake(operator, lib=_LIBRARY)


def _autograd(operator: Any, backward: Any, setup_context: Any) -> None:
    torch.library.register_autograd(operator, backward, setup_context=setup_context, lib=_LIBRARY)


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def as_numpy(tensor: torch.Tensor, name: str = "tensor") -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (no copy, no autograd); float16/bfloat16 become float32."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise TypeError(f"{name} is on {tensor.device}; as_numpy takes CPU tensors")
    tensor = tensor.detach()
    if tensor.dtype in _LOW_PRECISION:
        tensor = tensor.float()
    return tensor.numpy()


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any of the float tensors is float64, else float32."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def _array(tensor: Optional[Tensor], name: str, dtype: Optional[torch.dtype] = None) -> Any:
    """What the array API takes for ``tensor``: a NumPy view of a CPU tensor, or the CUDA tensor itself,
    contiguous, float tensors in ``dtype`` (the GPU kernels take one float dtype), ids in int64. Detached:
    an operator without an autograd formula (``viterbi_decode``, ``marginals``) still sees its inputs'
    ``requires_grad``."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.is_cpu:
        return tensor.numpy() if tensor.dtype not in _LOW_PRECISION else tensor.float().numpy()
    if not tensor.is_cuda:
        raise TypeError(f"{name} is on {tensor.device}; the kernels take CPU or CUDA tensors")
    if tensor.dtype.is_floating_point:
        tensor = tensor.to(dtype or (torch.float32 if tensor.dtype in _LOW_PRECISION else tensor.dtype))
    elif tensor.dtype != torch.bool:
        tensor = tensor.long()
    return tensor.contiguous()


def _crf_arrays(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor],
    dtype: Optional[torch.dtype] = None,
) -> tuple[Any, Any, Any, Any, Any]:
    """(scores, tokens, E1, E2, lengths) as the array API takes them, floats in ``dtype`` (default their
    compute dtype)."""
    dtype = dtype or compute_dtype(scores, E1, E2)
    return (
        _array(scores, "scores", dtype),
        _array(tokens, "tokens"),
        _array(E1, "E1", dtype),
        _array(E2, "E2", dtype),
        _array(lengths, "lengths"),
    )


def _forward(
    scores: Tensor, tokens: Tensor, E1: Tensor, E2: Tensor, lengths: Optional[Tensor], temperature: float
) -> vn.CRFForward:
    """The kept forward pass (:func:`viterbi_numba.crf_forward`) of an operator's tensors."""
    crf_arrays = _crf_arrays(scores, tokens, E1, E2, lengths)
    return vn.crf_forward(*crf_arrays[:4], temperature=temperature, lengths=crf_arrays[4])


def _tensor(array: Any) -> Tensor:
    """A tensor over an array the kernels returned (NumPy: shared memory; a torch CUDA tensor: itself;
    a numba device array: through ``__cuda_array_interface__``)."""
    if isinstance(array, Tensor):
        return array
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.as_tensor(array, device="cuda")


def _seed(seed: Optional[Tensor]) -> Optional[int]:
    return None if seed is None else int(seed)


def _saved(saved: tuple[Any, Any, Any, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A forward pass's saved state (``CRFForward.saved``) as tensors."""
    log_z, alpha, col_max, col_sum = (_tensor(array) for array in saved)
    return log_z, alpha, col_max, col_sum


def _float_like(tensor: Tensor, shape: Any, dtype: torch.dtype) -> Tensor:
    return tensor.new_empty(shape, dtype=dtype)


def _ids_like(tensor: Tensor, shape: Any) -> Tensor:
    return tensor.new_empty(shape, dtype=torch.int64)


def _state_like(scores: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, T, K = scores.shape
    return (
        _float_like(scores, (B,), dtype),
        _float_like(scores, (B, T, K), dtype),
        _float_like(scores, (B, T, K), dtype),
        _float_like(scores, (B, T, K), dtype),
    )


def _in_dtypes(grads: tuple, *inputs: Tensor) -> tuple:
    """Gradients (compute dtype) in their inputs' dtypes."""
    return tuple(grad.to(tensor.dtype) for grad, tensor in zip(grads, inputs))


# --------------------------------------------------------------------------------------------------
# seeds and masks
# --------------------------------------------------------------------------------------------------
@_operator(keys=("CompositeExplicitAutograd",), tags=(torch.Tag.nondeterministic_seeded,))
def draw_seed() -> Tensor:
    """A 0-dim int64 seed in [0, 2**63 - 1) from torch's default CPU generator.

    An operator (never merged with another call, never replaced by a compiler's own random numbers), so
    that a compiled function draws exactly the seeds its eager run draws: ``torch.manual_seed`` then
    gives the same samples compiled or not.
    """
    return torch.randint(0, _SEED_BOUND, (), dtype=torch.int64)


@_fake(draw_seed)
def _(*_args: Any) -> Tensor:
    return torch.empty((), dtype=torch.int64)


def checked_lengths(masks: Tensor) -> Tensor:
    """(B,) int64 lengths of (B, T) prefix masks (True on the real positions), on the masks' device.

    Raises a TypeError for a float mask and a ValueError for values other than 0/1, a mask off at the
    first position, or one that switches back on.
    """
    if masks.dtype.is_floating_point or masks.dtype.is_complex:
        raise TypeError(f"masks must be a bool (or 0/1 integer) tensor, got dtype {masks.dtype}")
    if masks.dim() != 2:
        raise ValueError(f"masks must have shape (B, T), got {tuple(masks.shape)}")
    host = masks.detach().cpu()
    if ((host != 0) & (host != 1)).any():
        raise ValueError("masks must hold only 0/1 (False/True)")
    host = host.bool()
    if host.shape[0] and host.shape[1] and not host[:, 0].all():
        b = int((~host[:, 0]).nonzero()[0, 0])
        raise ValueError(f"masks must be on at the first position of every sequence (sequence {b} is not)")
    switches = host[:, 1:] & ~host[:, :-1]
    if switches.any():
        b = int(switches.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"masks must be prefix masks (on, then off); sequence {b} switches back on")
    return host.sum(dim=1, dtype=torch.int64).to(masks.device)


@_operator
def lengths_from_masks(masks: Tensor) -> Tensor:
    """(B,) int64 lengths of (B, T) prefix masks, checked (:func:`checked_lengths`)."""
    return checked_lengths(masks)


@_fake(lengths_from_masks)
def _(masks: Tensor) -> Tensor:
    return _ids_like(masks, (masks.shape[0],))


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------
@_operator
def topk_beam(emissions: Tensor, k: int, force_tokens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:func:`viterbi_numba.topk_beam`: beam scores (compute dtype) and tokens (B, T, k)."""
    beam = vn.topk_beam(_array(emissions, "emissions"), k, _array(force_tokens, "force_tokens"))
    return _tensor(beam.scores), _tensor(beam.tokens)


@_fake(topk_beam)
def _(emissions: Tensor, k: int, force_tokens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    B, T, _ = emissions.shape
    return _float_like(emissions, (B, T, k), compute_dtype(emissions)), _ids_like(emissions, (B, T, k))


def _topk_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    emissions = inputs[0]
    ctx.shape, ctx.dtype = emissions.shape, emissions.dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _topk_backward(ctx: Any, grad_scores: Tensor, _grad_tokens: Any) -> tuple:
    (tokens,) = ctx.saved_tensors
    grad = grad_scores.new_zeros(ctx.shape).scatter_add(2, tokens, grad_scores)
    return grad.to(ctx.dtype), None, None


_autograd(topk_beam, _topk_backward, _topk_setup)


@_operator
def viterbi_decode(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
    fairseq_step_scores: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.viterbi_decode` (``step_scores="fairseq"`` when ``fairseq_step_scores``)."""
    best = vn.viterbi_decode(
        *_crf_arrays(scores, tokens, E1, E2, lengths), step_scores="fairseq" if fairseq_step_scores else "increments"
    )
    return _tensor(best.beam_idx), _tensor(best.tokens), _tensor(best.score), _tensor(best.step_scores)


@_fake(viterbi_decode)
def _(scores, tokens, E1, E2, lengths=None, fairseq_step_scores=False):  # type: ignore[no-untyped-def]
    B, T, _ = scores.shape
    dtype = compute_dtype(scores, E1, E2)
    return (
        _ids_like(scores, (B, T)),
        _ids_like(scores, (B, T)),
        _float_like(scores, (B,), dtype),
        _float_like(scores, (B, T), dtype),
    )


@_operator
def viterbi_nbest(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    n: int,
    lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.viterbi_nbest`: beam_idx, tokens (B, T, n), score (B, n), count (B,)."""
    scores_, tokens_, E1_, E2_, lengths_ = _crf_arrays(scores, tokens, E1, E2, lengths)
    best = vn.viterbi_nbest(scores_, tokens_, E1_, E2_, n, lengths_)
    return _tensor(best.beam_idx), _tensor(best.tokens), _tensor(best.score), _tensor(best.count)


@_fake(viterbi_nbest)
def _(scores, tokens, E1, E2, n, lengths=None):  # type: ignore[no-untyped-def]
    B, T, _ = scores.shape
    return (
        _ids_like(scores, (B, T, n)),
        _ids_like(scores, (B, T, n)),
        _float_like(scores, (B, n), compute_dtype(scores, E1, E2)),
        _ids_like(scores, (B,)),
    )


@_operator
def stochastic_viterbi(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
    num_samples: int = 1,
    temperature: float = 1.0,
    seed: Optional[Tensor] = None,
    uniforms: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.stochastic_viterbi` with N = ``num_samples`` chains (N last, also for N = 1);
    ``uniforms`` (B, T-1, K, N) replay given draws instead of the ``seed``."""
    dtype = compute_dtype(scores, E1, E2)
    out = vn.stochastic_viterbi(
        *_crf_arrays(scores, tokens, E1, E2, None)[:4],
        num_samples=num_samples,
        temperature=temperature,
        lengths=_array(lengths, "lengths"),
        seed=_seed(seed),
        uniforms=_array(uniforms, "uniforms", dtype),
    )
    return tuple(_tensor(array) for array in out)


@_fake(stochastic_viterbi)
def _(scores, tokens, E1, E2, lengths=None, num_samples=1, temperature=1.0, seed=None, uniforms=None):  # type: ignore[no-untyped-def]
    B, T, K = scores.shape
    N = num_samples
    dtype = compute_dtype(scores, E1, E2)
    return (
        _float_like(scores, (B, T, K, N), dtype),
        _ids_like(scores, (B, T, N)),
        _ids_like(scores, (B, T, N)),
        _float_like(scores, (B, T, K, N), dtype),
        _ids_like(scores, (B, T - 1, K, N)),
        _float_like(scores, (B, N), dtype),
    )


def _stochastic_viterbi_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    scores, tokens, E1, E2, lengths = inputs[:5]
    beam_probs, beam_idx, path_tokens, path_scores, backpointers, score = output
    ctx.save_for_backward(scores, tokens, E1, E2, lengths, beam_probs, backpointers)
    ctx.mark_non_differentiable(beam_idx, path_tokens, path_scores, backpointers, score)


def _stochastic_viterbi_grad(ctx: Any, grad_beam_probs: Tensor, *_unused: Any) -> tuple:
    scores, tokens, E1, E2, lengths, beam_probs, backpointers = ctx.saved_tensors
    grads = torch.ops.viterbi_numba.stochastic_viterbi_backward(
        grad_beam_probs, beam_probs, backpointers, tokens, E1, E2, lengths
    )
    grad_scores, grad_E1, grad_E2 = _in_dtypes(grads, scores, E1, E2)
    return grad_scores, None, grad_E1, grad_E2, None, None, None, None, None


_autograd(stochastic_viterbi, _stochastic_viterbi_grad, _stochastic_viterbi_setup)


@_operator
def stochastic_viterbi_backward(
    grad_beam_probs: Tensor,
    beam_probs: Tensor,
    backpointers: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.stochastic_viterbi_backward` of a :func:`stochastic_viterbi` result."""
    dtype = compute_dtype(beam_probs, E1, E2)
    sample = vn.StochasticViterbiResult(  # what the backward pass reads of a sample
        _array(beam_probs, "beam_probs", dtype), None, None, None, _array(backpointers, "backpointers"), None
    )
    grads = vn.stochastic_viterbi_backward(
        _array(grad_beam_probs, "grad_beam_probs", dtype),
        sample,
        _array(tokens, "tokens"),
        _array(E1, "E1", dtype),
        _array(E2, "E2", dtype),
        _array(lengths, "lengths"),
    )
    return _tensor(grads.grad_scores), _tensor(grads.grad_E1), _tensor(grads.grad_E2)


@_fake(stochastic_viterbi_backward)
def _(grad_beam_probs, beam_probs, backpointers, tokens, E1, E2, lengths=None):  # type: ignore[no-untyped-def]
    return _grads_like(tokens, E1, compute_dtype(beam_probs, E1, E2))


def _grads_like(tokens: Tensor, E1: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return _float_like(tokens, tokens.shape, dtype), _float_like(E1, E1.shape, dtype), _float_like(E1, E1.shape, dtype)


# --------------------------------------------------------------------------------------------------
# exact inference
# --------------------------------------------------------------------------------------------------
@_operator
def crf_sample(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
    num_samples: int = 1,
    temperature: float = 1.0,
    seed: Optional[Tensor] = None,
    uniforms: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.crf_sample`: log_prob (B, N), beam_idx, tokens (B, T, N), then the forward
    pass's saved state (what the backward pass reads)."""
    forward, draws = _draw(scores, tokens, E1, E2, lengths, num_samples, temperature, seed, uniforms, True)
    return _tensor(draws.log_prob), _tensor(draws.beam_idx), _tensor(draws.tokens), *_saved(forward.saved)


def _draw(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor],
    num_samples: int,
    temperature: float,
    seed: Optional[Tensor],
    uniforms: Optional[Tensor],
    replacement: bool,
) -> tuple[vn.CRFForward, Any]:
    """The kept forward pass of an exact sampler's tensors and its draw (:meth:`viterbi_numba.CRFForward.sample`)."""
    forward = _forward(scores, tokens, E1, E2, lengths, temperature)
    uniforms_ = _array(uniforms, "uniforms", compute_dtype(scores, E1, E2))
    return forward, forward.sample(num_samples, seed=_seed(seed), uniforms=uniforms_, replacement=replacement)


@_fake(crf_sample)
def _crf_sample_like(scores, tokens, E1, E2, lengths=None, num_samples=1, temperature=1.0, seed=None, uniforms=None):  # type: ignore[no-untyped-def]
    B, T, _ = scores.shape
    dtype = compute_dtype(scores, E1, E2)
    N = num_samples
    return (
        _float_like(scores, (B, N), dtype),
        _ids_like(scores, (B, T, N)),
        _ids_like(scores, (B, T, N)),
        *_state_like(scores, dtype),
    )


def _crf_setup(ctx: Any, inputs: tuple, output: tuple, temperature: float, paths: Optional[Tensor]) -> None:
    """Saves what the backward pass of an exact-inference operator reads: its beam CRF's inputs, the
    ``paths`` (the samples', for their log-probabilities) and the forward pass's saved state (the last
    four outputs); only the first output carries a gradient."""
    scores, tokens, E1, E2, lengths = inputs[:5]
    ctx.temperature = temperature
    ctx.save_for_backward(scores, tokens, E1, E2, lengths, paths, *output[-4:])
    ctx.mark_non_differentiable(*output[1:])


def _crf_sample_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    _crf_setup(ctx, inputs, output, temperature=inputs[6], paths=output[1])


def _paths_grad(ctx: Any, weights: Tensor, paths: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum weights * log p(paths)`` with respect to scores, E1, E2 (``paths``: the saved
    ones unless given)."""
    scores, tokens, E1, E2, lengths, saved_paths, *state = ctx.saved_tensors
    grads = torch.ops.viterbi_numba.crf_paths_backward(
        weights, saved_paths if paths is None else paths, scores, tokens, E1, E2, lengths, ctx.temperature, *state
    )
    return _in_dtypes(grads, scores, E1, E2)


def _crf_sample_grad(ctx: Any, grad_log_prob: Tensor, *_unused: Any) -> tuple:
    grad_scores, grad_E1, grad_E2 = _paths_grad(ctx, grad_log_prob)
    return grad_scores, None, grad_E1, grad_E2, None, None, None, None, None


_autograd(crf_sample, _crf_sample_grad, _crf_sample_setup)


@_operator
def crf_sample_distinct(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
    num_samples: int = 1,
    temperature: float = 1.0,
    seed: Optional[Tensor] = None,
    uniforms: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.crf_sample` with ``replacement=False``: log_prob (B, N) (-inf beyond ``count``),
    beam_idx, tokens (B, T, N) (PAD beyond ``count``), the priority-sampling weights p/q (B, N), kappa (B,),
    count (B,), then the forward pass's saved state; ``uniforms`` (B, T, N + 1, 2 (N + 1)) replay given draws
    instead of the ``seed`` (the layout of :func:`viterbi_numba.crf_sample`)."""
    forward, draws = _draw(scores, tokens, E1, E2, lengths, num_samples, temperature, seed, uniforms, False)
    return (
        _tensor(draws.log_prob),
        _tensor(draws.beam_idx),
        _tensor(draws.tokens),
        _tensor(draws.weights),
        _tensor(draws.kappa),
        _tensor(draws.count),
        *_saved(forward.saved),
    )


@_fake(crf_sample_distinct)
def _(scores, tokens, E1, E2, lengths=None, num_samples=1, temperature=1.0, seed=None, uniforms=None):  # type: ignore[no-untyped-def]
    log_prob, beam_idx, path_tokens, *state = _crf_sample_like(scores, tokens, E1, E2, lengths, num_samples)
    B = scores.shape[0]
    weights = _float_like(scores, (B, num_samples), log_prob.dtype)
    kappa = _float_like(scores, (B,), log_prob.dtype)
    return log_prob, beam_idx, path_tokens, weights, kappa, _ids_like(scores, (B,)), *state


def _crf_sample_distinct_grad(ctx: Any, grad_log_prob: Tensor, *_unused: Any) -> tuple:
    paths = ctx.saved_tensors[5]
    # A path beyond ``count`` is PAD everywhere (position 0 is before every length) and its log_prob, -inf,
    # is a constant: weight 0 whatever the incoming gradient (even inf or NaN), and slot 0 in place of PAD
    # for crf_paths_backward, which takes beam slots before each length.
    drawn = paths[:, 0, :] >= 0
    weights = torch.where(drawn, grad_log_prob, torch.zeros_like(grad_log_prob))
    grad_scores, grad_E1, grad_E2 = _paths_grad(ctx, weights, paths.clamp_min(0))
    return grad_scores, None, grad_E1, grad_E2, None, None, None, None, None


_autograd(crf_sample_distinct, _crf_sample_distinct_grad, _crf_sample_setup)


@_operator
def log_partition(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.log_partition`: log Z (B,), then the forward pass's saved state."""
    forward = _forward(scores, tokens, E1, E2, lengths, temperature)
    log_z, *state = _saved(forward.saved)
    return log_z.clone(), log_z, *state


def _value_and_state_like(scores, tokens, E1, E2, lengths=None, temperature=1.0):  # type: ignore[no-untyped-def]
    """The fake of an operator (scores, tokens, E1, E2, lengths, temperature) -> (a value per sequence,
    the forward pass's saved state): ``log_partition``, ``crf_entropy``."""
    dtype = compute_dtype(scores, E1, E2)
    return _float_like(scores, (scores.shape[0],), dtype), *_state_like(scores, dtype)


def _value_autograd(operator: Any, backward_name: str) -> None:
    """Registers the autograd of such an operator, whose backward operator ``backward_name`` takes
    (grad (B,), scores, tokens, E1, E2, lengths, temperature, *saved state) and returns the gradients
    with respect to scores, E1 and E2."""

    def setup(ctx: Any, inputs: tuple, output: tuple) -> None:
        _crf_setup(ctx, inputs, output, temperature=inputs[5], paths=None)

    def backward(ctx: Any, grad_value: Tensor, *_state: Any) -> tuple:
        scores, tokens, E1, E2, lengths, _paths, *state = ctx.saved_tensors
        grads = getattr(torch.ops.viterbi_numba, backward_name)(
            grad_value, scores, tokens, E1, E2, lengths, ctx.temperature, *state
        )
        grad_scores, grad_E1, grad_E2 = _in_dtypes(grads, scores, E1, E2)
        return grad_scores, None, grad_E1, grad_E2, None, None

    _autograd(operator, backward, setup)


_fake(log_partition)(_value_and_state_like)
_value_autograd(log_partition, "log_partition_backward")


@_operator
def marginals(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
    temperature: float = 1.0,
) -> Tensor:
    """:func:`viterbi_numba.marginals`: node marginals (B, T, K), 0 at padded positions (not differentiable)."""
    return _tensor(_forward(scores, tokens, E1, E2, lengths, temperature).marginals())


@_fake(marginals)
def _(scores, tokens, E1, E2, lengths=None, temperature=1.0):  # type: ignore[no-untyped-def]
    return _float_like(scores, scores.shape, compute_dtype(scores, E1, E2))


@_operator
def log_likelihood(
    emissions: Tensor,
    targets: Tensor,
    E1: Tensor,
    E2: Tensor,
    k: int,
    lengths: Optional[Tensor] = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.log_likelihood` (fairseq ``DynamicCRF.forward``): log p(targets) (B,), the
    beam it was computed on (scores, tokens (B, T, k)), the targets' slots in it (B, T, 1), then the
    forward pass's saved state."""
    dtype = compute_dtype(emissions, E1, E2)
    likelihood = vn.log_likelihood_forward(
        _array(emissions, "emissions", dtype),
        _array(targets, "targets"),
        _array(E1, "E1", dtype),
        _array(E2, "E2", dtype),
        k,
        _array(lengths, "lengths"),
        temperature,
    )
    return (
        _tensor(likelihood.log_likelihood),
        _tensor(likelihood.beam_scores),
        _tensor(likelihood.beam_tokens),
        _tensor(likelihood.target_slots),
        *_saved(likelihood.forward.saved),
    )


@_fake(log_likelihood)
def _(emissions, targets, E1, E2, k, lengths=None, temperature=1.0):  # type: ignore[no-untyped-def]
    B, T, _ = emissions.shape
    dtype = compute_dtype(emissions, E1, E2)
    beam = _float_like(emissions, (B, T, k), dtype)
    return (
        _float_like(emissions, (B,), dtype),
        beam,
        _ids_like(emissions, (B, T, k)),
        _ids_like(emissions, (B, T, 1)),
        *_state_like(beam, dtype),
    )


def _log_likelihood_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    emissions, _targets, E1, E2, _k, lengths, temperature = inputs
    _, beam_scores, beam_tokens, slots, *state = output
    ctx.temperature = temperature
    ctx.emissions_shape, ctx.emissions_dtype = emissions.shape, emissions.dtype
    ctx.save_for_backward(beam_scores, beam_tokens, E1, E2, lengths, slots, *state)
    ctx.mark_non_differentiable(*output[1:])


def _log_likelihood_grad(ctx: Any, grad_log_likelihood: Tensor, *_unused: Any) -> tuple:
    beam_scores, beam_tokens, E1, E2, *_ = ctx.saved_tensors
    grad_scores, grad_E1, grad_E2 = _paths_grad(ctx, grad_log_likelihood[:, None])
    grad_emissions = grad_scores.new_zeros(ctx.emissions_shape).scatter_add(2, beam_tokens, grad_scores)
    return grad_emissions.to(ctx.emissions_dtype), None, grad_E1, grad_E2, None, None, None


_autograd(log_likelihood, _log_likelihood_grad, _log_likelihood_setup)


@_operator
def crf_entropy(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor] = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.crf_entropy`: H (B,), then the forward pass's saved state."""
    forward = _forward(scores, tokens, E1, E2, lengths, temperature)
    return _tensor(forward.entropy()), *_saved(forward.saved)


_fake(crf_entropy)(_value_and_state_like)
_value_autograd(crf_entropy, "crf_entropy_backward")


@_operator
def crf_kl(
    scores_p: Tensor,
    scores_q: Tensor,
    tokens: Tensor,
    E1_p: Tensor,
    E2_p: Tensor,
    E1_q: Tensor,
    E2_q: Tensor,
    lengths: Optional[Tensor] = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`viterbi_numba.crf_kl`: KL(p || q) (B,) of two CRFs on one beam, then p's and q's saved
    forward states (log_z, alpha, col_max, col_sum each)."""
    sp, sq, tokens_, E1p, E2p, E1q, E2q = _kl_arrays(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q)
    lengths_ = _array(lengths, "lengths")
    p = vn.crf_forward(sp, tokens_, E1p, E2p, temperature, lengths_)
    q = vn.crf_forward(sq, tokens_, E1q, E2q, temperature, lengths_)
    return _tensor(p.kl(q)), *_saved(p.saved), *_saved(q.saved)


def _kl_arrays(*tensors: Tensor) -> tuple[Any, Any, Any, Any, Any, Any, Any]:
    """(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q) as the array API takes them, in one dtype."""
    names = ("scores_p", "scores_q", "tokens", "E1_p", "E2_p", "E1_q", "E2_q")
    dtype = compute_dtype(*(t for t in tensors if t.dtype.is_floating_point))
    p, q, tokens, E1_p, E2_p, E1_q, E2_q = (_array(t, name, dtype) for t, name in zip(tensors, names))
    return p, q, tokens, E1_p, E2_p, E1_q, E2_q


@_fake(crf_kl)
def _(scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, lengths=None, temperature=1.0):  # type: ignore[no-untyped-def]
    dtype = compute_dtype(scores_p, scores_q, E1_p, E2_p, E1_q, E2_q)
    return (
        _float_like(scores_p, (scores_p.shape[0],), dtype),
        *_state_like(scores_p, dtype),
        *_state_like(scores_p, dtype),
    )


def _kl_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.temperature = inputs[8]
    ctx.save_for_backward(*inputs[:8], *output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _kl_grad(ctx: Any, grad_kl: Tensor, *_state: Any) -> tuple:
    saved = ctx.saved_tensors
    inputs = saved[:8]
    grads = torch.ops.viterbi_numba.crf_kl_backward(grad_kl, *inputs, ctx.temperature, *saved[8:])
    floats = (inputs[0], inputs[3], inputs[4], inputs[1], inputs[5], inputs[6])  # scores_p, E1_p, E2_p, scores_q, ...
    g_scores_p, g_E1_p, g_E2_p, g_scores_q, g_E1_q, g_E2_q = _in_dtypes(grads, *floats)
    return g_scores_p, g_scores_q, None, g_E1_p, g_E2_p, g_E1_q, g_E2_q, None, None


_autograd(crf_kl, _kl_grad, _kl_setup)


# --------------------------------------------------------------------------------------------------
# the backward formulas' operators
# --------------------------------------------------------------------------------------------------
def _restored(
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor],
    temperature: float,
    state: tuple[Tensor, ...],
    dtype: Optional[torch.dtype] = None,
) -> vn.CRFForward:
    """The forward pass that saved ``state`` (in ``dtype``, default the compute dtype of its floats)."""
    dtype = dtype or compute_dtype(scores, E1, E2)
    crf_arrays = _crf_arrays(scores, tokens, E1, E2, lengths, dtype)
    log_z, alpha, col_max, col_sum = (
        _array(array, name, dtype) for array, name in zip(state, ("log_z", "alpha", "col_max", "col_sum"))
    )
    saved = (log_z, alpha, col_max, col_sum)
    return vn.CRFForward.from_saved(*crf_arrays[:4], saved, temperature=temperature, lengths=crf_arrays[4])


@_operator
def crf_paths_backward(
    weights: Tensor,
    paths: Tensor,
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor],
    temperature: float,
    log_z: Tensor,
    alpha: Tensor,
    col_max: Tensor,
    col_sum: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_{b,n} weights[b, n] * log p(paths[b, :, n])`` (:meth:`viterbi_numba.CRFForward.paths_grad`)
    from a forward pass's saved state."""
    forward = _restored(scores, tokens, E1, E2, lengths, temperature, (log_z, alpha, col_max, col_sum))
    dtype = compute_dtype(scores, E1, E2)
    grads = forward.paths_grad(_array(paths, "paths"), weights=_array(weights, "weights", dtype))
    return tuple(_tensor(grad) for grad in grads)


@_fake(crf_paths_backward)
def _(weights, paths, scores, tokens, E1, E2, lengths, temperature, log_z, alpha, col_max, col_sum):  # type: ignore[no-untyped-def]
    return _grads_like(scores, E1, compute_dtype(scores, E1, E2))


@_operator
def log_partition_backward(
    grad_log_z: Tensor,
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor],
    temperature: float,
    log_z: Tensor,
    alpha: Tensor,
    col_max: Tensor,
    col_sum: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_b grad_log_z[b] * log Z[b]`` (:meth:`viterbi_numba.CRFForward.log_partition_grad`)
    from a forward pass's saved state."""
    forward = _restored(scores, tokens, E1, E2, lengths, temperature, (log_z, alpha, col_max, col_sum))
    grads = forward.log_partition_grad(_array(grad_log_z, "grad_log_z", compute_dtype(scores, E1, E2)))
    return _tensor(grads.grad_scores), _tensor(grads.grad_E1), _tensor(grads.grad_E2)


@_fake(log_partition_backward)
def _(grad_log_z, scores, tokens, E1, E2, lengths, temperature, log_z, alpha, col_max, col_sum):  # type: ignore[no-untyped-def]
    return _grads_like(scores, E1, compute_dtype(scores, E1, E2))


@_operator
def crf_entropy_backward(
    grad_entropy: Tensor,
    scores: Tensor,
    tokens: Tensor,
    E1: Tensor,
    E2: Tensor,
    lengths: Optional[Tensor],
    temperature: float,
    log_z: Tensor,
    alpha: Tensor,
    col_max: Tensor,
    col_sum: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_b grad_entropy[b] * H[b]`` (:meth:`viterbi_numba.CRFForward.entropy_grad`) from a
    forward pass's saved state."""
    forward = _restored(scores, tokens, E1, E2, lengths, temperature, (log_z, alpha, col_max, col_sum))
    grads = forward.entropy_grad(_array(grad_entropy, "grad_entropy", compute_dtype(scores, E1, E2)))
    return _tensor(grads.grad_scores), _tensor(grads.grad_E1), _tensor(grads.grad_E2)


@_fake(crf_entropy_backward)
def _(grad_entropy, scores, tokens, E1, E2, lengths, temperature, log_z, alpha, col_max, col_sum):  # type: ignore[no-untyped-def]
    return _grads_like(scores, E1, compute_dtype(scores, E1, E2))


@_operator
def crf_kl_backward(
    grad_kl: Tensor,
    scores_p: Tensor,
    scores_q: Tensor,
    tokens: Tensor,
    E1_p: Tensor,
    E2_p: Tensor,
    E1_q: Tensor,
    E2_q: Tensor,
    lengths: Optional[Tensor],
    temperature: float,
    log_z_p: Tensor,
    alpha_p: Tensor,
    col_max_p: Tensor,
    col_sum_p: Tensor,
    log_z_q: Tensor,
    alpha_q: Tensor,
    col_max_q: Tensor,
    col_sum_q: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sum_b grad_kl[b] * KL[b]`` (:meth:`viterbi_numba.CRFForward.kl_grad`) from both
    forward passes' saved states: with respect to scores_p, E1_p, E2_p, scores_q, E1_q, E2_q."""
    dtype = compute_dtype(scores_p, scores_q, E1_p, E2_p, E1_q, E2_q)
    p = _restored(scores_p, tokens, E1_p, E2_p, lengths, temperature, (log_z_p, alpha_p, col_max_p, col_sum_p), dtype)
    q = _restored(scores_q, tokens, E1_q, E2_q, lengths, temperature, (log_z_q, alpha_q, col_max_q, col_sum_q), dtype)
    grads = p.kl_grad(q, _array(grad_kl, "grad_kl", dtype))
    return tuple(_tensor(grad) for grad in grads[1:])


@_fake(crf_kl_backward)
def _(grad_kl, scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, lengths, temperature, *state):  # type: ignore[no-untyped-def]
    dtype = compute_dtype(scores_p, scores_q, E1_p, E2_p, E1_q, E2_q)
    return (
        _float_like(scores_p, scores_p.shape, dtype),
        _float_like(E1_p, E1_p.shape, dtype),
        _float_like(E1_p, E1_p.shape, dtype),
        _float_like(scores_q, scores_q.shape, dtype),
        _float_like(E1_q, E1_q.shape, dtype),
        _float_like(E1_q, E1_q.shape, dtype),
    )
