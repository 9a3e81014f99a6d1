"""Exact inference in the beam CRF p(y) = exp(S(y) / tau) / Z_tau (DESIGN §2, §4): log partition,
exact samples with their log-probabilities, fairseq's log-likelihood, marginals and gradients.

Same conventions as :mod:`viterbi_numba.api`: NumPy in, NumPy out; B sequences, T positions, K beam
slots, V tokens, D low-rank dimension, N samples; ``lengths`` (B,) in [1, T] (None: all T); the compute
dtype is float64 if any float input is float64, else float32; padded positions hold ``PAD`` / 0.
"""

from __future__ import annotations

import secrets
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _cpu_crf, _gpu, _validate
from .api import _beam_inputs, _single_threaded_blas, _table_gradients, topk_beam

__all__ = [
    "CRFSample",
    "PartitionGrad",
    "LikelihoodGrad",
    "crf_sample",
    "log_partition",
    "log_partition_grad",
    "log_likelihood",
    "log_likelihood_grad",
    "marginals",
    "sequence_score",
]


class CRFSample(NamedTuple):
    """Output of :func:`crf_sample`: N exact samples per sequence, N last."""

    beam_idx: np.ndarray  # (B, T, N) int64 beam slot per position (PAD after the length)
    tokens: np.ndarray  # (B, T, N) int64 token id per position (PAD after the length)
    log_prob: np.ndarray  # (B, N) log p_tau(y) = S(y) / tau - log Z_tau


class PartitionGrad(NamedTuple):
    """Output of :func:`log_partition_grad`.

    ``grad_scores`` (B, T, K) is grad_output[b] * marginals / tau; ``grad_E1``, ``grad_E2`` (V, D) are the
    gradients of sum_b grad_output[b] * log Z_tau[b] with respect to the tables.
    """

    log_z: np.ndarray  # (B,)
    marginals: np.ndarray  # (B, T, K)
    grad_scores: np.ndarray
    grad_E1: np.ndarray
    grad_E2: np.ndarray


class LikelihoodGrad(NamedTuple):
    """Output of :func:`log_likelihood_grad`.

    The beam (``beam_scores``, ``beam_tokens``, (B, T, K)) is the one the likelihood was computed on, with
    each target in it. The gradient with respect to ``emissions`` is zero except at the beam tokens, where
    it is ``grad_scores``: ``grad_emissions[b, t, beam_tokens[b, t, k]] = grad_scores[b, t, k]``.
    """

    log_likelihood: np.ndarray  # (B,)
    beam_scores: np.ndarray
    beam_tokens: np.ndarray
    grad_scores: np.ndarray  # (B, T, K)
    grad_E1: np.ndarray  # (V, D)
    grad_E2: np.ndarray  # (V, D)


def _inv_temp(temperature: Any, dtype: np.dtype):
    return dtype.type(1.0 / _validate.temperature(temperature))


class _ForwardState(NamedTuple):
    """What the backward pass needs of the forward pass (inputs already validated and cast)."""

    scores: np.ndarray
    tokens: np.ndarray
    E1: np.ndarray
    E2: np.ndarray
    lengths: np.ndarray
    inv_temp: Any
    log_z: np.ndarray  # (B,) float64
    alpha: np.ndarray  # (B, T, K) normalised log alpha
    col_max: np.ndarray  # (B, T, K)
    col_sum: np.ndarray  # (B, T, K)


def _forward_pass(scores, tokens, E1, E2, lengths, inv_temp) -> _ForwardState:
    B, T, K = scores.shape
    log_z = np.empty(B, dtype=np.float64)
    alpha, col_max, col_sum = np.empty((3, B, T, K), dtype=scores.dtype)
    if B:
        with _single_threaded_blas():
            _cpu_crf.forward_kernel(scores, tokens, E1, E2, lengths, inv_temp, log_z, alpha, col_max, col_sum)
    return _ForwardState(scores, tokens, E1, E2, lengths, inv_temp, log_z, alpha, col_max, col_sum)


