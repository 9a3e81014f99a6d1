"""GPU kernels of the host path: the value checks behind ``gpu/checks.py``, fills and small per-element
steps of exact inference (one thread per element or row)."""

from __future__ import annotations

from numba import cuda

from .block import FIRST_ROW, Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    NEG_INF = blk.NEG_INF
    POS_INF = blk.POS_INF
    family = Family()

    @family.kernel((t.f3, t.int32[::1]))
    def check_beam(scores, flags):
        """One block per (b, t): flags[0] = 1 on NaN/+inf in scores; flags[FIRST_ROW + b * T + t] = 1
        where the beam holds a score above -inf."""
        row = cuda.blockIdx.x
        T = scores.shape[1]
        b = row // T
        t = row - b * T
        alive = 0
        for k in range(cuda.threadIdx.x, scores.shape[2], cuda.blockDim.x):
            x = scores[b, t, k]
            if not x < POS_INF:
                cuda.atomic.max(flags, 0, 1)
            if x > NEG_INF:
                alive = 1
        if alive == 1:
            cuda.atomic.max(flags, FIRST_ROW + row, 1)

    @family.kernel((t.f1, t.int32[::1], t.int64))
    def check_finite(values, flags, slot):
        """flags[slot] = 1 if the 1-D array ``values`` holds NaN or inf."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            if not (values[e] < POS_INF and values[e] > NEG_INF):
                cuda.atomic.max(flags, slot, 1)

    @family.kernel((t.i1, t.int64, t.int64, t.int32[::1], t.int64))
    def check_range(values, low, high, flags, slot):
        """flags[slot] = 1 if the 1-D integer array ``values`` holds a value outside [low, high)."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            if values[e] < low or values[e] >= high:
                cuda.atomic.max(flags, slot, 1)

    @family.kernel((t.f1, t.f))
    def fill(values, value):
        """values[:] = value for a 1-D array."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            values[e] = value

    @family.kernel((t.f3, t.f1, t.f3))
    def scale_rows(values, scale, out):
        """out[b, t, k] = values[b, t, k] * scale[b]."""
        B, T, K = values.shape
        for e in range(cuda.grid(1), B * T * K, cuda.gridsize(1)):
            b = e // (T * K)
            rest = e - b * T * K
            t = rest // K
            k = rest - t * K
            out[b, t, k] = values[b, t, k] * scale[b]

    @family.kernel((t.i3, t.i2, t.i3))
    def find_slots(beam_tokens, targets, slots):
        """slots[b, t, 0] = the first beam slot holding targets[b, t] (a thread per (b, t))."""
        B, T, K = beam_tokens.shape
        row = cuda.grid(1)
        if row >= B * T:
            return
        b = row // T
        t = row - b * T
        slot = 0
        for k in range(K - 1, -1, -1):
            if beam_tokens[b, t, k] == targets[b, t]:
                slot = k
        slots[b, t, 0] = slot

    @family.kernel((t.f2, t.f1, t.f, t.f2))
    def path_log_prob(path_score, log_z, inv_temp, out):
        """out[b, n] = path_score[b, n] * inv_temp - log_z[b]."""
        B, N = path_score.shape
        e = cuda.grid(1)
        if e < B * N:
            b = e // N
            out[b, e - b * N] = path_score[b, e - b * N] * inv_temp - log_z[b]

    return family
