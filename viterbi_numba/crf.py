"""Public functions of exact inference in the beam CRF p(y) = exp(S(y) / tau) / Z_tau (docs/design.md §4).

log partition, exact samples with their log-probabilities (FFBS), marginals, fairseq's log-likelihood,
path scores and gradients; and the two state objects that keep a forward pass for what follows it
(:class:`CRFForward`, :class:`LikelihoodForward`), which autograd wrappers use. Like
:mod:`viterbi_numba.decode`, each function validates once, picks the backend from the arrays and calls
the backend's op. Conventions: ``lengths`` (B,) in [1, T] (None: all T); the compute dtype is float64 if
any float input is float64, else float32; padded positions hold ``PAD`` / 0.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from . import _validate
from ._devices import backend_of
from .decode import ArrayLike
from .results import Beam, CRFSample, DistinctSample, EntropyGrad, KLGrad, LikelihoodGrad, PartitionGrad

__all__ = [
    "CRFForward",
    "LikelihoodForward",
    "crf_cross_entropy",
    "crf_entropy",
    "crf_entropy_grad",
    "crf_forward",
    "crf_kl",
    "crf_kl_grad",
    "crf_sample",
    "log_likelihood",
    "log_likelihood_forward",
    "log_likelihood_grad",
    "log_partition",
    "log_partition_grad",
    "marginals",
    "sequence_score",
]


class CRFForward:
    """The forward pass of one beam CRF, kept for sampling and for the backward pass.

    Made by :func:`crf_forward`. Holds the validated inputs and the forward state (normalised log
    alpha and each step's column maxima and sums, (B, T, K) each, docs/design.md §4) on the inputs'
    device.

    Attributes
    ----------
    log_z : (B,) float
        ``log Z_tau`` per sequence, in the compute dtype.
    """

    def __init__(self, ops: Any, state: Any):
        self._ops = ops
        self._state = state

    @property
    def log_z(self) -> Any:
        return self._state.log_z

    @property
    def saved(self) -> tuple[Any, Any, Any, Any]:
        """What :meth:`from_saved` rebuilds this forward pass from: log Z (B,) and the normalised log alpha
        and each step's column maxima and sums (B, T, K), in the compute dtype, on the inputs' device (the
        autograd wrappers keep them between a forward and a backward pass)."""
        return self._state.saved

    @classmethod
    def from_saved(
        cls,
        scores: ArrayLike,
        tokens: ArrayLike,
        E1: ArrayLike,
        E2: ArrayLike,
        saved: tuple[Any, Any, Any, Any],
        temperature: float = 1.0,
        lengths: Optional[ArrayLike] = None,
    ) -> CRFForward:
        """The forward pass that :attr:`saved` came from, for sampling or the backward pass, without
        running it again.

        The inputs are those of the :func:`crf_forward` call that made ``saved``; their shapes, token ids
        and lengths are checked again (they bound the kernels' reads), their values are not (that call
        checked them). A sample of a rebuilt pass reads log Z in the compute dtype (the first pass keeps
        it in float64 on the CPU), so in float32 its log-probabilities may differ in the last bits.
        """
        ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
        with ops.call():
            crf = _validate.beam_crf(
                ops.arrays, scores, tokens, E1, E2, lengths, temperature_value=temperature, values_checked=True
            )
            views = _validate.saved_forward(ops.arrays, crf, saved)
            inv_temp = _validate.inv_temperature(temperature, crf.dtype)
            return cls(ops, ops.restore_forward(crf, inv_temp, views, tuple(saved)))

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        """(B, T, K) of the beam."""
        B, T, K = self._state.crf.scores.shape
        return B, T, K

    def sample(
        self,
        num_samples: int = 1,
        *,
        seed: Optional[int] = None,
        uniforms: Optional[ArrayLike] = None,
        replacement: bool = True,
    ) -> Union[CRFSample, DistinctSample]:
        """``num_samples`` exact samples from this forward pass, with or without replacement (as
        :func:`crf_sample`)."""
        ops = self._ops
        with ops.call():
            return _draw(ops, self._state, num_samples, seed, uniforms, replacement)

    def marginals(self) -> Any:
        """Node marginals p_tau(y_t = k) (B, T, K); 0 at padded positions."""
        with self._ops.call():
            return self._ops.marginals(self._state)

    def log_partition_grad(self, grad_output: Optional[ArrayLike] = None) -> PartitionGrad:
        """log Z_tau and the gradients of ``sum_b grad_output[b] * log Z_tau[b]`` (as :func:`log_partition_grad`)."""
        ops = self._ops
        with ops.call():
            weights = _validate.weights(ops.arrays, grad_output, (self.batch_shape[0],), self._state.crf.dtype)
            return ops.log_partition_grad(self._state, weights)

    def entropy(self) -> Any:
        """H(p_tau) (B,) of this forward pass's CRF (as :func:`crf_entropy`)."""
        with self._ops.call():
            return self._ops.entropy(self._state, None).entropy

    def entropy_grad(self, grad_output: Optional[ArrayLike] = None) -> EntropyGrad:
        """H(p_tau) and the gradients of ``sum_b grad_output[b] * H[b]`` (as :func:`crf_entropy_grad`)."""
        ops = self._ops
        with ops.call():
            weights = _validate.weights(ops.arrays, grad_output, (self.batch_shape[0],), self._state.crf.dtype)
            return ops.entropy(self._state, weights)

    def kl(self, reference: CRFForward) -> Any:
        """KL(p || q) (B,) with this forward pass as p and ``reference`` as q (as :func:`crf_kl`)."""
        return self._kl(reference, None, False).kl

    def kl_grad(self, reference: CRFForward, grad_output: Optional[ArrayLike] = None) -> KLGrad:
        """KL(p || q) and the gradients of ``sum_b grad_output[b] * KL[b]`` (as :func:`crf_kl_grad`).

        ``reference`` is a forward pass of q on this pass's beam: the same (B, T, K), dtype and temperature,
        read at this pass's token ids (checked to lie in q's vocabulary) and lengths.
        """
        return self._kl(reference, grad_output, True)

    def _kl(self, reference: CRFForward, grad_output: Any, want_grads: bool) -> KLGrad:
        if not isinstance(reference, CRFForward):
            raise TypeError(f"reference must be a CRFForward (crf_forward of q), got {type(reference).__name__}")
        if type(reference._ops) is not type(self._ops):
            raise TypeError("reference is on another device than this forward pass")
        ops, p, q = self._ops, self._state, reference._state
        with ops.call():
            q = q._replace(crf=_validate.same_beam(ops.arrays, p.crf, p.inv_temp, q.crf, q.inv_temp))
            weights = (
                _validate.weights(ops.arrays, grad_output, (self.batch_shape[0],), p.crf.dtype) if want_grads else None
            )
            return ops.kl(p, q, weights)

    def paths_grad(self, beam_idx: ArrayLike, weights: Optional[ArrayLike] = None) -> tuple[Any, Any, Any]:
        """Gradients of ``sum_{b,n} weights[b, n] * log p_tau(y_bn)`` for beam paths y.

        Parameters
        ----------
        beam_idx : (B, T) or (B, T, N) int array
            Beam paths, such as ``CRFSample.beam_idx``; entries at or after a length are ignored.
        weights : (B,) or (B, N) float array, optional
            One weight per path (default 1).

        Returns
        -------
        tuple
            (grad_scores (B, T, K), grad_E1 (V, D), grad_E2 (V, D)), where
            ``log p_tau(y) = S(y) / tau - log Z_tau``.
        """
        ops = self._ops
        with ops.call():
            paths, single = _validate.paths(ops.arrays, self._state.crf, beam_idx)
            shape = (self.batch_shape[0],) if single else (self.batch_shape[0], paths.shape[2])
            path_weights = _validate.weights(ops.arrays, weights, shape, self._state.crf.dtype, "weights")
            return ops.paths_grad(self._state, paths, path_weights.reshape(shape[0], paths.shape[2]))


class LikelihoodForward:
    """fairseq's log-likelihood and its forward pass, kept for the backward pass.

    Made by :func:`log_likelihood_forward`.

    Attributes
    ----------
    log_likelihood : (B,) float
        ``log p_tau(targets)`` over each position's beam with the target forced in.
    beam_scores, beam_tokens : (B, T, K)
        That beam.
    target_slots : (B, T, 1) int64
        The beam slot of each target (what :meth:`CRFForward.paths_grad` takes as its path).
    forward : CRFForward
        The forward pass over it.
    """

    def __init__(self, forward: CRFForward, beam: Beam, slots: Any, log_likelihood: Any):
        self.forward = forward
        self.beam_scores, self.beam_tokens = beam
        self.target_slots = slots
        self.log_likelihood = log_likelihood

    def grad(self, grad_output: Optional[ArrayLike] = None) -> tuple[Any, Any, Any]:
        """(grad_scores (B, T, K), grad_E1, grad_E2) of ``sum_b grad_output[b] * log_likelihood[b]``."""
        ops, B = self.forward._ops, self.beam_scores.shape[0]
        with ops.call():
            return self._paths_grad(_validate.weights(ops.arrays, grad_output, (B,), self.forward._state.crf.dtype))

    def _paths_grad(self, weights: Any) -> tuple[Any, Any, Any]:
        """The gradients for validated weights (B,) in the compute dtype."""
        B = self.beam_scores.shape[0]
        return self.forward._ops.paths_grad(self.forward._state, self.target_slots, weights.reshape(B, 1))


def crf_forward(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
) -> CRFForward:
    """The forward pass of exact inference, kept: sample from it, or run its backward pass.

    Parameters
    ----------
    scores, tokens, E1, E2, lengths
        As for :func:`~viterbi_numba.viterbi_decode`.
    temperature : float
        tau > 0 of p(y) proportional to exp(S(y) / tau); a ValueError names it where it is too small for
        the dtype at these scores (the range: docs/design.md §6).

    Returns
    -------
    CRFForward
    """
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
    with ops.call():
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths, temperature_value=temperature, exact=True)
        return CRFForward(ops, ops.crf_forward(crf, _validate.inv_temperature(temperature, crf.dtype)))