def log_partition(
    scores: Any, tokens: Any, E1: Any, E2: Any, temperature: float = 1.0, lengths: Optional[Any] = None
) -> np.ndarray:
    """log Z_tau = log sum_y exp(S(y) / tau) over all beam paths, per sequence: (B,) in the compute dtype.

    scores (B, T, K), tokens (B, T, K) token ids in [0, V), E1/E2 (V, D): as for :func:`viterbi_decode`.
    """
    if _gpu.on_gpu(scores, tokens, E1, E2):
        return _gpu.log_partition(scores, tokens, E1, E2, temperature, lengths)
    scores, tokens, E1, E2, lengths = _beam_inputs(scores, tokens, E1, E2, lengths)
    state = _forward_pass(scores, tokens, E1, E2, lengths, _inv_temp(temperature, scores.dtype))
    return state.log_z.astype(scores.dtype)


def crf_sample(
    scores: Any,
    tokens: Any,
    E1: Any,
    E2: Any,
    num_samples: int = 1,
    temperature: float = 1.0,
    lengths: Optional[Any] = None,
    seed: Optional[int] = None,
    uniforms: Optional[Any] = None,
) -> CRFSample:
    """``num_samples`` independent exact samples of p(y) proportional to exp(S(y) / temperature).

    Forward filtering, backward sampling (DESIGN §4): one forward pass per sequence, then O(T K D) per
    sample, so N samples cost about as much as one. Each position is drawn by the inverse CDF (smallest
    i with u * total < prefix[i]), the last position first.

    Randomness: ``uniforms`` (B, T, N) in [0, 1) replays given numbers, ``uniforms[b, t, n]`` drawing
    position t of sample n (positions at or after the length are unused); otherwise they come from
    Philox4x32-10 keyed by ``seed`` (a fresh one when None), on a stream of their own, so the same seed
    gives the same samples for any thread count. Returns :class:`CRFSample`.
    """
    return _sample_with_state(scores, tokens, E1, E2, num_samples, temperature, lengths, seed, uniforms)[1]


def _sample_with_state(scores, tokens, E1, E2, num_samples, temperature, lengths, seed, uniforms):
    """:func:`crf_sample`, also returning its forward state (the autograd of ``log_prob`` needs it)."""
    if _gpu.on_gpu(scores, tokens, E1, E2):
        return _gpu.sample_with_state(scores, tokens, E1, E2, num_samples, temperature, lengths, seed, uniforms)
    scores, tokens, E1, E2, lengths = _beam_inputs(scores, tokens, E1, E2, lengths)
    num_samples = _validate.positive_int(num_samples, "num_samples")
    inv_temp = _inv_temp(temperature, scores.dtype)
    seed = _validate.seed(seed)
    B, T, _ = scores.shape
    if uniforms is not None:
        if seed is not None:
            raise ValueError("give either seed or uniforms, not both")
        uniforms = _validate.uniforms(uniforms, (B, T, num_samples), "(B, T, N)")
    state = _forward_pass(scores, tokens, E1, E2, lengths, inv_temp)
    return state, _sample_from(state, num_samples, seed, uniforms)


def _sample_from(state: _ForwardState, num_samples: int, seed: Optional[int], uniforms: Optional[np.ndarray]):
    """FFBS samples from a forward pass; ``seed``/``uniforms`` already validated (None and None: fresh seed)."""
    B, T, _ = state.scores.shape
    if uniforms is None:
        seed = secrets.randbits(64) if seed is None else seed
        replay = np.zeros((1, 1, 1), dtype=np.float64)
    else:
        seed, replay = 0, uniforms  # the seed is unused when replaying uniforms
    beam_idx = np.empty((B, T, num_samples), dtype=np.int64)
    path_tokens = np.empty((B, T, num_samples), dtype=np.int64)
    log_prob = np.empty((B, num_samples), dtype=np.float64)
    if B:
        with _single_threaded_blas():
            _cpu_crf.sample_kernel(state.scores, state.tokens, state.E1, state.E2, state.lengths, state.inv_temp,
                                   state.log_z, state.alpha, seed & 0xFFFFFFFF, seed >> 32, replay,
                                   uniforms is not None, beam_idx, path_tokens, log_prob)
    return CRFSample(beam_idx, path_tokens, log_prob.astype(state.scores.dtype))


