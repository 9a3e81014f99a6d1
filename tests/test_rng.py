"""The counter-based generator: Philox known answers, the uniform mapping, and exact reproducibility."""

import os
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
from conftest import make_problem
from cpu_helpers import fill_uniforms

from viterbi_numba import _portable, stochastic_viterbi
from viterbi_numba.cpu.decode import portable

# Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert ref.philox4x32(counter, key) == expected
    got = portable.philox4x32(*[np.uint64(c) for c in counter], *[np.uint64(k) for k in key])
    assert tuple(int(x) for x in got) == expected


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 12345, 2**64 - 1])
def test_kernel_uniforms_match_reference(seed):
    shape = (2, 3, 5, 2)
    out = np.empty(shape)
    fill_uniforms(seed & 0xFFFFFFFF, seed >> 32, _portable.STREAM_STOCHASTIC_VITERBI, out)
    np.testing.assert_array_equal(out, ref.uniforms_for_seed(seed, shape))
    assert ((out >= 0) & (out < 1)).all()


def test_uniforms_look_uniform():
    from scipy import stats

    out = np.empty((4, 50, 64, 8))
    fill_uniforms(7, 0, 0, out)
    assert stats.kstest(out.ravel(), "uniform").pvalue > 1e-3
    # neighbouring states and chains are not correlated
    assert abs(np.corrcoef(out[..., :-1, :].ravel(), out[..., 1:, :].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(out[..., :-1].ravel(), out[..., 1:].ravel())[0, 1]) < 0.01


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_samples", [None, 3])
def test_seed_equals_replay_of_its_uniforms(rng, dtype, num_samples):
    scores, tokens, E1, E2 = make_problem(rng, 3, 6, 7, dtype=dtype)
    seeded = stochastic_viterbi(scores, tokens, E1, E2, num_samples=num_samples, seed=99)
    N = num_samples or 1
    uniforms = ref.uniforms_for_seed(99, (3, 5, 7, N))
    replay = stochastic_viterbi(
        scores, tokens, E1, E2, num_samples=num_samples, uniforms=uniforms[..., 0] if num_samples is None else uniforms
    )
    for a, b in zip(seeded, replay):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_result_different_seed_differs(rng):
    scores, tokens, E1, E2 = make_problem(rng, 2, 8, 6)
    a = stochastic_viterbi(scores, tokens, E1, E2, num_samples=4, seed=5)
    b = stochastic_viterbi(scores, tokens, E1, E2, num_samples=4, seed=5)
    c = stochastic_viterbi(scores, tokens, E1, E2, num_samples=4, seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.backpointers, c.backpointers)
    d = stochastic_viterbi(scores, tokens, E1, E2, num_samples=4)  # fresh seeds differ
    e = stochastic_viterbi(scores, tokens, E1, E2, num_samples=4)
    assert not np.array_equal(d.backpointers, e.backpointers)


_SCRIPT = """
import hashlib, numpy as np, viterbi_numba as vn
rng = np.random.default_rng(3)
B, T, K, V, D = 5, 12, 16, 60, 8
scores = rng.standard_normal((B, T, K)).astype(np.float32)
tokens = rng.integers(0, V, (B, T, K))
E1 = rng.standard_normal((V, D)).astype(np.float32); E2 = rng.standard_normal((V, D)).astype(np.float32)
lengths = [12, 3, 7, 1, 12]
h = hashlib.sha256()
for r in (vn.stochastic_viterbi(scores, tokens, E1, E2, num_samples=3, seed=2024, lengths=lengths),
          vn.crf_sample(scores, tokens, E1, E2, num_samples=3, seed=2024, lengths=lengths),
          vn.log_partition_grad(scores, tokens, E1, E2, lengths=lengths)):  # its table gradient is chunked by threads
    for a in r:
        h.update(np.ascontiguousarray(a).tobytes())
print(h.hexdigest())
"""


def test_bit_identical_across_processes_and_thread_counts():
    """Stochastic Viterbi, the exact sampler and the gradients give the same bits with 1 or 2 threads."""
    digests = set()
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_float32_gpu_uniforms_are_the_top_24_bits():
    """The float32 GPU kernels draw _portable's uniform_pair_f32: each uniform is the float64 one cut to 24 bits."""
    for seed in (0, 2**64 - 1, 123456789):
        for counter in ((0, 0, 0, 0), (5, 3, 1, 7), (2**31, 9, 4, 0)):
            args = (seed & 0xFFFFFFFF, seed >> 32, _portable.STREAM_STOCHASTIC_VITERBI, *counter)
            wide = portable.uniform_pair(*args)
            narrow = portable.uniform_pair_f32(*args)
            for u, v in zip(wide, narrow):
                assert v == np.float32(v) == np.floor(u * 2**24) / 2**24 and 0 <= v <= u < 1


def test_float32_uniform_precision_moves_almost_no_draw():
    """The allowed CPU/GPU mismatch, measured on the CPU: the float32 GPU kernels use 24-bit uniforms,
    so a draw can differ only where its target lies within 2**-24 of the column total from a CDF step
    (the other difference, the order of float32 sums, is of the same size). Replaying the seed
    sampler's uniforms cut to 24 bits, at K = 256, N = 8, float32, moves at most 1 draw in 10^4."""
    rng = np.random.default_rng(8)
    scores, tokens, E1, E2 = make_problem(rng, 2, 12, 256, V=600, D=32, dtype=np.float32, scale=3.0)
    uniforms = ref.uniforms_for_seed(5, (2, 11, 256, 8))
    wide = stochastic_viterbi(scores, tokens, E1, E2, 8, uniforms=uniforms).backpointers
    narrow = stochastic_viterbi(scores, tokens, E1, E2, 8, uniforms=np.floor(uniforms * 2**24) / 2**24).backpointers
    rate = np.mean(wide != narrow)
    print(f"float32, 24-bit uniforms: {rate:.2e} of {wide.size} draws differ")
    assert rate <= 1e-4
