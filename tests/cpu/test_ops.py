"""The CPU backend's host side (viterbi_numba/cpu/ops.py): BLAS threads, memory errors and read-only inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _scipy_wheel_openblas() -> bool:
    """SciPy's own OpenBLAS (its pip wheel's, in scipy.libs) with a process-wide pool: what the scenarios
    below assume (a count from OPENBLAS_NUM_THREADS, set through OpenBLAS's API)."""
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import threadpool_info

    return any(
        lib["internal_api"] == "openblas"
        and lib.get("threading_layer") == "pthreads"
        and "scipy.libs" in lib["filepath"]
        for lib in threadpool_info()
    )


needs_scipy_openblas = pytest.mark.skipif(
    not _scipy_wheel_openblas(), reason="needs SciPy's wheel OpenBLAS (pthreads); this SciPy links another BLAS"
)

# Each scenario runs in a process of its own, whose BLAS thread counts no earlier test has touched.
# argv: the tests folder, then "overlap" (two calls that overlap, the first to start finishing first),
# "controlled" (the same after the main thread has set a limit through threadpoolctl and kept it) or
# "many" (8 threads calling the real kernel at once).
BLAS_THREADS = r"""
import json, os, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import make_problem
import scipy, scipy.linalg.cython_blas  # SciPy's BLAS loaded, as the kernels load it
from threadpoolctl import threadpool_info, threadpool_limits
import viterbi_numba as vn
from viterbi_numba.cpu import ops

SITE = os.path.dirname(os.path.dirname(scipy.__file__))

def blas_threads():
    # {library: thread count} over the BLAS libraries, SciPy's (its wheel's own, or the only one) named "scipy"
    found = {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    scipys = [path for path in found if os.path.relpath(path, SITE).startswith("scipy") or len(found) == 1]
    return {"scipy" if path in scipys else path: n for path, n in found.items()}

scores, tokens, E1, E2 = make_problem(np.random.default_rng(0), 2, 3, 4, D=2)
mode = sys.argv[2]
if mode == "controlled":
    kept = threadpool_limits(limits=2)  # threadpoolctl now lets only the main thread set OpenBLAS's count
before = blas_threads()
names = [str(i) for i in range(8)] if mode == "many" else ["first", "second"]
inside, errors = [], []
started = threading.Barrier(len(names), timeout=60)
both_inside = threading.Barrier(2, timeout=10)
first_finished = threading.Event()

def kernel(*args):  # stands in for viterbi_kernel: waits until both calls are in, and the first is out
    inside.append(blas_threads())
    both_inside.wait()
    if threading.current_thread().name == "second":
        assert first_finished.wait(10)
        inside.append(blas_threads())  # the first call has finished; this one still runs

def call(name):
    try:
        started.wait()
        for _ in range(20 if mode == "many" else 1):
            vn.viterbi_decode(scores, tokens, E1, E2)
        if name == "first":
            first_finished.set()
    except BaseException as error:
        errors.append(repr(error))

if mode != "many":
    ops.decode_kernels.viterbi_kernel = kernel
threads = [threading.Thread(target=call, args=(name,), name=name) for name in names]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(120)
alive = [thread.name for thread in threads if thread.is_alive()]
print(json.dumps({"before": before, "inside": inside, "after": blas_threads(), "errors": errors, "alive": alive}))
"""


def blas_threads_in(mode):
    """What the BLAS_THREADS scenario ``mode`` saw, run with OpenBLAS on 2 threads (a known count above 1)."""
    done = subprocess.run(
        [sys.executable, "-c", BLAS_THREADS, os.path.dirname(HERE), mode],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "2"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert not found["errors"] and not found["alive"], found
    assert found["before"].get("scipy") == 2, found["before"]
    return found


@needs_scipy_openblas
@pytest.mark.parametrize("mode", ["overlap", "controlled"])
def test_overlapping_calls_share_one_limit_on_scipys_blas_and_restore_it(mode):
    """Two kernel calls from worker threads overlap, the first to start finishing while the other still
    runs (the kernel is replaced by one that waits for that interleaving). Inside both, SciPy's BLAS
    (the one the kernels call) has one thread and every other BLAS (NumPy's) keeps its count; afterwards
    every library has its count from before. A limit entered and left per call restores, last, the one
    thread that the second call found, and leaves SciPy's BLAS single-threaded for good.

    "controlled": the main thread has first set a limit through threadpoolctl and kept it; threadpoolctl
    then ignores the counts that any other thread sets for OpenBLAS, so the limit must not go through it."""
    found = blas_threads_in(mode)
    assert len(found["inside"]) == 3
    for counts in found["inside"]:
        assert counts == {**found["before"], "scipy": 1}, found
    assert found["after"] == found["before"]


@needs_scipy_openblas
def test_many_threads_calling_the_kernels_at_once_leave_the_blas_counts_as_they_were():
    """8 threads, 20 real viterbi_decode calls each, started together: afterwards every BLAS library has
    its thread count from before."""
    found = blas_threads_in("many")
    assert found["after"] == found["before"]


MEMORY = r"""
import resource, sys
import numpy as np
import viterbi_numba as vn
rng = np.random.default_rng(0)
def beam(K, V):
    tokens = np.stack([rng.choice(V, K, replace=False) for _ in range(2)])[None]
    return rng.standard_normal((1, 2, K)), tokens, rng.standard_normal((V, 2)), rng.standard_normal((V, 2))
vn.marginals(*beam(4, 8))  # compiled (or loaded) before the cap
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    vn.marginals(*beam(50_000, 60_000))
except MemoryError as error:
    print("MemoryError:", error)
"""


def test_a_kernel_that_cannot_allocate_raises_memory_error_saying_what_it_needs():
    """K = 50 000 with the address space capped at 4 GiB: the backward pass's (K, K) scratch cannot be
    allocated, and the error is a MemoryError naming the size, not numba's SystemError. (Viterbi, the
    forward pass and the stochastic sampler need none: they reduce their blocks strip by strip.)"""
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
