"""The result types of every public function (docs/design.md §2).

Arrays are of the inputs' kind: NumPy for NumPy inputs; for GPU inputs, arrays of the caller's library
(torch in, torch out; CuPy in, CuPy out; otherwise numba device arrays). Shapes use B sequences, T
positions, K beam slots, V tokens, D low-rank dimension and N samples; positions at or after a
sequence's length hold :data:`PAD` (indices and token ids) and 0 (scores and probabilities).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._portable import PAD

__all__ = [
    "PAD",
    "Beam",
    "ViterbiResult",
    "NBestResult",
    "StochasticViterbiResult",
    "SamplerGrad",
    "CRFSample",
    "DistinctSample",
    "PartitionGrad",
    "LikelihoodGrad",
    "EntropyGrad",
    "KLGrad",
]


class Beam(NamedTuple):
    """Top-K beam of :func:`~viterbi_numba.topk_beam`.

    Attributes
    ----------
    scores : (B, T, K) float
        The K best scores of each position, best first.
    tokens : (B, T, K) int64
        Their token ids.
    """

    scores: Any
    tokens: Any


class ViterbiResult(NamedTuple):
    """Best path per sequence, from :func:`~viterbi_numba.viterbi_decode`.

    Attributes
    ----------
    beam_idx : (B, T) int64
        Beam slot of the path at every position.
    tokens : (B, T) int64
        Token id of the path at every position.
    score : (B,) float
        Total path score S(y).
    step_scores : (B, T) float
        Per-step increments of S(y): ``s[0, y_0]``, then ``s[t, y_t] + trans[t-1, y_{t-1}, y_t]``; they sum
        to ``score`` up to rounding. With ``step_scores="fairseq"``: fairseq's ``forward_decoder`` values.
    """

    beam_idx: Any
    tokens: Any
    score: Any
    step_scores: Any


class NBestResult(NamedTuple):
    """The n best distinct paths per sequence, from :func:`~viterbi_numba.viterbi_nbest`, best first.

    Attributes
    ----------
    beam_idx : (B, T, n) int64
        Beam slot of path k at every position (``PAD`` after the length, and for k >= ``count``).
    tokens : (B, T, n) int64
        Token id of path k at every position (``PAD`` likewise).
    score : (B, n) float
        S(y) of each path, non-increasing in k (-inf for k >= ``count``).
    count : (B,) int64
        Paths found: n, or fewer when the beam has fewer paths of finite score.
    """

    beam_idx: Any
    tokens: Any
    score: Any
    count: Any


class StochasticViterbiResult(NamedTuple):
    """Output of :func:`~viterbi_numba.stochastic_viterbi`; the first three fields are the write-up's.

    Shapes are given for ``num_samples=None`` / ``num_samples=N``.

    Attributes
    ----------
    beam_probs : (B, T, K) / (B, T, K, N) float
        Softmax of each step's untempered path scores (not the probability of the sampled path).
    beam_idx : (B, T, 1) / (B, T, N) int64
        Beam slots of the sampled path(s).
    tokens : (B, T) / (B, T, N) int64
        Token ids of the sampled path(s).
    path_scores : (B, T, K) / (B, T, K, N) float
        Cumulative score of every state at every step.
    backpointers : (B, T-1, K) / (B, T-1, K, N) int64
        The predecessor drawn for state j at step t+1.
    score : (B,) / (B, N) float
        The total score S(y) of each sampled path.
    """

    beam_probs: Any
    beam_idx: Any
    tokens: Any
    path_scores: Any
    backpointers: Any
    score: Any


class SamplerGrad(NamedTuple):
    """Output of :func:`~viterbi_numba.stochastic_viterbi_backward`.

    Attributes
    ----------
    grad_scores : (B, T, K) float
        Gradient with respect to the beam scores, summed over the chains.
    grad_E1, grad_E2 : (V, D) float
        Gradients with respect to the tables.
    """

    grad_scores: Any
    grad_E1: Any
    grad_E2: Any


class CRFSample(NamedTuple):
    """Output of :func:`~viterbi_numba.crf_sample`: N exact samples per sequence, N last.

    Attributes
    ----------
    beam_idx : (B, T, N) int64
        Beam slot per position.
    tokens : (B, T, N) int64
        Token id per position.
    log_prob : (B, N) float
        ``log p_tau(y) = S(y) / tau - log Z_tau``.
    """

    beam_idx: Any
    tokens: Any
    log_prob: Any


class DistinctSample(NamedTuple):
    """Output of :func:`~viterbi_numba.crf_sample` with ``replacement=False``: N distinct exact samples per
    sequence, drawn without replacement, in the order drawn (docs/design.md §4).

    Attributes
    ----------
    beam_idx, tokens : (B, T, N) int64
        As in :class:`CRFSample`; ``PAD`` for the samples beyond ``count``.
    log_prob : (B, N) float
        ``log p_tau(y)`` (-inf beyond ``count``).
    perturbed : (B, N) float
        Each sample's Gumbel-perturbed log-probability, decreasing in n.
    kappa : (B,) float
        The (N+1)-th perturbed value, the threshold of the estimators (-inf when the beam has N or fewer
        paths: then every path was drawn).
    weights : (B, N) float
        ``p(y) / q(y)``, q(y) = 1 - exp(-exp(log p(y) - kappa)) the probability that y is drawn given kappa:
        ``sum_n weights[b, n] * f(y_bn)`` is an unbiased estimate of E_p[f] (0 beyond ``count``).
    count : (B,) int64
        Samples drawn: N, or every path where the beam has fewer.
    """

    beam_idx: Any
    tokens: Any
    log_prob: Any
    perturbed: Any
    kappa: Any
    weights: Any
    count: Any


class PartitionGrad(NamedTuple):
    """Output of :func:`~viterbi_numba.log_partition_grad`.

    Attributes
    ----------
    log_z : (B,) float
        ``log Z_tau`` per sequence.
    marginals : (B, T, K) float
        Node marginals ``p_tau(y_t = k)``.
    grad_scores : (B, T, K) float
        ``grad_output[b] * marginals / tau``.
    grad_E1, grad_E2 : (V, D) float
        Gradients of ``sum_b grad_output[b] * log Z_tau[b]`` with respect to the tables.
    """

    log_z: Any
    marginals: Any
    grad_scores: Any
    grad_E1: Any
    grad_E2: Any


class LikelihoodGrad(NamedTuple):
    """Output of :func:`~viterbi_numba.log_likelihood_grad`.

    The gradient with respect to ``emissions`` is zero except at the beam tokens, where it is
    ``grad_scores``: ``grad_emissions[b, t, beam_tokens[b, t, k]] = grad_scores[b, t, k]``.

    Attributes
    ----------
    log_likelihood : (B,) float
        ``log p_tau(targets)``.
    beam_scores, beam_tokens : (B, T, K)
        The beam the likelihood was computed on, each target in it.
    grad_scores : (B, T, K) float
        Gradient with respect to the beam scores.
    grad_E1, grad_E2 : (V, D) float
        Gradients with respect to the tables.
    """

    log_likelihood: Any
    beam_scores: Any
    beam_tokens: Any
    grad_scores: Any
    grad_E1: Any
    grad_E2: Any


class EntropyGrad(NamedTuple):
    """Output of :func:`~viterbi_numba.crf_entropy_grad`.

    Attributes
    ----------
    entropy : (B,) float
        ``H(p_tau) = -E[log p_tau(y)]`` per sequence.
    grad_scores : (B, T, K) float
        Gradient of ``sum_b grad_output[b] * H[b]`` with respect to the beam scores (0 at padded positions).
    grad_E1, grad_E2 : (V, D) float
        Its gradients with respect to the tables.
    """

    entropy: Any
    grad_scores: Any
    grad_E1: Any
    grad_E2: Any


class KLGrad(NamedTuple):
    """Output of :func:`~viterbi_numba.crf_kl_grad`: KL(p || q) and the gradients of
    ``sum_b grad_output[b] * KL[b]`` with respect to both CRFs.

    Attributes
    ----------
    kl : (B,) float
        ``KL(p_tau || q_tau) = E_p[log p(y) - log q(y)]`` per sequence.
    grad_scores_p, grad_scores_q : (B, T, K) float
        With respect to each CRF's beam scores.
    grad_E1_p, grad_E2_p : (V, D) float
        With respect to p's tables.
    grad_E1_q, grad_E2_q : (V_q, D_q) float
        With respect to q's tables.
    """

    kl: Any
    grad_scores_p: Any
    grad_E1_p: Any
    grad_E2_p: Any
    grad_scores_q: Any
    grad_E1_q: Any
    grad_E2_q: Any
