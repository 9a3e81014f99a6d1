"""Every GPU kernel against its CPU counterpart (tiny sizes), in the CUDA simulator or on a GPU.

``tests/test_gpu_simulator.py`` runs this in a process of its own with NUMBA_ENABLE_CUDASIM=1 (the
simulator changes how numba behaves, so it never shares a process with the CPU tests). On a machine with
a GPU: ``VITERBI_NUMBA_GPU_TESTS=1 python -m pytest tests/gpu``.
"""

import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and os.environ.get("VITERBI_NUMBA_GPU_TESTS") != "1":
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 or VITERBI_NUMBA_GPU_TESTS=1", allow_module_level=True)

from conftest import make_problem
from extremes import EXTREMES
from numba import cuda
from round_trips import ROUND_TRIPS
from round_trips import problem as round_trip_problem

import viterbi_numba as vn

DTYPES = [np.float64, np.float32]
TOL = {np.float64: 1e-9, np.float32: 2e-4}


def dev(*arrays):
    return [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]


def host(value):
    return value.copy_to_host()


def problem(dtype, B=2, T=4, K=5, D=3, seed=0):
    rng = np.random.default_rng(seed)
    scores, tokens, E1, E2 = make_problem(rng, B, T, K, D=D, dtype=dtype)
    return scores, tokens, E1, E2, np.array([T, 2][:B])


