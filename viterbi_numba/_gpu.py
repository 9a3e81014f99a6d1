"""The array API on the GPU: detection of GPU arrays, validation, allocation and kernel launches.

The public functions of ``api`` and ``crf`` call into here when an input is a GPU array: anything with
``__cuda_array_interface__`` (numba device arrays, CuPy, torch CUDA tensors) or a CUDA DLPack capsule.
Results are allocated by the input's own library (torch in, torch out on the same device; CuPy in,
CuPy out; otherwise numba device arrays) and the kernels run on that library's current stream, so
nothing synchronises with the host except the validation flags read back before each launch.

Detecting a GPU array never imports numba-cuda; using one without numba-cuda or without a GPU raises
a ``RuntimeError`` that says what is missing.
"""

from __future__ import annotations

import secrets
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _validate

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def is_gpu_array(value: Any) -> bool:
    """True for an object that lives on a CUDA device (checked without importing numba-cuda)."""
    try:
        if hasattr(value, "__cuda_array_interface__") or _is_numba_device_array(value):
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


def _is_numba_device_array(value: Any) -> bool:
    """A numba device array (real, or the CUDA simulator's, which has no __cuda_array_interface__)."""
    return bool(getattr(type(value), "__cuda_ndarray__", False))


def on_gpu(*values: Any) -> bool:
    return any(is_gpu_array(v) for v in values if v is not None)


def _cuda():
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
    return cuda


def require_gpu() -> None:
    """Raise a RuntimeError saying why, unless GPU kernels can run here."""
    _cuda()
    _kernels(np.float32)  # the kernel module imports (numba-cuda and its compiler are present)


