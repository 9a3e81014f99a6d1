"""Round trips: every output the API takes back somewhere is accepted there, padded or not.

One row per trip (``ROUND_TRIPS``): a function of (problem, ``dev``) that makes an output and feeds it
back, and checks what comes out. ``dev`` moves NumPy arrays to the target (identity on the CPU,
``cuda.to_device`` in tests/gpu), ``host`` brings results back. The CPU tests (tests/test_round_trips.py)
and the GPU suite (tests/gpu/test_gpu_kernels.py) run the same rows.
"""

from types import SimpleNamespace

import numpy as np

import viterbi_numba as vn


def host(value):
    return value.copy_to_host() if hasattr(value, "copy_to_host") else np.asarray(value)


def problem(padded: bool, seed: int = 0) -> SimpleNamespace:
    """Emissions (B, T, V), their top-K beam and tables, and lengths (None or with padding)."""
    rng = np.random.default_rng(seed)
    B, T, V, K, D = 2, 5, 12, 4, 3
    emissions = rng.standard_normal((B, T, V))
    beam = vn.topk_beam(emissions, K)
    E1, E2 = rng.standard_normal((V, D)) * 0.5, rng.standard_normal((V, D)) * 0.5
    lengths = np.array([T, 2]) if padded else None
    return SimpleNamespace(
        emissions=emissions, scores=beam.scores, tokens=beam.tokens, E1=E1, E2=E2, K=K, lengths=lengths
    )


def _lengths(p, dev):
    return None if p.lengths is None else dev(p.lengths)


def _beam(p, dev):
    return dev(p.scores), dev(p.tokens), dev(p.E1), dev(p.E2)


def sample_tokens_rescored(p, dev):
    """crf_sample's tokens (PAD after each length) as log_likelihood's targets: the PPO ratio step. At
    temperature 1 a sampled token is in its beam already, so the rescored log p is the sample's."""
    draws = vn.crf_sample(*_beam(p, dev), 3, lengths=_lengths(p, dev), seed=1)
    tokens = host(draws.tokens)
    if p.lengths is not None:
        assert (tokens[1, 2:] == vn.PAD).all()
    for n in range(3):
        rescored = vn.log_likelihood(
            dev(p.emissions), dev(np.ascontiguousarray(tokens[:, :, n])), dev(p.E1), dev(p.E2), p.K, _lengths(p, dev)
        )
        np.testing.assert_allclose(host(rescored), host(draws.log_prob)[:, n], rtol=1e-6, atol=1e-9)


def sample_paths_scored(p, dev):
    """crf_sample's beam_idx (PAD after each length) as sequence_score's and paths_grad's paths."""
    forward = vn.crf_forward(*_beam(p, dev), lengths=_lengths(p, dev))
    draws = forward.sample(2, seed=2)
    scores = host(vn.sequence_score(*_beam(p, dev), draws.beam_idx, _lengths(p, dev)))
    log_z = host(forward.log_z)
    np.testing.assert_allclose(scores - log_z[:, None], host(draws.log_prob), rtol=1e-6, atol=1e-9)
    grads = forward.paths_grad(draws.beam_idx)
    assert all(np.isfinite(host(g)).all() for g in grads)


def viterbi_path_rescored(p, dev):
    """viterbi_decode's tokens and beam_idx as log_likelihood's targets and sequence_score's paths."""
    best = vn.viterbi_decode(*_beam(p, dev), lengths=_lengths(p, dev))
    score = host(vn.sequence_score(*_beam(p, dev), best.beam_idx, _lengths(p, dev)))
    np.testing.assert_allclose(score, host(best.score), rtol=1e-6, atol=1e-9)
    rescored = vn.log_likelihood(dev(p.emissions), best.tokens, dev(p.E1), dev(p.E2), p.K, _lengths(p, dev))
    assert np.isfinite(host(rescored)).all()


def sampler_backward(p, dev):
    """stochastic_viterbi's sample (one chain and N) as stochastic_viterbi_backward's."""
    for num_samples in (None, 2):
        sample = vn.stochastic_viterbi(*_beam(p, dev), num_samples, lengths=_lengths(p, dev), seed=3)
        grad = vn.stochastic_viterbi_backward(
            dev(np.ones(host(sample.beam_probs).shape)), sample, dev(p.tokens), dev(p.E1), dev(p.E2), _lengths(p, dev)
        )
        assert all(np.isfinite(host(g)).all() for g in grad)


def tokens_forced(p, dev):
    """Sampled tokens (PAD after each length) as topk_beam's force_tokens: each is in its beam, and
    nothing is forced where PAD stands."""
    draws = vn.crf_sample(*_beam(p, dev), 1, lengths=_lengths(p, dev), seed=4)
    forced = np.ascontiguousarray(host(draws.tokens)[:, :, 0])
    beam = host(vn.topk_beam(dev(p.emissions), p.K, dev(forced)).tokens)
    real = forced != vn.PAD
    assert (beam == forced[:, :, None]).any(axis=2)[real].all()
    np.testing.assert_array_equal(beam[~real], p.tokens[~real])


def likelihood_beam_reused(p, dev):
    """log_likelihood_forward's beam as crf_forward's: the same log Z."""
    likelihood = vn.log_likelihood_forward(
        dev(p.emissions), dev(p.tokens[:, :, 0].copy()), dev(p.E1), dev(p.E2), p.K, _lengths(p, dev)
    )
    again = vn.crf_forward(
        likelihood.beam_scores, likelihood.beam_tokens, dev(p.E1), dev(p.E2), lengths=_lengths(p, dev)
    )
    np.testing.assert_allclose(host(again.log_z), host(likelihood.forward.log_z), rtol=1e-12)


ROUND_TRIPS = {
    trip.__name__: trip
    for trip in (
        sample_tokens_rescored,
        sample_paths_scored,
        viterbi_path_rescored,
        sampler_backward,
        tokens_forced,
        likelihood_beam_reused,
    )
}
