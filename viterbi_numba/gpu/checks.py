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

from .._validate import EXACT_LIMIT, OVERFLOW_LIMIT, read_gpu_flags
from .arrays import Library, grid
from .kernels import kernels
from .kernels.block import threads_for

SLOTS = 16  # checks per call (a call makes at most eight)


class DeviceChecks:
    def __init__(self, lib: Library):
        self.lib = lib
        self.flags: Any = None  # (SLOTS,) int32 on the device, made by the first check
        self.failures: list[Callable[[], None]] = []  # by slot: raises that slot's error from host copies
        self.bounds: Any = None  # (3,) magnitudes gathered for the scale check (``_bounds``)

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

    def _screened_copy(self, kernel: Any, values: Any, dtype: Any, rule: Callable[..., None], *options: Any) -> Any:
        """A copy of ``values`` in ``dtype``, written by ``kernel(flat values, *options, flat copy, flags,
        slot)``, which flags (and replaces) the values that break ``rule``."""
        flags, slot = self.slot(rule, values)
        out = self.lib.empty(values.shape, dtype)[1]
        if values.size:
            flat = (values.reshape(values.size), *options, out.reshape(values.size), flags, slot)
            kernel[grid(values.size), 256, self.lib.stream](*flat)
        self.settle()
        return out

    def finite_cast(self, values: Any, dtype: np.dtype, rule: Callable[[np.ndarray], None]) -> Any:
        """``values`` in ``dtype`` (a copy), after screening them for NaN and inf."""
        return self._screened_copy(kernels(dtype).finite_copy, values, dtype, rule)

    def in_range(self, values: Any, low: int, high: int, rule: Callable[[np.ndarray], None]) -> Any:
        """int64 ``values`` clamped to [low, high - 1] (a copy); flags values outside [low, high)."""
        return self._screened_copy(kernels(np.float64).clamp_range, values, np.int64, rule, low, high)

    def unit_interval(self, values: Any, dtype: np.dtype, rule: Callable[[np.ndarray], None]) -> Any:
        """``values`` in ``dtype`` (a copy), with values outside [0, 1) (NaN too) flagged and read as 0."""
        return self._screened_copy(kernels(dtype).unit_copy, values, dtype, rule)

    def _bounds(self, dtype: np.dtype) -> Any:
        """This call's (3,) magnitudes in ``dtype``, zeros at first: the beam's spread and the tables'
        largest squared row norms, gathered by ``beam`` and ``tables`` for ``scale``."""
        if self.bounds is None:
            self.bounds = self.lib.zeros((3,), dtype)[1]
        return self.bounds

    def tables(self, E1: Any, E2: Any, rule: Callable[..., None]) -> None:
        """Flags NaN/inf in E1 or E2 (V, D), and gathers their largest squared row norms (one launch)."""
        flags, slot = self.slot(rule, E1, E2)
        rows = 2 * E1.shape[0]
        kernels(E1.dtype).check_tables[-(-rows // 256), 256, self.lib.stream](
            E1, E2, self._bounds(E1.dtype), flags, slot
        )
        self.settle()

    def beam(self, scores: Any, lengths: Any, rule: Callable[..., None]) -> None:
        """Flags NaN/+inf in scores (B, T, K) and a position before its length whose beam is all -inf, and
        gathers the largest spread of a position's finite scores."""
        flags, slot = self.slot(rule, scores, lengths)
        B, T, K = scores.shape
        if B * T:
            kernels(scores.dtype).check_beam[B * T, threads_for(K), self.lib.stream](
                scores, lengths, self._bounds(scores.dtype), flags, slot
            )
        self.settle()

    def scale(
        self,
        scores: Any,
        lengths: Any,
        E1: Any,
        E2: Any,
        temperature: float,
        exact: bool,
        rule: Callable[..., None],
    ) -> None:
        """Flags magnitudes beyond ``_validate.OVERFLOW_LIMIT`` (and ``EXACT_LIMIT`` when ``exact``), from
        what ``tables`` and ``beam`` gathered in this call (one thread)."""
        flags, slot = self.slot(rule, scores, lengths, E1, E2)
        dtype = np.dtype(scores.dtype)
        scalar = dtype.type
        limit = scalar(OVERFLOW_LIMIT[dtype])
        exact_limit = scalar(EXACT_LIMIT[dtype]) if exact else limit
        with np.errstate(over="ignore"):  # 1 / tau beyond float32's range is inf, which the check flags
            inv_temp = scalar(1.0 / temperature)
        kernels(dtype).check_scale[1, 1, self.lib.stream](
            self._bounds(dtype), scalar(scores.shape[1]), inv_temp, limit, exact_limit, flags, slot
        )
        self.bounds = None  # spent: another CRF checked in this call (crf_kl's q) gathers its own
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
        self.failures, self.flags, self.bounds = [], None, None
        if not failures or not read_gpu_flags():
            return
        host = self.lib.to_host(flags)
        for slot, fail in enumerate(failures):
            if host[slot]:
                fail()
                raise ValueError("an input failed a value check on the GPU")  # pragma: no cover
