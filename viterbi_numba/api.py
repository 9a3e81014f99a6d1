"""The array API: validation, dtype handling and dispatch to the kernels.

Shapes: B sequences, T positions, V vocabulary, K beam size, D low-rank dimension, N samples.
Empty batches (B = 0) give empty results; T = 0 is an error (a sequence has at least one position).
"""

from __future__ import annotations

import contextlib
import secrets
from functools import lru_cache
from typing import Any, NamedTuple, Optional

import numpy as np
from numba import get_num_threads

from . import _cpu, _gpu, _validate
from ._cpu import PAD

__all__ = [
    "PAD",
    "Beam",
    "ViterbiResult",
    "StochasticViterbiResult",
    "topk_beam",
    "viterbi_decode",
    "stochastic_viterbi",
    "SamplerGrad",
    "stochastic_viterbi_backward",
]

# A column of factored sampling weights whose total falls below this is recomputed directly: far above
# the dtype's smallest normal, so that the weights that matter never lose precision to underflow.
_TINY = {np.dtype(np.float32): np.float32(1e-20), np.dtype(np.float64): np.float64(1e-250)}


@lru_cache(maxsize=1)
def _blas_controller():
    # The kernels' np.dot calls SciPy's BLAS (numba binds scipy.linalg.cython_blas); it must be loaded
    # before threadpoolctl looks, or the controller would only see NumPy's and leave SciPy's multi-threaded.
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _single_threaded_blas():
    """The kernels call BLAS from every core at once: keep each call on one thread while they run."""
    controller = _blas_controller()
    return controller.limit(limits=1) if controller else contextlib.nullcontext()


def _table_gradients(run_kernel, tokens, lengths, scale, table_shape):
    """(grad_E1, grad_E2) from a kernel that writes per-position table-row gradients.

    ``run_kernel(first, count, grad_src, grad_dst)`` fills the rows of sequences first..first+count-1
    (layout of ``_cpu.scatter_rows``); they are added into (V, D) arrays, weighted by ``scale`` (B,), in
    (b, t, k) order. Only as many sequences as there are threads hold rows at a time, so the memory is
    O(threads * T * K * D) and the sums do not depend on the thread count.
    """
    B, T, K = tokens.shape
    dtype = scale.dtype
    chunk = max(1, min(B, get_num_threads()))
    grad_src, grad_dst = np.zeros((2, chunk, T, K, table_shape[1]), dtype=dtype)
    grad_E1 = np.zeros(table_shape, dtype=dtype)
    grad_E2 = np.zeros(table_shape, dtype=dtype)
    for first in range(0, B, chunk):
        count = min(chunk, B - first)
        run_kernel(first, count, grad_src, grad_dst)
        _cpu.scatter_rows(tokens, lengths, first, count, scale, grad_src, grad_dst, grad_E1, grad_E2)
    return grad_E1, grad_E2


class Beam(NamedTuple):
    """Top-K beam: ``scores`` (B, T, K) best first, ``tokens`` (B, T, K) int64 token ids."""

    scores: np.ndarray
    tokens: np.ndarray


class ViterbiResult(NamedTuple):
    """Best path per sequence. Positions at or after a sequence's length hold ``PAD`` (indices) and 0."""

    beam_idx: np.ndarray  # (B, T) int64 beam slot of the path
    tokens: np.ndarray  # (B, T) int64 token id of the path
    score: np.ndarray  # (B,) total path score S(y)
    step_scores: np.ndarray  # (B, T) fairseq forward_decoder's per-step scores; they sum to `score`


class StochasticViterbiResult(NamedTuple):
    """Output of :func:`stochastic_viterbi`; the first three fields are the seed's return values.

    Shapes for ``num_samples=None`` / ``num_samples=N``:
    beam_probs (B,T,K) / (B,T,K,N); beam_idx (B,T,1) / (B,T,N); tokens (B,T) / (B,T,N);
    path_scores (B,T,K) / (B,T,K,N): cumulative score of every state at every step (the sampler's
    ``score_t``); backpointers (B,T-1,K) / (B,T-1,K,N): the predecessor drawn for state j at step t+1;
    score (B,) / (B,N): the total score S(y) of each sampled path.
    """

    beam_probs: np.ndarray
    beam_idx: np.ndarray
    tokens: np.ndarray
    path_scores: np.ndarray
    backpointers: np.ndarray
    score: np.ndarray


