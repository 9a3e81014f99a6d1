"""PyTorch adapter: tensors in and out without copies, autograd over the kernels, and drop-in modules.

* :class:`StochasticViterbiSample`, :class:`StochasticViterbiSamples` — the write-up's classes
  (same constructor, parameters, methods and outputs), on the kernels; ``beam_probs`` is differentiable
  exactly as in the write-up (through the sampled predecessors), by a backward kernel.
* :class:`DynamicCRF` — fairseq's ``DynamicCRF`` interface (``forward`` = log-likelihood,
  ``forward_decoder`` = Viterbi) plus ``sample``: exact samples with differentiable log-probabilities.
* :func:`as_numpy`, :func:`lengths_from_masks`, :func:`seed_from` — the conversions they use.

CPU tensors cross as NumPy views of the same memory (``Tensor.numpy()`` / ``torch.from_numpy``);
CUDA tensors go to the GPU kernels as they are (``__cuda_array_interface__``), which allocate their
results with torch on the same device and run on torch's current stream. float16 and bfloat16 are
computed in float32 and returned in the input's dtype; on the GPU, the float inputs of one call are
cast to one dtype (float64 if any is float64), as the CPU path does.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import nn

import viterbi_numba as vn

__all__ = [
    "DynamicCRF",
    "StochasticViterbiSample",
    "StochasticViterbiSamples",
    "as_numpy",
    "lengths_from_masks",
    "seed_from",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def _kernel_input(tensor: torch.Tensor, name: str = "tensor", dtype: Optional[torch.dtype] = None):
    """What the array API takes for ``tensor``: a zero-copy NumPy view of a CPU tensor, or the detached
    CUDA tensor itself (the GPU kernels read torch CUDA tensors in place; they need one float dtype, so
    a float CUDA tensor is cast to the torch ``dtype`` given; float16/bfloat16 become float32 on both
    devices)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type == "cpu":
        return as_numpy(tensor, name)
    if tensor.device.type != "cuda":
        raise TypeError(f"{name} is on {tensor.device}; the kernels take CPU or CUDA tensors")
    tensor = tensor.detach()
    if tensor.dtype in _LOW_PRECISION:
        tensor = tensor.float()
    if tensor.dtype.is_floating_point and dtype is not None:
        tensor = tensor.to(dtype)
    elif not tensor.dtype.is_floating_point:
        tensor = tensor.long()
    return tensor.contiguous()


def _crf_inputs(scores: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor) -> tuple[Any, Any, Any]:
    """``_kernel_input`` of the scores (emissions or beam scores) and both tables, in one compute dtype
    (float64 if any is float64): (scores, E1, E2)."""
    named = ((scores, "emissions"), (weight1, "E1.weight"), (weight2, "E2.weight"))
    wide = any(tensor.dtype == torch.float64 for tensor, _ in named if isinstance(tensor, torch.Tensor))
    dtype = torch.float64 if wide else torch.float32
    scores, E1, E2 = (_kernel_input(tensor, name, dtype) for tensor, name in named)
    return scores, E1, E2


def _out(array, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A tensor over ``array``'s memory (NumPy, or a CUDA tensor the GPU kernels returned), cast to
    ``dtype`` where given (a copy only if it must cast)."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _host(tensor: torch.Tensor, name: str) -> np.ndarray:
    """A small tensor (per-sequence weights) on the host, in NumPy."""
    return as_numpy(tensor.detach().cpu(), name)


def _grads_out(grads, dtypes):
    """Gradient arrays as tensors in their inputs' dtypes."""
    return [_out(grad, dtype) for grad, dtype in zip(grads, dtypes)]


def lengths_from_masks(masks: Optional[torch.Tensor], batch: int, steps: int) -> Optional[np.ndarray]:
    """Sequence lengths (B,) from (B, T) prefix masks (True on the real positions); None stays None.

    A mask must be on at the first position and never switch back on after it switched off.
    """
    if masks is None:
        return None
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if masks.dtype.is_floating_point or masks.dtype.is_complex:
        raise TypeError(f"masks must be a bool (or 0/1 integer) tensor, got dtype {masks.dtype}")
    if tuple(masks.shape) != (batch, steps):
        raise ValueError(f"masks must have shape {(batch, steps)} (B, T), got {tuple(masks.shape)}")
    masks = masks.detach().cpu()
    if ((masks != 0) & (masks != 1)).any():
        raise ValueError("masks must hold only 0/1 (False/True)")
    masks = masks.bool()
    if batch and steps and not masks[:, 0].all():
        b = int((~masks[:, 0]).nonzero()[0, 0])
        raise ValueError(f"masks must be on at the first position of every sequence (sequence {b} is not)")
    if (masks[:, 1:] & ~masks[:, :-1]).any():
        b = int((masks[:, 1:] & ~masks[:, :-1]).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"masks must be prefix masks (on, then off); sequence {b} switches back on")
    return masks.sum(dim=1).numpy().astype(np.int64)


def seed_from(generator: Optional[torch.Generator] = None) -> int:
    """A 63-bit seed drawn from ``generator`` (torch's default generator when None), so that
    ``torch.manual_seed`` and ``generator=`` control the kernels' Philox streams."""
    return int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=generator).item())