def _backward_pass(state: _ForwardState, scale: Optional[np.ndarray]):
    """Marginals (B, T, K) and, when ``scale`` (B,) is given, the table gradients of
    sum_b scale[b] * tau * log Z_tau[b] (the kernel's row gradients are those times tau)."""
    B, T, K = state.scores.shape
    mu = np.empty((B, T, K), dtype=state.scores.dtype)

    def run(first, count, src_rows, dst_rows):
        _cpu_crf.backward_kernel(state.tokens, state.E1, state.E2, state.lengths, state.inv_temp, state.alpha,
                                 state.col_max, state.col_sum, first, count, scale is not None, mu,
                                 src_rows, dst_rows)

    with _single_threaded_blas():
        if scale is None:
            run(0, B, *np.zeros((2, 1, 1, 1, 1), dtype=mu.dtype))
            return mu, None, None
        grad_E1, grad_E2 = _table_gradients(run, state.tokens, state.lengths, scale, state.E1.shape)
    return mu, grad_E1, grad_E2


def marginals(
    scores: Any, tokens: Any, E1: Any, E2: Any, temperature: float = 1.0, lengths: Optional[Any] = None
) -> np.ndarray:
    """Node marginals p_tau(y_t = k) (B, T, K) by forward-backward; 0 at padded positions."""
    if _gpu.on_gpu(scores, tokens, E1, E2):
        return _gpu.marginals(scores, tokens, E1, E2, temperature, lengths)
    scores, tokens, E1, E2, lengths = _beam_inputs(scores, tokens, E1, E2, lengths)
    state = _forward_pass(scores, tokens, E1, E2, lengths, _inv_temp(temperature, scores.dtype))
    return _backward_pass(state, None)[0]


def _grad_output(grad_output: Any, batch: int, dtype: np.dtype) -> np.ndarray:
    if grad_output is None:
        return np.ones(batch, dtype=dtype)
    weights = _validate.float_array(grad_output, "grad_output", 1)
    if weights.shape != (batch,):
        raise ValueError(f"grad_output must have shape ({batch},) (B,), got {weights.shape}")
    if not np.isfinite(weights).all():
        raise ValueError("grad_output contains NaN or inf")
    return np.ascontiguousarray(weights, dtype=dtype)


def log_partition_grad(
    scores: Any,
    tokens: Any,
    E1: Any,
    E2: Any,
    temperature: float = 1.0,
    lengths: Optional[Any] = None,
    grad_output: Optional[Any] = None,
) -> PartitionGrad:
    """log Z_tau and its gradients, by one forward-backward pass per sequence (see :class:`PartitionGrad`).

    ``grad_output`` (B,) weights each sequence (default all 1), as in a backward pass of autograd: the
    gradients are those of sum_b grad_output[b] * log Z_tau[b]. The edge marginals are contracted with
    the table rows step by step; memory is O(K^2) per thread plus O(T K D) per thread for the rows.
    """
    if _gpu.on_gpu(scores, tokens, E1, E2):
        return _gpu.log_partition_grad(scores, tokens, E1, E2, temperature, lengths, grad_output)
    scores, tokens, E1, E2, lengths = _beam_inputs(scores, tokens, E1, E2, lengths)
    inv_temp = _inv_temp(temperature, scores.dtype)
    weights = _grad_output(grad_output, scores.shape[0], scores.dtype)
    state = _forward_pass(scores, tokens, E1, E2, lengths, inv_temp)
    mu, grad_E1, grad_E2 = _backward_pass(state, weights * inv_temp)
    grad_scores = mu * (weights * inv_temp)[:, None, None]
    return PartitionGrad(state.log_z.astype(scores.dtype), mu, grad_scores, grad_E1, grad_E2)


