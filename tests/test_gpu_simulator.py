"""Runs the CUDA-simulator suite (tests/gpu) in a process of its own, and checks that the package
works without a GPU: the CPU path never touches CUDA, and a GPU array gives a clear error."""

import os
import subprocess
import sys

HERE = os.path.dirname(__file__)


def _run(args, **env):
    return subprocess.run(
        [sys.executable, *args],
        cwd=os.path.dirname(HERE),
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=1200,
    )


def test_cuda_simulator_suite():
    done = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "gpu")], NUMBA_ENABLE_CUDASIM="1")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


NO_GPU_SCRIPT = r"""
import sys
import numpy as np
import viterbi_numba as vn

assert not any(name.startswith("viterbi_numba.gpu") for name in sys.modules)
rng = np.random.default_rng(0)
scores = rng.standard_normal((2, 3, 4))
tokens = np.tile(np.arange(4), (2, 3, 1))
E1 = rng.standard_normal((6, 2))
vn.viterbi_decode(scores, tokens, E1, E1)
vn.crf_sample(scores, tokens, E1, E1, 2, seed=0)
assert not any(name.startswith("viterbi_numba.gpu") for name in sys.modules), "the CPU path imported the GPU backend"
from viterbi_numba.gpu.arrays import gpu_available

assert not gpu_available()


class FakeGpuArray:
    __cuda_array_interface__ = {"shape": (2, 3, 4), "typestr": "<f8", "data": (0, False), "version": 3}


try:
    vn.viterbi_decode(FakeGpuArray(), tokens, E1, E1)
except RuntimeError as error:
    print("ERROR:", error)
"""


def test_without_a_gpu_the_cpu_path_works_and_gpu_arrays_get_a_clear_error():
    done = _run(
        ["-c", NO_GPU_SCRIPT], NUMBA_ENABLE_CUDASIM="0", CUDA_VISIBLE_DEVICES=""
    )  # no GPU, even on a GPU machine
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR: a GPU array was given but no CUDA GPU is usable here" in done.stdout, done.stdout


def test_gpu_benchmark_says_what_is_missing():
    done = _run([os.path.join(os.path.dirname(HERE), "benchmarks", "gpu.py")], CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no CUDA GPU" in done.stderr


def test_gpu_arrays_are_recognised_without_importing_numba_cuda():
    import numpy as np

    from viterbi_numba._devices import is_gpu_array

    class Interface:
        __cuda_array_interface__ = {}

    class DLPack:
        def __init__(self, device_type):
            self.device_type = device_type

        def __dlpack__(self):  # pragma: no cover - never called by the check
            raise AssertionError

        def __dlpack_device__(self):
            return (self.device_type, 0)

    class RefusesToExport:  # like a torch CUDA tensor that requires grad
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("requires grad")

    assert is_gpu_array(Interface()) and is_gpu_array(DLPack(2)) and is_gpu_array(RefusesToExport())
    assert not is_gpu_array(np.zeros(3)) and not is_gpu_array(DLPack(1)) and not is_gpu_array([1.0])
    torch = __import__("pytest").importorskip("torch")
    assert not is_gpu_array(torch.zeros(3)) and not is_gpu_array(torch.zeros(3, requires_grad=True))