def gpu_available() -> bool:
    """True when GPU kernels can run here (numba-cuda and a CUDA GPU, or the CUDA simulator)."""
    try:
        require_gpu()
    except (RuntimeError, ImportError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# arrays of the caller's library
# --------------------------------------------------------------------------------------------------
class _Library:
    """Allocates outputs and picks the stream like the library of the first GPU input."""

    def __init__(self, sample: Any):
        self.cuda = _cuda()
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

    def _external(self, pointer: int):
        from numba import config

        if config.ENABLE_CUDASIM or not pointer:
            return self.cuda.default_stream()
        return self.cuda.external_stream(pointer)

    def empty(self, shape, dtype):
        """(native array, numba view) of a new uninitialised array."""
        dtype = np.dtype(dtype)
        if self.kind == "torch":
            torch_dtype = {np.dtype(np.float32): self.torch.float32, np.dtype(np.float64): self.torch.float64,
                           np.dtype(np.int64): self.torch.int64, np.dtype(np.int32): self.torch.int32}[dtype]
            native = self.torch.empty(tuple(shape), dtype=torch_dtype, device=self.sample.device)
        elif self.kind == "cupy":
            native = self.cupy.empty(tuple(shape), dtype=dtype)
        else:
            native = self.cuda.device_array(tuple(shape), dtype=dtype, stream=self.stream)
        return native, self.view(native)

    def view(self, native):
        if self.kind == "numba":
            return native
        return self.cuda.as_cuda_array(native, sync=False)

    def zeros(self, shape, dtype):
        native, view = self.empty(shape, dtype)
        if view.size:
            flat = view.reshape(view.size)
            _kernels(np.float64).fill[_grid(view.size), 256, self.stream](flat, flat.dtype.type(0))
        return native, view

    def to_device(self, host: np.ndarray):
        native, view = self.empty(host.shape, host.dtype)
        if host.size:
            view.copy_to_device(np.ascontiguousarray(host), stream=self.stream)
        return native, view

    def to_host(self, view) -> np.ndarray:
        out = view.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return out


def _kernels(dtype):
    from . import _cuda

    return _cuda.kernels(np.dtype(dtype))


def _grid(size: int, threads: int = 256) -> int:
    return max(1, min(1024, -(-size // threads)))


def _block_limits() -> tuple[int, int]:
    """(fewest, most) threads per block: a warp to 256 on a GPU; 1 to 4 in the CUDA simulator, which
    runs each thread as a Python thread (tests there use K above 4 to exercise the strided loops)."""
    from numba import config

    from . import _cuda

    return (1, 4) if config.ENABLE_CUDASIM else (32, _cuda.MAX_THREADS)


def _threads(K: int) -> int:
    """Threads per block for a beam of K: a power of two, K or more where the limit allows."""
    threads, most = _block_limits()
    while threads < K and threads < most:
        threads *= 2
    return threads


def _tile_rows(K: int, D: int, itemsize: int, fixed_items: int) -> int:
    """Rows of a factor table that fit next to ``fixed_items`` values in a block's shared memory."""
    from . import _cuda

    free = _cuda.SHARED_BUDGET - fixed_items * itemsize
    return int(max(1, min(K, free // (D * itemsize))))


def _tiling(K: int, D: int, dtype, fixed_items: int) -> tuple[int, int]:
    """(rows per tile of factor rows, dynamic shared-memory bytes) for a kernel that also keeps
    ``fixed_items`` values of ``dtype`` in shared memory."""
    rows = _tile_rows(K, D, dtype.itemsize, fixed_items)
    return rows, (fixed_items + rows * D) * dtype.itemsize


# --------------------------------------------------------------------------------------------------
# validation of GPU inputs
# --------------------------------------------------------------------------------------------------
def _view(lib: _Library, value: Any, name: str):
    """A numba device view of a GPU input, or TypeError naming it."""
    if not is_gpu_array(value):
        raise TypeError(f"{name} is a host array but the other inputs are on the GPU; pass all arrays on one device")
    if _is_numba_device_array(value):
        view = value
    elif getattr(value, "requires_grad", False):
        raise TypeError(f"{name} requires grad: pass {name}.detach() (or use the torch adapter's modules)")
    elif hasattr(value, "__cuda_array_interface__"):
        view = lib.cuda.as_cuda_array(value, sync=False)
    else:
        from cuda.core.utils import StridedMemoryView

        memory = StridedMemoryView.from_dlpack(value, stream_ptr=-1)
        itemsize = np.dtype(memory.dtype).itemsize
        strides = None if memory.strides is None else tuple(s * itemsize for s in memory.strides)
        view = lib.cuda.from_cuda_array_interface(
            {"shape": tuple(memory.shape), "strides": strides, "typestr": np.dtype(memory.dtype).str,
             "data": (memory.ptr, memory.readonly), "version": 3},
            owner=value, sync=False,
        )
    if not view.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous on the GPU")
    return view


def _float_view(lib, value, name, ndim, dtype=None):
    view = _view(lib, value, name)
    if view.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64 on the GPU (cast float16/bfloat16 first), got {view.dtype}")
    if dtype is not None and view.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of the other float inputs ({dtype}) on the GPU, got {view.dtype}")
    if view.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {view.shape}")
    return view


def _int_view(lib, value, name, shape):
    view = _view(lib, value, name)
    if view.dtype != np.int64:
        raise TypeError(f"{name} must be an int64 array on the GPU, got dtype {view.dtype}")
    if view.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {view.shape}")
    return view


def _host_copy(lib, value):
    return lib.to_host(lib.view(value)) if is_gpu_array(value) else value


class _Checks:
    """Value checks of GPU inputs, done by kernels into one flag array that is read back once.

    ``run()`` raises the error of the first failed check; messages that quote values (the first bad
    position, the range of token ids) copy the offending array to the host only then.
    """

    def __init__(self, lib: _Library, dtype, rows: int = 0):
        from . import _cuda

        self.lib = lib
        self.kernels = _kernels(dtype)
        self.first_row = _cuda.FIRST_ROW
        self.flags = lib.zeros((self.first_row + rows,), np.int32)[1]
        self.failures = []  # (flag slot, function that raises)
        self.slots = iter(range(2, self.first_row))

    def beam(self, scores, tokens, vocab: int, lengths: np.ndarray, name: str) -> None:
        """NaN/+inf in scores, token ids outside [0, vocab), a whole -inf beam before a length."""
        B, T, K = scores.shape
        if B * T:
            self.kernels.check_beam[B * T, _threads(K), self.lib.stream](scores, tokens, vocab, self.flags)
        self.failures.append((0, lambda: _validate.beam_scores(self.lib.to_host(scores), lengths, name)))
        self.failures.append((1, lambda: _validate.token_ids(self.lib.to_host(tokens), vocab)))
        self.lengths = lengths
        self.name = name

    def finite(self, values, message: str) -> None:
        slot = next(self.slots)
        if values.size:
            flat = values.reshape(values.size)
            self.kernels.check_finite[_grid(values.size), 256, self.lib.stream](flat, self.flags, slot)
        self.failures.append((slot, lambda: _raise(message)))

    def in_range(self, values, low: int, high: int, message: str) -> None:
        slot = next(self.slots)
        if values.size:
            flat = values.reshape(values.size)
            self.kernels.check_range[_grid(values.size), 256, self.lib.stream](flat, low, high, self.flags, slot)
        self.failures.append((slot, lambda: _raise(message)))

    def run(self) -> None:
        host = self.lib.to_host(self.flags)
        for slot, fail in self.failures:
            if host[slot]:
                fail()
                raise ValueError("an input failed a value check on the GPU")  # pragma: no cover
        if len(host) > self.first_row:
            B, T = len(self.lengths), (len(host) - self.first_row) // max(1, len(self.lengths))
            dead = (host[self.first_row:].reshape(B, T) == 0) & (np.arange(T)[None, :] < self.lengths[:, None])
            if dead.any():  # the CPU check on a stand-in that is -inf exactly at the dead positions
                _validate.beam_scores(np.where(dead[:, :, None], -np.inf, 0.0), self.lengths, self.name)


def _raise(message: str):
    raise ValueError(message)


def _tables(lib: _Library, E1: Any, E2: Any, dtype, checks: _Checks):
    from . import _cuda

    E1 = _float_view(lib, E1, "E1", 2, dtype)
    E2 = _float_view(lib, E2, "E2", 2, dtype)
    if E1.shape != E2.shape:
        raise ValueError(f"E1 and E2 must have the same shape (V, D), got {E1.shape} and {E2.shape}")
    if E1.shape[0] == 0 or E1.shape[1] == 0:
        raise ValueError(f"E1 and E2 must be non-empty (V, D), got {E1.shape}")
    if E1.shape[1] > _cuda.MAX_D:
        raise ValueError(f"E1, E2: the GPU kernels take D <= {_cuda.MAX_D}, got D = {E1.shape[1]}")
    checks.finite(E1, "E1 contains NaN or inf")
    checks.finite(E2, "E2 contains NaN or inf")
    return E1, E2


class _Beam(NamedTuple):
    lib: _Library
    scores: Any  # numba views, validated
    tokens: Any
    E1: Any
    E2: Any
    lengths: Any  # device int64 (B,)
    lengths_host: np.ndarray


def beam_inputs(scores: Any, tokens: Any, E1: Any, E2: Any, lengths: Any) -> _Beam:
    """GPU counterpart of ``api._beam_inputs``: the same checks and messages, no casts (GPU inputs must
    already be float32 or float64, one dtype, and int64 token ids)."""
    from . import _cuda

    lib = _Library(next(v for v in (scores, tokens, E1, E2) if is_gpu_array(v)))
    scores = _float_view(lib, scores, "scores", 3)
    B, T, K = scores.shape
    if T == 0:
        raise ValueError(f"scores must have at least one position (T >= 1), got shape {scores.shape}")
    if K == 0:
        raise ValueError(f"scores must have a beam of at least one slot (K >= 1), got shape {scores.shape}")
    if K > _cuda.MAX_K:
        raise ValueError(f"scores: the GPU kernels take a beam of at most {_cuda.MAX_K} slots, got K = {K}")
    tokens = _int_view(lib, tokens, "tokens", (B, T, K))
    checks = _Checks(lib, scores.dtype, B * T)
    E1, E2 = _tables(lib, E1, E2, scores.dtype, checks)
    lengths_host = _validate.lengths(_host_copy(lib, lengths), B, T)
    checks.beam(scores, tokens, E1.shape[0], lengths_host, "scores")
    checks.run()
    return _Beam(lib, scores, tokens, E1, E2, lib.to_device(lengths_host)[1], lengths_host)


def _seed_and_uniforms(lib, seed, uniforms, shape, layout, dtype):
    """(seed, device uniforms in the compute dtype or a 1-element dummy, replaying?)."""
    seed = _validate.seed(seed)
    if uniforms is not None:
        if seed is not None:
            raise ValueError("give either seed or uniforms, not both")
        host = _validate.uniforms(_host_copy(lib, uniforms), shape, layout)
        return 0, lib.to_device(host.astype(dtype))[1], True
    seed = secrets.randbits(64) if seed is None else seed
    return seed, lib.to_device(np.zeros((1,) * len(shape), dtype=dtype))[1], False


# --------------------------------------------------------------------------------------------------
# operations (same signatures and results as the CPU functions, on device arrays)
# --------------------------------------------------------------------------------------------------
def topk_beam(emissions, k, force_tokens=None):
    from . import _cuda
    from .api import Beam

    lib = _Library(emissions)
    emissions = _float_view(lib, emissions, "emissions", 3)
    B, T, V = emissions.shape
    k = _validate.positive_int(k, "k")
    if k > V:
        raise ValueError(f"k must be at most V = {V} (emissions.shape[2]), got {k}")
    if k > _cuda.MAX_K:
        raise ValueError(f"k: the GPU kernels take a beam of at most {_cuda.MAX_K} slots, got {k}")
    if force_tokens is None:
        forced = lib.to_device(np.zeros((1, 1), dtype=np.int64))[1]
    else:
        forced = _int_view(lib, force_tokens, "force_tokens", (B, T))
        checks = _Checks(lib, emissions.dtype)
        checks.in_range(forced, 0, V, f"force_tokens must be token ids in [0, {V}) (rows of E1/E2)")
        checks.run()
    scores_native, scores = lib.empty((B, T, k), emissions.dtype)
    tokens_native, tokens = lib.empty((B, T, k), np.int64)
    _, bad_rows = lib.zeros((B, T), np.int64)
    threads = _block_limits()[1]
    region = 4 * threads  # candidate slots for 4 chunks of the row: a sort only every few chunks' survivors
    while region < k:
        region *= 2
    shared = 2 * region * (emissions.dtype.itemsize + 8)
    if B * T:
        _kernels(emissions.dtype).topk_kernel[B * T, threads, lib.stream, shared](
            emissions, k, region, forced, force_tokens is not None, scores, tokens, bad_rows)
        bad = lib.to_host(bad_rows)
        if bad.any():
            b, t = np.argwhere(bad)[0]
            raise ValueError(f"emissions contains NaN or +inf (first at batch {b}, position {t})")
    return Beam(scores_native, tokens_native)


def viterbi_decode(scores, tokens, E1, E2, lengths=None):
    from .api import ViterbiResult

    beam = beam_inputs(scores, tokens, E1, E2, lengths)
    lib, scores = beam.lib, beam.scores
    B, T, K = scores.shape
    D = beam.E1.shape[1]
    dtype = scores.dtype
    beam_idx = lib.empty((B, T), np.int64)
    path_tokens = lib.empty((B, T), np.int64)
    score = lib.empty((B,), dtype)
    step_scores = lib.empty((B, T), dtype)
    shift, cum_shift = (lib.empty((B, T), dtype)[1] for _ in range(2))
    history = lib.empty((B, T, K), dtype)[1]
    back = lib.empty((B, T, K), np.int32)[1]
    tile_rows, shared = _tiling(K, D, dtype, K)
    if B:
        _kernels(dtype).viterbi_kernel[B, _threads(K), lib.stream, shared](
            scores, beam.tokens, beam.E1, beam.E2, beam.lengths, tile_rows, shift, cum_shift, history, back,
            beam_idx[1], path_tokens[1], score[1], step_scores[1])
    return ViterbiResult(beam_idx[0], path_tokens[0], score[0], step_scores[0])


def stochastic_viterbi(scores, tokens, E1, E2, num_samples=None, temperature=1.0, lengths=None, seed=None,
                       uniforms=None):
    from .api import StochasticViterbiResult

    beam = beam_inputs(scores, tokens, E1, E2, lengths)
    lib, scores = beam.lib, beam.scores
    B, T, K = scores.shape
    D = beam.E1.shape[1]
    dtype = scores.dtype
    single = num_samples is None
    N = 1 if single else _validate.positive_int(num_samples, "num_samples")
    inv_temp = dtype.type(1.0 / _validate.temperature(temperature))
    expected = (B, T - 1, K) if single else (B, T - 1, K, N)
    seed, replay, replaying = _seed_and_uniforms(lib, seed, uniforms, expected,
                                                 "(B, T-1, K)" if single else "(B, T-1, K, N)", dtype)
    if replaying:
        replay = replay.reshape(B, T - 1, K, N)
    else:
        replay = replay.reshape(1, 1, 1, 1)
    beam_probs = lib.empty((B, T, K, N), dtype)
    beam_idx = lib.empty((B, T, N), np.int64)
    path_tokens = lib.empty((B, T, N), np.int64)
    path_scores = lib.empty((B, T, K, N), dtype)
    backpointers = lib.empty((B, T - 1, K, N), np.int64)
    score = lib.empty((B, N), dtype)
    shift, cum_shift = (lib.empty((B * N, T), dtype)[1] for _ in range(2))
    tile_rows, shared = _tiling(K, D, dtype, 2 * K)
    if B:
        _kernels(dtype).stochastic_viterbi_kernel[B * N, _threads(K), lib.stream, shared](
            scores, beam.tokens, beam.E1, beam.E2, beam.lengths, inv_temp, seed & 0xFFFFFFFF, seed >> 32, replay,
            replaying, tile_rows, shift, cum_shift, beam_probs[1], beam_idx[1], path_tokens[1], path_scores[1],
            backpointers[1], score[1])
    out = [beam_probs[0], beam_idx[0], path_tokens[0], path_scores[0], backpointers[0], score[0]]
    if single:
        out = [out[0].reshape(B, T, K), out[1], out[2].reshape(B, T), out[3].reshape(B, T, K),
               out[4].reshape(B, T - 1, K), out[5].reshape(B)]
    return StochasticViterbiResult(*out)


def stochastic_viterbi_backward(grad_beam_probs, sample, tokens, E1, E2, lengths=None):
    from .api import SamplerGrad

    lib = _Library(sample.beam_probs)
    ndim = len(getattr(sample.beam_probs, "shape", ()))
    if ndim not in (3, 4):
        raise ValueError(f"sample.beam_probs must have shape (B, T, K) or (B, T, K, N), got {sample.beam_probs.shape}")
    beam_probs = _float_view(lib, sample.beam_probs, "sample.beam_probs", ndim)
    dtype = beam_probs.dtype
    B, T, K = beam_probs.shape[:3]
    N = 1 if ndim == 3 else beam_probs.shape[3]
    grads = _float_view(lib, grad_beam_probs, "grad_beam_probs", ndim, dtype)
    if grads.shape != beam_probs.shape:
        raise ValueError(f"grad_beam_probs must have the shape of sample.beam_probs {beam_probs.shape}, got {grads.shape}")
    backpointers = _int_view(lib, sample.backpointers, "sample.backpointers", (B, T - 1, K) + ((N,) if ndim == 4 else ()))
    tokens = _int_view(lib, tokens, "tokens", (B, T, K))
    checks = _Checks(lib, dtype)
    checks.finite(grads, "grad_beam_probs contains NaN or inf")
    checks.in_range(backpointers, 0, K, f"sample.backpointers must be beam slots in [0, {K})")
    E1, E2 = _tables(lib, E1, E2, dtype, checks)
    checks.in_range(tokens, 0, E1.shape[0], f"tokens must be token ids in [0, {E1.shape[0]}) (rows of E1/E2)")
    lengths_host = _validate.lengths(_host_copy(lib, lengths), B, T)
    checks.run()
    grad_scores = lib.zeros((B, T, K), dtype)
    grad_E1 = lib.zeros(E1.shape, dtype)
    grad_E2 = lib.zeros(E1.shape, dtype)
    if B * N:
        _kernels(dtype).stochastic_viterbi_backward_kernel[B * N, _threads(K), lib.stream, 2 * K * dtype.itemsize](
            beam_probs.reshape(B, T, K, N), backpointers.reshape(B, T - 1, K, N), tokens, E1, E2,
            lib.to_device(lengths_host)[1], grads.reshape(B, T, K, N), grad_scores[1], grad_E1[1], grad_E2[1])
    return SamplerGrad(grad_scores[0], grad_E1[0], grad_E2[0])


# --------------------------------------------------------------------------------------------------
# exact inference
# --------------------------------------------------------------------------------------------------
class ForwardState(NamedTuple):
    """``crf._ForwardState``'s counterpart: the validated beam and the forward pass's device arrays."""

    beam: _Beam
    inv_temp: Any
    log_z: Any  # (B,) view, compute dtype
    log_z_native: Any
    alpha: Any  # (B, T, K) views
    col_max: Any
    col_sum: Any

    @property
    def scores(self):
        return self.beam.scores


def forward_pass(beam: _Beam, temperature) -> ForwardState:
    lib, scores = beam.lib, beam.scores
    B, T, K = scores.shape
    D = beam.E1.shape[1]
    dtype = scores.dtype
    inv_temp = dtype.type(1.0 / _validate.temperature(temperature))
    log_z = lib.empty((B,), dtype)
    alpha, col_max, col_sum = (lib.empty((B, T, K), dtype)[1] for _ in range(3))
    tile_rows, shared = _tiling(K, D, dtype, K)
    if B:
        _kernels(dtype).forward_kernel[B, _threads(K), lib.stream, shared](
            scores, beam.tokens, beam.E1, beam.E2, beam.lengths, inv_temp, tile_rows, log_z[1], alpha, col_max,
            col_sum)
    return ForwardState(beam, inv_temp, log_z[1], log_z[0], alpha, col_max, col_sum)


def log_partition(scores, tokens, E1, E2, temperature=1.0, lengths=None):
    return forward_pass(beam_inputs(scores, tokens, E1, E2, lengths), temperature).log_z_native


def sample_with_state(scores, tokens, E1, E2, num_samples, temperature, lengths, seed, uniforms):
    from .crf import CRFSample

    beam = beam_inputs(scores, tokens, E1, E2, lengths)
    num_samples = _validate.positive_int(num_samples, "num_samples")
    lib = beam.lib
    B, T, K = beam.scores.shape
    D = beam.E1.shape[1]
    dtype = beam.scores.dtype
    state = forward_pass(beam, temperature)
    seed, replay, replaying = _seed_and_uniforms(lib, seed, uniforms, (B, T, num_samples), "(B, T, N)", dtype)
    beam_idx = lib.empty((B, T, num_samples), np.int64)
    path_tokens = lib.empty((B, T, num_samples), np.int64)
    log_prob = lib.empty((B, num_samples), dtype)
    if B:
        _kernels(dtype).sample_kernel[B * num_samples, _threads(K), lib.stream, (2 * K + D) * dtype.itemsize](
            beam.scores, beam.tokens, beam.E1, beam.E2, beam.lengths, state.inv_temp, state.log_z, state.alpha,
            seed & 0xFFFFFFFF, seed >> 32, replay, replaying, beam_idx[1], path_tokens[1], log_prob[1])
    return state, CRFSample(beam_idx[0], path_tokens[0], log_prob[0])


def backward_pass(state: ForwardState, row_scale: Optional[np.ndarray]):
    """(marginals (native), grad_E1, grad_E2 (native or None)); the table gradients are those of
    sum_b row_scale[b] * tau * log Z_tau[b]."""
    beam = state.beam
    lib = beam.lib
    B, T, K = beam.scores.shape
    D = beam.E1.shape[1]
    dtype = beam.scores.dtype
    mu = lib.empty((B, T, K), dtype)
    want_rows = row_scale is not None
    grad_E1 = lib.zeros(beam.E1.shape if want_rows else (1, 1), dtype)
    grad_E2 = lib.zeros(beam.E1.shape if want_rows else (1, 1), dtype)
    scale = lib.to_device(np.ones(B, dtype) if row_scale is None else row_scale.astype(dtype))[1]
    tile_rows, shared = _tiling(K, D, dtype, 3 * K)
    if B:
        _kernels(dtype).backward_kernel[B, _threads(K), lib.stream, shared](
            beam.tokens, beam.E1, beam.E2, beam.lengths, state.inv_temp, state.alpha, state.col_max, state.col_sum,
            tile_rows, scale, want_rows, mu[1], grad_E1[1], grad_E2[1])
    if not want_rows:
        return mu, None, None
    return mu, grad_E1, grad_E2


def marginals(scores, tokens, E1, E2, temperature=1.0, lengths=None):
    state = forward_pass(beam_inputs(scores, tokens, E1, E2, lengths), temperature)
    return backward_pass(state, None)[0][0]


def _weights(lib, grad_output, batch, dtype):
    from .crf import _grad_output

    return _grad_output(_host_copy(lib, grad_output), batch, np.dtype(dtype))


def log_partition_grad(scores, tokens, E1, E2, temperature=1.0, lengths=None, grad_output=None):
    from .crf import PartitionGrad

    beam = beam_inputs(scores, tokens, E1, E2, lengths)
    lib = beam.lib
    dtype = beam.scores.dtype
    B = beam.scores.shape[0]
    weights = _weights(lib, grad_output, B, dtype)
    state = forward_pass(beam, temperature)
    scale = weights * state.inv_temp
    mu, grad_E1, grad_E2 = backward_pass(state, scale)
    grad_scores = lib.empty(mu[1].shape, dtype)
    _scale_rows(lib, mu[1], scale, grad_scores[1])
    return PartitionGrad(state.log_z_native, mu[0], grad_scores[0], grad_E1[0], grad_E2[0])


def _scale_rows(lib, values, scale, out):
    if values.size:
        _kernels(values.dtype).scale_rows[_grid(values.size), 256, lib.stream](
            values, lib.to_device(np.asarray(scale, values.dtype))[1], out)


def sequence_score(scores, tokens, E1, E2, beam_idx, lengths=None):
    beam = beam_inputs(scores, tokens, E1, E2, lengths)
    lib = beam.lib
    B, T, K = beam.scores.shape
    paths = _view(lib, beam_idx, "beam_idx")
    if paths.ndim not in (2, 3):
        raise ValueError(f"beam_idx must have shape (B, T) or (B, T, N), got {paths.shape}")
    single = paths.ndim == 2
    paths = _int_view(lib, beam_idx, "beam_idx", (B, T) if single else (B, T, paths.shape[2]))
    host = lib.to_host(paths).reshape(B, T, -1)
    inside = np.arange(T)[None, :, None] < beam.lengths_host[:, None, None]
    if (inside & ((host < 0) | (host >= K))).any():
        raise ValueError(f"beam_idx must be beam slots in [0, {K}) before each sequence's length")
    N = host.shape[2]
    out = lib.empty((B, N), beam.scores.dtype)
    _sequence_scores(beam, lib.to_device(np.where(inside, host, 0))[1], out[1])
    return out[0].reshape(B) if single else out[0]


def _sequence_scores(beam, paths, out):
    B, _, N = paths.shape
    if B * N:
        _kernels(beam.scores.dtype).sequence_score_kernel[_grid(B * N, 64), 64, beam.lib.stream](
            beam.scores, beam.tokens, beam.E1, beam.E2, beam.lengths, paths, out)


class LikelihoodState(NamedTuple):
    forward: ForwardState
    beam_scores: Any  # native (B, T, K)
    beam_tokens: Any
    targets: Any  # (B, T) view
    slots: Any  # (B, T) view
    log_likelihood: Any  # native (B,)


def likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature) -> LikelihoodState:
    lib = _Library(emissions)
    emissions_view = _float_view(lib, emissions, "emissions", 3)
    B, T, V = emissions_view.shape
    if T == 0:
        raise ValueError(f"emissions must have at least one position (T >= 1), got shape {emissions_view.shape}")
    target_view = _int_view(lib, targets, "targets", (B, T))
    checks = _Checks(lib, emissions_view.dtype)
    checks.in_range(target_view, 0, V, f"targets must be token ids in [0, {V}) (rows of E1/E2)")
    E1_view, _ = _tables(lib, E1, E2, emissions_view.dtype, checks)
    if E1_view.shape[0] != V:
        raise ValueError(f"E1 and E2 must have V = {V} rows (emissions.shape[2]), got {E1_view.shape[0]}")
    checks.run()
    beam_scores, beam_tokens = topk_beam(emissions, k, force_tokens=targets)
    beam = beam_inputs(beam_scores, beam_tokens, E1, E2, lengths)
    dtype = beam.scores.dtype
    slots = lib.empty((B, T, 1), np.int64)[1]
    numerator = lib.empty((B, 1), dtype)[1]
    log_lik = lib.empty((B,), dtype)
    kern = _kernels(dtype)
    if B * T:
        kern.find_slots[_grid(B * T, 64), 64, lib.stream](beam.tokens, target_view, slots)
    _sequence_scores(beam, slots, numerator)
    state = forward_pass(beam, temperature)
    if B:
        kern.path_log_prob[_grid(B, 64), 64, lib.stream](numerator, state.log_z, state.inv_temp, log_lik[1].reshape(B, 1))
    return LikelihoodState(state, beam_scores, beam_tokens, target_view, slots, log_lik[0])


def log_likelihood(emissions, targets, E1, E2, k, lengths=None, temperature=1.0):
    return likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature).log_likelihood


def paths_backward(state: ForwardState, beam_idx, path_tokens, weights: np.ndarray):
    """Native (grad_scores, grad_E1, grad_E2) of sum_{b,n} weights[b, n] * (S(y_bn) / tau - log Z_tau[b])
    for device paths beam_idx / path_tokens (B, T, N) (entries after the length are not read)."""
    lib = state.beam.lib
    dtype = state.beam.scores.dtype
    beam_idx = _view(lib, beam_idx, "beam_idx")
    path_tokens = _view(lib, path_tokens, "path_tokens")
    scale = (np.asarray(weights) * state.inv_temp).astype(dtype)  # (B, N)
    mu, grad_E1, grad_E2 = backward_pass(state, -scale.sum(axis=1))
    grad_scores = lib.empty(mu[1].shape, dtype)
    _scale_rows(lib, mu[1], -scale.sum(axis=1), grad_scores[1])
    B, T, N = beam_idx.shape
    if B * N:
        beam = state.beam
        _kernels(dtype).add_paths[_grid(B * N, 64), 64, lib.stream](
            beam_idx, path_tokens, beam.lengths, lib.to_device(scale)[1], beam.E1, beam.E2, grad_scores[1],
            grad_E1[1], grad_E2[1])
    return grad_scores[0], grad_E1[0], grad_E2[0]


def log_likelihood_grad(emissions, targets, E1, E2, k, lengths=None, temperature=1.0, grad_output=None):
    from .crf import LikelihoodGrad

    weights = _weights(_Library(emissions), grad_output, emissions.shape[0], np.float64)  # checked before any work
    likelihood = likelihood_forward(emissions, targets, E1, E2, k, lengths, temperature)
    grads = likelihood_backward(likelihood, weights)
    return LikelihoodGrad(likelihood.log_likelihood, likelihood.beam_scores, likelihood.beam_tokens, *grads)


def likelihood_backward(likelihood: LikelihoodState, weights: np.ndarray):
    """Native (grad_scores, grad_E1, grad_E2) of sum_b weights[b] * log_likelihood[b] (host weights (B,))."""
    B, T = likelihood.targets.shape
    return paths_backward(likelihood.forward, likelihood.slots, likelihood.targets.reshape(B, T, 1),
                          np.asarray(weights)[:, None])