def topk_beam(emissions: Any, k: int, force_tokens: Optional[Any] = None) -> Beam:
    """The K best tokens per position, like ``torch.topk(emissions, k, 2)``, with ties to the lower id.

    emissions: (B, T, V) float array (float16 is computed in float32). k: beam size in [1, V].
    force_tokens: optional (B, T) token ids that must be in the beam (fairseq forces the reference
    tokens this way); each keeps its own score and takes the place of the K-th best when it would not
    have been selected, so the beam stays sorted best first.
    Raises ValueError on NaN or +inf in ``emissions``.
    """
    if _gpu.on_gpu(emissions, force_tokens):
        return _gpu.topk_beam(emissions, k, force_tokens)
    emissions = _validate.float_array(emissions, "emissions", 3)
    B, T, V = emissions.shape
    k = _validate.positive_int(k, "k")
    if k > V:
        raise ValueError(f"k must be at most V = {V} (emissions.shape[2]), got {k}")
    dtype = _validate.compute_dtype(emissions)
    emissions = np.ascontiguousarray(emissions, dtype=dtype)
    if force_tokens is None:
        forced = np.zeros((1, 1), dtype=np.int64)
    else:
        forced = _validate.int_array(force_tokens, "force_tokens", (B, T))
        _validate.token_ids(forced, V, "force_tokens")
    out_scores = np.empty((B, T, k), dtype=dtype)
    out_tokens = np.empty((B, T, k), dtype=np.int64)
    bad_rows = np.zeros((B, T), dtype=np.int8)
    if B * T:
        _cpu.topk_beam_kernel(emissions, k, forced, force_tokens is not None, out_scores, out_tokens, bad_rows)
    if bad_rows.any():
        b, t = np.argwhere(bad_rows)[0]
        raise ValueError(f"emissions contains NaN or +inf (first at batch {b}, position {t})")
    return Beam(out_scores, out_tokens)


def _beam_inputs(scores: Any, tokens: Any, E1: Any, E2: Any, lengths: Any):
    """Validate a beam CRF's inputs; return them contiguous in the compute dtype, with lengths."""
    scores = _validate.float_array(scores, "scores", 3)
    B, T, K = scores.shape
    if T == 0:
        raise ValueError("scores must have at least one position (T >= 1), got shape {}".format(scores.shape))
    if K == 0:
        raise ValueError("scores must have a beam of at least one slot (K >= 1), got shape {}".format(scores.shape))
    tokens = _validate.int_array(tokens, "tokens", (B, T, K))
    E1, E2 = _validate.embedding_tables(E1, E2)
    _validate.token_ids(tokens, E1.shape[0])
    lengths = _validate.lengths(lengths, B, T)
    _validate.beam_scores(scores, lengths)
    dtype = _validate.compute_dtype(scores, E1, E2)
    as_dtype = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return as_dtype(scores), tokens, as_dtype(E1), as_dtype(E2), lengths