def log_partition(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
) -> Any:
    """log Z_tau = log sum_y exp(S(y) / tau) over all beam paths, per sequence.

    Parameters
    ----------
    scores, tokens, E1, E2, temperature, lengths
        As for :func:`crf_forward`.

    Returns
    -------
    (B,) float array in the compute dtype.
    """
    return crf_forward(scores, tokens, E1, E2, temperature, lengths).log_z


def _draw(ops: Any, state: Any, num_samples: Any, seed: Any, uniforms: Any, replacement: Any) -> Any:
    """:func:`crf_sample`'s draw from a forward pass, inside the call."""
    num_samples = _validate.positive_int(num_samples, "num_samples")
    if not isinstance(replacement, bool):
        raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
    B, T, _ = state.crf.scores.shape
    if replacement:
        draws = _validate.draws(ops.arrays, seed, uniforms, (B, T, num_samples), "(B, T, N)", state.crf.dtype)
        return ops.crf_sample(state, num_samples, draws)
    M = num_samples + 1
    draws = _validate.draws(ops.arrays, seed, uniforms, (B, T, M, 2 * M), "(B, T, N + 1, 2 (N + 1))", state.crf.dtype)
    return ops.distinct_sample(state, num_samples, draws)


def crf_sample(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    num_samples: int = 1,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
    seed: Optional[int] = None,
    uniforms: Optional[ArrayLike] = None,
    *,
    replacement: bool = True,
) -> Union[CRFSample, DistinctSample]:
    """``num_samples`` exact samples of p(y) proportional to exp(S(y) / temperature): independent, or
    with ``replacement=False`` distinct (without replacement).

    Forward filtering, backward sampling (docs/design.md §4): one forward pass per sequence, then
    O(T K D) per sample, so N samples cost about as much as one. Each position is drawn by the inverse
    CDF (smallest i with u * total < prefix[i]), the last position first. Without replacement, a
    stochastic beam search over the same factorisation (Gumbel top-k with truncated Gumbels, Kool et al.
    2019, each node's children drawn top-down in order of their Gumbels) draws N distinct paths in the
    order a draw without replacement makes them (the first follows p, each next one p restricted to the
    paths not drawn yet), with the threshold and weights of the priority-sampling estimator (Kool et al.
    2020); where the beam has N or fewer paths, all of them.

    Parameters
    ----------
    scores, tokens, E1, E2, temperature, lengths
        As for :func:`crf_forward`.
    num_samples : int
        N >= 1.
    seed : int, optional
        Philox4x32-10 key in [0, 2**64), on the exact sampler's own stream (a fresh one when None and
        no ``uniforms``): the same seed gives the same samples for any thread count.
    uniforms : (B, T, N) float array in [0, 1), optional
        Replays given numbers: ``uniforms[b, t, n]`` draws position t of sample n (positions at or
        after the length are unused). Not with ``seed``. Without replacement (B, T, N + 1, 2 (N + 1)):
        ``uniforms[b, t, m, 2k]`` picks the k-th child the beam's place m draws at position t and
        ``uniforms[b, t, m, 2k + 1]`` makes its Gumbel; the root's Gumbel is ``uniforms[b, L - 1, 1, 0]``.
    replacement : bool
        False: N distinct samples (a :class:`DistinctSample`).

    Returns
    -------
    CRFSample, or DistinctSample without replacement
    """
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
    with ops.call():
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths, temperature_value=temperature, exact=True)
        _validate.positive_int(num_samples, "num_samples")  # before the forward pass
        inv_temp = _validate.inv_temperature(temperature, crf.dtype)
        state: Any = ops.crf_forward(crf, inv_temp)
        return _draw(ops, state, num_samples, seed, uniforms, replacement)


