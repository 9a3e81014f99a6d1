"""The CPU backend: NumPy arrays, output allocation, BLAS threads and the kernel launches.

:class:`CPUOps` has the same methods, with the same signatures, as ``gpu.ops.GPUOps``; the public
functions call them with inputs that ``_validate`` has already checked and normalised, so nothing here
validates. The kernels (``cpu/decode.py``, ``cpu/crf.py``) run sequences in parallel (``prange``) on
thread-local scratch, so results do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
from numba import get_num_threads

from .._devices import is_gpu_array
from .._validate import (
    Arrays,
    BeamCRF,
    Checks,
    Draws,
    SamplerGradInputs,
    beam_spread,
    float_dtype,
    int_dtype,
    scale_fits,
    squared_row_norm,
)
from ..results import (
    Beam,
    CRFSample,
    DistinctSample,
    EntropyGrad,
    KLGrad,
    NBestResult,
    PartitionGrad,
    SamplerGrad,
    StochasticViterbiResult,
    ViterbiResult,
)
from . import crf as crf_kernels
from . import decode as decode_kernels

# A column of factored sampling weights whose total falls below this is recomputed directly: far above
# the dtype's smallest normal, so that the weights that matter never lose precision to underflow.
_TINY = {np.dtype(np.float32): np.float32(1e-20), np.dtype(np.float64): np.float64(1e-250)}


# --------------------------------------------------------------------------------------------------
# arrays
# --------------------------------------------------------------------------------------------------
def kernel_array(values: Any, dtype: Any) -> np.ndarray:
    """``values`` as a C-contiguous array of ``dtype``, copied only where the cast or the layout needs it.

    A read-only array (a memory map, a non-writeable view, a copy-on-write buffer) comes back as a
    writeable view of the same memory: numba compiles every kernel again for read-only arguments
    (seconds each), and the kernels never write their inputs."""
    array = np.ascontiguousarray(values, dtype=dtype)
    if array.flags.writeable:
        return array
    interface = dict(array.__array_interface__)
    interface["data"] = (interface["data"][0], False)
    return np.asarray(SimpleNamespace(__array_interface__=interface, memory=array))  # keeps the memory alive


class HostChecks:
    """Value checks of host arrays (``_validate.Checks``): each rule runs at once, except the range
    (``scale``), which the magnitudes gathered by ``tables`` and ``beam`` settle, as on the GPU; only a
    failure runs its rule, which words the error."""

    def __init__(self) -> None:
        self.spread = 0.0
        self.squared_norms = (0.0, 0.0)

    def finite(self, values: np.ndarray, rule: Callable[[np.ndarray], None]) -> None:
        rule(values)

    def finite_cast(self, values: np.ndarray, dtype: np.dtype, rule: Callable[[np.ndarray], None]) -> np.ndarray:
        rule(values)
        return kernel_array(values, dtype)

    def in_range(self, values: np.ndarray, low: int, high: int, rule: Callable[[np.ndarray], None]) -> np.ndarray:
        rule(values)
        return kernel_array(values, np.int64)

    def unit_interval(self, values: np.ndarray, dtype: np.dtype, rule: Callable[[np.ndarray], None]) -> np.ndarray:
        rule(values)
        return kernel_array(values, np.float64)  # the CPU kernels draw from float64 uniforms

    def tables(self, E1: np.ndarray, E2: np.ndarray, rule: Callable[..., None]) -> None:
        self.squared_norms = (squared_row_norm(E1), squared_row_norm(E2))
        if not np.isfinite(self.squared_norms).all():  # NaN or inf in a table, or a norm beyond its dtype
            rule(E1, E2)

    def beam(self, scores: np.ndarray, lengths: np.ndarray, rule: Callable[..., None]) -> None:
        rule(scores, lengths)
        self.spread = beam_spread(scores, lengths)

    def scale(
        self,
        scores: np.ndarray,
        lengths: np.ndarray,
        E1: np.ndarray,
        E2: np.ndarray,
        temperature: float,
        exact: bool,
        rule: Callable[..., None],
    ) -> None:
        # beam_crf has cast scores, E1 and E2 to the compute dtype before the checks
        if not scale_fits(self.spread, self.squared_norms, scores.shape[1], temperature, exact, scores.dtype):
            rule(scores, lengths, E1, E2)  # words the error

    def before_lengths(
        self, values: np.ndarray, lengths: np.ndarray, high: int, fill: int, rule: Callable[..., None]
    ) -> np.ndarray:
        rule(values, lengths)
        inside = np.arange(values.shape[1])[None, :, None] < lengths[:, None, None]
        return np.ascontiguousarray(np.where(inside | ((values >= 0) & (values < high)), values, fill), dtype=np.int64)


class HostArrays:
    """How the CPU backend reads its inputs (``_validate.Arrays``): anything NumPy takes, copied only
    where a cast or a contiguous layout needs it (``kernel_array``)."""

    max_beam: Optional[int] = None
    max_rank: Optional[int] = None

    @staticmethod
    def _host(value: Any, name: str) -> np.ndarray:
        if is_gpu_array(value):
            raise TypeError(f"{name} is a GPU array but the main inputs are host arrays; pass all arrays on one device")
        return np.asarray(value)

    def float_array(self, value: Any, name: str, ndim: int) -> np.ndarray:
        return float_dtype(self._host(value, name), name, ndim)

    def int_array(self, value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
        array = int_dtype(self._host(value, name), name)
        if array.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
        return kernel_array(array, np.int64)

    def cast(self, array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
        return kernel_array(array, dtype)

    def small_array(self, value: Any, name: str) -> np.ndarray:
        return self._host(value, name)

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    def checks(self) -> Checks:
        return HostChecks()


# --------------------------------------------------------------------------------------------------
# BLAS threads and table gradients
# --------------------------------------------------------------------------------------------------
# The thread-count getter of each BLAS that threadpoolctl knows, OpenBLAS's with the affixes its builds
# use (SciPy's wheels: "scipy_", and "64_" in ILP64 builds). The library the kernels call is the one
# whose getter is also the one that the kernels' BLAS module resolves.
_THREAD_COUNT_GETTERS = [
    f"{prefix}openblas_get_num_threads{suffix}" for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")
] + [
    "MKL_Get_Max_Threads",
    "bli_thread_get_num_threads",
    "flexiblas_get_num_threads",
]

BlasLimit = Callable[[], Callable[[], None]]  # sets one thread, returns what restores the count from before


def _address(library: ctypes.CDLL, symbol: str) -> Optional[int]:
    function = getattr(library, symbol, None)
    return None if function is None else ctypes.cast(function, ctypes.c_void_p).value


def _openblas_limit(library: ctypes.CDLL, getter: str) -> BlasLimit:
    get_count = getattr(library, getter)
    set_count = getattr(library, getter.replace("_get_", "_set_"))

    def limit() -> Callable[[], None]:
        count = get_count()
        if count == 1:
            return lambda: None
        set_count(1)
        return lambda: set_count(count)

    return limit


@lru_cache(maxsize=1)
def _scipy_blas_limit() -> Optional[BlasLimit]:
    """How to put the BLAS that the kernels call on one thread; None where there is none to limit.

    The kernels' ``np.dot`` calls SciPy's BLAS (numba binds ``scipy.linalg.cython_blas``), not NumPy's
    (pip wheels bring one each), so only SciPy's is limited. threadpoolctl finds the loaded libraries;
    an OpenBLAS with a process-wide pool (pthreads) is then set through its own API, from any thread:
    threadpoolctl passes it only the counts of its "controlling thread" (the first to set a limit, while
    it holds it), so a kernel call from another thread would set, and restore, nothing."""
    import scipy.linalg.cython_blas as cython_blas  # loaded before threadpoolctl looks
    from threadpoolctl import ThreadpoolController

    kernels_blas = ctypes.CDLL(cython_blas.__file__)  # looks symbols up in the libraries it links too (ELF, Mach-O)
    infos = ThreadpoolController().info()
    for info in infos:
        library = ctypes.CDLL(info["filepath"])  # loaded already: the same library
        addresses = {name: _address(library, name) for name in _THREAD_COUNT_GETTERS}
        getters = [name for name, address in addresses.items() if address and address == _address(kernels_blas, name)]
        if not getters and not any(_address(kernels_blas, name) for name in _THREAD_COUNT_GETTERS):
            # where a module's lookups do not reach its dependencies (Windows DLLs): SciPy's wheel's own
            getters = [name for name, address in addresses.items() if address and "scipy" in info["filepath"].lower()]
            getters = getters if len(infos) == 1 or "numpy" not in info["filepath"].lower() else []
        if not getters:
            continue  # not the library the kernels call (NumPy's, say)
        if info["internal_api"] != "openblas":
            # MKL, BLIS, FlexiBLAS: threadpoolctl sets the library's process-wide count. Weaker than the
            # OpenBLAS path: nothing here checks that a count set from a worker thread takes effect, and
            # threadpoolctl may have rules of its own for a library (as it has for OpenBLAS).
            selected = ThreadpoolController().select(filepath=info["filepath"])
            return lambda: selected.limit(limits=1).restore_original_limits
        if info.get("threading_layer") == "openmp":
            # Each thread's OpenMP count governs the BLAS calls it makes: a count set here would never
            # reach numba's workers, and one restored by another thread would stay with this one.
            return None
        return _openblas_limit(library, getters[0])
    return None


_BLAS_LOCK = threading.Lock()
_kernel_calls_running = 0  # inside single_threaded_blas, in every Python thread
_restore_blas: Optional[Callable[[], None]] = None  # restores SciPy's BLAS count from before the first of them


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """SciPy's BLAS on one thread while kernels run: they call it from every core at once.

    One limit is shared by the kernel calls running at once, from any Python thread: the first to enter
    sets it, the last to leave restores the count from before. A limit per call would let overlapping
    calls restore each other's one-thread limit and leave BLAS single-threaded for good. A count that
    another thread sets for SciPy's BLAS while a kernel call runs is overwritten on that restore."""
    global _kernel_calls_running, _restore_blas
    with _BLAS_LOCK:
        if _kernel_calls_running == 0:
            limit = _scipy_blas_limit()
            _restore_blas = limit() if limit else None
        _kernel_calls_running += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _kernel_calls_running -= 1
            if _kernel_calls_running == 0 and _restore_blas is not None:
                _restore_blas()
                _restore_blas = None


