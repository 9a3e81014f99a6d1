"""Which backend an array belongs to (docs/design.md §8).

A GPU array is anything with ``__cuda_array_interface__`` (numba device arrays, CuPy, torch CUDA
tensors), a numba device array of the CUDA simulator, or an object whose DLPack device is CUDA. Telling
them apart never imports numba-cuda: the GPU backend is imported only when a GPU array is passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    from .cpu.ops import CPUOps
    from .gpu.ops import GPUOps

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def is_numba_device_array(value: Any) -> bool:
    """A numba device array (real, or the CUDA simulator's, which has no __cuda_array_interface__)."""
    return bool(getattr(type(value), "__cuda_ndarray__", False))


def is_gpu_array(value: Any) -> bool:
    """True for an object that lives on a CUDA device (checked without importing numba-cuda)."""
    try:
        if hasattr(value, "__cuda_array_interface__") or is_numba_device_array(value):
            return True
    except RuntimeError:  # torch: a CUDA tensor that requires grad refuses to export itself
        return True
    device = getattr(value, "__dlpack_device__", None)
    if device is None or isinstance(value, np.ndarray):
        return False
    try:
        return device()[0] in _DLPACK_CUDA
    except Exception:  # noqa: BLE001 - an object whose DLPack device cannot be read is not ours
        return False


def backend_of(**arrays: Any) -> Union[CPUOps, GPUOps]:
    """The backend that runs an operation on these main input arrays (None entries are skipped).

    All host arrays: the CPU backend. Any GPU array: the GPU backend of the first one (its library
    allocates the results and gives the stream); a host array among them is then a ``TypeError``, and a
    GPU array where no GPU is usable a ``RuntimeError`` saying what is missing.
    """
    on_gpu = [name for name, value in arrays.items() if value is not None and is_gpu_array(value)]
    if not on_gpu:
        from .cpu.ops import CPU

        return CPU
    from .gpu.ops import GPUOps

    ops = GPUOps(arrays[on_gpu[0]])  # first: a GPU array where no GPU is usable is a RuntimeError
    on_host = [name for name, value in arrays.items() if value is not None and name not in on_gpu]
    if on_host:
        raise TypeError(
            f"{on_host[0]} is a host array but the other inputs are on the GPU; pass all arrays on one device"
        )
    return ops
