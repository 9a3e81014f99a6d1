"""The CPU backend's host side (viterbi_numba/cpu/ops.py): memory errors and read-only inputs."""

import subprocess
import sys

import numpy as np

MEMORY = r"""
import resource, sys
import numpy as np
import viterbi_numba as vn
rng = np.random.default_rng(0)
def beam(K, V):
    tokens = np.stack([rng.choice(V, K, replace=False) for _ in range(2)])[None]
    return rng.standard_normal((1, 2, K)), tokens, rng.standard_normal((V, 2)), rng.standard_normal((V, 2))
vn.viterbi_decode(*beam(4, 8))  # compiled (or loaded) before the cap
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    vn.viterbi_decode(*beam(50_000, 60_000))
except MemoryError as error:
    print("MemoryError:", error)
"""


def test_a_kernel_that_cannot_allocate_raises_memory_error_saying_what_it_needs():
    """K = 50 000 with the address space capped at 4 GiB: the kernel's (K, K) scratch cannot be
    allocated, and the error is a MemoryError naming the size, not numba's SystemError."""
    done = subprocess.run([sys.executable, "-c", MEMORY], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MemoryError: the CPU kernels could not allocate their scratch arrays" in done.stdout, done.stdout
    assert "18.63 GiB each at K = 50000 in float64" in done.stdout


def test_read_only_inputs_compile_nothing_new(tmp_path):
    """Read-only inputs (a memory map, non-writeable arrays) run on the kernels compiled for writeable
    ones: no kernel gains a specialisation, the results are the same and the inputs are untouched."""
    from conftest import make_problem

    import viterbi_numba as vn
    from viterbi_numba.cpu import crf as crf_kernels
    from viterbi_numba.cpu import decode as decode_kernels

    scores, tokens, E1, E2 = make_problem(np.random.default_rng(5), 2, 4, 3, D=2)
    lengths = np.array([4, 2])
    emissions = np.random.default_rng(6).standard_normal((2, 4, E1.shape[0]))
    targets = np.zeros((2, 4), np.int64)

    def calls(s, t, e1, e2, n, em, tg):
        forward = vn.crf_forward(s, t, e1, e2, lengths=n)
        return [
            vn.viterbi_decode(s, t, e1, e2, lengths=n).score,
            vn.stochastic_viterbi(s, t, e1, e2, 2, lengths=n, seed=1).beam_probs,
            forward.log_z,
            forward.sample(2, seed=2).log_prob,
            vn.log_partition_grad(s, t, e1, e2, lengths=n).grad_E1,
            vn.log_likelihood_grad(em, tg, e1, e2, 3, n).grad_scores,
            vn.topk_beam(em, 3).scores,
        ]

    want = calls(scores, tokens, E1, E2, lengths, emissions, targets)
    kernels = [getattr(module, name) for module in (decode_kernels, crf_kernels) for name in dir(module)]
    kernels = [kernel for kernel in kernels if hasattr(kernel, "signatures")]
    compiled = {kernel: len(kernel.signatures) for kernel in kernels}
    path = tmp_path / "scores.npy"
    np.save(path, scores)
    read_only = [np.load(path, mmap_mode="r")]
    for array in (tokens, E1, E2, lengths, emissions, targets):
        array = array.copy()
        array.setflags(write=False)
        read_only.append(array)
    got = calls(*read_only)
    assert {kernel: len(kernel.signatures) for kernel in kernels} == compiled
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert not any(array.flags.writeable for array in read_only)
    np.testing.assert_array_equal(read_only[0], scores)