@contextlib.contextmanager
def kernel_scope(beam: int, dtype: Any) -> Iterator[None]:
    """Around a kernel call on a beam of ``beam`` slots: BLAS on one thread (``single_threaded_blas``),
    and a kernel that cannot allocate its scratch arrays raises a MemoryError saying what they need
    (numba reports it as a SystemError from the parallel region)."""
    try:
        with single_threaded_blas():
            yield
    except SystemError as error:
        if not isinstance(error.__cause__, MemoryError):
            raise
        threads = get_num_threads()
        block = beam * beam * np.dtype(dtype).itemsize
        raise MemoryError(
            f"the CPU kernels could not allocate their scratch arrays: each of the {threads} threads holds "
            f"(K, K) blocks, {block / 2**30:.2f} GiB each at K = {beam} in {np.dtype(dtype)}; use a smaller "
            "beam, fewer threads (numba.set_num_threads) or a machine with more memory"
        ) from error.__cause__


def _table_gradients(
    run_kernel: Callable, tokens: np.ndarray, lengths: np.ndarray, scale: np.ndarray, table_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(grad_E1, grad_E2) from a kernel that writes per-position table-row gradients.

    ``run_kernel(first, count, grad_src, grad_dst)`` fills the rows of sequences first..first+count-1
    (layout of ``decode.scatter_rows``); they are added into (V, D) arrays, weighted by ``scale`` (B,),
    in (b, t, k) order. Only as many sequences as there are threads hold rows at a time, so the memory
    is O(threads * T * K * D) and the sums do not depend on the thread count.
    """
    return _table_gradient_pairs(run_kernel, tokens, lengths, [(scale, table_shape)])[0]


def _table_gradient_pairs(
    run_kernel: Callable, tokens: np.ndarray, lengths: np.ndarray, tables: list[tuple[np.ndarray, tuple[int, int]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`_table_gradients` for a kernel that writes rows for several pairs of tables at once:
    ``tables`` lists (scale (B,), (V, D)) per pair; ``run_kernel(first, count, src_0, dst_0, src_1, ...)``."""
    B, T, K = tokens.shape
    chunk = max(1, min(B, get_num_threads()))
    rows = [np.zeros((2, chunk, T, K, shape[1]), dtype=scale.dtype) for scale, shape in tables]
    grads = [(np.zeros(shape, dtype=scale.dtype), np.zeros(shape, dtype=scale.dtype)) for scale, shape in tables]
    for first in range(0, B, chunk):
        count = min(chunk, B - first)
        run_kernel(first, count, *(row for pair in rows for row in pair))
        for (scale, _), (grad_src, grad_dst), (grad_E1, grad_E2) in zip(tables, rows, grads):
            decode_kernels.scatter_rows(tokens, lengths, first, count, scale, grad_src, grad_dst, grad_E1, grad_E2)
    return grads


class ForwardState(NamedTuple):
    """What the backward pass and the sampler need of the forward pass."""

    crf: BeamCRF
    inv_temp: Any
    log_z64: np.ndarray  # (B,) float64
    alpha: np.ndarray  # (B, T, K) normalised log alpha
    col_max: np.ndarray  # (B, T, K)
    col_sum: np.ndarray  # (B, T, K)

    @property
    def log_z(self) -> np.ndarray:
        return self.log_z64.astype(self.crf.dtype)

    @property
    def saved(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.log_z, self.alpha, self.col_max, self.col_sum


# --------------------------------------------------------------------------------------------------
# the operations
# --------------------------------------------------------------------------------------------------
class CPUOps:
    """The CPU backend's operations (docs/design.md §2 defines each)."""

    arrays: Arrays = HostArrays()

    def call(self) -> contextlib.AbstractContextManager:
        """The span of one public call (on the GPU its checks are read back at its end; here each has
        raised already)."""
        return contextlib.nullcontext()

    # --- decoding ---------------------------------------------------------------------------------
    def topk_beam(self, emissions: np.ndarray, k: int, force_tokens: Any) -> Beam:
        B, T, _ = emissions.shape
        forced = np.zeros((1, 1), dtype=np.int64) if force_tokens is None else force_tokens
        out_scores = np.empty((B, T, k), dtype=emissions.dtype)
        out_tokens = np.empty((B, T, k), dtype=np.int64)
        bad_rows = np.zeros((B, T), dtype=np.int8)
        if B * T:
            decode_kernels.topk_beam_kernel(
                emissions, k, forced, force_tokens is not None, out_scores, out_tokens, bad_rows
            )
        if bad_rows.any():
            b, t = np.argwhere(bad_rows)[0]
            raise ValueError(f"emissions contains NaN or +inf (first at batch {b}, position {t})")
        return Beam(out_scores, out_tokens)

    def gather_beam(self, emissions: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """emissions[b, t, tokens[b, t, k]] (B, T, K)."""
        return np.take_along_axis(emissions, tokens, axis=2)

    def viterbi_decode(self, crf: BeamCRF, fairseq_steps: bool) -> ViterbiResult:
        B, T, _ = crf.scores.shape
        beam_idx = np.empty((B, T), dtype=np.int64)
        path_tokens = np.empty((B, T), dtype=np.int64)
        score = np.empty(B, dtype=crf.dtype)
        step_scores = np.empty((B, T), dtype=crf.dtype)
        if B:
            with kernel_scope(crf.scores.shape[2], crf.dtype):
                decode_kernels.viterbi_kernel(
                    crf.scores,
                    crf.tokens,
                    crf.E1,
                    crf.E2,
                    crf.lengths,
                    fairseq_steps,
                    beam_idx,
                    path_tokens,
                    score,
                    step_scores,
                )
        return ViterbiResult(beam_idx, path_tokens, score, step_scores)

    def viterbi_nbest(self, crf: BeamCRF, n: int) -> NBestResult:
        B, T, _ = crf.scores.shape
        beam_idx = np.empty((B, T, n), dtype=np.int64)
        path_tokens = np.empty((B, T, n), dtype=np.int64)
        score = np.empty((B, n), dtype=crf.dtype)
        count = np.empty(B, dtype=np.int64)
        if B:
            with kernel_scope(crf.scores.shape[2], crf.dtype):
                decode_kernels.nbest_kernel(
                    crf.scores, crf.tokens, crf.E1, crf.E2, crf.lengths, beam_idx, path_tokens, score, count
                )
        return NBestResult(beam_idx, path_tokens, score, count)

    def stochastic_viterbi(
        self, crf: BeamCRF, num_samples: int, inv_temp: Any, draws: Draws
    ) -> StochasticViterbiResult:
        B, T, K = crf.scores.shape
        N = num_samples
        replay = np.zeros((1, 1, 1, 1)) if draws.uniforms is None else draws.uniforms.reshape(B, T - 1, K, N)
        beam_probs = np.empty((B, T, K, N), dtype=crf.dtype)
        beam_idx = np.empty((B, T, N), dtype=np.int64)
        path_tokens = np.empty((B, T, N), dtype=np.int64)
        path_scores = np.empty((B, T, K, N), dtype=crf.dtype)
        backpointers = np.empty((B, T - 1, K, N), dtype=np.int64)
        score = np.empty((B, N), dtype=crf.dtype)
        if B:
            with kernel_scope(crf.scores.shape[2], crf.dtype):
                decode_kernels.stochastic_viterbi_kernel(
                    crf.scores,
                    crf.tokens,
                    crf.E1,
                    crf.E2,
                    crf.lengths,
                    inv_temp,
                    _TINY[crf.dtype],
                    draws.seed & 0xFFFFFFFF,
                    draws.seed >> 32,
                    replay,
                    draws.uniforms is not None,
                    beam_probs,
                    beam_idx,
                    path_tokens,
                    path_scores,
                    backpointers,
                    score,
                )
        return StochasticViterbiResult(beam_probs, beam_idx, path_tokens, path_scores, backpointers, score)

    def stochastic_viterbi_backward(self, inputs: SamplerGradInputs) -> SamplerGrad:
        crf = inputs.crf
        B, T, K, _ = inputs.beam_probs.shape
        grad_scores = np.empty((B, T, K), dtype=crf.dtype)

        def run(first: int, count: int, grad_src: np.ndarray, grad_dst: np.ndarray) -> None:
            decode_kernels.stochastic_viterbi_backward_kernel(
                inputs.beam_probs,
                inputs.backpointers,
                crf.tokens,
                crf.E1,
                crf.E2,
                crf.lengths,
                inputs.grad_beam_probs,
                first,
                count,
                grad_scores,
                grad_src,
                grad_dst,
            )

        grad_E1, grad_E2 = _table_gradients(run, crf.tokens, crf.lengths, np.ones(B, dtype=crf.dtype), crf.E1.shape)
        return SamplerGrad(grad_scores, grad_E1, grad_E2)

    # --- exact inference ----------------------------------------------------------------------------
    def crf_forward(self, crf: BeamCRF, inv_temp: Any) -> ForwardState:
        B, T, K = crf.scores.shape
        log_z = np.empty(B, dtype=np.float64)
        alpha, col_max, col_sum = np.zeros((3, B, T, K), dtype=crf.dtype)  # padded positions: 0, not stale memory
        if B:
            with kernel_scope(crf.scores.shape[2], crf.dtype):
                crf_kernels.forward_kernel(
                    crf.scores, crf.tokens, crf.E1, crf.E2, crf.lengths, inv_temp, log_z, alpha, col_max, col_sum
                )
        return ForwardState(crf, inv_temp, log_z, alpha, col_max, col_sum)

    def restore_forward(self, crf: BeamCRF, inv_temp: Any, views: tuple, natives: tuple) -> ForwardState:
        """The ForwardState of saved arrays: ``views`` as ``_validate.saved_forward`` made them (the
        ``natives`` they came from are the GPU's concern)."""
        log_z, alpha, col_max, col_sum = views
        return ForwardState(crf, inv_temp, log_z.astype(np.float64), alpha, col_max, col_sum)

    def crf_sample(self, state: ForwardState, num_samples: int, draws: Draws) -> CRFSample:
        crf = state.crf
        B, T, _ = crf.scores.shape
        replay = np.zeros((1, 1, 1)) if draws.uniforms is None else draws.uniforms
        beam_idx = np.empty((B, T, num_samples), dtype=np.int64)
        path_tokens = np.empty((B, T, num_samples), dtype=np.int64)
        log_prob = np.empty((B, num_samples), dtype=np.float64)
        if B:
            with kernel_scope(crf.scores.shape[2], crf.dtype):
                crf_kernels.sample_kernel(
                    crf.scores,
                    crf.tokens,
                    crf.E1,
                    crf.E2,
                    crf.lengths,
                    state.inv_temp,
                    state.log_z64,
                    state.alpha,
                    draws.seed & 0xFFFFFFFF,
                    draws.seed >> 32,
                    replay,
                    draws.uniforms is not None,
                    beam_idx,
                    path_tokens,
                    log_prob,
                )
        return CRFSample(beam_idx, path_tokens, log_prob.astype(crf.dtype))

    def distinct_sample(self, state: ForwardState, num_samples: int, draws: Draws) -> DistinctSample:
        crf = state.crf
        B, T, K = crf.scores.shape
        N = num_samples
        replay = np.zeros((1, 1, 1, 1)) if draws.uniforms is None else draws.uniforms
        beam_idx = np.empty((B, T, N), dtype=np.int64)
        path_tokens = np.empty((B, T, N), dtype=np.int64)
        log_prob, perturbed, weights = (np.empty((B, N), dtype=np.float64) for _ in range(3))
        kappa = np.empty(B, dtype=np.float64)
        count = np.empty(B, dtype=np.int64)
        if B:
            with kernel_scope(K, crf.dtype):
                crf_kernels.distinct_sample_kernel(
                    crf.scores, crf.tokens, crf.E1, crf.E2, crf.lengths, state.inv_temp, state.log_z64, state.alpha,
                    state.col_max, state.col_sum, draws.seed & 0xFFFFFFFF, draws.seed >> 32, replay,
                    draws.uniforms is not None, beam_idx, path_tokens, log_prob, perturbed, kappa, weights, count,
                )  # fmt: skip
        dtype = crf.dtype
        return DistinctSample(
            beam_idx,
            path_tokens,
            log_prob.astype(dtype),
            perturbed.astype(dtype),
            kappa.astype(dtype),
            weights.astype(dtype),
            count,
        )

    def _backward(self, state: ForwardState, scale: Any) -> tuple[np.ndarray, Any, Any]:
        """Marginals (B, T, K) and, when ``scale`` (B,) is given, the table gradients of
        sum_b scale[b] * tau * log Z_tau[b] (the kernel's row gradients are those times tau)."""
        crf = state.crf
        B, T, K = crf.scores.shape
        mu = np.empty((B, T, K), dtype=crf.dtype)

        def run(first: int, count: int, src_rows: np.ndarray, dst_rows: np.ndarray) -> None:
            crf_kernels.backward_kernel(
                crf.tokens,
                crf.E1,
                crf.E2,
                crf.lengths,
                state.inv_temp,
                state.alpha,
                state.col_max,
                state.col_sum,
                first,
                count,
                scale is not None,
                mu,
                src_rows,
                dst_rows,
            )

        with kernel_scope(crf.scores.shape[2], crf.dtype):
            if scale is None:
                run(0, B, *np.zeros((2, 1, 1, 1, 1), dtype=mu.dtype))
                return mu, None, None
            grad_E1, grad_E2 = _table_gradients(run, crf.tokens, crf.lengths, scale, crf.E1.shape)
        return mu, grad_E1, grad_E2

    def marginals(self, state: ForwardState) -> np.ndarray:
        return self._backward(state, None)[0]

    def log_partition_grad(self, state: ForwardState, weights: np.ndarray) -> PartitionGrad:
        scale = weights * state.inv_temp
        mu, grad_E1, grad_E2 = self._backward(state, scale)
        return PartitionGrad(state.log_z, mu, mu * scale[:, None, None], grad_E1, grad_E2)

    def paths_grad(self, state: ForwardState, paths: np.ndarray, weights: np.ndarray) -> tuple[Any, Any, Any]:
        """(grad_scores, grad_E1, grad_E2) of sum_{b,n} weights[b, n] * (S(y_bn) / tau - log Z_tau[b]) for
        beam paths (B, T, N) (0 at and after each length) and host weights (B, N)."""
        crf = state.crf
        T = crf.scores.shape[1]
        scale = weights * state.inv_temp  # (B, N)
        mu, grad_E1, grad_E2 = self._backward(state, -scale.sum(axis=1))
        inside = np.arange(T)[None, :] < crf.lengths[:, None]
        grad_scores = -mu * scale.sum(axis=1)[:, None, None]
        b_index, t_index = np.nonzero(inside)
        path_tokens = np.take_along_axis(crf.tokens, paths, axis=2)
        for n in range(paths.shape[2]):
            np.add.at(grad_scores, (b_index, t_index, paths[b_index, t_index, n]), scale[b_index, n])
            crf_kernels.add_path_rows(
                np.ascontiguousarray(path_tokens[:, :, n]),
                crf.lengths,
                np.ascontiguousarray(scale[:, n]),
                crf.E1,
                crf.E2,
                grad_E1,
                grad_E2,
            )
        return grad_scores, grad_E1, grad_E2

    def forward_log_ratio(
        self, crf: BeamCRF, q_crf: Optional[BeamCRF], inv_temp: Any, own: float
    ) -> tuple[ForwardState, Optional[ForwardState], np.ndarray]:
        """The forward passes of p and q (None: p alone) and the expected log ratios of their prefixes
        (B, T, K), on one set of transition blocks (``crf_kernels.forward_ratio_kernel``)."""
        B, T, K = crf.scores.shape
        use_q = q_crf is not None
        q = q_crf if q_crf is not None else crf
        log_z, q_log_z = np.empty(B, dtype=np.float64), np.empty(B if use_q else 1, dtype=np.float64)
        p_arrays = np.zeros((3, B, T, K), dtype=crf.dtype)  # padded positions: 0, not stale memory
        q_arrays = np.zeros((3, B, T, K) if use_q else (3, 1, 1, 1), dtype=crf.dtype)
        prefix_ratios = np.zeros((B, T, K), dtype=crf.dtype)
        if B:
            with kernel_scope(K, crf.dtype):
                crf_kernels.forward_ratio_kernel(
                    crf.scores, crf.tokens, crf.E1, crf.E2, q.scores, q.E1, q.E2, crf.lengths, inv_temp, use_q,
                    crf.dtype.type(own), log_z, *p_arrays, q_log_z, *q_arrays, prefix_ratios,
                )  # fmt: skip
        p_state = ForwardState(crf, inv_temp, log_z, *p_arrays)
        q_state = ForwardState(q_crf, inv_temp, q_log_z, *q_arrays) if q_crf is not None else None
        return p_state, q_state, prefix_ratios

    def _log_ratio(
        self,
        state: ForwardState,
        q_state: Optional[ForwardState],
        want_grads: bool,
        own: float = 1.0,
        prefix_ratios: Optional[np.ndarray] = None,
    ) -> tuple[np.ndarray, Any, Any]:
        """E_p[own * log p - log q] (B,) float64 (q None: E_p[log p] = -H) and, with ``want_grads`` (own = 1),
        a function run(first, count, grad_src, grad_dst, q_grad_src, q_grad_dst) of the kernel's rows, and the
        (cov_nodes, marginals) arrays it fills (``crf_kernels.log_ratio_kernel``); ``prefix_ratios``:
        ``forward_log_ratio``'s, for the same own."""
        crf = state.crf
        B, T, K = crf.scores.shape
        use_q = q_state is not None
        q = q_state if q_state is not None else state
        expected = np.zeros(B, dtype=np.float64)
        cov = np.zeros((B, T, K) if want_grads else (1, 1, 1), dtype=crf.dtype)
        marginals = np.zeros((B, T, K) if want_grads and use_q else (1, 1, 1), dtype=crf.dtype)

        def run(first: int, count: int, *rows: np.ndarray) -> None:
            crf_kernels.log_ratio_kernel(
                crf.tokens,
                crf.E1,
                crf.E2,
                crf.lengths,
                state.inv_temp,
                state.alpha,
                state.col_max,
                state.col_sum,
                q.crf.E1,
                q.crf.E2,
                q.alpha,
                q.col_max,
                q.col_sum,
                use_q,
                crf.dtype.type(own),
                prefix_ratios is not None,
                prefix_ratios if prefix_ratios is not None else cov,
                first,
                count,
                want_grads,
                expected,
                cov,
                *rows[:2],
                marginals,
                *rows[2:],
            )

        if not want_grads and B:
            with kernel_scope(K, crf.dtype):
                run(0, B, *np.zeros((4, 1, 1, 1, 1), dtype=crf.dtype))
        return expected, run, (cov, marginals)

    def entropy(
        self, state: ForwardState, weights: Optional[np.ndarray], prefix_ratios: Optional[np.ndarray] = None
    ) -> EntropyGrad:
        """H_tau (B,) and, for host weights (B,), the gradients of sum_b weights[b] * H_tau[b] (None
        without weights); ``prefix_ratios`` from ``forward_log_ratio`` (own = 1) saves the forward sweep."""
        crf = state.crf
        expected, run, (cov, _) = self._log_ratio(state, None, weights is not None, 1.0, prefix_ratios)
        if weights is None:
            return EntropyGrad((-expected).astype(crf.dtype), None, None, None)
        scale = -weights * state.inv_temp  # dH / d potential = -Cov(feature, log p) / tau
        no_q_rows = np.zeros((2, 1, 1, 1, 1), dtype=crf.dtype)
        with kernel_scope(crf.scores.shape[2], crf.dtype):
            grad_E1, grad_E2 = _table_gradients(
                lambda first, count, src, dst: run(first, count, src, dst, *no_q_rows),
                crf.tokens,
                crf.lengths,
                scale,
                crf.E1.shape,
            )
        return EntropyGrad((-expected).astype(crf.dtype), cov * scale[:, None, None], grad_E1, grad_E2)

    def kl(
        self,
        state: ForwardState,
        q_state: ForwardState,
        weights: Optional[np.ndarray],
        prefix_ratios: Optional[np.ndarray] = None,
    ) -> KLGrad:
        """KL(p || q) (B,) of two CRFs on one beam and, for host weights (B,), the gradients of
        sum_b weights[b] * KL[b] with respect to both (None without weights); ``prefix_ratios`` from
        ``forward_log_ratio`` (own = 1) saves the forward sweep."""
        crf, q_crf = state.crf, q_state.crf
        expected, run, (cov, marginal_gap) = self._log_ratio(state, q_state, weights is not None, 1.0, prefix_ratios)
        if weights is None:
            return KLGrad(expected.astype(crf.dtype), None, None, None, None, None, None)
        scale = weights * state.inv_temp  # d KL / d p's potential = Cov(feature, log p - log q) / tau
        with kernel_scope(crf.scores.shape[2], crf.dtype):
            # d KL / d q's potential = (q's marginals - p's) / tau, which the kernel gives
            (grad_E1, grad_E2), (grad_E1_q, grad_E2_q) = _table_gradient_pairs(
                run, crf.tokens, crf.lengths, [(scale, crf.E1.shape), (scale, q_crf.E1.shape)]
            )
        return KLGrad(
            expected.astype(crf.dtype),  # filled by the runs above
            cov * scale[:, None, None],
            grad_E1,
            grad_E2,
            marginal_gap * scale[:, None, None],
            grad_E1_q,
            grad_E2_q,
        )

    def cross_entropy(
        self, state: ForwardState, q_state: ForwardState, prefix_ratios: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """-E_p[log q] (B,) of two CRFs on one beam, in the compute dtype; ``prefix_ratios`` from
        ``forward_log_ratio`` with own = 0."""
        return self._log_ratio(state, q_state, False, 0.0, prefix_ratios)[0].astype(state.crf.dtype)

    @staticmethod
    def _path_scores(crf: BeamCRF, paths: np.ndarray) -> np.ndarray:
        """S(y) (B, N) in float64 of beam paths (B, T, N)."""
        out = np.empty((paths.shape[0], paths.shape[2]), dtype=np.float64)
        crf_kernels.sequence_score_kernel(crf.scores, crf.tokens, crf.E1, crf.E2, crf.lengths, paths, out)
        return out

    def sequence_score(self, crf: BeamCRF, paths: np.ndarray) -> np.ndarray:
        """S(y) (B, N) of beam paths (B, T, N), in the compute dtype (summed in float64)."""
        return self._path_scores(crf, paths).astype(crf.dtype)

    def target_slots(self, crf: BeamCRF, targets: np.ndarray) -> np.ndarray:
        """(B, T, 1): the beam slot that holds each target (the beam was built with them forced in)."""
        return np.argmax(crf.tokens == targets[:, :, None], axis=2)[:, :, None]

    def path_log_prob(self, state: ForwardState, paths: np.ndarray) -> np.ndarray:
        """log p_tau of beam paths (B, T, N): S(y) / tau - log Z_tau (B, N), in the compute dtype."""
        numerator = self._path_scores(state.crf, paths)
        return (numerator * state.inv_temp - state.log_z64[:, None]).astype(state.crf.dtype)


CPU = CPUOps()
