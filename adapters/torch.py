"""PyTorch adapter: tensors in and out without copies, autograd over the kernels, and drop-in modules.

* :class:`StochasticViterbiSample`, :class:`StochasticViterbiSamples` — the write-up's classes
  (same constructor, parameters, methods and outputs), on the kernels; ``beam_probs`` is differentiable
  exactly as in the write-up (through the sampled predecessors), by a backward kernel.
* :class:`DynamicCRF` — fairseq's ``DynamicCRF`` interface (``forward`` = log-likelihood,
  ``forward_decoder`` = Viterbi) plus ``sample`` (exact samples with differentiable log-probabilities,
  with or without replacement: :class:`DistinctSamples`), ``entropy`` and ``kl`` (exact, differentiable:
  an entropy bonus, a KL penalty to a reference).
* :func:`as_numpy`, :func:`lengths_from_masks`, :func:`seed_tensor`, :func:`seed_from` — conversions.

The modules are made of the operators of :mod:`viterbi_numba.adapters.torch_ops`
(``torch.ops.viterbi_numba.*``, registered on import), so they work under ``torch.compile(fullgraph=True)``
and ``torch.export``. CPU tensors cross as NumPy views of the same memory (``Tensor.numpy()`` /
``torch.from_numpy``); CUDA tensors go to the GPU kernels as they are, which allocate their results with
torch on the same device and run on torch's current stream. Float results are in the compute dtype:
float64 if any float input (emissions, E1, E2) is float64, else float32 (float16 and bfloat16, as under
``torch.autocast``, are computed in float32); gradients are in their inputs' dtypes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Tuple, Union, overload

import numpy as np
import torch
from torch import nn

from . import torch_ops
from .torch_ops import as_numpy

__all__ = [
    "DistinctSamples",
    "DynamicCRF",
    "StochasticViterbiSample",
    "StochasticViterbiSamples",
    "as_numpy",
    "lengths_from_masks",
    "seed_from",
    "seed_tensor",
]

_ops = torch.ops.viterbi_numba
assert torch_ops  # imported for its registrations


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def lengths_from_masks(masks: Optional[torch.Tensor], batch: int, steps: int) -> Optional[np.ndarray]:
    """Sequence lengths (B,) as NumPy of (B, T) prefix masks (True on the real positions); None stays None.

    A mask must be on at the first position and never switch back on after it switched off.
    """
    lengths = _lengths(masks, batch, steps)
    return None if lengths is None else lengths.cpu().numpy()


def _lengths(masks: Optional[torch.Tensor], batch: int, steps: int) -> Optional[torch.Tensor]:
    """The operators' lengths (B,) of optional (B, T) prefix masks (their values checked by the
    ``lengths_from_masks`` operator)."""
    if masks is None:
        return None
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if tuple(masks.shape) != (batch, steps):
        raise ValueError(f"masks must have shape {(batch, steps)} (B, T), got {tuple(masks.shape)}")
    return _ops.lengths_from_masks(masks)


def seed_tensor(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A 0-dim int64 seed in [0, 2**63 - 1) drawn from ``generator`` (torch's default generator when None,
    by the ``draw_seed`` operator, so that compiled code draws the same seeds), for the samplers."""
    if generator is None:
        return _ops.draw_seed()
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator)


def seed_from(generator: Optional[torch.Generator] = None) -> int:
    """:func:`seed_tensor` as a Python int (for the array API's ``seed``)."""
    return int(seed_tensor(generator))


def _emissions(emissions: torch.Tensor) -> torch.Tensor:
    if not isinstance(emissions, torch.Tensor):
        raise TypeError(f"emissions must be a torch.Tensor, got {type(emissions).__name__}")
    if emissions.dim() != 3 or not emissions.dtype.is_floating_point:
        raise ValueError(
            f"emissions must be a (B, T, V) floating-point tensor, got {emissions.dtype} "
            f"of shape {tuple(emissions.shape)}"
        )
    if emissions.device.type not in ("cpu", "cuda"):
        raise TypeError(f"emissions is on {emissions.device}; the kernels take CPU or CUDA tensors")
    return emissions