def marginals(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
) -> Any:
    """Node marginals p_tau(y_t = k) by forward-backward.

    Parameters
    ----------
    scores, tokens, E1, E2, temperature, lengths
        As for :func:`crf_forward`.

    Returns
    -------
    (B, T, K) float array; 0 at padded positions.
    """
    return crf_forward(scores, tokens, E1, E2, temperature, lengths).marginals()


def log_partition_grad(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
    grad_output: Optional[ArrayLike] = None,
) -> PartitionGrad:
    """log Z_tau and its gradients, by one forward-backward pass per sequence.

    The edge marginals are contracted with the table rows step by step; memory is O(K^2) per thread
    plus O(T K D) per thread for the rows.

    Parameters
    ----------
    scores, tokens, E1, E2, temperature, lengths
        As for :func:`crf_forward`.
    grad_output : (B,) float array, optional
        Weights each sequence (default all 1), as in a backward pass of autograd: the gradients are
        those of ``sum_b grad_output[b] * log Z_tau[b]``.

    Returns
    -------
    PartitionGrad
    """
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
    with ops.call():
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths, temperature_value=temperature, exact=True)
        inv_temp = _validate.inv_temperature(temperature, crf.dtype)
        weights = _validate.weights(ops.arrays, grad_output, (crf.scores.shape[0],), crf.dtype)
        state: Any = ops.crf_forward(crf, inv_temp)
        return ops.log_partition_grad(state, weights)


