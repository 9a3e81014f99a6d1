"""Block-wide GPU primitives shared by every kernel family, compiled per float dtype.

``build(dtype)`` returns a namespace with the dtype's typed constants (every float constant in a float32
kernel is a float32, so its PTX has no ``.f64`` instruction; docs/design.md §7), the argument types the
kernels are launched with (``types``), the shared device functions of ``_portable`` (RNG, compensated
sums) and the block primitives below. Reductions over a block (max, sum, first crossing) are warp
shuffles, then one shared-memory step across the warps (in the CUDA simulator, which has no shuffles:
a shared-memory tree); the running sums of the inverse-CDF search are a shared-memory scan. Blocks are
a power of two threads, whole warps on a GPU.

:class:`Family` collects a family's kernels with the signature each is launched with, written on the
line above the kernel (``kernels.compile_ptx`` compiles ahead of time from them).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
from numba import boolean, config, cuda, from_dtype, int32, int64

from ... import _portable
from ..._portable import PAD

__all__ = ["PAD", "Family", "block_limits", "build", "threads_for"]

MAX_THREADS = 256  # threads per block (a power of two)
RANKS = (16, 32, 64, 128)  # the compiled low-rank sizes: D is padded (with zeros) to the next of these
MAX_D = RANKS[-1]  # largest low-rank dimension
TRANSITIONS_BUDGET = 32 * 1024 * 1024  # bytes of (K, K) blocks per chunk of steps: within an A100/H100 L2
MAX_K = 1024  # largest beam (top-K keeps 2 * max(K, 4 * threads) entries in shared memory)
SHARED_BUDGET = 40 * 1024  # dynamic shared memory per block, bytes (below the 48 KiB default limit)
FULL_MASK = 0xFFFFFFFF  # every lane of a warp takes part in the shuffles

portable = _portable.build(cuda.jit(device=True))


def block_limits() -> tuple[int, int]:
    """(fewest, most) threads per block: a warp to 256 on a GPU; 1 to 4 in the CUDA simulator, which
    runs each thread as a Python thread (tests there use K above 4 to exercise the strided loops)."""
    return (1, 4) if config.ENABLE_CUDASIM else (32, MAX_THREADS)


def rank_for(D: int) -> int:
    """The compiled size a low-rank dimension D runs at: the smallest of RANKS that holds it."""
    return next(rank for rank in RANKS if D <= rank)


def threads_for(K: int) -> int:
    """Threads per block for a beam of K: a power of two, K or more where the limit allows."""
    threads, most = block_limits()
    while threads < K and threads < most:
        threads *= 2
    return threads


class Family:
    """A family's kernels (attributes), the argument types each is launched with (``signatures``) and
    the most threads per block it is launched with (``threads``, also its ``launch_bounds``)."""

    def __init__(self) -> None:
        self.signatures: dict[str, tuple] = {}
        self.threads: dict[str, int] = {}

    def kernel(self, signature: tuple, threads: int = MAX_THREADS) -> Callable[[Any], Any]:
        """Compile the decorated function as a kernel launched with ``signature`` and at most ``threads``
        threads per block (the simulator takes no launch bounds)."""

        def register(function: Any) -> Any:
            kernel = cuda.jit(function) if config.ENABLE_CUDASIM else cuda.jit(launch_bounds=threads)(function)
            name = function.__name__
            setattr(self, name, kernel)
            self.signatures[name] = signature
            self.threads[name] = threads
            return kernel

        return register


def launch_types(dtype: np.dtype) -> SimpleNamespace:
    """Numba types of the launch arguments for float dtype ``dtype``: C-contiguous arrays of rank 1-4
    (``f1``..``f4`` float, ``i1``..``i4`` int64), scalars (``f``, ``int64``, ``int32``, ``boolean``: Python
    ints are int64 and bools boolean), and ``beam`` = (scores, tokens, E1, E2, lengths)."""
    f = from_dtype(np.dtype(dtype))
    f1, f2, f3, f4 = f[::1], f[:, ::1], f[:, :, ::1], f[:, :, :, ::1]
    i1, i2, i3, i4 = int64[::1], int64[:, ::1], int64[:, :, ::1], int64[:, :, :, ::1]
    return SimpleNamespace(
        f=f,
        f1=f1,
        f2=f2,
        f3=f3,
        f4=f4,
        i1=i1,
        i2=i2,
        i3=i3,
        i4=i4,
        int64=int64,
        int32=int32,
        boolean=boolean,
        beam=(f3, i3, f2, f2, i1),
    )


def build(dtype: Any, rank: int = 0) -> SimpleNamespace:
    """The block primitives and typed constants for float dtype ``dtype`` (np.float32 or np.float64).

    With ``rank`` (one of RANKS), the factor-row helpers run over ``rank`` entries known at compile time,
    so their loops unroll and a thread's own row is held in registers; entries at or past the tables'
    own D read as zero (the rows are padded virtually, without a copy).
    """
    dtype = np.dtype(dtype)
    RANK = rank
    scalar = dtype.type
    nbtype = from_dtype(dtype)
    ZERO = scalar(0.0)
    ONE = scalar(1.0)
    NEG_INF = scalar(-np.inf)
    POS_INF = scalar(np.inf)
    compensated_add = portable.compensated_add
    draw_pair = portable.uniform_pair_f32 if dtype == np.float32 else portable.uniform_pair

    # block-wide primitives: every thread of the block must call them
    if config.ENABLE_CUDASIM:
        # The simulator has no warp shuffles: tree reductions in shared memory (any power-of-two block).
        @cuda.jit(device=True)
        def block_reduce(value, scratch, op):
            tid = cuda.threadIdx.x
            scratch[tid] = value
            cuda.syncthreads()
            half = cuda.blockDim.x // 2
            while half > 0:
                if tid < half:
                    scratch[tid] = combine(scratch[tid], scratch[tid + half], op)
                cuda.syncthreads()
                half //= 2
            result = scratch[0]
            cuda.syncthreads()
            return result
    else:
        # On a GPU: a shuffle reduction within each warp, the warps' results through shared memory, a
        # second shuffle reduction, and a broadcast from lane 0 (blocks are whole warps, at most 32).
        @cuda.jit(device=True)
        def block_reduce(value, scratch, op):
            lane = cuda.threadIdx.x % 32
            warp = cuda.threadIdx.x // 32
            offset = 16
            while offset > 0:
                value = combine(value, cuda.shfl_down_sync(FULL_MASK, value, offset), op)
                offset //= 2
            if lane == 0:
                scratch[warp] = value
            cuda.syncthreads()
            warps = cuda.blockDim.x // 32  # a power of two: lanes below it hold the warps' results
            value = scratch[lane if lane < warps else 0]
            offset = 16
            while offset > 0:
                other = cuda.shfl_down_sync(FULL_MASK, value, offset)
                if lane + offset < warps:
                    value = combine(value, other, op)
                offset //= 2
            result = cuda.shfl_sync(FULL_MASK, value, 0)
            cuda.syncthreads()
            return result

    if config.ENABLE_CUDASIM:
        # The simulator runs a cooperative grid as one block, so a grid barrier is a block barrier, and it
        # has no cache hints.
        @cuda.jit(device=True)
        def step_barrier(split):
            cuda.syncthreads()

        @cuda.jit(device=True)
        def exchange_load(values, b, t, i):
            return values[b, t, i]

        @cuda.jit(device=True)
        def exchange_load4(values, b, t, i, n):
            return values[b, t, i, n]
    else:

        @cuda.jit(device=True)
        def step_barrier(split):
            """The barrier between two steps of a recursion whose columns are split over ``split`` blocks:
            the whole (cooperative) grid when split > 1, else the block."""
            if split > 1:
                cuda.cg.this_grid().sync()
            else:
                cuda.syncthreads()

        @cuda.jit(device=True)
        def exchange_load(values, b, t, i):
            """values[b, t, i] from L2 (ld.global.cg): data another block wrote before the last grid barrier
            must not come from this SM's L1, which is not coherent with other SMs' stores."""
            return cuda.ldcg(values, (int64(b), int64(t), int64(i)))

        @cuda.jit(device=True)
        def exchange_load4(values, b, t, i, n):
            return cuda.ldcg(values, (int64(b), int64(t), int64(i), int64(n)))

    @cuda.jit(device=True)
    def split_span(K, split):
        """This block's share of a unit's K columns (rows) split over ``split`` blocks of the grid:
        (units the grid serves at once, first column, one past the last)."""
        width = (K + split - 1) // split
        first = (cuda.blockIdx.x % split) * width
        return cuda.gridDim.x // split, first, min(K, first + width)

    @cuda.jit(device=True)
    def predecessor_share(K, parts):
        """When ``parts`` threads share each column's K predecessors: (columns per round, this thread's
        column lane, its part, its predecessors low .. high)."""
        lanes = cuda.blockDim.x // parts
        mine = cuda.threadIdx.x // lanes
        piece = (K + parts - 1) // parts
        low = min(K, mine * piece)
        return lanes, cuda.threadIdx.x % lanes, mine, low, min(K, low + piece)

    @cuda.jit(device=True)
    def combine(a, b, op):
        """op 0: max, 1: sum, 2: min."""
        if op == 0:
            return a if a > b else b
        if op == 1:
            return a + b
        return a if a < b else b

    @cuda.jit(device=True)
    def block_max(value, scratch):
        """max of ``value`` over the block, returned to every thread (``scratch``: shared, blockDim)."""
        return block_reduce(value, scratch, 0)

    @cuda.jit(device=True)
    def block_sum(value, scratch):
        return block_reduce(value, scratch, 1)

    @cuda.jit(device=True)
    def block_min_int(value, scratch):
        return block_reduce(value, scratch, 2)

    @cuda.jit(device=True)
    def strided_max(values, count, scratch):
        """max of values[:count] (shared or global), over the block."""
        m = NEG_INF
        for k in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            if values[k] > m:
                m = values[k]
        return block_max(m, scratch)

    @cuda.jit(device=True)
    def inclusive_scan(values, count, scratch):
        """values[:count] (shared) becomes its running sum, in chunks of blockDim (Hillis-Steele)."""
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        carry = ZERO
        for base in range(0, count, threads):
            i = base + tid
            scratch[tid] = values[i] if i < count else ZERO
            cuda.syncthreads()
            offset = 1
            while offset < threads:
                add = scratch[tid - offset] if tid >= offset else ZERO
                cuda.syncthreads()
                scratch[tid] += add
                cuda.syncthreads()
                offset *= 2
            if i < count:
                values[i] = scratch[tid] + carry
            carry += scratch[threads - 1]
            cuda.syncthreads()

    @cuda.jit(device=True)
    def block_pick(logits, weights, count, u, scratch, int_scratch):
        """Index drawn from softmax(logits[:count]) with uniform u by the inverse-CDF rule of
        ``core.inverse_cdf_pick``: the smallest i with u * total < prefix[i], else the last i with a
        positive weight. ``weights`` (shared, count) is scratch."""
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        m = strided_max(logits, count, scratch)
        for i in range(tid, count, threads):
            weights[i] = math.exp(logits[i] - m)
        cuda.syncthreads()
        inclusive_scan(weights, count, scratch)
        target = u * weights[count - 1]
        first = count
        for i in range(tid, count, threads):
            below = weights[i - 1] if i > 0 else ZERO
            if target < weights[i] and not target < below and i < first:
                first = i
        first = block_min_int(first, int_scratch)
        if first < count:
            return first
        last = 1  # clamp: the last i whose weight (prefix step) is positive, found as the min of -i
        for i in range(tid, count, threads):
            below = weights[i - 1] if i > 0 else ZERO
            if weights[i] > below and -i < last:
                last = -i
        last = block_min_int(last, int_scratch)
        return -last if last <= 0 else 0

    @cuda.jit(device=True)
    def dot_row(table, row, own):
        """table[row, :] . own (RANK entries in registers or shared memory, zero past the table's D), unrolled."""
        D = table.shape[1]
        total = ZERO
        for d in range(RANK):
            if d < D:
                total += table[row, d] * own[d]
        return total

    @cuda.jit(device=True)
    def position_shifts(scores, b, length, shift, cum_shift, scratch):
        """shift[t] = max_k scores[b, t, k]; cum_shift[t] = their sum up to min(t, length - 1) (rows of T;
        compensated, so float32 keeps the precision the CPU's float64 sum has)."""
        T = scores.shape[1]
        K = scores.shape[2]
        total = ZERO
        error = ZERO
        for t in range(T):
            m = ZERO
            if t < length:
                m = strided_max(scores[b, t], K, scratch)
                total, error = compensated_add(total, error, m)
            if cuda.threadIdx.x == 0:
                shift[t] = m
                cum_shift[t] = total

    if dtype == np.float32 and not config.ENABLE_CUDASIM:
        from numba.cuda import libdevice

        @cuda.jit(device=True)
        def fast_exp(x):
            """exp for the hot loops of float32 kernels: the hardware's ex2.approx (relative error about
            2**-22, exp(-inf) = 0), a few instructions instead of libdevice's accurate expf."""
            return libdevice.fast_expf(x)
    else:

        @cuda.jit(device=True)
        def fast_exp(x):
            return math.exp(x)

    return SimpleNamespace(
        path_increments=portable.path_increments,
        backtrace=portable.backtrace,
        fairseq_step_scores=portable.fairseq_step_scores,
        place_forced=portable.place_forced,
        ranks_above=portable.ranks_above,
        keep_best=portable.keep_best,
        nbest_paths=portable.nbest_paths,
        gumbel=portable.gumbel,
        distinct_uniforms=portable.distinct_uniforms,
        expand_node=portable.expand_node,
        distinct_sample=portable.distinct_sample,
        types=launch_types(dtype),
        nbtype=nbtype,
        ITEMSIZE=dtype.itemsize,
        ZERO=ZERO,
        ONE=ONE,
        NEG_INF=NEG_INF,
        POS_INF=POS_INF,
        draw_pair=draw_pair,
        compensated_add=compensated_add,
        fast_exp=fast_exp,
        block_max=block_max,
        block_sum=block_sum,
        block_min_int=block_min_int,
        strided_max=strided_max,
        inclusive_scan=inclusive_scan,
        block_pick=block_pick,
        dot_row=dot_row,
        position_shifts=position_shifts,
        step_barrier=step_barrier,
        exchange_load=exchange_load,
        split_span=split_span,
        predecessor_share=predecessor_share,
        exchange_load4=exchange_load4,
        RANK=RANK,
    )