def sequence_score(
    scores: Any, tokens: Any, E1: Any, E2: Any, beam_idx: Any, lengths: Optional[Any] = None
) -> np.ndarray:
    """S(y) of given beam paths: ``beam_idx`` (B, T) gives (B,), (B, T, N) gives (B, N).

    Entries at or after a sequence's length are ignored (they may be ``PAD``). Sums in float64 (on the
    GPU: compensated sums in the compute dtype), returned in the compute dtype.
    """
    if _gpu.on_gpu(scores, tokens, E1, E2, beam_idx):
        return _gpu.sequence_score(scores, tokens, E1, E2, beam_idx, lengths)
    scores, tokens, E1, E2, lengths = _beam_inputs(scores, tokens, E1, E2, lengths)
    B, T, K = scores.shape
    paths = np.asarray(beam_idx)
    if paths.ndim not in (2, 3):
        raise ValueError(f"beam_idx must have shape (B, T) or (B, T, N), got {paths.shape}")
    single = paths.ndim == 2
    paths = _validate.int_array(paths, "beam_idx", (B, T) if single else (B, T, paths.shape[2]))
    if single:
        paths = paths[:, :, None]
    inside = np.arange(T)[None, :, None] < lengths[:, None, None]
    if ((inside & ((paths < 0) | (paths >= K))).any()):
        raise ValueError(f"beam_idx must be beam slots in [0, {K}) before each sequence's length")
    out = np.empty((B, paths.shape[2]), dtype=np.float64)
    _cpu_crf.sequence_score_kernel(scores, tokens, E1, E2, lengths, np.where(inside, paths, 0), out)
    out = out.astype(scores.dtype)
    return out[:, 0] if single else out


class _LikelihoodState(NamedTuple):
    forward: _ForwardState  # of the beam with the targets forced in
    targets: np.ndarray  # (B, T)
    slots: np.ndarray  # (B, T) the targets' beam slots
    log_likelihood: np.ndarray  # (B,) in the compute dtype

    @property
    def beam_tokens(self) -> np.ndarray:
        return self.forward.tokens


def _likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature) -> _LikelihoodState:
    """Validate, build the forced beam, score the targets and run the forward pass."""
    if _gpu.on_gpu(emissions, targets, E1, E2):
        return _gpu.likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature)
    emissions = _validate.float_array(emissions, "emissions", 3)
    B, T, V = emissions.shape
    if T == 0:
        raise ValueError(f"emissions must have at least one position (T >= 1), got shape {emissions.shape}")
    targets = _validate.int_array(targets, "targets", (B, T))
    _validate.token_ids(targets, V, "targets")
    E1, E2 = _validate.embedding_tables(E1, E2)
    if E1.shape[0] != V:
        raise ValueError(f"E1 and E2 must have V = {V} rows (emissions.shape[2]), got {E1.shape[0]}")
    beam_scores, beam_tokens = topk_beam(emissions, k, force_tokens=targets)
    # the target's slot: where the beam holds the target token (it always does, it was forced)
    slots = np.argmax(beam_tokens == targets[:, :, None], axis=2)
    scores, beam_tokens, E1, E2, lengths = _beam_inputs(beam_scores, beam_tokens, E1, E2, lengths)
    inv_temp = _inv_temp(temperature, scores.dtype)
    numerator = np.empty((B, 1), dtype=np.float64)
    _cpu_crf.sequence_score_kernel(scores, beam_tokens, E1, E2, lengths, slots[:, :, None], numerator)
    state = _forward_pass(scores, beam_tokens, E1, E2, lengths, inv_temp)
    log_likelihood = (numerator[:, 0] * inv_temp - state.log_z).astype(scores.dtype)
    return _LikelihoodState(state, targets, slots, log_likelihood)