def crf_entropy(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
) -> Any:
    """The entropy H(p_tau) = -sum_y p_tau(y) log p_tau(y) over all beam paths, per sequence.

    Summed along the backward factorisation p(y) = p(y_{L-1}) prod_t p(y_{t-1} | y_t) as a sum of
    conditional entropies (docs/design.md §4): no cancellation between log Z and E[S] / tau, and H >= 0
    up to rounding. One forward pass, with the sweep of expectations inside it.

    Parameters
    ----------
    scores, tokens, E1, E2, temperature, lengths
        As for :func:`crf_forward`.

    Returns
    -------
    (B,) float array in the compute dtype.
    """
    return _entropy(scores, tokens, E1, E2, temperature, lengths, None, False).entropy


def crf_entropy_grad(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
    grad_output: Optional[ArrayLike] = None,
) -> EntropyGrad:
    """H(p_tau) and its gradients with respect to the beam scores and the tables (an entropy bonus).

    dH / d potential = -Cov_p(feature, log p(y)) / tau for every node and edge feature, from a forward
    and a backward sweep of expectations (docs/design.md §4); the edge terms are contracted with the
    table rows step by step, never kept as a (T, K, K) array.

    Parameters
    ----------
    scores, tokens, E1, E2, temperature, lengths
        As for :func:`crf_forward`.
    grad_output : (B,) float array, optional
        Weights each sequence (default all 1): the gradients are those of ``sum_b grad_output[b] * H[b]``.

    Returns
    -------
    EntropyGrad
    """
    return _entropy(scores, tokens, E1, E2, temperature, lengths, grad_output, True)


