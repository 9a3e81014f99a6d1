"""GPU arrays: numba-cuda and a usable GPU, the caller's array library (allocation, stream) and how the GPU
backend reads its inputs.

Results are allocated by the library of the first GPU input (torch in, torch out on the same device;
CuPy in, CuPy out; otherwise numba device arrays) and the kernels run on that library's current stream.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Optional

import numpy as np

from .._devices import is_gpu_array, is_numba_device_array

__all__ = ["DeviceArrays", "Library", "gpu_available", "require_gpu"]


def cuda_module() -> Any:
    """numba.cuda, after checking that a GPU (or the simulator) can run kernels."""
    try:
        from numba import cuda
    except ImportError as error:  # pragma: no cover - numba always has cuda or numba-cuda provides it
        raise RuntimeError("GPU arrays need numba-cuda: pip install 'viterbi-numba[cuda]'") from error
    if not cuda.is_available():
        raise RuntimeError(
            "a GPU array was given but no CUDA GPU is usable here (numba.cuda.is_available() is False); "
            "pass NumPy arrays for the CPU kernels, or install numba-cuda with a CUDA driver "
            "(pip install 'viterbi-numba[cuda]')"
        )
    _check_cuda_versions(cuda)
    return cuda


def cuda_version_problem(driver: tuple[int, int], toolkit: int) -> Optional[str]:
    """What is wrong when the driver's CUDA version (major, minor) is older than the toolkit's major
    version that numba-cuda compiles with, else None."""
    if driver[0] >= toolkit:
        return None
    extra = f"cuda{driver[0]}" if driver[0] in (12, 13) else "cuda12"
    return (
        f"the CUDA driver here supports CUDA {driver[0]}.{driver[1]}, but numba-cuda compiles with the CUDA "
        f"{toolkit} toolkit, which needs a newer driver: install the matching extra "
        f"(pip install 'viterbi-numba[{extra}]') or update the driver"
    )


@cache
def _check_cuda_versions(cuda: Any) -> None:
    """Once per process: the driver is new enough for numba-cuda's toolkit (else the first launch fails
    with a linker error that does not say why)."""
    from numba import config

    if config.ENABLE_CUDASIM:
        return
    try:
        from cuda import bindings

        toolkit = int(bindings.__version__.split(".")[0])
        driver = tuple(cuda.cudadrv.driver.driver.get_version())
    except Exception:  # pragma: no cover - an unusual installation: let numba-cuda speak for itself
        return
    problem = cuda_version_problem((int(driver[0]), int(driver[1])), toolkit)
    if problem:
        raise RuntimeError(problem)


def require_gpu() -> None:
    """Raise a RuntimeError saying why, unless GPU kernels can run here (numba-cuda, a usable GPU, a
    driver as new as the CUDA toolkit numba-cuda compiles with)."""
    cuda_module()
    from .kernels import kernels

    kernels(np.float32)  # the kernel modules import (numba-cuda and its compiler are present)


def gpu_available() -> bool:
    """True when GPU kernels can run here (numba-cuda and a CUDA GPU, or the CUDA simulator)."""
    try:
        require_gpu()
    except (RuntimeError, ImportError):
        return False
    return True


class Library:
    """Allocates outputs and picks the stream like the library of a GPU array ``sample``."""

    def __init__(self, sample: Any):
        self.cuda = cuda_module()
        module = type(sample).__module__.split(".")[0]
        self.kind = module if module in ("torch", "cupy") else "numba"
        self.sample = sample
        if self.kind == "torch":
            import torch

            self.torch = torch
            self._use_device(sample.device.index or 0)
            self.stream = self._external(torch.cuda.current_stream(sample.device).cuda_stream)
        elif self.kind == "cupy":
            import cupy

            self.cupy = cupy
            self._use_device(sample.device.id)
            self.stream = self._external(cupy.cuda.get_current_stream().ptr)
        else:
            self.stream = self.cuda.default_stream()

    def _use_device(self, index: int) -> None:
        """Make numba launch on the array's GPU (one process per GPU, as under DDP, is not always GPU 0)."""
        from numba import config

        if not config.ENABLE_CUDASIM and self.cuda.get_current_device().id != index:
            self.cuda.select_device(index)

    def _external(self, pointer: int) -> Any:
        from numba import config

        if config.ENABLE_CUDASIM or not pointer:
            return self.cuda.default_stream()
        return self.cuda.external_stream(pointer)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
        """(native array, numba view) of a new uninitialised array."""
        dtype = np.dtype(dtype)
        if self.kind == "torch":
            torch_dtype = {
                np.dtype(np.float32): self.torch.float32,
                np.dtype(np.float64): self.torch.float64,
                np.dtype(np.int64): self.torch.int64,
                np.dtype(np.int32): self.torch.int32,
            }[dtype]
            native = self.torch.empty(tuple(shape), dtype=torch_dtype, device=self.sample.device)
        elif self.kind == "cupy":
            native = self.cupy.empty(tuple(shape), dtype=dtype)
        else:
            native = self.cuda.device_array(tuple(shape), dtype=dtype, stream=self.stream)
        return native, self.view(native)

    def view(self, native: Any) -> Any:
        if self.kind == "numba":
            return native
        return self.cuda.as_cuda_array(native, sync=False)

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> tuple[Any, Any]:
        """(native, view) of a new array holding ``value`` everywhere, filled on the device (no host
        memory is copied, so it can be captured in a CUDA graph)."""
        native, view = self.empty(shape, dtype)
        if view.size:
            from .kernels import kernels

            flat = view.reshape(view.size)
            kernels(np.float64).fill[grid(view.size), 256, self.stream](flat, flat.dtype.type(value))
        return native, view

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
        return self.full(shape, 0, dtype)

    def to_device(self, host: np.ndarray) -> tuple[Any, Any]:
        native, view = self.empty(host.shape, host.dtype)
        if host.size:
            view.copy_to_device(np.ascontiguousarray(host), stream=self.stream)
        return native, view

    def to_host(self, view: Any) -> np.ndarray:
        out = view.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return out


