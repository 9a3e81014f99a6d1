"""Every bad input gets a ValueError or TypeError that names the argument."""

import numpy as np
import pytest
from conftest import make_problem

from viterbi_numba import (
    crf_entropy,
    crf_entropy_grad,
    crf_forward,
    crf_sample,
    log_likelihood,
    log_likelihood_grad,
    log_partition,
    log_partition_grad,
    marginals,
    sequence_score,
    stochastic_viterbi,
    stochastic_viterbi_backward,
    topk_beam,
    viterbi_decode,
    viterbi_nbest,
)


@pytest.fixture
def problem(rng):
    return make_problem(rng, 2, 5, 4, V=10)


def _sv(problem, **changes):
    scores, tokens, E1, E2 = problem
    kwargs = dict(scores=scores, tokens=tokens, E1=E1, E2=E2)
    kwargs.update(changes)
    return stochastic_viterbi(**kwargs)


def _vd(problem, **changes):
    scores, tokens, E1, E2 = problem
    kwargs = dict(scores=scores, tokens=tokens, E1=E1, E2=E2)
    kwargs.update(changes)
    return viterbi_decode(**kwargs)


def _on_beam(function):
    """A call of ``function(scores, tokens, E1, E2, **changes)`` on the fixture's problem."""

    def call(problem, **changes):
        scores, tokens, E1, E2 = problem
        kwargs = dict(scores=scores, tokens=tokens, E1=E1, E2=E2)
        kwargs.update(changes)
        return function(**kwargs)

    call.__name__ = function.__name__
    return call


def _score_paths(scores, tokens, E1, E2, **kwargs):
    return sequence_score(scores, tokens, E1, E2, np.zeros(scores.shape[:2], np.int64), **kwargs)


def _nbest(scores, tokens, E1, E2, **kwargs):
    return viterbi_nbest(scores, tokens, E1, E2, 3, **kwargs)


def _distinct(scores, tokens, E1, E2, **kwargs):
    return crf_sample(scores, tokens, E1, E2, 3, **kwargs, seed=0, replacement=False)


_cs, _lp, _mg, _lpg = map(_on_beam, (crf_sample, log_partition, marginals, log_partition_grad))
_ent, _entg = map(_on_beam, (crf_entropy, crf_entropy_grad))
_ds = _on_beam(_distinct)
BEAM_CALLS = [_sv, _vd, _cs, _lp, _mg, _lpg, _ent, _entg, _on_beam(_score_paths), _on_beam(_nbest), _ds]
TEMPERATURE_CALLS = [_sv, _cs, _lp, _mg, _lpg, _ent, _entg]


# --- topk_beam -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, error, match",
    [
        (0, ValueError, "k must be at least 1"),
        (-3, ValueError, "k must be at least 1"),
        (11, ValueError, "k must be at most V = 10"),
        (2.5, TypeError, "k must be an integer"),
        (True, TypeError, "k must be an integer"),
    ],
)
def test_topk_bad_k(rng, k, error, match):
    with pytest.raises(error, match=match):
        topk_beam(rng.standard_normal((1, 2, 10)), k)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_topk_rejects_nan_and_posinf(rng, bad):
    emissions = rng.standard_normal((2, 3, 10))
    emissions[1, 2, 7] = bad
    with pytest.raises(ValueError, match=r"emissions contains NaN or \+inf \(first at batch 1, position 2\)"):
        topk_beam(emissions, 3)
    emissions[1, 2, 0] = bad  # also inside the first k entries
    with pytest.raises(ValueError, match="emissions contains NaN"):
        topk_beam(emissions, 3)


def test_topk_bad_arrays(rng):
    with pytest.raises(ValueError, match="emissions must have 3 dimensions"):
        topk_beam(rng.standard_normal((2, 10)), 3)
    with pytest.raises(TypeError, match="emissions must be a floating-point array"):
        topk_beam(np.ones((1, 2, 10), np.int64), 3)
    with pytest.raises(ValueError, match="force_tokens must have shape"):
        topk_beam(rng.standard_normal((1, 2, 10)), 3, force_tokens=np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match=r"force_tokens must be token ids in \[0, 10\)"):
        topk_beam(rng.standard_normal((1, 2, 10)), 3, force_tokens=np.array([[0, 10]]))
    with pytest.raises(TypeError, match="force_tokens must be an integer array"):
        topk_beam(rng.standard_normal((1, 2, 10)), 3, force_tokens=np.zeros((1, 2)))


