"""Value checks of GPU inputs (``_validate.Checks``): screening kernels into one flag array, read back once.

Each check records a screening kernel and the ``_validate`` rule that words its error. ``run()``
allocates the flags, launches every screen, reads the flags back once and, for the first screen that
flagged, applies its rule to a host copy of the array, so the error is word for word the CPU's.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .arrays import Library, grid
from .kernels import kernels
from .kernels.block import FIRST_ROW, threads_for

Rule = Callable[[np.ndarray], None]


class DeviceChecks:
    def __init__(self, lib: Library):
        self.lib = lib
        self.screens: list[tuple[int, Callable[[Any], None], Any, Rule]] = []  # (slot, launch, array, rule)
        self.rows: Any = None  # (scores, rule) of the beam check, whose per-row flags follow FIRST_ROW

    def _slot(self) -> int:
        slot = 2 + len(self.screens)
        if slot >= FIRST_ROW:  # pragma: no cover - a validator asks for at most a few checks
            raise RuntimeError("too many GPU value checks in one call")
        return slot

    def finite(self, values: Any, rule: Rule) -> None:
        slot = self._slot()

        def launch(flags: Any) -> None:
            flat = values.reshape(values.size)
            kernels(values.dtype).check_finite[grid(values.size), 256, self.lib.stream](flat, flags, slot)

        self.screens.append((slot, launch, values, rule))

    def in_range(self, values: Any, low: int, high: int, rule: Rule) -> None:
        slot = self._slot()

        def launch(flags: Any) -> None:
            flat = values.reshape(values.size)
            kernels(np.float64).check_range[grid(values.size), 256, self.lib.stream](flat, low, high, flags, slot)

        self.screens.append((slot, launch, values, rule))

    def beam(self, scores: Any, rule: Rule) -> None:
        """NaN/+inf in scores (slot 0) and, per (b, t) row, whether any slot is above -inf."""
        self.rows = (scores, rule)

    def run(self) -> None:
        B = T = 0
        if self.rows is not None:
            scores, beam_rule = self.rows
            B, T, K = scores.shape
        flags = self.lib.zeros((FIRST_ROW + B * T,), np.int32)[1]
        for _, launch, values, _ in self.screens:
            if values.size:
                launch(flags)
        if B * T:
            kernels(scores.dtype).check_beam[B * T, threads_for(K), self.lib.stream](scores, flags)
        host = self.lib.to_host(flags)
        if self.rows is not None:
            dead = host[FIRST_ROW:].reshape(B, T) == 0
            if host[0]:  # NaN/+inf: the rule quotes the first position, so it reads the scores themselves
                beam_rule(self.lib.to_host(scores))
            elif dead.any():  # a stand-in that is -inf exactly at the rows without a live slot
                beam_rule(np.where(dead[:, :, None], -np.inf, 0.0))
        for slot, _, values, rule in self.screens:
            if host[slot]:
                rule(self.lib.to_host(values))
                raise ValueError("an input failed a value check on the GPU")  # pragma: no cover