def viterbi_decode(scores: Any, tokens: Any, E1: Any, E2: Any, lengths: Optional[Any] = None) -> ViterbiResult:
    """Max-product decoding of the beam CRF: the best beam path per sequence.

    scores: (B, T, K) beam scores; tokens: (B, T, K) their token ids in [0, V); E1, E2: (V, D) tables
    (transition i -> j between steps t-1 and t is ``E1[tokens[t-1, i]] . E2[tokens[t, j]]``);
    lengths: optional (B,) in [1, T]. Ties go to the lowest beam index. Results in the compute dtype
    (float64 if any float input is float64, else float32).
    """
    if _gpu.on_gpu(scores, tokens, E1, E2):
        return _gpu.viterbi_decode(scores, tokens, E1, E2, lengths)
    scores, tokens, E1, E2, lengths = _beam_inputs(scores, tokens, E1, E2, lengths)
    B, T, _ = scores.shape
    beam_idx = np.empty((B, T), dtype=np.int64)
    path_tokens = np.empty((B, T), dtype=np.int64)
    score = np.empty(B, dtype=scores.dtype)
    step_scores = np.empty((B, T), dtype=scores.dtype)
    if B:
        with _single_threaded_blas():
            _cpu.viterbi_kernel(scores, tokens, E1, E2, lengths, beam_idx, path_tokens, score, step_scores)
    return ViterbiResult(beam_idx, path_tokens, score, step_scores)


def stochastic_viterbi(
    scores: Any,
    tokens: Any,
    E1: Any,
    E2: Any,
    num_samples: Optional[int] = None,
    temperature: float = 1.0,
    lengths: Optional[Any] = None,
    seed: Optional[int] = None,
    uniforms: Optional[Any] = None,
) -> StochasticViterbiResult:
    """The seed's stochastic Viterbi sampler (DESIGN §3), one chain or ``num_samples`` independent ones.

    Every step draws, for each state j, a predecessor i from softmax((score[i] + trans[i, j]) / temperature)
    by the inverse CDF (smallest i with u * total < prefix[i]); the path is the backtrace from the best
    final state. This is *not* a sample of the CRF distribution (it is sharper and misses some paths);
    ``beam_probs`` is softmax of the untempered step scores, not the probability of the sampled path.

    Randomness: ``uniforms`` (B, T-1, K) or (B, T-1, K, N) in [0, 1) replays given numbers; otherwise they
    come from Philox4x32-10 keyed by ``seed`` (a fresh one when None), the same for any thread count.
    See :class:`StochasticViterbiResult` for the outputs.
    """
    if _gpu.on_gpu(scores, tokens, E1, E2):
        return _gpu.stochastic_viterbi(scores, tokens, E1, E2, num_samples, temperature, lengths, seed, uniforms)
    scores, tokens, E1, E2, lengths = _beam_inputs(scores, tokens, E1, E2, lengths)
    B, T, K = scores.shape
    single = num_samples is None
    N = 1 if single else _validate.positive_int(num_samples, "num_samples")
    inv_temp = scores.dtype.type(1.0 / _validate.temperature(temperature))
    seed = _validate.seed(seed)
    if uniforms is not None:
        if seed is not None:
            raise ValueError("give either seed or uniforms, not both")
        expected = (B, T - 1, K) if single else (B, T - 1, K, N)
        replay = _validate.uniforms(uniforms, expected, "(B, T-1, K)" if single else "(B, T-1, K, N)")
        replay = replay.reshape(B, T - 1, K, N)
    else:
        replay = np.zeros((1, 1, 1, 1), dtype=np.float64)
        if seed is None:
            seed = secrets.randbits(64)
    seed_bits = 0 if seed is None else seed  # unused when replaying uniforms
    beam_probs = np.empty((B, T, K, N), dtype=scores.dtype)
    beam_idx = np.empty((B, T, N), dtype=np.int64)
    path_tokens = np.empty((B, T, N), dtype=np.int64)
    path_scores = np.empty((B, T, K, N), dtype=scores.dtype)
    backpointers = np.empty((B, T - 1, K, N), dtype=np.int64)
    score = np.empty((B, N), dtype=scores.dtype)
    if B:
        with _single_threaded_blas():
            _cpu.stochastic_viterbi_kernel(
                scores, tokens, E1, E2, lengths, inv_temp, _TINY[scores.dtype],
                seed_bits & 0xFFFFFFFF, seed_bits >> 32, replay, uniforms is not None,
                beam_probs, beam_idx, path_tokens, path_scores, backpointers, score,
            )
    if single:
        return StochasticViterbiResult(
            beam_probs[..., 0], beam_idx, path_tokens[..., 0], path_scores[..., 0], backpointers[..., 0], score[:, 0]
        )
    return StochasticViterbiResult(beam_probs, beam_idx, path_tokens, path_scores, backpointers, score)