# --- beam inputs (both decoders) ---------------------------------------------------------------------
@pytest.mark.parametrize("call", BEAM_CALLS)
def test_scores_nan_inf_and_dead_positions(problem, call):
    scores = problem[0].copy()
    scores[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match=r"scores contains NaN or \+inf \(first at batch 1, position 3\)"):
        call(problem, scores=scores)
    scores[1, 3, 2] = np.inf
    with pytest.raises(ValueError, match=r"scores contains NaN or \+inf"):
        call(problem, scores=scores)
    scores = problem[0].copy()
    scores[0, 2, :] = -np.inf
    with pytest.raises(ValueError, match="whole beam is -inf at batch 0, position 2"):
        call(problem, scores=scores)
    # a dead position after the sequence's end is padding, not an error
    call(problem, scores=scores, lengths=[2, 5])


@pytest.mark.parametrize("call", BEAM_CALLS)
def test_bad_tokens(problem, call):
    tokens = problem[1].copy()
    tokens[0, 0, 0] = 10
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 10\)"):
        call(problem, tokens=tokens)
    tokens[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 10\)"):
        call(problem, tokens=tokens)
    with pytest.raises(ValueError, match="tokens must have shape"):
        call(problem, tokens=problem[1][:, :, :3])
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        call(problem, tokens=problem[1].astype(np.float64))


@pytest.mark.parametrize("call", BEAM_CALLS)
def test_bad_tables(problem, call):
    E1 = problem[2]
    with pytest.raises(ValueError, match="E1 and E2 must have the same shape"):
        call(problem, E1=E1[:, :3])
    with pytest.raises(TypeError, match="E1 must be a floating-point array"):
        call(problem, E1=E1.astype(np.int32))
    with pytest.raises(TypeError, match="E2 must be a floating-point array"):
        call(problem, E2=problem[3].astype(np.int32))
    with pytest.raises(ValueError, match="E1 must have 2 dimensions"):
        call(problem, E1=E1[None])
    bad = E1.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="E1 contains NaN or inf"):
        call(problem, E1=bad)


@pytest.mark.parametrize("call", BEAM_CALLS)
def test_bad_scores_arrays(problem, call):
    with pytest.raises(ValueError, match="scores must have 3 dimensions"):
        call(problem, scores=problem[0][0])
    with pytest.raises(TypeError, match="scores must be a floating-point array"):
        call(problem, scores=problem[0].astype(np.int64))
    with pytest.raises(ValueError, match=r"T >= 1"):
        call(problem, scores=problem[0][:, :0], tokens=problem[1][:, :0])


@pytest.mark.parametrize("call", BEAM_CALLS)
@pytest.mark.parametrize(
    "lengths, error, match",
    [
        ([0, 5], ValueError, r"lengths must lie in \[1, 5\]"),
        ([1, 6], ValueError, r"lengths must lie in \[1, 5\]"),
        ([5], ValueError, r"lengths must have shape \(2,\)"),
        ([[5, 5]], ValueError, r"lengths must have shape \(2,\)"),
        ([2.0, 3.0], TypeError, "lengths must be an integer array"),
    ],
)
def test_bad_lengths(problem, call, lengths, error, match):
    with pytest.raises(error, match=match):
        call(problem, lengths=np.array(lengths))


@pytest.mark.parametrize(
    "temperature, error",
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (np.nan, ValueError),
        (np.inf, ValueError),
        ("hot", TypeError),
    ],
)
@pytest.mark.parametrize("call", TEMPERATURE_CALLS)
def test_bad_temperature(problem, temperature, error, call):
    with pytest.raises(error, match="temperature must be"):
        call(problem, temperature=temperature)


@pytest.mark.parametrize("call", [_sv, _cs])
@pytest.mark.parametrize("num_samples, error", [(0, ValueError), (-2, ValueError), (2.0, TypeError)])
def test_bad_num_samples(problem, num_samples, error, call):
    with pytest.raises(error, match="num_samples must be"):
        call(problem, num_samples=num_samples)


@pytest.mark.parametrize("call", [_sv, _cs])
def test_bad_seed(problem, call):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        call(problem, seed=-1)
    with pytest.raises(TypeError, match="seed must be None or an integer"):
        call(problem, seed=1.5)


