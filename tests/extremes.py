"""Extreme values: each case either computes a finite, correct result or raises a ValueError naming the
argument (docs/design.md §6, "Range").

One row per case (``EXTREMES``): a function of ``dev`` (identity on the CPU, ``cuda.to_device`` in
tests/gpu) that makes the inputs, calls the API and checks what comes out, or that the call raises. The
CPU tests (tests/test_extremes.py) and the GPU suite (tests/gpu/test_gpu_kernels.py) run the same rows.
"""

import itertools

import numpy as np
import pytest
import reference
from round_trips import host

import viterbi_numba as vn

B, T, V, K, D = 2, 5, 12, 4, 3
LENGTHS = np.array([T, 3])


def problem(dtype=np.float64, table_scale=1.0):
    """A small padded problem: beam scores, tokens (B, T, K), tables (V, D) in ``dtype``."""
    rng = np.random.default_rng(7)
    emissions = rng.standard_normal((B, T, V))
    beam = vn.topk_beam(emissions, K)
    E1 = rng.standard_normal((V, D)) * 0.5 * table_scale
    E2 = rng.standard_normal((V, D)) * 0.5 * table_scale
    return emissions.astype(dtype), beam.scores.astype(dtype), beam.tokens, E1.astype(dtype), E2.astype(dtype)


def _beam(dev, dtype=np.float64, table_scale=1.0):
    _, scores, tokens, E1, E2 = problem(dtype, table_scale)
    return [dev(a) for a in (scores, tokens, E1, E2)]


def exact_log_probs(scores, tokens, E1, E2, b, length, temperature):
    """{path: log p_tau(path)} of sequence b of ``length`` by enumeration, from score differences to the
    best path, so that a tiny temperature loses no precision to S/tau - log Z (also benchmarks/extremes.py)."""
    trans = reference.transitions(tokens, E1, E2)
    paths = list(itertools.product(range(scores.shape[2]), repeat=int(length)))
    path_scores = np.array([reference.path_score(scores.astype(np.float64), trans, b, y) for y in paths])
    logits = (path_scores - path_scores.max()) / temperature
    top = logits.max()
    log_z = top + np.log(np.exp(logits - top).sum())
    return dict(zip(paths, logits - log_z))


def _raises(match, call):
    with pytest.raises(ValueError, match=match):
        call()


def _greedy_sampler(dtype, temperature):
    """At a tiny temperature every predecessor draw is the argmax, so the write-up's sampler follows the
    Viterbi recursion and ends on the Viterbi path."""

    def case(dev):
        beam = _beam(dev, dtype)
        lengths = dev(LENGTHS)
        sample = vn.stochastic_viterbi(*beam, lengths=lengths, temperature=temperature, seed=3)
        best = vn.viterbi_decode(*beam, lengths=lengths)
        assert np.isfinite(host(sample.beam_probs)).all() and np.isfinite(host(sample.score)).all()
        np.testing.assert_array_equal(host(sample.beam_idx)[:, :, 0], host(best.beam_idx))

    return case


def _exact_refused(dtype, temperature, match):
    """Every exact-inference call refuses a temperature where its log-probabilities would lose their
    precision, naming it."""

    def case(dev):
        beam = _beam(dev, dtype)
        emissions, _, _, E1, E2 = problem(dtype)
        targets = dev(np.zeros((B, T), np.int64))
        calls = [
            lambda: vn.crf_sample(*beam, temperature=temperature, seed=1),
            lambda: vn.log_partition(*beam, temperature=temperature),
            lambda: vn.marginals(*beam, temperature=temperature),
            lambda: vn.log_partition_grad(*beam, temperature=temperature),
            lambda: vn.crf_forward(*beam, temperature=temperature),
            lambda: vn.log_likelihood(dev(emissions), targets, dev(E1), dev(E2), K, temperature=temperature),
        ]
        for call in calls:
            _raises(match, call)

    return case


def _exact_accepted(dtype, temperature, atol):
    """Near the edge of the range, exact samples' log-probabilities still match enumeration, and none
    is above 0 by more than ``atol``."""

    def case(dev):
        _, scores, tokens, E1, E2 = problem(dtype)
        draws = vn.crf_sample(*_beam(dev, dtype), 4, temperature=temperature, lengths=dev(LENGTHS), seed=5)
        beam_idx, log_prob = host(draws.beam_idx), host(draws.log_prob)
        assert (log_prob <= atol).all(), log_prob
        for b in range(B):
            want = exact_log_probs(scores, tokens, E1, E2, b, LENGTHS[b], temperature)
            for n in range(4):
                path = tuple(int(y) for y in beam_idx[b, : LENGTHS[b], n])
                assert abs(log_prob[b, n] - want[path]) <= atol, (b, n, log_prob[b, n], want[path])

    return case


def tiny_temperature_refused_without_magnitudes(dev):
    """A beam of one slot and zero tables (M = 0): 1/tau = inf in float32 is still refused, by name."""
    scores = np.zeros((B, T, 1), np.float32)
    beam = [dev(a) for a in (scores, np.zeros((B, T, 1), np.int64), np.zeros((V, D), np.float32))]
    match = "temperature 1e-39 is too small for float32: 1 / temperature overflows it"
    _raises(match, lambda: vn.crf_sample(*beam, beam[2], temperature=1e-39, seed=1))
    _raises(match, lambda: vn.stochastic_viterbi(*beam, beam[2], temperature=1e-39, seed=1))