def _emissions(emissions: torch.Tensor) -> torch.Tensor:
    if not isinstance(emissions, torch.Tensor):
        raise TypeError(f"emissions must be a torch.Tensor, got {type(emissions).__name__}")
    if emissions.dim() != 3 or not emissions.dtype.is_floating_point:
        raise ValueError(
            f"emissions must be a (B, T, V) floating-point tensor, got {emissions.dtype} "
            f"of shape {tuple(emissions.shape)}"
        )
    return emissions


def _uniforms(uniforms):
    return _kernel_input(uniforms, "uniforms") if isinstance(uniforms, torch.Tensor) else uniforms


def _beam(emissions: torch.Tensor, k: int):
    """The top-k beam: its token ids (NumPy, or a CUDA tensor) and its scores gathered from ``emissions``
    (differentiable)."""
    tokens = vn.topk_beam(_kernel_input(emissions, "emissions"), k).tokens
    return tokens, emissions.gather(2, _out(tokens))


# --------------------------------------------------------------------------------------------------
# the write-up's stochastic Viterbi, differentiable through beam_probs
# --------------------------------------------------------------------------------------------------
class _StochasticViterbi(torch.autograd.Function):
    """beam_probs, beam_idx, tokens of ``vn.stochastic_viterbi``; backward by ``vn.stochastic_viterbi_backward``."""

    @staticmethod
    def forward(ctx, beam_scores, weight1, weight2, beam_tokens, lengths, num_samples, temperature, seed, uniforms):
        scores, E1, E2 = _crf_inputs(beam_scores, weight1, weight2)
        sample = vn.stochastic_viterbi(
            scores,
            beam_tokens,
            E1=E1,
            E2=E2,
            num_samples=num_samples,
            temperature=temperature,
            lengths=lengths,
            seed=seed,
            uniforms=uniforms,
        )
        ctx.saved = sample, beam_tokens, E1, E2, lengths
        ctx.dtypes = beam_scores.dtype, weight1.dtype, weight2.dtype
        beam_idx, tokens = _out(sample.beam_idx), _out(sample.tokens)
        ctx.mark_non_differentiable(beam_idx, tokens)
        return _out(sample.beam_probs, beam_scores.dtype), beam_idx, tokens

    @staticmethod
    def backward(ctx, grad_beam_probs, _grad_idx, _grad_tokens):
        sample, beam_tokens, E1, E2, lengths = ctx.saved
        grad = vn.stochastic_viterbi_backward(
            _kernel_input(grad_beam_probs, "grad", E1.dtype), sample, beam_tokens, E1=E1, E2=E2, lengths=lengths
        )
        return (*_grads_out(grad, ctx.dtypes), None, None, None, None, None, None)