def _paths_backward(state: _ForwardState, beam_idx: np.ndarray, path_tokens: np.ndarray, weights: np.ndarray):
    """(grad_scores (B, T, K), grad_E1, grad_E2) of sum_{b,n} weights[b, n] * (S(y_bn) / tau - log Z_tau[b])
    for beam paths beam_idx (B, T, N) with token ids path_tokens (B, T, N) (anything after the length).
    Host ``weights`` (B, N) in the state's dtype; a GPU state takes device paths."""
    if isinstance(state, _gpu.ForwardState):
        return _gpu.paths_backward(state, beam_idx, path_tokens, weights)
    B, T, _ = state.scores.shape
    scale = weights * state.inv_temp  # (B, N)
    mu, grad_E1, grad_E2 = _backward_pass(state, -scale.sum(axis=1))
    inside = np.arange(T)[None, :] < state.lengths[:, None]
    grad_scores = -mu * scale.sum(axis=1)[:, None, None]
    b_index, t_index = np.nonzero(inside)
    for n in range(beam_idx.shape[2]):
        np.add.at(grad_scores, (b_index, t_index, beam_idx[b_index, t_index, n]), scale[b_index, n])
        _cpu_crf.add_path_rows(np.where(inside, path_tokens[:, :, n], 0), state.lengths,
                               np.ascontiguousarray(scale[:, n]), state.E1, state.E2, grad_E1, grad_E2)
    return grad_scores, grad_E1, grad_E2


def _likelihood_backward(likelihood: _LikelihoodState, weights: np.ndarray):
    """(grad_scores (B, T, K), grad_E1, grad_E2) of sum_b weights[b] * log_likelihood[b]."""
    if isinstance(likelihood, _gpu.LikelihoodState):
        return _gpu.likelihood_backward(likelihood, weights)
    return _paths_backward(likelihood.forward, likelihood.slots[:, :, None], likelihood.targets[:, :, None],
                           weights[:, None])


def log_likelihood(
    emissions: Any,
    targets: Any,
    E1: Any,
    E2: Any,
    k: int,
    lengths: Optional[Any] = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """log p_tau(targets) under the beam CRF, fairseq ``DynamicCRF.forward`` parity: (B,).

    emissions (B, T, V), targets (B, T) token ids, E1/E2 (V, D), k: beam size. Each position's beam is
    its top k tokens with the target forced in (at its own score, replacing the k-th best if needed);
    the result is S(targets) / tau - log Z_tau over that beam. Positions at or after ``lengths[b]`` are
    ignored (fairseq's prefix masks). This scores sequences sampled under an older policy for a PPO ratio.
    """
    if _gpu.on_gpu(emissions, targets, E1, E2):
        return _gpu.log_likelihood(emissions, targets, E1, E2, k, lengths, temperature)
    return _likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature).log_likelihood


def log_likelihood_grad(
    emissions: Any,
    targets: Any,
    E1: Any,
    E2: Any,
    k: int,
    lengths: Optional[Any] = None,
    temperature: float = 1.0,
    grad_output: Optional[Any] = None,
) -> LikelihoodGrad:
    """:func:`log_likelihood` and the gradients of sum_b grad_output[b] * log_likelihood[b] (default
    weights 1) with respect to the beam scores (hence the emissions) and the tables; see
    :class:`LikelihoodGrad`.
    """
    if _gpu.on_gpu(emissions, targets, E1, E2):
        return _gpu.log_likelihood_grad(emissions, targets, E1, E2, k, lengths, temperature, grad_output)
    weights = _grad_output(grad_output, np.shape(emissions)[0], np.dtype(np.float64))  # checked before any work
    likelihood = _likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature)
    state = likelihood.forward
    weights = weights.astype(state.scores.dtype)
    return LikelihoodGrad(likelihood.log_likelihood, state.scores, state.tokens,
                          *_likelihood_backward(likelihood, weights))