def _entropy(
    scores: Any, tokens: Any, E1: Any, E2: Any, temperature: Any, lengths: Any, grad_output: Any, want_grads: bool
) -> EntropyGrad:
    """The entropy (and, with ``want_grads``, its gradients) from raw inputs: the forward pass and the
    forward sweep of expectations run on one set of transition blocks (``ops.forward_log_ratio``)."""
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2)
    with ops.call():
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths, temperature_value=temperature, exact=True)
        inv_temp = _validate.inv_temperature(temperature, crf.dtype)
        weights = _validate.weights(ops.arrays, grad_output, (crf.scores.shape[0],), crf.dtype) if want_grads else None
        passes: Any = ops.forward_log_ratio(crf, None, inv_temp, 1.0)
        state, _, prefix_ratios = passes
        return ops.entropy(state, weights, prefix_ratios)


def _kl(
    scores_p: Any,
    scores_q: Any,
    tokens: Any,
    E1_p: Any,
    E2_p: Any,
    E1_q: Any,
    E2_q: Any,
    temperature: Any,
    lengths: Any,
    grad_output: Any,
    finish: Callable[[Any, Any, Any, Any, Any], Any],
    own: float = 1.0,
) -> Any:
    """Validates two CRFs on one beam, runs both forward passes with the forward sweep of E_p[own log p -
    log q] (``ops.forward_log_ratio``) and returns ``finish(ops, p_state, q_state, prefix_ratios, weights)``
    inside the call (weights: the validated ``grad_output``, all 1 when None)."""
    ops = backend_of(scores_p=scores_p, scores_q=scores_q, tokens=tokens, E1_p=E1_p, E2_p=E2_p, E1_q=E1_q, E2_q=E2_q)
    with ops.call():
        p, q = _validate.kl_crfs(ops.arrays, scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, lengths, temperature)
        inv_temp = _validate.inv_temperature(temperature, p.dtype)
        weights = _validate.weights(ops.arrays, grad_output, (p.scores.shape[0],), p.dtype)
        p_state, q_state, prefix_ratios = ops.forward_log_ratio(p, q, inv_temp, own)
        return finish(ops, p_state, q_state, prefix_ratios, weights)


def crf_kl(
    scores_p: ArrayLike,
    scores_q: ArrayLike,
    tokens: ArrayLike,
    E1_p: ArrayLike,
    E2_p: ArrayLike,
    E1_q: ArrayLike,
    E2_q: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
) -> Any:
    """KL(p_tau || q_tau) = E_p[log p(y) - log q(y)] of two beam CRFs on the same beam, per sequence.

    p (the policy) and q (a reference, such as a frozen copy) share the beam ``tokens`` and ``lengths``;
    each has its own beam scores and tables (q's emissions gathered at p's beam tokens:
    :func:`~viterbi_numba.gather_beam`). For two models whose top-K beams differ this is the
    KL of the two CRFs restricted to p's beam. Summed along the backward factorisation as a sum of
    conditional KL divergences (docs/design.md §4): >= 0 up to rounding, 0 for q = p. +inf where q gives
    probability 0 (a -inf slot) to a path p can take.

    Parameters
    ----------
    scores_p, scores_q : (B, T, K) float arrays
        Each CRF's beam scores.
    tokens : (B, T, K) int array
        The beam's token ids, in [0, V) and in [0, V_q) (rows of both CRFs' tables).
    E1_p, E2_p : (V, D) float arrays
        p's tables.
    E1_q, E2_q : (V_q, D_q) float arrays
        q's tables.
    temperature, lengths
        As for :func:`crf_forward` (one temperature for both).

    Returns
    -------
    (B,) float array in the compute dtype.
    """
    return _kl(
        scores_p,
        scores_q,
        tokens,
        E1_p,
        E2_p,
        E1_q,
        E2_q,
        temperature,
        lengths,
        None,
        lambda ops, p, q, sums, _: ops.kl(p, q, None, sums).kl,
    )