class _StochasticViterbiModule(nn.Module):
    """Parameters and settings shared by the write-up's two classes (their constructors and state_dict keys)."""

    def __init__(self, num_embedding: int, low_rank: int = 32, beam_size: int = 256, temp: float = 1.0):
        super().__init__()
        self.E1 = nn.Embedding(num_embedding, low_rank)
        self.E2 = nn.Embedding(num_embedding, low_rank)
        self.rank = low_rank
        self.beam = beam_size
        self.temp = temp

    def _sample(self, emissions, num_samples, masks, beam, uniforms, generator):
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        lengths = lengths_from_masks(masks, B, T)
        beam_tokens, beam_scores = _beam(emissions, beam if beam is not None else self.beam)
        uniforms = _uniforms(uniforms)
        seed = None if uniforms is not None else seed_from(generator)
        return _StochasticViterbi.apply(
            beam_scores, self.E1.weight, self.E2.weight, beam_tokens, lengths, num_samples, self.temp, seed, uniforms
        )

    def extra_repr(self) -> str:
        return f"vocab_size={self.E1.num_embeddings}, low_rank={self.rank}, beam_size={self.beam}, temp={self.temp}"


class StochasticViterbiSample(_StochasticViterbiModule):
    """The write-up's one-sample stochastic Viterbi (``StochasticViterbiSample(num_embedding, low_rank=32,
    beam_size=256, temp=1.0)``), on the kernels. A state_dict of the write-up's class loads as is."""

    def _compute_stochastic_viterbi_sample(
        self,
        emissions: torch.Tensor,
        beam: Optional[int] = None,
        masks: Optional[torch.Tensor] = None,
        uniforms=None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """emissions (B, T, V) -> beam_probs (B, T, K), sampled beam indices (B, T, 1), tokens (B, T).

        ``beam_probs`` is differentiable with respect to ``emissions`` and both tables, as in the write-up.
        Extras: ``masks`` (B, T) prefix masks (padded positions: ``beam_probs`` 0, indices and tokens -1);
        ``uniforms`` (B, T-1, K) replays given draws (docs/design.md §3); ``generator`` seeds the draws (torch's
        default generator when None).
        """
        return self._sample(emissions, None, masks, beam, uniforms, generator)

    def forward(self, emissions, beam=None, masks=None, uniforms=None, generator=None):
        return self._compute_stochastic_viterbi_sample(emissions, beam, masks, uniforms, generator)


class StochasticViterbiSamples(_StochasticViterbiModule):
    """The write-up's N-sample (GRPO) stochastic Viterbi (``StochasticViterbiSamples(num_embedding,
    low_rank=32, beam_size=256, temp=1.0, num_samples=8)``), on the kernels."""

    def __init__(
        self, num_embedding: int, low_rank: int = 32, beam_size: int = 256, temp: float = 1.0, num_samples: int = 8
    ):
        super().__init__(num_embedding, low_rank, beam_size, temp)
        self.num_samples = num_samples

    def _compute_grpo_samples(
        self,
        emissions: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        beam: Optional[int] = None,
        uniforms=None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """emissions (B, T, V) -> beam_probs (B, T, K, N), sampled beam indices (B, T, N), tokens (B, T, N).

        As :meth:`StochasticViterbiSample._compute_stochastic_viterbi_sample`; ``uniforms`` (B, T-1, K, N).
        """
        return self._sample(emissions, self.num_samples, masks, beam, uniforms, generator)

    def forward(self, emissions, masks=None, beam=None, uniforms=None, generator=None):
        return self._compute_grpo_samples(emissions, masks, beam, uniforms, generator)


# --------------------------------------------------------------------------------------------------
# fairseq's DynamicCRF
# --------------------------------------------------------------------------------------------------
class _LogLikelihood(torch.autograd.Function):
    """log p(targets) with the targets forced into the beam; backward from the kept forward state."""

    @staticmethod
    def forward(ctx, beam_scores, weight1, weight2, likelihood):
        ctx.likelihood = likelihood
        ctx.dtypes = beam_scores.dtype, weight1.dtype, weight2.dtype
        return _out(likelihood.log_likelihood, beam_scores.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        likelihood = ctx.likelihood
        grads = likelihood.grad(grad_output=_host(grad_output, "grad"))
        return (*_grads_out(grads, ctx.dtypes), None)


class _SampleLogProb(torch.autograd.Function):
    """log p(y) (B, N) of exact samples; the gradient is that of S(y)/tau - log Z_tau for each sample."""

    @staticmethod
    def forward(ctx, beam_scores, weight1, weight2, forward, draws):
        ctx.forward, ctx.draws = forward, draws
        ctx.dtypes = beam_scores.dtype, weight1.dtype, weight2.dtype
        return _out(draws.log_prob, beam_scores.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.forward.paths_grad(ctx.draws.beam_idx, weights=_host(grad_output, "grad"))  # (B, N) weights
        return (*_grads_out(grads, ctx.dtypes), None, None)


class DynamicCRF(nn.Module):
    """fairseq's ``DynamicCRF(num_embedding, low_rank=32, beam_size=64)`` on the kernels, plus exact sampling.

    Same parameters (``E1``, ``E2`` embeddings; a fairseq state_dict loads) and attributes (``vocb``,
    ``rank``, ``beam``). ``masks`` are (B, T) prefix masks everywhere (optional).
    """

    def __init__(self, num_embedding: int, low_rank: int = 32, beam_size: int = 64):
        super().__init__()
        self.E1 = nn.Embedding(num_embedding, low_rank)
        self.E2 = nn.Embedding(num_embedding, low_rank)
        self.vocb = num_embedding
        self.rank = low_rank
        self.beam = beam_size

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocb}, low_rank={self.rank}, beam_size={self.beam}"

    def forward(
        self,
        emissions: torch.Tensor,
        targets: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        beam: Optional[int] = None,
    ) -> torch.Tensor:
        """log-likelihood (B,) of ``targets`` (B, T): fairseq ``forward`` (targets forced into each
        position's beam); differentiable with respect to ``emissions``, ``E1`` and ``E2``."""
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        lengths = lengths_from_masks(masks, B, T)
        scores, E1, E2 = _crf_inputs(emissions, self.E1.weight, self.E2.weight)
        likelihood = vn.log_likelihood_forward(
            scores,
            _kernel_input(targets, "targets"),
            E1=E1,
            E2=E2,
            k=beam if beam is not None else self.beam,
            lengths=lengths,
        )
        beam_scores = emissions.gather(2, _out(likelihood.beam_tokens))
        return _LogLikelihood.apply(beam_scores, self.E1.weight, self.E2.weight, likelihood)

    @torch.no_grad()
    def forward_decoder(
        self, emissions: torch.Tensor, masks: Optional[torch.Tensor] = None, beam: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Viterbi: (per-step scores (B, T), tokens (B, T)) as fairseq returns them — at padded positions
        the score is 0 and the token is the beam token in the last real position's slot, as fairseq's
        identity back-pointers give."""
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        lengths = lengths_from_masks(masks, B, T)
        beam_tokens, beam_scores = _beam(emissions, beam if beam is not None else self.beam)
        scores, E1, E2 = _crf_inputs(beam_scores, self.E1.weight, self.E2.weight)
        best = vn.viterbi_decode(scores, beam_tokens, E1=E1, E2=E2, lengths=lengths, step_scores="fairseq")
        tokens = best.tokens
        if lengths is not None:
            for b, length in enumerate(lengths):
                tokens[b, length:] = beam_tokens[b, length:, best.beam_idx[b, length - 1]]
        return _out(best.step_scores, emissions.dtype), _out(tokens)

    def sample(
        self,
        emissions: torch.Tensor,
        num_samples: int,
        temperature: float = 1.0,
        masks: Optional[torch.Tensor] = None,
        beam: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact samples of p(y) proportional to exp(S(y) / temperature) over each position's top-k beam.

        Returns tokens (B, T, N) (-1 at padded positions) and their log-probabilities (B, N),
        differentiable with respect to ``emissions``, ``E1`` and ``E2``: at temperature 1, rescoring the
        tokens with :meth:`forward` gives the same values and gradients (a sampled token is in its
        top-k beam already, so forcing it in changes nothing).
        """
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        lengths = lengths_from_masks(masks, B, T)
        beam_tokens, beam_scores = _beam(emissions, beam if beam is not None else self.beam)
        scores, E1, E2 = _crf_inputs(beam_scores, self.E1.weight, self.E2.weight)
        forward = vn.crf_forward(scores, beam_tokens, E1=E1, E2=E2, temperature=temperature, lengths=lengths)
        draws = forward.sample(num_samples, seed=seed_from(generator))
        log_prob = _SampleLogProb.apply(beam_scores, self.E1.weight, self.E2.weight, forward, draws)
        return _out(draws.tokens), log_prob