def multiprocessors() -> int:
    """Multiprocessors of the current GPU (1 in the CUDA simulator)."""
    from numba import config

    if config.ENABLE_CUDASIM:
        return 1
    return int(cuda_module().get_current_device().MULTIPROCESSOR_COUNT)


def grid(size: int, threads: int = 256) -> int:
    """Blocks for a grid-stride loop over ``size`` elements."""
    return max(1, min(1024, -(-size // threads)))


class DeviceArrays:
    """How the GPU backend reads its inputs (``_validate.Arrays``): numba views of the caller's arrays,
    never copied or cast (GPU inputs must already be float32 or float64, one dtype, and int64 ids)."""

    def __init__(self, sample: Any):
        from .kernels.block import MAX_D, MAX_K

        self.lib = Library(sample)
        self._checks: Any = None
        self.max_beam: Optional[int] = MAX_K
        self.max_rank: Optional[int] = MAX_D

    def view(self, value: Any, name: str) -> Any:
        """A C-contiguous numba device view of a GPU input, or TypeError naming it."""
        if not is_gpu_array(value):
            raise TypeError(
                f"{name} is a host array but the other inputs are on the GPU; pass all arrays on one device"
            )
        if is_numba_device_array(value):
            view = value
        elif getattr(value, "requires_grad", False):
            raise TypeError(f"{name} requires grad: pass {name}.detach() (or use the torch adapter's modules)")
        elif hasattr(value, "__cuda_array_interface__"):
            view = self.lib.cuda.as_cuda_array(value, sync=False)
        else:
            from cuda.core.utils import StridedMemoryView

            memory = StridedMemoryView.from_dlpack(value, stream_ptr=-1)
            itemsize = np.dtype(memory.dtype).itemsize
            strides = None if memory.strides is None else tuple(s * itemsize for s in memory.strides)
            view = self.lib.cuda.from_cuda_array_interface(
                {
                    "shape": tuple(memory.shape),
                    "strides": strides,
                    "typestr": np.dtype(memory.dtype).str,
                    "data": (memory.ptr, memory.readonly),
                    "version": 3,
                },
                owner=value,
                sync=False,
            )
        if not view.is_c_contiguous():
            raise ValueError(f"{name} must be C-contiguous on the GPU")
        return view

    def float_array(self, value: Any, name: str, ndim: int) -> Any:
        view = self.view(value, name)
        if view.dtype not in (np.float32, np.float64):
            raise TypeError(
                f"{name} must be float32 or float64 on the GPU (cast float16/bfloat16 first), got {view.dtype}"
            )
        if view.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {view.shape}")
        return view

    def int_array(self, value: Any, name: str, shape: tuple[int, ...]) -> Any:
        view = self.view(value, name)
        if view.dtype != np.int64:
            raise TypeError(f"{name} must be an int64 array on the GPU, got dtype {view.dtype}")
        if view.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {view.shape}")
        return view

    def cast(self, array: Any, dtype: np.dtype, name: str) -> Any:
        if array.dtype != dtype:
            raise TypeError(
                f"{name} must have the dtype of the other float inputs ({dtype}) on the GPU, got {array.dtype}"
            )
        return array

    def small_array(self, value: Any, name: str) -> Any:
        """A device view of a small input (lengths, weights, uniforms, paths) given on the device, or a
        device copy of one given on the host (not read back either way; the checks screen it there)."""
        if is_gpu_array(value):
            view = self.view(value, name)
            if view.dtype.kind == "f" and view.dtype not in (np.float32, np.float64):
                raise TypeError(f"{name} must be float32 or float64 on the GPU, got {view.dtype}")
            return view
        host = np.asarray(value)
        if host.dtype == np.float16:  # computed in float32, as on the CPU
            host = host.astype(np.float32)
        if not (np.issubdtype(host.dtype, np.number) or host.dtype == np.bool_):
            return host  # the validators name the argument and its dtype
        return self.lib.cuda.to_device(np.ascontiguousarray(host), stream=self.lib.stream)

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> Any:
        return self.lib.full(shape, value, dtype)[1]

    def checks(self) -> Any:
        """This call's value checks (one flag array, read back by ``GPUOps.call``)."""
        if self._checks is None:
            from .checks import DeviceChecks

            self._checks = DeviceChecks(self.lib)
        return self._checks

    def verify(self) -> None:
        """End of a call: read its checks' flags back once and raise the first failure (``checks.py``)."""
        checks, self._checks = self._checks, None
        if checks is not None:
            checks.verify()
