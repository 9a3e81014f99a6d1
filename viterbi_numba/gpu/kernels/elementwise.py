"""GPU kernels of the host path: the value checks behind ``gpu/checks.py`` (screens that set a slot of
the call's flag array, most writing a clamped or cast copy), fills and small per-element steps of
exact inference (one thread per element or row)."""

from __future__ import annotations

import math

from numba import cuda, int64

from .block import Family


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    NEG_INF = blk.NEG_INF
    POS_INF = blk.POS_INF
    ZERO = blk.ZERO
    nbtype = blk.nbtype
    family = Family()

    @cuda.jit(device=True)
    def split_index(e, T, N):
        """(b, t, n) of the flat index ``e`` into a C-ordered (B, T, N) array."""
        b = e // (T * N)
        rest = e - b * T * N
        t = rest // N
        return b, t, rest - t * N

    @family.kernel((t.f3, t.i1, t.f1, t.int32[::1], t.int64))
    def check_beam(scores, lengths, bounds, flags, slot):
        """One block per (b, t): flags[slot] = 1 on NaN/+inf in scores, or when t is before the
        sequence's length and no slot of the beam is above -inf; there bounds[0] takes the position's
        spread, its best minus its worst finite score, if it is larger (``_validate.beam_spread``)."""
        row = cuda.blockIdx.x
        T = scores.shape[1]
        b = row // T
        t = row - b * T
        high = cuda.shared.array(1, nbtype)
        low = cuda.shared.array(1, nbtype)
        if cuda.threadIdx.x == 0:
            high[0] = NEG_INF
            low[0] = POS_INF
        cuda.syncthreads()
        mine_high = NEG_INF
        mine_low = POS_INF
        for k in range(cuda.threadIdx.x, scores.shape[2], cuda.blockDim.x):
            x = scores[b, t, k]
            if not x < POS_INF:
                cuda.atomic.max(flags, slot, 1)
            elif x > NEG_INF:
                mine_high = max(mine_high, x)
                mine_low = min(mine_low, x)
        if mine_high > NEG_INF:
            cuda.atomic.max(high, 0, mine_high)
            cuda.atomic.min(low, 0, mine_low)
        cuda.syncthreads()
        if cuda.threadIdx.x == 0 and t < lengths[b]:
            if high[0] > NEG_INF:
                cuda.atomic.max(bounds, 0, high[0] - low[0])
            else:
                cuda.atomic.max(flags, slot, 1)

    @family.kernel((t.f2, t.f2, t.f1, t.int32[::1], t.int64))
    def check_tables(E1, E2, bounds, flags, slot):
        """A thread per row of E1 then of E2: flags[slot] = 1 on NaN or inf; bounds[1] and bounds[2] take
        the largest squared row norm of E1 and E2 (summed in this dtype, as ``_validate.squared_row_norm``)."""
        V, D = E1.shape
        largest = cuda.shared.array(2, nbtype)
        if cuda.threadIdx.x < 2:
            largest[cuda.threadIdx.x] = ZERO
        cuda.syncthreads()
        row = cuda.grid(1)
        if row < 2 * V:
            which = 0 if row < V else 1
            total = ZERO
            for d in range(D):
                x = E1[row, d] if which == 0 else E2[row - V, d]
                if not (x < POS_INF and x > NEG_INF):
                    cuda.atomic.max(flags, slot, 1)
                total += x * x
            cuda.atomic.max(largest, which, total)  # NaN is ignored: the flag reports it
        cuda.syncthreads()
        if cuda.threadIdx.x < 2:
            cuda.atomic.max(bounds, 1 + cuda.threadIdx.x, largest[cuda.threadIdx.x])

    @family.kernel((t.f1, t.f, t.f, t.f, t.f, t.int32[::1], t.int64), threads=1)
    def check_scale(bounds, steps, inv_temp, limit, exact_limit, flags, slot):
        """One thread: flags[slot] = 1 unless T (spread + |E1| |E2|) max(1, 1 / tau) <= limit and
        T (spread + |E1| |E2|) / tau <= exact_limit (``_validate.scale_fits``), with ``bounds`` =
        (spread, largest squared row norms of E1 and of E2) from ``check_beam`` and ``check_tables``."""
        if cuda.grid(1) == 0:
            untempered = steps * (bounds[0] + math.sqrt(bounds[1]) * math.sqrt(bounds[2]))
            tempered = untempered * inv_temp
            if not (untempered <= limit and tempered <= limit and tempered <= exact_limit):
                cuda.atomic.max(flags, slot, 1)

    @family.kernel((t.f1, t.int32[::1], t.int64))
    def check_finite(values, flags, slot):
        """flags[slot] = 1 if the 1-D array ``values`` holds NaN or inf."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            if not (values[e] < POS_INF and values[e] > NEG_INF):
                cuda.atomic.max(flags, slot, 1)

    @family.kernel((t.f1, t.f1, t.int32[::1], t.int64))
    def finite_copy(values, out, flags, slot):
        """out = values in this dtype (``values`` of any float dtype); flags[slot] = 1 on NaN or inf."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            x = values[e]
            if not (x < POS_INF and x > NEG_INF):
                cuda.atomic.max(flags, slot, 1)
            out[e] = x

    @family.kernel((t.f1, t.f1, t.int32[::1], t.int64))
    def unit_copy(values, out, flags, slot):
        """out = values in this dtype (``values`` of any float dtype), 0 where a value is outside [0, 1)
        (NaN too), which flags[slot] = 1 reports."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            u = values[e]
            if u >= 0 and u < 1:
                out[e] = u
            else:
                out[e] = 0
                cuda.atomic.max(flags, slot, 1)

    @family.kernel((t.i1, t.int64, t.int64, t.i1, t.int32[::1], t.int64))
    def clamp_range(values, low, high, out, flags, slot):
        """out = the 1-D integer array ``values`` clamped to [low, high - 1], as int64; flags[slot] = 1
        where a value lies outside [low, high)."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            v = int64(values[e])
            if v < low or v >= high:
                cuda.atomic.max(flags, slot, 1)
                v = low if v < low else high - 1
            out[e] = v

    @family.kernel((t.i3, t.i1, t.int64, t.int64, t.i3, t.int32[::1], t.int64))
    def mask_after_lengths(values, lengths, high, fill, out, flags, slot):
        """out[b, t, n] = values[b, t, n] before lengths[b] (clamped to [0, high), flags[slot] = 1 where it
        was outside); at and after it the value where it lies in [0, high), else ``fill``."""
        B, T, N = values.shape
        for e in range(cuda.grid(1), B * T * N, cuda.gridsize(1)):
            b, t, n = split_index(e, T, N)
            v = int64(values[b, t, n])
            if v < 0 or v >= high:
                if t < lengths[b]:
                    cuda.atomic.max(flags, slot, 1)
                    v = 0 if v < 0 else high - 1
                else:
                    v = fill
            out[b, t, n] = v

    @family.kernel((t.f2, t.f, t.f, t.f2, t.f1))
    def weight_scale(weights, inv_temp, sign, scale, rows):
        """scale[b, n] = weights[b, n] * inv_temp and rows[b] = sign * sum_n scale[b, n] (a thread per b)."""
        b = cuda.grid(1)
        if b < weights.shape[0]:
            total = ZERO
            for n in range(weights.shape[1]):
                scale[b, n] = weights[b, n] * inv_temp
                total += scale[b, n]
            rows[b] = sign * total

    @family.kernel((t.f1, t.f))
    def fill(values, value):  # also launched on int arrays (numba compiles that variant on first use)
        """values[:] = value for a 1-D array."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            values[e] = value

    @family.kernel((t.f3, t.f1, t.f3))
    def scale_rows(values, scale, out):
        """out[b, t, k] = values[b, t, k] * scale[b]."""
        B, T, K = values.shape
        for e in range(cuda.grid(1), B * T * K, cuda.gridsize(1)):
            b, t, k = split_index(e, T, K)
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

    @family.kernel((t.f3, t.i3, t.f3))
    def gather_beam(emissions, tokens, out):
        """out[b, t, k] = emissions[b, t, tokens[b, t, k]], a thread per entry (tokens in range: checked)."""
        B, T, K = tokens.shape
        e = cuda.grid(1)
        if e < B * T * K:
            b, t, k = split_index(e, T, K)
            out[b, t, k] = emissions[b, t, tokens[b, t, k]]

    return family