def test_bad_uniforms(problem, rng):
    with pytest.raises(ValueError, match=r"uniforms must have shape \(2, 4, 4\)"):
        _sv(problem, uniforms=rng.random((2, 5, 4)))
    with pytest.raises(ValueError, match=r"uniforms must have shape \(2, 4, 4, 3\)"):
        _sv(problem, num_samples=3, uniforms=rng.random((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="uniforms must have 3 dimensions"):
        _sv(problem, uniforms=rng.random((2, 4, 4, 1)))
    for bad in (1.0, -0.1, np.nan):
        uniforms = rng.random((2, 4, 4))
        uniforms[1, 1, 1] = bad
        with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
            _sv(problem, uniforms=uniforms)
    with pytest.raises(ValueError, match="either seed or uniforms"):
        _sv(problem, uniforms=rng.random((2, 4, 4)), seed=1)


def test_crf_sample_bad_uniforms(problem, rng):
    with pytest.raises(ValueError, match=r"uniforms must have shape \(2, 5, 3\) \(B, T, N\)"):
        _cs(problem, num_samples=3, uniforms=rng.random((2, 4, 3)))
    uniforms = rng.random((2, 5, 1))
    uniforms[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        _cs(problem, uniforms=uniforms)
    with pytest.raises(ValueError, match="either seed or uniforms"):
        _cs(problem, uniforms=rng.random((2, 5, 1)), seed=1)


def test_bad_grad_output(problem):
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2,\)"):
        _lpg(problem, grad_output=np.ones(3))
    with pytest.raises(ValueError, match="grad_output contains NaN"):
        _lpg(problem, grad_output=np.array([1.0, np.nan]))
    with pytest.raises(TypeError, match="grad_output must be a floating-point array"):
        _lpg(problem, grad_output=np.array([1, 2]))


def test_sequence_score_bad_beam_idx(problem):
    scores, tokens, E1, E2 = problem
    paths = np.zeros((2, 5), np.int64)
    paths[1, 3] = 4
    with pytest.raises(ValueError, match=r"beam_idx must be beam slots in \[0, 4\)"):
        sequence_score(scores, tokens, E1, E2, paths)
    sequence_score(scores, tokens, E1, E2, paths, lengths=[5, 3])  # past the length: ignored
    with pytest.raises(ValueError, match=r"beam_idx must have shape \(B, T\) or \(B, T, N\)"):
        sequence_score(scores, tokens, E1, E2, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"beam_idx must have shape \(2, 5\)"):
        sequence_score(scores, tokens, E1, E2, np.zeros((2, 4), np.int64))
    with pytest.raises(TypeError, match="beam_idx must be an integer array"):
        sequence_score(scores, tokens, E1, E2, np.zeros((2, 5)))


@pytest.mark.parametrize("function", [log_likelihood, log_likelihood_grad])
def test_log_likelihood_bad_inputs(rng, function):
    emissions = rng.standard_normal((2, 5, 10))
    targets = rng.integers(0, 10, (2, 5))
    E1, E2 = rng.standard_normal((10, 3)), rng.standard_normal((10, 3))
    function(emissions, targets, E1, E2, 4)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 10\)"):
        function(emissions, targets + 5, E1, E2, 4)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 5\)"):
        function(emissions, targets[:, :4], E1, E2, 4)
    with pytest.raises(ValueError, match="E1 and E2 must have V = 10 rows"):
        function(emissions, targets, E1[:9], E2[:9], 4)
    with pytest.raises(ValueError, match="k must be at most V = 10"):
        function(emissions, targets, E1, E2, 11)
    with pytest.raises(ValueError, match=r"emissions must have at least one position \(T >= 1\)"):
        function(emissions[:, :0], targets[:, :0], E1, E2, 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        function(emissions, targets, E1, E2, 4, lengths=[0, 5])
    bad = emissions.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="emissions contains NaN"):
        function(emissions=bad, targets=targets, E1=E1, E2=E2, k=4)