def big_tables_in_float32_refused(dev):
    """Finite tables whose products overflow float32 (entries about 1e20) are refused by every call."""
    beam = _beam(dev, np.float32, table_scale=1e20)
    match = "E1, E2: transition scores"
    _raises(match, lambda: vn.viterbi_decode(*beam))
    _raises(match, lambda: vn.stochastic_viterbi(*beam, seed=1))
    _raises(match, lambda: vn.sequence_score(*beam, dev(np.zeros((B, T), np.int64))))
    _raises(match, lambda: vn.crf_sample(*beam, seed=1))


def big_tables_in_float64_decode(dev):
    """The same tables in float64 decode exactly (the reference's Viterbi), with finite step scores;
    exact inference refuses them, since S(y) is far beyond where log-probabilities keep precision."""
    _, scores, tokens, E1, E2 = problem(np.float64, table_scale=1e20)
    best = vn.viterbi_decode(*_beam(dev, np.float64, 1e20), lengths=dev(LENGTHS))
    want = reference.viterbi(scores, tokens, E1, E2, LENGTHS)
    np.testing.assert_array_equal(host(best.beam_idx), want[0])
    np.testing.assert_allclose(host(best.score), want[2], rtol=1e-12)
    assert np.isfinite(host(best.step_scores)).all()
    _raises("too large for exact inference in float64", lambda: vn.crf_sample(*_beam(dev, np.float64, 1e20), seed=1))


def score_spread_beyond_float32_refused(dev):
    """A finite beam score so far below the best that a few steps of it overflow float32."""
    _, scores, tokens, E1, E2 = problem(np.float32)
    scores[0, 1, 3] = -1e37
    beam = [dev(a) for a in (scores, tokens, E1, E2)]
    _raises("scores: the best and worst finite scores of a position are 1e", lambda: vn.viterbi_decode(*beam))


def emission_spread_named_in_log_likelihood(dev):
    """log_likelihood forces a target with a finite but extreme emission into its beam: the error names
    the emissions."""
    emissions, _, _, E1, E2 = problem(np.float32)
    emissions[1, 2, 5] = -1e37
    targets = np.zeros((B, T), np.int64)
    targets[1, 2] = 5
    call = lambda: vn.log_likelihood(dev(emissions), dev(targets), dev(E1), dev(E2), K)  # noqa: E731
    _raises("emissions: the best and worst finite scores", call)


def minus_infinity_slots_give_finite_step_scores(dev):
    """-inf beam slots that the best path avoids put no -inf, inf or NaN into step_scores, in either
    mode; fairseq's still add up to the path score."""
    _, scores, tokens, E1, E2 = problem()
    scores[:, :, K - 1] = -np.inf
    scores[0, 2, :2] = -np.inf  # position 2 of sequence 0 keeps one live slot
    beam = [dev(a) for a in (scores, tokens, E1, E2)]
    for mode in ("increments", "fairseq"):
        best = vn.viterbi_decode(*beam, lengths=dev(LENGTHS), step_scores=mode)
        steps, score = host(best.step_scores), host(best.score)
        assert np.isfinite(steps).all(), (mode, steps)
        np.testing.assert_allclose(steps.sum(axis=1), score, rtol=1e-12)
    increments = reference.step_increments(scores, tokens, E1, E2, host(best.beam_idx), LENGTHS)
    np.testing.assert_allclose(host(vn.viterbi_decode(*beam, lengths=dev(LENGTHS)).step_scores), increments)


EXTREMES = {
    "tau 1e-39 in float32 is refused": lambda dev: _raises(
        "temperature 1e-39 is too small for float32: 1 / temperature overflows it",
        lambda: vn.stochastic_viterbi(*_beam(dev, np.float32), temperature=1e-39, seed=1),
    ),
    "tau 1e-36 in float32 is refused": lambda dev: _raises(  # 1/tau is finite, M/tau is not
        "temperature 1e-36 is too small for these inputs in float32: T \\(score spread",
        lambda: vn.stochastic_viterbi(*_beam(dev, np.float32), temperature=1e-36, seed=1),
    ),
    "tau 1e-39 in float64 samples greedily": _greedy_sampler(np.float64, 1e-39),
    "tau 1e-30 in float32 samples greedily": _greedy_sampler(np.float32, 1e-30),
    "tau 1e-30 exact in float32 is refused": _exact_refused(
        np.float32, 1e-30, "temperature 1e-30 is too small for exact inference in float32"
    ),
    "tau 1e-30 exact in float64 is refused": _exact_refused(
        np.float64, 1e-30, "temperature 1e-30 is too small for exact inference in float64"
    ),
    "tau 1e-39 in float32 is refused where M = 0": tiny_temperature_refused_without_magnitudes,
    "tau 3e-4 exact in float32 is accurate": _exact_accepted(np.float32, 3e-4, 1e-2),
    "tau 1e-10 exact in float64 is accurate": _exact_accepted(np.float64, 1e-10, 1e-2),
    "tables of 1e20 in float32 are refused": big_tables_in_float32_refused,
    "tables of 1e20 in float64 decode": big_tables_in_float64_decode,
    "a score spread beyond float32 is refused": score_spread_beyond_float32_refused,
    "an emission spread is named in log_likelihood": emission_spread_named_in_log_likelihood,
    "-inf slots give finite step scores": minus_infinity_slots_give_finite_step_scores,
}