class SamplerGrad(NamedTuple):
    """Output of :func:`stochastic_viterbi_backward`."""

    grad_scores: np.ndarray  # (B, T, K), summed over the chains
    grad_E1: np.ndarray  # (V, D)
    grad_E2: np.ndarray  # (V, D)


def stochastic_viterbi_backward(
    grad_beam_probs: Any,
    sample: StochasticViterbiResult,
    tokens: Any,
    E1: Any,
    E2: Any,
    lengths: Optional[Any] = None,
) -> SamplerGrad:
    """The gradient that the seed's PyTorch autograd gives for a loss on ``beam_probs``.

    ``sample`` is what :func:`stochastic_viterbi` returned for ``tokens``, ``E1``, ``E2`` and ``lengths``;
    ``grad_beam_probs`` is dL/d beam_probs, of ``sample.beam_probs``' shape. As in the seed, the draws
    (predecessor picks) are constants and the scores they gather carry the gradient, so
    ``beam_probs`` depends on the beam scores along each state's sampled predecessor chain and on the
    tables through the transitions on it. Returns dL/d scores (B, T, K) and dL/d E1, dL/d E2 (V, D) in
    the sample's dtype; O(T K N D) per sequence.
    """
    if _gpu.on_gpu(sample.beam_probs, grad_beam_probs, tokens, E1, E2):
        return _gpu.stochastic_viterbi_backward(grad_beam_probs, sample, tokens, E1, E2, lengths)
    beam_probs = _validate.float_array(sample.beam_probs, "sample.beam_probs", np.ndim(sample.beam_probs))
    if beam_probs.ndim not in (3, 4):
        raise ValueError(f"sample.beam_probs must have shape (B, T, K) or (B, T, K, N), got {beam_probs.shape}")
    B, T, K = beam_probs.shape[:3]
    N = 1 if beam_probs.ndim == 3 else beam_probs.shape[3]
    dtype = beam_probs.dtype
    grads = _validate.float_array(grad_beam_probs, "grad_beam_probs", beam_probs.ndim)
    if grads.shape != beam_probs.shape:
        raise ValueError(f"grad_beam_probs must have the shape of sample.beam_probs {beam_probs.shape}, got {grads.shape}")
    if not np.isfinite(grads).all():
        raise ValueError("grad_beam_probs contains NaN or inf")
    backpointers = _validate.int_array(sample.backpointers, "sample.backpointers", (B, T - 1, K) + ((N,) if beam_probs.ndim == 4 else ()))
    if backpointers.size and (backpointers.min() < 0 or backpointers.max() >= K):
        raise ValueError(f"sample.backpointers must be beam slots in [0, {K})")
    tokens = _validate.int_array(tokens, "tokens", (B, T, K))
    E1, E2 = _validate.embedding_tables(E1, E2)
    _validate.token_ids(tokens, E1.shape[0])
    lengths = _validate.lengths(lengths, B, T)
    shape = (B, T, K, N)
    beam_probs = np.ascontiguousarray(beam_probs).reshape(shape)
    grads = np.ascontiguousarray(grads, dtype=dtype).reshape(shape)
    backpointers = backpointers.reshape((B, T - 1, K, N))
    E1 = np.ascontiguousarray(E1, dtype=dtype)
    E2 = np.ascontiguousarray(E2, dtype=dtype)
    grad_scores = np.empty((B, T, K), dtype=dtype)

    def run(first, count, grad_src, grad_dst):
        _cpu.stochastic_viterbi_backward_kernel(beam_probs, backpointers, tokens, E1, E2, lengths, grads,
                                                first, count, grad_scores, grad_src, grad_dst)

    grad_E1, grad_E2 = _table_gradients(run, tokens, lengths, np.ones(B, dtype=dtype), E1.shape)
    return SamplerGrad(grad_scores, grad_E1, grad_E2)