def crf_kl_grad(
    scores_p: ArrayLike,
    scores_q: ArrayLike,
    tokens: ArrayLike,
    E1_p: ArrayLike,
    E2_p: ArrayLike,
    E1_q: ArrayLike,
    E2_q: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
    grad_output: Optional[ArrayLike] = None,
) -> KLGrad:
    """KL(p_tau || q_tau) and the gradients of ``sum_b grad_output[b] * KL[b]`` with respect to both CRFs.

    d KL / d p's potentials = Cov_p(feature, log p - log q) / tau; d KL / d q's potentials =
    (q's marginals - p's marginals) / tau. Edge terms are contracted with the table rows step by step.

    Parameters
    ----------
    scores_p, scores_q, tokens, E1_p, E2_p, E1_q, E2_q, temperature, lengths
        As for :func:`crf_kl`.
    grad_output : (B,) float array, optional
        Default all 1.

    Returns
    -------
    KLGrad
    """
    return _kl(
        scores_p,
        scores_q,
        tokens,
        E1_p,
        E2_p,
        E1_q,
        E2_q,
        temperature,
        lengths,
        grad_output,
        lambda ops, p, q, sums, weights: ops.kl(p, q, weights, sums),
    )


def crf_cross_entropy(
    scores_p: ArrayLike,
    scores_q: ArrayLike,
    tokens: ArrayLike,
    E1_p: ArrayLike,
    E2_p: ArrayLike,
    E1_q: ArrayLike,
    E2_q: ArrayLike,
    temperature: float = 1.0,
    lengths: Optional[ArrayLike] = None,
) -> Any:
    """The cross-entropy -E_p[log q(y)] = H(p) + KL(p || q) of two beam CRFs on the same beam.

    Parameters and returns as for :func:`crf_kl`.
    """
    return _kl(
        scores_p,
        scores_q,
        tokens,
        E1_p,
        E2_p,
        E1_q,
        E2_q,
        temperature,
        lengths,
        None,
        lambda ops, p, q, sums, _: ops.cross_entropy(p, q, sums),
        own=0.0,
    )


def sequence_score(
    scores: ArrayLike,
    tokens: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    beam_idx: ArrayLike,
    lengths: Optional[ArrayLike] = None,
) -> Any:
    """S(y) of given beam paths.

    Parameters
    ----------
    scores, tokens, E1, E2, lengths
        As for :func:`~viterbi_numba.viterbi_decode`.
    beam_idx : (B, T) or (B, T, N) int array
        Beam paths; entries at or after a sequence's length are ignored (they may be ``PAD``).

    Returns
    -------
    (B,) or (B, N) float array
        Summed in float64 on the CPU (compensated sums in the compute dtype on the GPU), returned in
        the compute dtype.
    """
    ops = backend_of(scores=scores, tokens=tokens, E1=E1, E2=E2, beam_idx=beam_idx)
    with ops.call():
        crf = _validate.beam_crf(ops.arrays, scores, tokens, E1, E2, lengths)
        paths, single = _validate.paths(ops.arrays, crf, beam_idx)
        out = ops.sequence_score(crf, paths)
    return out.reshape(out.shape[0]) if single else out