def _uniforms(uniforms) -> Optional[torch.Tensor]:
    """Replayed uniforms as a tensor (they may come as NumPy)."""
    if uniforms is None or isinstance(uniforms, torch.Tensor):
        return uniforms
    return torch.as_tensor(np.asarray(uniforms))


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
        """beam_probs (B, T, K, N), beam_idx (B, T, N), tokens (B, T, N) of N = ``num_samples`` chains."""
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        lengths = _lengths(masks, B, T)
        beam_scores, beam_tokens = _ops.topk_beam(emissions, beam if beam is not None else self.beam)
        uniforms = _uniforms(uniforms)
        seed = None if uniforms is not None else seed_tensor(generator)
        beam_probs, beam_idx, tokens, *_ = _ops.stochastic_viterbi(
            beam_scores, beam_tokens, self.E1.weight, self.E2.weight, lengths, num_samples, self.temp, seed, uniforms
        )
        return beam_probs, beam_idx, tokens

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
        uniforms = _uniforms(uniforms)
        if uniforms is not None and uniforms.dim() == 3:
            uniforms = uniforms[..., None]  # the operator's (B, T-1, K, N) layout
        beam_probs, beam_idx, tokens = self._sample(emissions, 1, masks, beam, uniforms, generator)
        return beam_probs[..., 0], beam_idx, tokens[..., 0]

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
class DistinctSamples(NamedTuple):
    """:meth:`DynamicCRF.sample` with ``replacement=False``: N distinct exact samples per sequence, in the
    order drawn (the torch side of :class:`viterbi_numba.DistinctSample`, docs/design.md §4).

    Attributes
    ----------
    tokens : (B, T, N) int64
        Token ids; -1 at padded positions and for the samples beyond ``count``.
    log_prob : (B, N) float
        ``log p_tau(y)``, differentiable with respect to the emissions, ``E1`` and ``E2``; -inf beyond
        ``count`` (no gradient there).
    weights : (B, N) float
        Priority-sampling weights ``p(y) / q(y)`` (not differentiable): ``sum_n weights[b, n] * f(y_bn)``
        is an unbiased estimate of E_p[f]; 0 beyond ``count``.
    kappa : (B,) float
        The threshold of the weights, the (N+1)-th perturbed log-probability (-inf where every path was drawn).
    count : (B,) int64
        Samples drawn: N, or every path where the beam has fewer.
    """

    tokens: torch.Tensor
    log_prob: torch.Tensor
    weights: torch.Tensor
    kappa: torch.Tensor
    count: torch.Tensor


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
        k = beam if beam is not None else self.beam
        return _ops.log_likelihood(emissions, targets, self.E1.weight, self.E2.weight, k, _lengths(masks, B, T))[0]

    @torch.no_grad()
    def forward_decoder(
        self, emissions: torch.Tensor, masks: Optional[torch.Tensor] = None, beam: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Viterbi: (per-step scores (B, T), tokens (B, T)) as fairseq returns them — at padded positions
        the score is 0 and the token is the beam token in the last real position's slot, as fairseq's
        identity back-pointers give."""
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        lengths = _lengths(masks, B, T)
        beam_scores, beam_tokens = _ops.topk_beam(emissions, beam if beam is not None else self.beam)
        beam_idx, tokens, _, step_scores = _ops.viterbi_decode(
            beam_scores, beam_tokens, self.E1.weight, self.E2.weight, lengths, True
        )
        if lengths is not None:  # fairseq's identity back-pointers: the last real slot's beam token
            last_slot = beam_idx.gather(1, (lengths - 1)[:, None])  # (B, 1)
            held = beam_tokens.gather(2, last_slot[:, None, :].expand(B, T, 1))[..., 0]
            tokens = torch.where(torch.arange(T, device=tokens.device)[None, :] < lengths[:, None], tokens, held)
        return step_scores, tokens

    @torch.no_grad()
    def nbest(
        self, emissions: torch.Tensor, n: int, masks: Optional[torch.Tensor] = None, beam: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The n best distinct sequences of the CRF over each position's top-k beam, best first
        (:func:`viterbi_numba.viterbi_nbest`): tokens (B, T, n) (-1 at padded positions, and for the paths
        beyond ``count``), their scores S(y) (B, n) (-inf beyond ``count``) and ``count`` (B,), n or fewer
        where the beam has fewer paths. Not differentiable (rescore the tokens with :meth:`forward`)."""
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        beam_scores, beam_tokens = _ops.topk_beam(emissions, beam if beam is not None else self.beam)
        _, tokens, score, count = _ops.viterbi_nbest(
            beam_scores, beam_tokens, self.E1.weight, self.E2.weight, n, _lengths(masks, B, T)
        )
        return tokens, score, count

    @overload
    def sample(
        self,
        emissions: torch.Tensor,
        num_samples: int,
        temperature: float = ...,
        masks: Optional[torch.Tensor] = ...,
        beam: Optional[int] = ...,
        generator: Optional[torch.Generator] = ...,
        replacement: Literal[True] = ...,
    ) -> Tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def sample(
        self,
        emissions: torch.Tensor,
        num_samples: int,
        temperature: float = ...,
        masks: Optional[torch.Tensor] = ...,
        beam: Optional[int] = ...,
        generator: Optional[torch.Generator] = ...,
        *,
        replacement: Literal[False],
    ) -> DistinctSamples: ...

    @overload
    def sample(
        self,
        emissions: torch.Tensor,
        num_samples: int,
        temperature: float = ...,
        masks: Optional[torch.Tensor] = ...,
        beam: Optional[int] = ...,
        generator: Optional[torch.Generator] = ...,
        replacement: bool = ...,
    ) -> Union[Tuple[torch.Tensor, torch.Tensor], DistinctSamples]: ...

    def sample(
        self,
        emissions: torch.Tensor,
        num_samples: int,
        temperature: float = 1.0,
        masks: Optional[torch.Tensor] = None,
        beam: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        replacement: bool = True,
    ) -> Union[Tuple[torch.Tensor, torch.Tensor], DistinctSamples]:
        """Exact samples of p(y) proportional to exp(S(y) / temperature) over each position's top-k beam.

        Parameters
        ----------
        emissions : (B, T, V) float tensor
        num_samples : int
            N >= 1 samples per sequence.
        temperature : float
            tau > 0.
        masks : (B, T) bool tensor, optional
            Prefix masks (True on the real positions).
        beam : int, optional
            k, the beam size (default ``self.beam``).
        generator : torch.Generator, optional
            Draws the seed (torch's default generator when None).
        replacement : bool
            True: N independent samples. False: N distinct samples, drawn without replacement (a
            stochastic beam search, docs/design.md §4), with the priority-sampling weights that turn them
            into unbiased estimates; every path where the beam has N or fewer.

        Returns
        -------
        (tokens, log_prob), or DistinctSamples without replacement
            tokens (B, T, N) (-1 at padded positions) and their log-probabilities (B, N), differentiable
            with respect to ``emissions``, ``E1`` and ``E2``: at temperature 1, rescoring the tokens with
            :meth:`forward` gives the same values and gradients (a sampled token is in its top-k beam
            already, so forcing it in changes nothing). Without replacement, :class:`DistinctSamples`
            (tokens, log_prob, weights, kappa, count), the samples beyond ``count`` -1 with log_prob -inf.
        """
        if not isinstance(replacement, bool):
            raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        beam_scores, beam_tokens = _ops.topk_beam(emissions, beam if beam is not None else self.beam)
        sampler = _ops.crf_sample if replacement else _ops.crf_sample_distinct
        log_prob, _, tokens, *extras = sampler(
            beam_scores,
            beam_tokens,
            self.E1.weight,
            self.E2.weight,
            _lengths(masks, B, T),
            num_samples,
            temperature,
            seed_tensor(generator),
        )
        if replacement:
            return tokens, log_prob
        weights, kappa, count = extras[:3]
        return DistinctSamples(tokens, log_prob, weights, kappa, count)

    def entropy(
        self,
        emissions: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        beam: Optional[int] = None,
    ) -> torch.Tensor:
        """The exact entropy H(p_tau) (B,) of the CRF over each position's top-k beam, differentiable with
        respect to ``emissions``, ``E1`` and ``E2`` (an entropy bonus)."""
        emissions = _emissions(emissions)
        B, T, _ = emissions.shape
        beam_scores, beam_tokens = _ops.topk_beam(emissions, beam if beam is not None else self.beam)
        lengths = _lengths(masks, B, T)
        return _ops.crf_entropy(beam_scores, beam_tokens, self.E1.weight, self.E2.weight, lengths, temperature)[0]

    def kl(
        self,
        emissions: torch.Tensor,
        reference: DynamicCRF,
        reference_emissions: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        beam: Optional[int] = None,
    ) -> torch.Tensor:
        """KL(p || q) (B,): p is this CRF on ``emissions``' top-k beam, q the ``reference`` CRF (another
        DynamicCRF, such as a frozen copy of the initial policy) with ``reference_emissions`` gathered at
        the same beam tokens. Differentiable with respect to both (detach the reference's side to freeze
        it). For two models whose top-k beams differ, this is the KL of the two CRFs restricted to p's beam.
        """
        emissions = _emissions(emissions)
        reference_emissions = _emissions(reference_emissions)
        if not isinstance(reference, DynamicCRF):
            raise TypeError(f"reference must be a DynamicCRF, got {type(reference).__name__}")
        if reference_emissions.shape != emissions.shape:
            raise ValueError(
                f"reference_emissions must have the shape of emissions {tuple(emissions.shape)}, "
                f"got {tuple(reference_emissions.shape)}"
            )
        B, T, _ = emissions.shape
        beam_scores, beam_tokens = _ops.topk_beam(emissions, beam if beam is not None else self.beam)
        return _ops.crf_kl(
            beam_scores,
            reference_emissions.gather(2, beam_tokens),
            beam_tokens,
            self.E1.weight,
            self.E2.weight,
            reference.E1.weight,
            reference.E2.weight,
            _lengths(masks, B, T),
            temperature,
        )[0]
