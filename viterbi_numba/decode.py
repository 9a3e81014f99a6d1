"""Public decoding functions: the top-K beam, Viterbi, and the write-up's stochastic Viterbi sampler.

Each function validates and normalises its inputs once (:mod:`viterbi_numba._validate`), picks the
backend from the arrays (:mod:`viterbi_numba._devices`) and calls the backend's op of the same name:
``cpu/ops.py`` for NumPy arrays, ``gpu/ops.py`` for GPU arrays (docs/design.md §8).

Shapes: B sequences, T positions, V vocabulary, K beam size, D low-rank dimension, N samples. Empty
batches (B = 0) give empty results; T = 0 is an error (a sequence has at least one position).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy.typing as npt

from . import _validate
from ._devices import backend_of
from .results import PAD, Beam, NBestResult, SamplerGrad, StochasticViterbiResult, ViterbiResult

__all__ = [
    "PAD",
    "topk_beam",
    "gather_beam",
    "viterbi_decode",
    "viterbi_nbest",
    "stochastic_viterbi",
    "stochastic_viterbi_backward",
]

ArrayLike = npt.ArrayLike | Any  # NumPy arrays or GPU arrays (torch, CuPy, numba)


def topk_beam(emissions: ArrayLike, k: int, force_tokens: Optional[ArrayLike] = None) -> Beam:
    """The K best tokens per position, like ``torch.topk(emissions, k, 2)``, with ties to the lower id.

    Parameters
    ----------
    emissions : (B, T, V) float array
        Per-position token scores (float16 is computed in float32).
    k : int
        Beam size, in [1, V].
    force_tokens : (B, T) int array, optional
        Token ids that must be in the beam (fairseq forces the reference tokens this way). Each keeps
        its own score and takes the place of the K-th best when it would not have been selected, so
        the beam stays sorted best first. ``PAD`` (-1) forces nothing at its position (the samplers'
        tokens hold it after each length).

    Returns
    -------
    Beam
        ``scores`` and ``tokens``, (B, T, K).

    Raises
    ------
    ValueError
        On NaN or +inf in ``emissions``, ``k`` outside [1, V], ``force_tokens`` outside [0, V) and not PAD.
    """
    ops = backend_of(emissions=emissions, force_tokens=force_tokens)
    with ops.call():
        emissions, k, forced = _validate.topk_inputs(ops.arrays, emissions, k, force_tokens)
        return ops.topk_beam(emissions, k, forced)


def gather_beam(emissions: ArrayLike, tokens: ArrayLike) -> Any:
    """Another model's scores on a beam: ``emissions[b, t, tokens[b, t, k]]``, like
    ``np.take_along_axis(emissions, tokens, 2)`` (on the GPU too).

    A reference model's emissions gathered at the policy's beam tokens are its beam scores for
    :func:`~viterbi_numba.crf_kl` (``scores_q``).

    Parameters
    ----------
    emissions : (B, T, V) float array
        Per-position token scores (float16 is computed in float32).
    tokens : (B, T, K) int array
        Token ids in [0, V), such as ``topk_beam(...).tokens``.

    Returns
    -------
    (B, T, K) float array in the compute dtype.
    """
    ops = backend_of(emissions=emissions, tokens=tokens)
    with ops.call():
        emissions, tokens = _validate.gather_inputs(ops.arrays, emissions, tokens)
        return ops.gather_beam(emissions, tokens)


def viterbi_decode(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    lengths: Optional[ArrayLike] = None,
    *,
    step_scores: Literal["increments", "fairseq"] = "increments",
) -> ViterbiResult:
    """Max-product decoding of the beam CRF: the best beam path per sequence.

    Parameters
    ----------
    scores : (B, T, K) float array
        Beam scores.
    tokens : (B, T, K) int array
        Their token ids, in [0, V).
    E1, E2 : (V, D) float arrays
        The low-rank tables: the transition from slot i at step t-1 to slot j at step t is
        ``E1[tokens[t-1, i]] . E2[tokens[t, j]]``.
    lengths : (B,) int array, optional
        Sequence lengths in [1, T] (None: all T).
    step_scores : {"increments", "fairseq"}
        What ``step_scores`` holds: the per-step increments of S(y) (default), or fairseq
        ``forward_decoder``'s values, which read step t's cumulative score at step t+1's beam index
        (what :class:`~viterbi_numba.adapters.torch.DynamicCRF` returns).

    Returns
    -------
    ViterbiResult
        ``beam_idx``, ``tokens``, ``score``, ``step_scores``. Ties go to the lowest beam index; results
        in the compute dtype (float64 if any float input is float64, else float32).
    """
    if step_scores not in ("increments", "fairseq"):
        raise ValueError(f"step_scores must be 'increments' or 'fairseq', got {step_scores!r}")
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
    with ops.call():
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths)
        return ops.viterbi_decode(crf, step_scores == "fairseq")


MAX_NBEST = 1024  # n of viterbi_nbest: each sequence keeps T x K x n prefix scores and back-pointers


def viterbi_nbest(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    n: int,
    lengths: Optional[ArrayLike] = None,
) -> NBestResult:
    """The n best distinct beam paths per sequence, best first (for reranking, MBR, a self-critical
    baseline).

    Exact: a list Viterbi keeps, for every position and beam slot, the n best prefix scores ending
    there (docs/design.md §4). Path k = 0 is :func:`viterbi_decode`'s path. Ties between equal scores go
    to the path that is lower in order of (last slot, then the rank of its prefix there), recursively;
    Viterbi's "lowest beam index" rule is this rule's first path.

    Parameters
    ----------
    scores, tokens, E1, E2, lengths
        As for :func:`viterbi_decode`.
    n : int
        Paths per sequence, in [1, 1024] (memory: T x K x n prefix scores and back-pointers per thread).

    Returns
    -------
    NBestResult
        ``beam_idx``, ``tokens`` (B, T, n), ``score`` (B, n) and ``count`` (B,): where a sequence has fewer
        than n paths of finite score (K^L, fewer with -inf slots), all of them, then ``PAD`` and -inf.
    """
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
    with ops.call():
        n = _validate.positive_int(n, "n")
        if n > MAX_NBEST:
            raise ValueError(f"n must be at most {MAX_NBEST}, got {n}")
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths)
        return ops.viterbi_nbest(crf, n)


def stochastic_viterbi(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    num_samples: Optional[int] = None,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
    seed: Optional[int] = None,
    uniforms: Optional[ArrayLike] = None,
) -> StochasticViterbiResult:
    """The write-up's stochastic Viterbi sampler (docs/design.md §3), one chain or N independent ones.

    Every step draws, for each state j, a predecessor i from softmax((score[i] + trans[i, j]) / temperature)
    by the inverse CDF (smallest i with u * total < prefix[i]); the path is the backtrace from the best
    final state. This is *not* a sample of the CRF distribution (it is sharper and misses some paths);
    ``beam_probs`` is softmax of the untempered step scores, not the probability of the sampled path.

    Parameters
    ----------
    scores, tokens, E1, E2, lengths
        As for :func:`viterbi_decode`.
    num_samples : int, optional
        None: one chain, with the write-up's shapes; N: N independent chains, N last.
    temperature : float
        Softmax temperature of the predecessor draws (> 0; a ValueError names it where the tempered
        scores would overflow the dtype: docs/design.md §6).
    seed : int, optional
        Philox4x32-10 key, in [0, 2**64) (a fresh one when None and no ``uniforms``); the same seed
        gives the same samples for any thread count, on the CPU and the GPU.
    uniforms : (B, T-1, K) or (B, T-1, K, N) float array in [0, 1), optional
        Replays given uniforms instead (not with ``seed``).

    Returns
    -------
    StochasticViterbiResult
    """
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
    with ops.call():
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths, temperature_value=temperature)
        B, T, K = crf.scores.shape
        single = num_samples is None
        N = 1 if single else _validate.positive_int(num_samples, "num_samples")
        inv_temp = _validate.inv_temperature(temperature, crf.dtype)
        layout = "(B, T-1, K)" if single else "(B, T-1, K, N)"
        shape = (B, T - 1, K) if single else (B, T - 1, K, N)
        draws = _validate.draws(ops.arrays, seed, uniforms, shape, layout, crf.dtype)
        out = ops.stochastic_viterbi(crf, N, inv_temp, draws)
    if single:
        return StochasticViterbiResult(
            out.beam_probs.reshape(B, T, K),
            out.beam_idx,
            out.tokens.reshape(B, T),
            out.path_scores.reshape(B, T, K),
            out.backpointers.reshape(B, T - 1, K),
            out.score.reshape(B),
        )
    return out


def stochastic_viterbi_backward(
    grad_beam_probs: ArrayLike,
    sample: StochasticViterbiResult,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    lengths: Optional[ArrayLike] = None,
) -> SamplerGrad:
    """The gradient that the write-up's PyTorch autograd gives for a loss on ``beam_probs``.

    As in the write-up, the draws (predecessor picks) are constants and the scores they gather carry
    the gradient, so ``beam_probs`` depends on the beam scores along each state's sampled predecessor
    chain and on the tables through the transitions on it. O(T K N D) per sequence.

    Parameters
    ----------
    grad_beam_probs : float array of ``sample.beam_probs``' shape
        dL / d beam_probs.
    sample : StochasticViterbiResult
        What :func:`stochastic_viterbi` returned for ``tokens``, ``E1``, ``E2`` and ``lengths``.
    tokens, E1, E2, lengths
        As for :func:`viterbi_decode`.

    Returns
    -------
    SamplerGrad
        dL / d scores (B, T, K) and dL / d E1, dL / d E2 (V, D), in the sample's dtype.
    """
    ops = backend_of(
        **{
            "sample.beam_probs": getattr(sample, "beam_probs", None),  # a bad sample: the validator says so
            "grad_beam_probs": grad_beam_probs,
            "tokens": tokens,
            "E1": E1,
            "E2": E2,
        }
    )
    with ops.call():
        inputs = _validate.sampler_grad(ops.arrays, grad_beam_probs, sample, tokens, E1, E2, lengths)
        return ops.stochastic_viterbi_backward(inputs)