def log_likelihood_forward(
    emissions: ArrayLike,
    targets: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    k: int,
    lengths: Optional[ArrayLike] = None,
    temperature: float = 1.0,
) -> LikelihoodForward:
    """:func:`log_likelihood` with its forward pass kept for the backward pass (:meth:`LikelihoodForward.grad`).

    Parameters
    ----------
    emissions, targets, E1, E2, k, lengths, temperature
        As for :func:`log_likelihood`.

    Returns
    -------
    LikelihoodForward
    """
    ops = backend_of(emissions=emissions, targets=targets, E1=E1, E2=E2)
    with ops.call():
        return _likelihood_forward(ops, emissions, targets, E1, E2, k, lengths, temperature)


def _likelihood_forward(
    ops: Any, emissions: Any, targets: Any, E1: Any, E2: Any, k: Any, lengths: Any, temperature: Any
) -> LikelihoodForward:
    emissions, k, forced, lengths = _validate.likelihood(ops.arrays, emissions, targets, E1, E2, k, lengths)
    beam = ops.topk_beam(emissions, k, forced)
    crf = _validate.beam_crf(
        ops.arrays,
        beam.scores,
        beam.tokens,
        E1,
        E2,
        lengths,
        tokens_checked=True,
        lengths_checked=True,
        temperature_value=temperature,
        exact=True,
        scores_name="emissions",
    )
    forward = CRFForward(ops, ops.crf_forward(crf, _validate.inv_temperature(temperature, crf.dtype)))
    slots = ops.target_slots(crf, forced)
    log_likelihood = ops.path_log_prob(forward._state, slots).reshape(crf.scores.shape[0])
    return LikelihoodForward(forward, beam, slots, log_likelihood)


def log_likelihood(
    emissions: ArrayLike,
    targets: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    k: int,
    lengths: Optional[ArrayLike] = None,
    temperature: float = 1.0,
) -> Any:
    """log p_tau(targets) under the beam CRF, fairseq ``DynamicCRF.forward`` parity.

    Each position's beam is its top k tokens with the target forced in (at its own score, replacing
    the k-th best if needed); the result is S(targets) / tau - log Z_tau over that beam. This scores
    sequences sampled under an older policy for a PPO ratio.

    Parameters
    ----------
    emissions : (B, T, V) float array
    targets : (B, T) int array
        Token ids in [0, V) before each sequence's length; anything after it (such as the samplers'
        ``PAD``) is ignored.
    E1, E2 : (V, D) float arrays
    k : int
        Beam size.
    lengths : (B,) int array, optional
        Positions at or after ``lengths[b]`` are ignored (fairseq's prefix masks).
    temperature : float

    Returns
    -------
    (B,) float array
    """
    return log_likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature).log_likelihood


def log_likelihood_grad(
    emissions: ArrayLike,
    targets: ArrayLike,
    E1: ArrayLike,
    E2: ArrayLike,
    k: int,
    lengths: Optional[ArrayLike] = None,
    temperature: float = 1.0,
    grad_output: Optional[ArrayLike] = None,
) -> LikelihoodGrad:
    """:func:`log_likelihood` and the gradients of ``sum_b grad_output[b] * log_likelihood[b]``.

    Parameters
    ----------
    emissions, targets, E1, E2, k, lengths, temperature
        As for :func:`log_likelihood`.
    grad_output : (B,) float array, optional
        Default all 1.

    Returns
    -------
    LikelihoodGrad
        Gradients with respect to the beam scores (hence the emissions) and the tables.
    """
    ops = backend_of(emissions=emissions, targets=targets, E1=E1, E2=E2)
    with ops.call():
        likelihood = _likelihood_forward(ops, emissions, targets, E1, E2, k, lengths, temperature)
        dtype = likelihood.forward._state.crf.dtype
        weights = _validate.weights(ops.arrays, grad_output, (likelihood.beam_scores.shape[0],), dtype)
        grads = likelihood._paths_grad(weights)
        return LikelihoodGrad(likelihood.log_likelihood, likelihood.beam_scores, likelihood.beam_tokens, *grads)
