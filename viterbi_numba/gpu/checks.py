"""Value checks of GPU inputs (``_validate.Checks``): one flag array per call, read back once at its end.

Each check launches a screening kernel at once, on the call's stream, that sets its slot of the call's
flag array, and records how to word its error: the ``_validate`` rule, applied to host copies of the
arrays. The screens of index arrays (token ids, lengths, slots, paths) also write a clamped copy that
the kernels read instead of the input, so no kernel indexes out of bounds before the flags are read.
Kernels that find a bad value themselves (top-K's NaN) take a slot too (``slot``). ``verify()``, at the
end of the call (``GPUOps.call``), reads the flags back once — not at all inside
``skip_gpu_checks()`` — and raises the first flagged check's error, in the order the checks were made.

The CUDA simulator runs kernels as Python, which raises on the math errors (log of 0) that a GPU turns
into -inf or NaN, so there each check is settled as soon as it is made, by a direct copy that is not a
read-back of the real path: the call then fails before its kernels run on bad values.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from numba import config

from .._validate import read_gpu_flags
from .arrays import Library, grid
from .kernels import kernels
from .kernels.block import threads_for

SLOTS = 16  # checks per call (a call makes at most eight)


class DeviceChecks:
    def __init__(self, lib: Library):
        self.lib = lib
        self.flags: Any = None  # (SLOTS,) int32 on the device, made by the first check
        self.failures: list[Callable[[], None]] = []  # by slot: raises that slot's error from host copies

    def _host(self, *arrays: Any) -> list[np.ndarray]:
        return [self.lib.to_host(array) for array in arrays]

    def slot(self, rule: Callable[..., None], *arrays: Any) -> tuple[Any, int]:
        """(flags, slot) for a kernel that sets flags[slot] when ``rule`` must be applied to host copies of
        ``arrays`` (which words the error)."""
        if self.flags is None:
            self.flags = self.lib.zeros((SLOTS,), np.int32)[1]
        if len(self.failures) == SLOTS:  # pragma: no cover - a call makes at most eight checks
            raise RuntimeError("too many GPU value checks in one call")
        self.failures.append(lambda: rule(*self._host(*arrays)))
        return self.flags, len(self.failures) - 1

    def settle(self) -> None:
        """In the simulator only: raise the latest check's error now (see the module docstring)."""
        if config.ENABLE_CUDASIM and read_gpu_flags() and self.flags.copy_to_host()[len(self.failures) - 1]:
            self.failures[-1]()

    def finite(self, values: Any, rule: Callable[[np.ndarray], None]) -> None:
        flags, slot = self.slot(rule, values)
        if values.size:
            flat = values.reshape(values.size)
            kernels(values.dtype).check_finite[grid(values.size), 256, self.lib.stream](flat, flags, slot)
        self.settle()

    def finite_cast(self, values: Any, dtype: np.dtype, rule: Callable[[np.ndarray], None]) -> Any:
        """``values`` in ``dtype`` (a copy), after screening them for NaN and inf."""
        flags, slot = self.slot(rule, values)
        out = self.lib.empty(values.shape, dtype)[1]
        if values.size:
            kernels(dtype).finite_copy[grid(values.size), 256, self.lib.stream](
                values.reshape(values.size), out.reshape(values.size), flags, slot
            )
        self.settle()
        return out

    def in_range(self, values: Any, low: int, high: int, rule: Callable[[np.ndarray], None]) -> Any:
        """int64 ``values`` clamped to [low, high - 1] (a copy); flags values outside [low, high)."""
        flags, slot = self.slot(rule, values)
        out = self.lib.empty(values.shape, np.int64)[1]
        if values.size:
            kernels(np.float64).clamp_range[grid(values.size), 256, self.lib.stream](
                values.reshape(values.size), low, high, out.reshape(values.size), flags, slot
            )
        self.settle()
        return out

    def unit_interval(self, values: Any, dtype: np.dtype, rule: Callable[[np.ndarray], None]) -> Any:
        """``values`` in ``dtype`` (a copy), with values outside [0, 1) (NaN too) flagged and read as 0."""
        flags, slot = self.slot(rule, values)
        out = self.lib.empty(values.shape, dtype)[1]
        if values.size:
            kernels(dtype).unit_copy[grid(values.size), 256, self.lib.stream](
                values.reshape(values.size), out.reshape(values.size), flags, slot
            )
        self.settle()
        return out

    def beam(self, scores: Any, lengths: Any, rule: Callable[..., None]) -> None:
        """Flags NaN/+inf in scores (B, T, K) and a position before its length whose beam is all -inf."""
        flags, slot = self.slot(rule, scores, lengths)
        B, T, K = scores.shape
        if B * T:
            kernels(scores.dtype).check_beam[B * T, threads_for(K), self.lib.stream](scores, lengths, flags, slot)
        self.settle()

    def before_lengths(self, values: Any, lengths: Any, high: int, fill: int, rule: Callable[..., None]) -> Any:
        """int64 ids (B, T, N) (paths, targets) clamped to [0, high) before each length, where a value
        outside it is flagged; at and after it a value outside [0, high) becomes ``fill`` (a copy)."""
        flags, slot = self.slot(rule, values, lengths)
        out = self.lib.empty(values.shape, np.int64)[1]
        if values.size:
            kernels(np.float64).mask_after_lengths[grid(values.size), 256, self.lib.stream](
                values, lengths, high, fill, out, flags, slot
            )
        self.settle()
        return out

    def verify(self) -> None:
        """Read the flags back (once; not inside ``skip_gpu_checks()``) and raise the first flagged
        check's error. The checks are spent either way."""
        failures, flags = self.failures, self.flags
        self.failures, self.flags = [], None
        if not failures or not read_gpu_flags():
            return
        host = self.lib.to_host(flags)
        for slot, fail in enumerate(failures):
            if host[slot]:
                fail()
                raise ValueError("an input failed a value check on the GPU")  # pragma: no cover