def close(gpu, cpu, dtype, scale=1.0):
    np.testing.assert_allclose(host(gpu), cpu, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_beam_matches_cpu_with_ties_and_forced_tokens(dtype):
    rng = np.random.default_rng(1)
    emissions = rng.integers(-4, 4, size=(2, 2, 70)).astype(dtype)  # many ties; 70 > the simulator's 16 candidate slots
    forced = rng.integers(0, 70, size=(2, 2))
    for k, force in ((5, None), (7, forced), (1, forced)):
        gpu = vn.topk_beam(*dev(emissions), k, None if force is None else dev(force)[0])
        cpu = vn.topk_beam(emissions, k, force)
        np.testing.assert_array_equal(host(gpu.tokens), cpu.tokens)
        np.testing.assert_array_equal(host(gpu.scores), cpu.scores)
    emissions[1, 1, 9] = np.nan
    with pytest.raises(ValueError, match=r"NaN or \+inf \(first at batch 1, position 1\)"):
        vn.topk_beam(*dev(emissions), 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_viterbi_matches_cpu(dtype):
    scores, tokens, E1, E2, lengths = problem(dtype)
    gpu = vn.viterbi_decode(*dev(scores, tokens, E1, E2), lengths=lengths)
    cpu = vn.viterbi_decode(scores, tokens, E1, E2, lengths=lengths)
    np.testing.assert_array_equal(host(gpu.beam_idx), cpu.beam_idx)
    np.testing.assert_array_equal(host(gpu.tokens), cpu.tokens)
    close(gpu.score, cpu.score, dtype, 10)
    close(gpu.step_scores, cpu.step_scores, dtype, 10)


def test_strided_loops_when_the_beam_exceeds_the_block():
    # the simulator's blocks have at most 4 threads: K = 9 makes threads own two or three beam slots
    scores, tokens, E1, E2, lengths = problem(np.float64, K=9, T=3)
    gpu = vn.viterbi_decode(*dev(scores, tokens, E1, E2), lengths=lengths)
    np.testing.assert_array_equal(
        host(gpu.beam_idx), vn.viterbi_decode(scores, tokens, E1, E2, lengths=lengths).beam_idx
    )
    close(
        vn.log_partition(*dev(scores, tokens, E1, E2), lengths=lengths),
        vn.log_partition(scores, tokens, E1, E2, lengths=lengths),
        np.float64,
    )
    uniforms = np.random.default_rng(3).random((2, 3, 2))
    gpu = vn.crf_sample(*dev(scores, tokens, E1, E2), 2, lengths=lengths, uniforms=uniforms)
    cpu = vn.crf_sample(scores, tokens, E1, E2, 2, lengths=lengths, uniforms=uniforms)
    np.testing.assert_array_equal(host(gpu.beam_idx), cpu.beam_idx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_viterbi_matches_cpu_given_uniforms(dtype):
    scores, tokens, E1, E2, lengths = problem(dtype)
    uniforms = np.random.default_rng(2).random((2, 3, 5, 3))
    gpu = vn.stochastic_viterbi(*dev(scores, tokens, E1, E2), 3, 0.7, lengths=lengths, uniforms=uniforms)
    cpu = vn.stochastic_viterbi(scores, tokens, E1, E2, 3, 0.7, lengths=lengths, uniforms=uniforms)
    for name in ("beam_idx", "tokens", "backpointers"):
        np.testing.assert_array_equal(host(getattr(gpu, name)), getattr(cpu, name), err_msg=name)
    for name in ("beam_probs", "path_scores", "score"):
        close(getattr(gpu, name), getattr(cpu, name), dtype, 10)
    single = vn.stochastic_viterbi(*dev(scores, tokens, E1, E2), lengths=lengths, uniforms=uniforms[..., 0])
    assert host(single.beam_probs).shape == (2, 4, 5) and host(single.beam_idx).shape == (2, 4, 1)
    np.testing.assert_array_equal(
        host(single.tokens),
        vn.stochastic_viterbi(scores, tokens, E1, E2, lengths=lengths, uniforms=uniforms[..., 0]).tokens,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_seed_same_samples_as_cpu(dtype):
    """The same Philox numbers on both targets; float32 kernels use each uniform's top 24 bits, so a draw
    may differ only where its target lies within rounding of a CDF boundary (none here)."""
    scores, tokens, E1, E2, lengths = problem(dtype)
    gpu = vn.stochastic_viterbi(*dev(scores, tokens, E1, E2), 3, lengths=lengths, seed=99)
    cpu = vn.stochastic_viterbi(scores, tokens, E1, E2, 3, lengths=lengths, seed=99)
    np.testing.assert_array_equal(host(gpu.backpointers), cpu.backpointers)
    gpu = vn.crf_sample(*dev(scores, tokens, E1, E2), 3, lengths=lengths, seed=99)
    cpu = vn.crf_sample(scores, tokens, E1, E2, 3, lengths=lengths, seed=99)
    np.testing.assert_array_equal(host(gpu.beam_idx), cpu.beam_idx)
    close(gpu.log_prob, cpu.log_prob, dtype, 10)
    again = vn.crf_sample(*dev(scores, tokens, E1, E2), 3, lengths=lengths, seed=99)
    np.testing.assert_array_equal(host(again.beam_idx), host(gpu.beam_idx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_backward_matches_cpu(dtype):
    scores, tokens, E1, E2, lengths = problem(dtype)
    uniforms = np.random.default_rng(2).random((2, 3, 5, 2))
    cpu_sample = vn.stochastic_viterbi(scores, tokens, E1, E2, 2, lengths=lengths, uniforms=uniforms)
    grads = np.random.default_rng(5).standard_normal(cpu_sample.beam_probs.shape).astype(dtype)
    cpu = vn.stochastic_viterbi_backward(grads, cpu_sample, tokens, E1, E2, lengths)
    gpu_sample = vn.stochastic_viterbi(*dev(scores, tokens, E1, E2), 2, lengths=lengths, uniforms=uniforms)
    gpu = vn.stochastic_viterbi_backward(*dev(grads), gpu_sample, *dev(tokens, E1, E2), lengths)
    for name in ("grad_scores", "grad_E1", "grad_E2"):
        close(getattr(gpu, name), getattr(cpu, name), dtype, 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_inference_matches_cpu(dtype):
    scores, tokens, E1, E2, lengths = problem(dtype)
    d = dev(scores, tokens, E1, E2)
    close(vn.log_partition(*d, 0.8, lengths), vn.log_partition(scores, tokens, E1, E2, 0.8, lengths), dtype, 10)
    close(vn.marginals(*d, 0.8, lengths), vn.marginals(scores, tokens, E1, E2, 0.8, lengths), dtype)
    weights = np.array([0.5, -2.0])
    gpu = vn.log_partition_grad(*d, 0.8, lengths, weights)
    cpu = vn.log_partition_grad(scores, tokens, E1, E2, 0.8, lengths, weights)
    for name in cpu._fields:
        close(getattr(gpu, name), getattr(cpu, name), dtype, 10)
    paths = vn.crf_sample(scores, tokens, E1, E2, 3, lengths=lengths, seed=1).beam_idx
    close(
        vn.sequence_score(*d, dev(paths)[0], lengths),
        vn.sequence_score(scores, tokens, E1, E2, paths, lengths),
        dtype,
        10,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_forward_pass_and_paths_grad_match_cpu(dtype):
    scores, tokens, E1, E2, lengths = problem(dtype)
    cpu = vn.crf_forward(scores, tokens, E1, E2, 0.9, lengths)
    gpu = vn.crf_forward(*dev(scores, tokens, E1, E2), 0.9, lengths)
    close(gpu.log_z, cpu.log_z, dtype, 10)
    paths = cpu.sample(3, seed=5).beam_idx
    np.testing.assert_array_equal(host(gpu.sample(3, seed=5).beam_idx), paths)
    weights = np.array([[1.0, -0.5, 2.0], [0.25, 1.0, -1.0]])
    for got, want in zip(gpu.paths_grad(dev(paths)[0], weights), cpu.paths_grad(paths, weights)):
        close(got, want, dtype, 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_saved_forward_pass_rebuilds_on_the_gpu(dtype):
    # what the CUDA kernels of the PyTorch operators run: a forward pass's saved arrays, then its
    # backward pass (paths_grad, log_partition_grad) from them in a later call
    scores, tokens, E1, E2, lengths = problem(dtype)
    inputs = dev(scores, tokens, E1, E2)
    first = vn.crf_forward(*inputs, 0.9, lengths)
    saved = first.saved
    assert all(isinstance(array, type(inputs[0])) for array in saved)
    cpu = vn.crf_forward(scores, tokens, E1, E2, 0.9, lengths)
    for got, want in zip(saved, cpu.saved):
        close(got, want, dtype, 10)
    again = vn.CRFForward.from_saved(*inputs, saved, 0.9, lengths)
    paths = cpu.sample(3, seed=5).beam_idx
    weights = np.array([[1.0, -0.5, 2.0], [0.25, 1.0, -1.0]])
    for got, want in zip(again.paths_grad(dev(paths)[0], weights), cpu.paths_grad(paths, weights)):
        close(got, want, dtype, 10)
    rebuilt, direct = again.log_partition_grad(), cpu.log_partition_grad()
    for name in direct._fields:
        close(getattr(rebuilt, name), getattr(direct, name), dtype, 10)
    with pytest.raises(ValueError, match=r"saved alpha must have 3 dimensions"):
        vn.CRFForward.from_saved(*inputs, (saved[0], saved[0], saved[2], saved[3]), 0.9, lengths)


def entropy_kl_pairs(scores, tokens, E1, E2, lengths, dtype, temperature=0.8):
    """(GPU, CPU) results of every entropy and KL function on a policy p and a reference q on its beam
    (q with its own vocabulary and rank)."""
    rng = np.random.default_rng(11)
    V, _ = E1.shape
    scores_q = (scores + rng.standard_normal(scores.shape)).astype(dtype)
    E1_q, E2_q = (rng.standard_normal((V + 3, 2)).astype(dtype) * 0.5 for _ in range(2))
    weights = np.array([0.5, -2.0])[: len(scores)]
    kl_args = (scores, scores_q, tokens, E1, E2, E1_q, E2_q, temperature, lengths)
    d_kl = (*dev(*kl_args[:7]), temperature, lengths)
    d = dev(scores, tokens, E1, E2)
    pairs = [
        (vn.crf_entropy(*d, temperature, lengths), vn.crf_entropy(scores, tokens, E1, E2, temperature, lengths)),
        (vn.crf_kl(*d_kl), vn.crf_kl(*kl_args)),
        (vn.crf_cross_entropy(*d_kl), vn.crf_cross_entropy(*kl_args)),
    ]
    gpu = vn.crf_entropy_grad(*d, temperature, lengths, weights)
    cpu = vn.crf_entropy_grad(scores, tokens, E1, E2, temperature, lengths, weights)
    pairs += [(getattr(gpu, name), getattr(cpu, name)) for name in cpu._fields]
    gpu = vn.crf_kl_grad(*d_kl, weights)
    cpu = vn.crf_kl_grad(*kl_args, weights)
    pairs += [(getattr(gpu, name), getattr(cpu, name)) for name in cpu._fields]
    return pairs


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_and_kl_match_cpu(dtype):
    scores, tokens, E1, E2, lengths = problem(dtype, K=6)
    for gpu, cpu in entropy_kl_pairs(scores, tokens, E1, E2, lengths, dtype):
        assert np.all(np.isfinite(cpu))
        close(gpu, cpu, dtype, 10)
    # kept passes (whose forward sweep runs apart from the forward pass), and KL(p || p) = 0
    d = dev(scores, tokens, E1, E2)
    p = vn.crf_forward(*d, 0.8, lengths)
    np.testing.assert_allclose(host(p.kl(vn.crf_forward(*d, 0.8, lengths))), 0.0, atol=TOL[dtype])
    weights = np.array([0.5, -2.0])
    kept = p.entropy_grad(dev(weights)[0])
    direct = vn.crf_entropy_grad(scores, tokens, E1, E2, 0.8, lengths, weights)
    for name in direct._fields:
        close(getattr(kept, name), getattr(direct, name), dtype, 10)
    # a reference's scores gathered on the device
    reference = np.random.default_rng(3).standard_normal((2, 4, 30)).astype(dtype)
    beam_tokens = np.random.default_rng(4).integers(0, 30, (2, 4, 6))
    np.testing.assert_array_equal(
        host(vn.gather_beam(*dev(reference, beam_tokens))), np.take_along_axis(reference, beam_tokens, 2)
    )
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 30\) \(columns of emissions\)"):
        vn.gather_beam(*dev(reference, beam_tokens + 29))


def test_kl_value_errors_found_on_the_device_name_the_side():
    """The deferred checks (read back at the call's end) name q's arrays as the CPU does."""
    scores, tokens, E1, E2, lengths = problem(np.float64)
    bad = E1.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"E1_q contains NaN or inf"):
        vn.crf_kl(*dev(scores, scores, tokens, E1, E2, bad, E2), 1.0, lengths)
    dead = scores.copy()
    dead[0, 1] = -np.inf
    with pytest.raises(ValueError, match=r"scores_q: the whole beam is -inf at batch 0, position 1"):
        vn.crf_kl_grad(*dev(scores, dead, tokens, E1, E2, E1, E2), 1.0, lengths)
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 3\) \(rows of E1_q/E2_q\)"):
        vn.crf_cross_entropy(*dev(scores, scores, tokens, E1, E2, E1[:3], E2[:3]), 1.0, lengths)
    # a kept reference pass over a smaller vocabulary: the clamped ids are read, the call raises
    p = vn.crf_forward(*dev(scores, tokens, E1, E2), 1.0, lengths)
    small = vn.crf_forward(*dev(scores, tokens % 3, E1[:3], E2[:3]), 1.0, lengths)
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 3\) \(rows of the reference's E1/E2\)"):
        p.kl_grad(small)


@pytest.mark.parametrize("T", [1, 3])
def test_kl_is_infinite_where_q_cannot_end_a_path_p_can(T):
    scores, tokens, E1, E2, lengths = problem(np.float64, T=T)
    scores_q = scores.copy()
    scores_q[0, T - 1, 1] = -np.inf
    args = (scores, scores_q, tokens, E1, E2, E1[:, :2], E2[:, :2])
    cpu = vn.crf_kl(*args)
    gpu = host(vn.crf_kl(*dev(*args)))
    assert cpu[0] == gpu[0] == np.inf
    np.testing.assert_allclose(gpu[1:], cpu[1:], rtol=TOL[np.float64])


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_likelihood_and_gradients_match_cpu(dtype):
    rng = np.random.default_rng(4)
    B, T, V, D, k = 2, 4, 30, 3, 5
    emissions = rng.standard_normal((B, T, V)).astype(dtype)
    targets = rng.integers(0, V, (B, T))
    E1, E2 = (rng.standard_normal((V, D)).astype(dtype) * 0.5 for _ in range(2))
    lengths = np.array([4, 3])
    d = dev(emissions, targets, E1, E2)
    close(
        vn.log_likelihood(*d, k, lengths, 1.3),
        vn.log_likelihood(emissions, targets, E1, E2, k, lengths, 1.3),
        dtype,
        10,
    )
    gpu = vn.log_likelihood_grad(*d, k, lengths, 1.3, np.array([1.0, 0.25]))
    cpu = vn.log_likelihood_grad(emissions, targets, E1, E2, k, lengths, 1.3, np.array([1.0, 0.25]))
    for name in cpu._fields:
        close(getattr(gpu, name), getattr(cpu, name), dtype, 10)


def test_gpu_inputs_are_validated_like_cpu_inputs():
    scores, tokens, E1, E2, lengths = problem(np.float64)
    d = dev(scores, tokens, E1, E2)
    with pytest.raises(TypeError, match="E1 is a host array but the other inputs are on the GPU"):
        vn.viterbi_decode(d[0], d[1], E1, d[3])
    with pytest.raises(TypeError, match="E2 must have the dtype of the other float inputs"):
        vn.viterbi_decode(d[0], d[1], d[2], dev(E2.astype(np.float32))[0])
    with pytest.raises(TypeError, match="tokens must be an int64 array on the GPU"):
        vn.viterbi_decode(d[0], dev(tokens.astype(np.int32))[0], d[2], d[3])
    with pytest.raises(TypeError, match="scores must be float32 or float64 on the GPU"):
        vn.viterbi_decode(dev(scores.astype(np.float16))[0], *d[1:])
    bad_tokens = tokens.copy()
    bad_tokens[1, 2, 3] = 10_000
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 10\)"):
        vn.log_partition(d[0], dev(bad_tokens)[0], d[2], d[3])
    bad_scores = scores.copy()
    bad_scores[1, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"scores contains NaN or \+inf \(first at batch 1, position 1\)"):
        vn.stochastic_viterbi(dev(bad_scores)[0], *d[1:], seed=1)
    dead = scores.copy()
    dead[0, 2] = -np.inf
    with pytest.raises(ValueError, match="the whole beam is -inf at batch 0, position 2"):
        vn.marginals(dev(dead)[0], *d[1:])
    nan_table = E1.copy()
    nan_table[3, 1] = np.inf
    with pytest.raises(ValueError, match="E1 contains NaN or inf"):
        vn.crf_sample(d[0], d[1], dev(nan_table)[0], d[3], seed=1)
    with pytest.raises(ValueError, match="lengths must lie in"):
        vn.viterbi_decode(*d, lengths=np.array([0, 2]))
    with pytest.raises(TypeError, match="lengths is a GPU array but the main inputs are host arrays"):
        vn.viterbi_decode(scores, tokens, E1, E2, lengths=dev(lengths)[0])


def test_small_inputs_on_the_device_are_checked_there():
    """lengths, paths, weights and uniforms given on the device: the same errors as the CPU's."""
    scores, tokens, E1, E2, lengths = problem(np.float64)
    d = dev(scores, tokens, E1, E2)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\] \(T\), got values from 0 to 2"):
        vn.viterbi_decode(*d, lengths=dev(np.array([0, 2]))[0])
    paths = np.zeros((2, 4, 2), np.int64)
    paths[0, 3, 1] = 5
    with pytest.raises(ValueError, match=r"beam_idx must be beam slots in \[0, 5\) before each sequence's length"):
        vn.sequence_score(*d, dev(paths)[0], lengths)
    paths[0, 3, 1], paths[1, 3, 1] = 0, 7  # after sequence 1's length: ignored
    np.testing.assert_allclose(
        host(vn.sequence_score(*d, dev(paths)[0], lengths)), vn.sequence_score(scores, tokens, E1, E2, paths, lengths)
    )
    with pytest.raises(ValueError, match="grad_output contains NaN or inf"):
        vn.log_partition_grad(*d, 1.0, lengths, dev(np.array([1.0, np.nan]))[0])
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        vn.crf_sample(*d, 2, lengths=lengths, uniforms=dev(np.full((2, 4, 2), 1.0))[0])
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        vn.viterbi_decode(*d, lengths=dev(np.array([1.0, 2.0]))[0])


def test_a_value_error_found_on_the_device_comes_before_a_later_argument_error(monkeypatch):
    """On a card the checks' flags are read at the end of the call; a call that raises earlier (a bad
    option after the inputs) reads them first, so the earlier input's error wins, as on the CPU. (The
    simulator settles each check at once; here it is made to wait as a card does.)"""
    from viterbi_numba.gpu.checks import DeviceChecks

    monkeypatch.setattr(DeviceChecks, "settle", lambda self: None)
    scores, tokens, E1, E2, lengths = problem(np.float64)
    scores[1, 2, 0] = np.nan
    d = dev(scores, tokens, E1, E2)
    for call in (
        lambda: vn.crf_forward(*d, temperature=0.0),
        lambda: vn.stochastic_viterbi(*d, num_samples=0),
        lambda: vn.sequence_score(*d, dev(np.zeros((2, 3), np.int64))[0]),
    ):
        with pytest.raises(ValueError, match=r"scores contains NaN or \+inf \(first at batch 1, position 2\)"):
            call()
    with pytest.raises(ValueError, match=r"scores contains NaN or \+inf \(first at batch 1, position 2\)"):
        vn.crf_forward(scores, tokens, E1, E2, temperature=0.0)  # the CPU's order


def test_kernels_stay_in_bounds_on_unchecked_bad_indices():
    """Inside skip_gpu_checks() nothing is raised for bad values, and the kernels index with clamped
    copies: out-of-range tokens, lengths, forced tokens, paths and back-pointers run in the simulator
    (which raises on any out-of-bounds access) and give indices in range."""
    scores, tokens, E1, E2, lengths = problem(np.float64)
    bad_tokens = tokens.copy()
    bad_tokens[0, 1, 2], bad_tokens[1, 0, 0] = 10_000, -3
    d = dev(scores, bad_tokens, E1, E2)
    bad_lengths = dev(np.array([0, 9]))[0]
    paths = dev(np.full((2, 4, 2), 99, np.int64))[0]
    with vn.skip_gpu_checks():
        best = vn.viterbi_decode(*d, lengths=bad_lengths)
        forward = vn.crf_forward(*d, lengths=bad_lengths)
        draws = forward.sample(2, seed=1)
        forward.paths_grad(paths)
        vn.log_partition_grad(*d, 1.0, bad_lengths)
        vn.sequence_score(*d, paths, bad_lengths)
        sample = vn.stochastic_viterbi(*d, 2, lengths=bad_lengths, seed=2)
        bad_back = host(sample.backpointers)
        bad_back[0, 0, 0, 0] = 50
        sample = sample._replace(backpointers=dev(bad_back)[0])
        vn.stochastic_viterbi_backward(dev(np.ones((2, 4, 5, 2)))[0], sample, *d[1:], lengths=bad_lengths)
        emissions = dev(np.random.default_rng(5).standard_normal((2, 4, 9)))[0]
        beam = vn.topk_beam(emissions, 3, dev(np.full((2, 4), 40))[0])
        vn.log_likelihood_grad(emissions, dev(np.full((2, 4), -1))[0], *dev(E1[:9], E2[:9]), 3, bad_lengths)
    for indices, high in ((best.beam_idx, 5), (draws.beam_idx, 5), (beam.tokens, 9)):
        values = host(indices)
        assert ((values == vn.PAD) | ((values >= 0) & (values < high))).all()
    assert (host(best.beam_idx)[0, 1:] == vn.PAD).all()  # length 0 read as 1
    with pytest.raises(ValueError, match="tokens must be token ids"):  # the checks are back outside the context
        vn.viterbi_decode(*d, lengths=bad_lengths)


def test_results_are_device_arrays():
    scores, tokens, E1, E2, lengths = problem(np.float32)
    result = vn.viterbi_decode(*dev(scores, tokens, E1, E2), lengths=lengths)
    assert all(hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray) for x in result)
    assert host(result.score).dtype == np.float32 and host(result.beam_idx).dtype == np.int64


def test_readme_gpu_block_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "cuda.to_device" in b]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert host(namespace["draws"].log_prob).shape == (2, 3)


def nbest_pair(d, arrays, n, lengths):
    return vn.viterbi_nbest(*d, n, lengths), vn.viterbi_nbest(*arrays, n, lengths)


def assert_nbest_equal(gpu, cpu, dtype):
    for name in ("beam_idx", "tokens", "count"):
        np.testing.assert_array_equal(host(getattr(gpu, name)), getattr(cpu, name))
    close(gpu.score, cpu.score, dtype, 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nbest_matches_cpu(dtype):
    """Lists shorter and longer than the beam's paths (the second sequence has 5^2 = 25), -inf slots."""
    scores, tokens, E1, E2, lengths = problem(dtype)
    d = dev(scores, tokens, E1, E2)
    for n in (1, 4, 30):
        assert_nbest_equal(*nbest_pair(d, (scores, tokens, E1, E2), n, lengths), dtype)
    scores[:, :, 0] = -np.inf
    scores[1, 1, 3] = -np.inf
    assert_nbest_equal(*nbest_pair(dev(scores, tokens, E1, E2), (scores, tokens, E1, E2), 20, lengths), dtype)


def assert_distinct_equal(gpu, cpu, dtype):
    """The same paths, in the same order; the float64 search's values within rounding of the inputs."""
    for name in ("beam_idx", "tokens", "count"):
        np.testing.assert_array_equal(host(getattr(gpu, name)), getattr(cpu, name))
    for name in ("log_prob", "perturbed", "kappa", "weights"):
        close(getattr(gpu, name), getattr(cpu, name), dtype, 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_distinct_samples_match_cpu(dtype):
    """Replayed uniforms and a seed draw the same distinct samples on both targets (float64 search on
    both), with a beam of more than N paths (kappa finite) and one of fewer (every path, kappa -inf)."""
    scores, tokens, E1, E2, lengths = problem(dtype, K=3)  # sequence 1 has 3^2 = 9 paths
    d = dev(scores, tokens, E1, E2)
    uniforms = np.random.default_rng(4).random((2, 4, 5, 10)).astype(dtype)
    gpu = vn.crf_sample(*d, 4, 0.7, lengths, uniforms=uniforms, replacement=False)
    cpu = vn.crf_sample(scores, tokens, E1, E2, 4, 0.7, lengths, uniforms=uniforms, replacement=False)
    assert_distinct_equal(gpu, cpu, dtype)
    for N in (3, 12):
        gpu = vn.crf_sample(*d, N, lengths=lengths, seed=5, replacement=False)
        cpu = vn.crf_sample(scores, tokens, E1, E2, N, lengths=lengths, seed=5, replacement=False)
        assert_distinct_equal(gpu, cpu, dtype)
    assert host(gpu.count).tolist() == [12, 9]
    kept = vn.crf_forward(*d, lengths=lengths).sample(3, seed=5, replacement=False)
    np.testing.assert_array_equal(host(kept.beam_idx), cpu.beam_idx[:, :, :3])


@pytest.mark.parametrize("steps_per_chunk", [1, 2])
def test_several_chunks_of_steps(monkeypatch, steps_per_chunk):
    """With transition chunks of one or two steps, every recursion resumes from the previous chunk's
    state (and the backward pass walks the chunks last first)."""
    from viterbi_numba.gpu import ops as gpu_ops

    scores, tokens, E1, E2, lengths = problem(np.float64, T=6)
    B, T, K = scores.shape
    monkeypatch.setattr(gpu_ops, "TRANSITIONS_BUDGET", steps_per_chunk * B * K * K * 8)
    d = dev(scores, tokens, E1, E2)
    np.testing.assert_array_equal(
        host(vn.viterbi_decode(*d, lengths=lengths).beam_idx),
        vn.viterbi_decode(scores, tokens, E1, E2, lengths=lengths).beam_idx,
    )
    uniforms = np.random.default_rng(6).random((B, T - 1, K, 2))
    np.testing.assert_array_equal(
        host(vn.stochastic_viterbi(*d, 2, lengths=lengths, uniforms=uniforms).backpointers),
        vn.stochastic_viterbi(scores, tokens, E1, E2, 2, lengths=lengths, uniforms=uniforms).backpointers,
    )
    gpu = vn.log_partition_grad(*d, 1.0, lengths)
    cpu = vn.log_partition_grad(scores, tokens, E1, E2, 1.0, lengths)
    for name in cpu._fields:
        close(getattr(gpu, name), getattr(cpu, name), np.float64, 10)
    for gpu, cpu in entropy_kl_pairs(scores, tokens, E1, E2, lengths, np.float64):
        close(gpu, cpu, np.float64, 10)
    assert_nbest_equal(*nbest_pair(d, (scores, tokens, E1, E2), 3, lengths), np.float64)


def test_one_position_and_empty_batches():
    scores, tokens, E1, E2, _ = problem(np.float64, T=1)
    d = dev(scores, tokens, E1, E2)
    cpu = vn.viterbi_decode(scores, tokens, E1, E2)
    np.testing.assert_array_equal(host(vn.viterbi_decode(*d).beam_idx), cpu.beam_idx)
    sample = vn.stochastic_viterbi(*d, 2, seed=3)
    assert host(sample.backpointers).shape == (2, 0, 5, 2)
    np.testing.assert_array_equal(host(sample.beam_idx)[:, 0, 0], cpu.beam_idx[:, 0])
    close(vn.log_partition(*d), vn.log_partition(scores, tokens, E1, E2), np.float64)
    close(vn.marginals(*d), vn.marginals(scores, tokens, E1, E2), np.float64)
    np.testing.assert_array_equal(
        host(vn.crf_sample(*d, 3, seed=2).beam_idx), vn.crf_sample(scores, tokens, E1, E2, 3, seed=2).beam_idx
    )
    assert_nbest_equal(*nbest_pair(d, (scores, tokens, E1, E2), 7, None), np.float64)
    assert_distinct_equal(
        vn.crf_sample(*d, 2, seed=2, replacement=False),
        vn.crf_sample(scores, tokens, E1, E2, 2, seed=2, replacement=False),
        np.float64,
    )
    empty = dev(scores[:0], tokens[:0], E1, E2)
    assert host(vn.viterbi_decode(*empty).beam_idx).shape == (0, 1)
    assert host(vn.viterbi_nbest(*empty, 2).score).shape == (0, 2)
    assert host(vn.crf_sample(*empty, 2, seed=1, replacement=False).weights).shape == (0, 2)
    assert host(vn.crf_sample(*empty, 2, seed=1).log_prob).shape == (0, 2)
    assert host(vn.log_partition_grad(*empty).grad_E1).shape == E1.shape
    for gpu, cpu in entropy_kl_pairs(scores, tokens, E1, E2, None, np.float64):  # T = 1
        close(gpu, cpu, np.float64, 10)
    empty_kl = dev(scores[:0], scores[:0], tokens[:0], E1, E2, E1[:, :2], E2[:, :2])
    assert host(vn.crf_kl_grad(*empty_kl).grad_E1_q).shape == E1[:, :2].shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_infinity_beam_slots(dtype):
    """-inf scores (slots no path may use) weigh 0 everywhere and never make a NaN."""
    scores, tokens, E1, E2, lengths = problem(dtype)
    scores[:, :, 0] = -np.inf  # the first slot of every position, so the first rows of each pass
    scores[1, 1, 3] = -np.inf
    d = dev(scores, tokens, E1, E2)
    uniforms = np.random.default_rng(9).random((2, 3, 5, 2))
    gpu = vn.stochastic_viterbi(*d, 2, lengths=lengths, uniforms=uniforms)
    cpu = vn.stochastic_viterbi(scores, tokens, E1, E2, 2, lengths=lengths, uniforms=uniforms)
    np.testing.assert_array_equal(host(gpu.backpointers), cpu.backpointers)
    close(gpu.beam_probs, cpu.beam_probs, dtype)
    np.testing.assert_array_equal(
        host(vn.viterbi_decode(*d, lengths=lengths).beam_idx),
        vn.viterbi_decode(scores, tokens, E1, E2, lengths=lengths).beam_idx,
    )
    close(vn.log_partition(*d, lengths=lengths), vn.log_partition(scores, tokens, E1, E2, lengths=lengths), dtype, 10)
    close(vn.marginals(*d, lengths=lengths), vn.marginals(scores, tokens, E1, E2, lengths=lengths), dtype)
    uniforms = np.random.default_rng(9).random((2, 4, 3))
    np.testing.assert_array_equal(
        host(vn.crf_sample(*d, 3, lengths=lengths, uniforms=uniforms).beam_idx),
        vn.crf_sample(scores, tokens, E1, E2, 3, lengths=lengths, uniforms=uniforms).beam_idx,
    )
    for gpu, cpu in entropy_kl_pairs(scores, tokens, E1, E2, lengths, dtype):
        close(gpu, cpu, dtype, 10)


ON_CARD = os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"
# Beams that cross warps (33, 257), fill whole warps (64) and reach the limit (1024), on a card; the
# simulator, which runs each thread as a Python thread, takes the smallest (it has no warps anyway).
BEAMS = [33, 64, 257, 1024] if ON_CARD else [33]
# Rows that make top-K flush its candidate slots many times, with k up to the limit.
TOPK = [(2000, 5), (4000, 257), (30522, 1024)] if ON_CARD else [(300, 5)]


@pytest.mark.parametrize("K", BEAMS)
def test_large_beams_match_cpu(K):
    """Every cross-warp path of the recursions, the split columns and the top-K merge at real sizes."""
    dtype = np.float32
    rng = np.random.default_rng(K)
    T = 6 if ON_CARD else 3
    scores, tokens, E1, E2 = make_problem(rng, 2, T, K, D=32 if ON_CARD else 4, dtype=dtype)
    lengths = np.array([T, T - 1])
    d = dev(scores, tokens, E1, E2)
    gpu = vn.viterbi_decode(*d, lengths=lengths)
    cpu = vn.viterbi_decode(scores, tokens, E1, E2, lengths=lengths)
    np.testing.assert_array_equal(host(gpu.beam_idx), cpu.beam_idx)
    close(vn.log_partition(*d, lengths=lengths), vn.log_partition(scores, tokens, E1, E2, lengths=lengths), dtype, 10)
    close(vn.marginals(*d, lengths=lengths), vn.marginals(scores, tokens, E1, E2, lengths=lengths), dtype)
    uniforms = rng.random((2, T - 1, K, 2))
    gpu_sample = vn.stochastic_viterbi(*d, 2, lengths=lengths, uniforms=uniforms)
    cpu_sample = vn.stochastic_viterbi(scores, tokens, E1, E2, 2, lengths=lengths, uniforms=uniforms)
    # float32 sums in another order: a draw within rounding of a CDF boundary may differ (design §6)
    assert np.mean(host(gpu_sample.backpointers) == cpu_sample.backpointers) > 0.99
    gpu_grad = vn.log_partition_grad(*d, 1.0, lengths)
    cpu_grad = vn.log_partition_grad(scores, tokens, E1, E2, 1.0, lengths)
    for name in ("grad_scores", "grad_E1", "grad_E2"):
        close(getattr(gpu_grad, name), getattr(cpu_grad, name), dtype, 10)
    # the n best and the draw without replacement: exact orders, so equal paths but for float32 near-ties
    gpu_best = vn.viterbi_nbest(*d, 8, lengths)
    cpu_best = vn.viterbi_nbest(scores, tokens, E1, E2, 8, lengths)
    assert np.mean(host(gpu_best.beam_idx) == cpu_best.beam_idx) > 0.9
    close(gpu_best.score[:, 0], cpu_best.score[:, 0], dtype, 10)
    gpu_distinct = vn.crf_sample(*d, 8, lengths=lengths, seed=3, replacement=False)
    cpu_distinct = vn.crf_sample(scores, tokens, E1, E2, 8, lengths=lengths, seed=3, replacement=False)
    assert np.mean(host(gpu_distinct.beam_idx) == cpu_distinct.beam_idx) > 0.9


@pytest.mark.parametrize("V, k", TOPK)
def test_topk_of_long_rows_matches_cpu(V, k):
    rng = np.random.default_rng(V)
    emissions = rng.standard_normal((2, 3, V)).astype(np.float32)
    emissions[0, 0, :100] = emissions[0, 0, 0]  # ties across chunks
    forced = rng.integers(0, V, size=(2, 3))
    for force in (None, forced):
        gpu = vn.topk_beam(*dev(emissions), k, None if force is None else dev(force)[0])
        cpu = vn.topk_beam(emissions, k, force)
        np.testing.assert_array_equal(host(gpu.tokens), cpu.tokens)
        np.testing.assert_array_equal(host(gpu.scores), cpu.scores)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_select_handles_ties_signed_zeros_and_infinities(dtype):
    """Rows that stress the radix select: all equal (every digit ties, so the ids decide), -0.0 beside
    +0.0 (equal scores), mostly -inf, values one ulp apart, and k = V."""
    V = 100
    rng = np.random.default_rng(7)
    rows = np.zeros((2, 4, V), dtype)
    rows[0, 1] = np.where(rng.random(V) < 0.5, -0.0, 0.0)
    rows[0, 2] = -np.inf
    rows[0, 2, rng.choice(V, 5, replace=False)] = rng.standard_normal(5)
    rows[0, 3] = np.nextafter(dtype(1), dtype(2), dtype=dtype) * (rng.random(V) < 0.5) + dtype(1)
    rows[1] = rng.integers(-2, 3, (4, V)).astype(dtype) * dtype(0.5)
    rows[1, 3] = rng.standard_normal(V)
    forced = rng.integers(0, V, (2, 4))
    for k, force in ((1, None), (17, None), (17, forced), (V, forced)):
        gpu = vn.topk_beam(*dev(rows), k, None if force is None else dev(force)[0])
        cpu = vn.topk_beam(rows, k, force)
        np.testing.assert_array_equal(host(gpu.tokens), cpu.tokens, err_msg=f"k={k}")
        np.testing.assert_array_equal(host(gpu.scores), cpu.scores)


def test_blocking_read_backs_per_call(monkeypatch):
    """Each GPU call's blocking read-backs (``Library.to_host``), counted with a mock: one, for the flags
    of all its value checks, whatever its small inputs (lengths, paths, weights, uniforms) and wherever
    they are; none inside ``skip_gpu_checks()``, where no host memory is copied in either
    (``Library.to_device`` and numba's ``to_device``, counted too) when every input is on the device."""
    from numba import cuda

    from viterbi_numba.gpu import arrays

    counted, uploads = [], []
    to_host, to_device, cuda_to_device = arrays.Library.to_host, arrays.Library.to_device, cuda.to_device
    monkeypatch.setattr(arrays.Library, "to_host", lambda self, view: counted.append(1) or to_host(self, view))
    monkeypatch.setattr(arrays.Library, "to_device", lambda self, a: uploads.append(1) or to_device(self, a))
    monkeypatch.setattr(cuda, "to_device", lambda *a, **kw: uploads.append(1) or cuda_to_device(*a, **kw))
    scores, tokens, E1, E2, lengths = problem(np.float32)
    d = dev(scores, tokens, E1, E2)
    on_device = dev(lengths)[0]
    rng = np.random.default_rng(4)
    emissions, targets = dev(rng.standard_normal((2, 4, 9)).astype(np.float32), rng.integers(0, 9, (2, 4)))
    tables = dev(rng.standard_normal((9, 3)).astype(np.float32), rng.standard_normal((9, 3)).astype(np.float32))
    paths = dev(np.zeros((2, 4, 3), np.int64))[0]
    weights, sequence_weights = dev(np.ones((2, 3), np.float32), np.array([1.0, -2.0], np.float32))
    uniforms = dev(rng.random((2, 4, 3)))[0]  # float64, cast on the device
    forward = vn.crf_forward(*d, lengths=on_device)
    likelihood = vn.log_likelihood_forward(emissions, targets, *tables, 3, on_device)
    calls = {
        "topk_beam": lambda lengths: vn.topk_beam(emissions, 3, targets),
        "viterbi_decode": lambda lengths: vn.viterbi_decode(*d, lengths=lengths),
        "stochastic_viterbi": lambda lengths: vn.stochastic_viterbi(*d, 2, lengths=lengths, seed=1),
        "crf_sample": lambda lengths: vn.crf_sample(*d, 3, lengths=lengths, uniforms=uniforms),
        "log_partition": lambda lengths: vn.log_partition(*d, lengths=lengths),
        "marginals": lambda lengths: vn.marginals(*d, lengths=lengths),
        "log_partition_grad": lambda lengths: vn.log_partition_grad(*d, 1.0, lengths, sequence_weights),
        "sequence_score": lambda lengths: vn.sequence_score(*d, paths, lengths),
        "log_likelihood": lambda lengths: vn.log_likelihood(emissions, targets, *tables, 3, lengths),
        "log_likelihood_grad": lambda lengths: vn.log_likelihood_grad(emissions, targets, *tables, 3, lengths),
        "CRFForward.paths_grad": lambda lengths: forward.paths_grad(paths, weights),
        "CRFForward.sample": lambda lengths: forward.sample(2, seed=3),
        "LikelihoodForward.grad": lambda lengths: likelihood.grad(sequence_weights),
    }
    for given in (lengths, on_device):
        for name, call in calls.items():
            counted.clear()
            call(given)
            assert len(counted) == (0 if name == "CRFForward.sample" else 1), (name, len(counted))
    for name, call in calls.items():
        counted.clear()
        uploads.clear()
        with vn.skip_gpu_checks():
            call(on_device)
        assert (len(counted), len(uploads)) == (0, 0), name


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_on_the_gpu(name, padded):
    """The CPU's round trips (tests/round_trips.py) with device arrays: outputs stay on the device."""
    ROUND_TRIPS[name](round_trip_problem(padded), lambda array: cuda.to_device(np.ascontiguousarray(array)))


@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_extreme_values_on_the_gpu(name):
    """The CPU's extreme-value cases (tests/extremes.py) with device arrays: the same results or errors."""
    EXTREMES[name](lambda array: cuda.to_device(np.ascontiguousarray(array)))