def test_empty_batch_gives_empty_results(problem):
    _, _, E1, E2 = problem
    empty = np.zeros((0, 5, 4)), np.zeros((0, 5, 4), np.int64), E1, E2
    got = stochastic_viterbi(*empty, num_samples=2)
    assert got.beam_probs.shape == (0, 5, 4, 2) and got.tokens.shape == (0, 5, 2)
    assert crf_sample(*empty, num_samples=2).beam_idx.shape == (0, 5, 2)
    assert log_partition(*empty).shape == (0,) and marginals(*empty).shape == (0, 5, 4)
    grad = log_partition_grad(*empty)
    assert grad.grad_scores.shape == (0, 5, 4) and (grad.grad_E1 == 0).all()
    assert log_likelihood(np.zeros((0, 5, 10)), np.zeros((0, 5), np.int64), E1, E2, 3).shape == (0,)


def test_single_position_is_the_argmax(problem):
    scores, tokens, E1, E2 = problem
    got = stochastic_viterbi(scores[:, :1], tokens[:, :1], E1, E2, seed=0)
    np.testing.assert_array_equal(got.beam_idx[:, 0, 0], scores[:, 0].argmax(axis=1))
    assert got.backpointers.shape == (2, 0, 4)


# Arguments of the wrong kind: one row per case, (name, call on (scores, tokens, E1, E2), error, match).
def _emissions(problem):
    return np.random.default_rng(3).standard_normal((2, 5, 10))


WRONG_KINDS = [
    (
        "emissions None",
        lambda p: log_likelihood_grad(None, np.zeros((2, 5), np.int64), p[2], p[3], 2),
        TypeError,
        "emissions must be a floating-point array",
    ),
    (
        "targets None",
        lambda p: log_likelihood(_emissions(p), None, p[2], p[3], 2),
        TypeError,
        "targets must be an integer array",
    ),
    (
        "sample None",
        lambda p: stochastic_viterbi_backward(np.ones((2, 5, 4)), None, p[1], p[2], p[3]),
        TypeError,
        "sample must be the StochasticViterbiResult",
    ),
    (
        "sample a tuple",
        lambda p: stochastic_viterbi_backward(np.ones((2, 5, 4)), (1, 2), p[1], p[2], p[3]),
        TypeError,
        "sample must be the StochasticViterbiResult",
    ),
    (
        "scores complex",
        lambda p: viterbi_decode(p[0].astype(complex), *p[1:]),
        TypeError,
        "scores must be a floating-point array",
    ),
    ("scores text", lambda p: viterbi_decode("scores", *p[1:]), TypeError, "scores must be a floating-point array"),
    (
        "tokens float",
        lambda p: viterbi_decode(p[0], p[1].astype(float), *p[2:]),
        TypeError,
        "tokens must be an integer array",
    ),
    ("E1 None", lambda p: viterbi_decode(p[0], p[1], None, p[3]), TypeError, "E1 must be a floating-point array"),
    ("lengths text", lambda p: viterbi_decode(*p, lengths="ab"), TypeError, "lengths must be an integer array"),
    (
        "beam_idx None",
        lambda p: sequence_score(*p, None),
        ValueError,
        r"beam_idx must have shape \(B, T\) or \(B, T, N\)",
    ),
    ("num_samples None", lambda p: crf_forward(*p).sample(None), TypeError, "num_samples must be an integer"),
]


@pytest.mark.parametrize("name, call, error, match", WRONG_KINDS, ids=[row[0] for row in WRONG_KINDS])
def test_wrong_kinds_of_argument(problem, name, call, error, match):
    with pytest.raises(error, match=match):
        call(problem)


# Float dtypes and the compute dtype they give: (name, cast of every float input, compute dtype).
FLOAT_KINDS = [
    ("big-endian float64", lambda x: x.astype(">f8"), np.float64),
    ("big-endian float32", lambda x: x.astype(">f4"), np.float32),
    ("longdouble", lambda x: x.astype(np.longdouble), np.float64),
    ("float16", lambda x: x.astype(np.float16), np.float32),
]


@pytest.mark.parametrize("name, cast, dtype", FLOAT_KINDS, ids=[row[0] for row in FLOAT_KINDS])
def test_float_kinds_compute_in_their_width(problem, name, cast, dtype):
    scores, tokens, E1, E2 = problem
    best = viterbi_decode(cast(scores), tokens, cast(E1), cast(E2))
    assert best.score.dtype == dtype
    native = viterbi_decode(
        *(cast(x).astype(dtype) for x in (scores,)), tokens, *(cast(x).astype(dtype) for x in (E1, E2))
    )
    np.testing.assert_array_equal(best.beam_idx, native.beam_idx)
