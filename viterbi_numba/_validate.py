"""Every argument check and option normalisation, once, above the device split (docs/design.md §8).

Each public function calls one of the validators at the bottom with the backend that
:func:`viterbi_numba._devices.backend_of` picked; they return the inputs normalised (cast to the compute
dtype, contiguous, int64 ids, lengths on the device) in the NamedTuples below. Every failure is a
``TypeError`` or ``ValueError`` that names the argument.

The value rules (``*_values`` functions) are written once, for NumPy arrays. The CPU backend applies
them directly; the GPU backend screens device arrays with small kernels that write one flag array per
call, which is read back once, when the call's kernels are queued (``gpu/checks.py``); only when a flag
is set is the same rule applied to a host copy, so the message is word for word the CPU's. The screens
also hand the kernels clamped copies of every index array, so a kernel never reads out of bounds even
before the flags are read, or when they are not (:func:`skip_gpu_checks`).
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import secrets
from typing import Any, Iterator, NamedTuple, Optional, Protocol

import numpy as np

__all__ = ["BeamCRF", "Draws", "skip_gpu_checks"]

_READ_GPU_FLAGS = contextvars.ContextVar("viterbi_numba_read_gpu_flags", default=True)


@contextlib.contextmanager
def skip_gpu_checks() -> Iterator[None]:
    """Inside this context, GPU calls never wait for the GPU: the value checks still run on the device
    but their flags are not read back, so a call makes no blocking transfer and can be captured in a
    CUDA graph (give its small inputs, such as ``lengths``, on the device too). Invalid values (NaN,
    ids or lengths out of range) then give unspecified results instead of a ValueError; the kernels
    still never read out of bounds, as they index with clamped copies. Shape and type errors are raised
    as always; so are value errors of CPU calls (a small host array given with GPU arrays is checked on
    the GPU, so not here)."""
    token = _READ_GPU_FLAGS.set(False)
    try:
        yield
    finally:
        _READ_GPU_FLAGS.reset(token)


def read_gpu_flags() -> bool:
    """False inside :func:`skip_gpu_checks`."""
    return _READ_GPU_FLAGS.get()


class Checks(Protocol):
    """A backend's value checks: each takes the rule that words the error from host copies of the
    arrays it is given (see the module docstring); those returning an array return what the kernels
    must read instead of the input (contiguous, in the backend's dtype, and on the GPU clamped to the
    valid range)."""

    def finite(self, values: Any, rule: Any) -> None: ...

    def finite_cast(self, values: Any, dtype: np.dtype, rule: Any) -> Any: ...

    def in_range(self, values: Any, low: int, high: int, rule: Any) -> Any: ...

    def unit_interval(self, values: Any, dtype: np.dtype, rule: Any) -> Any: ...

    def tables(self, E1: Any, E2: Any, rule: Any) -> None: ...

    def beam(self, scores: Any, lengths: Any, rule: Any) -> None: ...

    def scale(
        self, scores: Any, lengths: Any, E1: Any, E2: Any, temperature: float, exact: bool, rule: Any
    ) -> None: ...

    def before_lengths(self, values: Any, lengths: Any, high: int, fill: int, rule: Any) -> Any: ...


class Arrays(Protocol):
    """How a backend reads its arrays (``cpu.ops.HostArrays``, ``gpu.arrays.DeviceArrays``)."""

    max_beam: Optional[int]
    max_rank: Optional[int]

    def float_array(self, value: Any, name: str, ndim: int) -> Any: ...

    def int_array(self, value: Any, name: str, shape: tuple[int, ...]) -> Any: ...

    def cast(self, array: Any, dtype: np.dtype, name: str) -> Any: ...

    def small_array(self, value: Any, name: str) -> Any: ...

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> Any: ...

    def checks(self) -> Checks: ...


class BeamCRF(NamedTuple):
    """Validated inputs of a beam CRF: scores, E1, E2 in one compute dtype, int64 tokens and lengths."""

    scores: Any  # (B, T, K)
    tokens: Any  # (B, T, K)
    E1: Any  # (V, D)
    E2: Any  # (V, D)
    lengths: Any  # (B,) on the backend's device

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.scores.dtype)


class Draws(NamedTuple):
    """Where a sampler's uniforms come from: ``uniforms`` when replayed (the backend's array: float64 on
    the CPU, the compute dtype on the GPU), else ``seed``."""

    seed: int  # 64 bits; 0 (unused) when replaying
    uniforms: Any


# --------------------------------------------------------------------------------------------------
# scalars and options
# --------------------------------------------------------------------------------------------------
def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def temperature(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return value


def inv_temperature(value: Any, dtype: np.dtype) -> Any:
    """1 / temperature as a scalar of the compute dtype (what every kernel multiplies by; inf where it
    overflows the dtype, which the range check refuses: ``scale_values``)."""
    with np.errstate(over="ignore"):
        return np.dtype(dtype).type(1.0 / temperature(value))


def seed(value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be None or an integer, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {value}")
    return value


def compute_dtype(*dtypes: Any) -> np.dtype:
    """float64 if any input is a float of 8 bytes or more (in either byte order; longdouble is computed
    in float64), else float32 (float16 is computed in float32)."""
    wide = any(np.dtype(d).kind == "f" and np.dtype(d).itemsize >= 8 for d in dtypes)
    return np.dtype(np.float64) if wide else np.dtype(np.float32)


def float_dtype(array: Any, name: str, ndim: int) -> Any:
    """``array`` itself, after checking that it is a floating-point array of rank ``ndim``."""
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float16, float32 or float64), got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def int_dtype(array: Any, name: str) -> Any:
    """``array`` itself, after checking that it holds integers (not booleans)."""
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    return array


# --------------------------------------------------------------------------------------------------
# value rules on NumPy arrays (the GPU re-runs them on a host copy when its screen flags a failure)
# --------------------------------------------------------------------------------------------------
def finite_values(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf")


def token_id_values(tokens: np.ndarray, vocab: int, name: str = "tokens", of: str = "rows of E1/E2") -> None:
    """Ids in [0, vocab); ``of`` says what they index."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(
            f"{name} must be token ids in [0, {vocab}) ({of}), got values from {tokens.min()} to {tokens.max()}"
        )


def emission_values(emissions: np.ndarray) -> None:
    if np.isnan(emissions).any() or np.isposinf(emissions).any():
        b, t = np.argwhere(~(np.isfinite(emissions) | np.isneginf(emissions)))[0][:2]
        raise ValueError(f"emissions contains NaN or +inf (first at batch {b}, position {t})")


def beam_score_values(scores: np.ndarray, lengths: np.ndarray, name: str = "scores") -> None:
    """No NaN or +inf anywhere; no position before a sequence's length whose whole beam is -inf."""
    if np.isnan(scores).any() or np.isposinf(scores).any():
        b, t = np.argwhere(~(np.isfinite(scores) | np.isneginf(scores)))[0][:2]
        raise ValueError(f"{name} contains NaN or +inf (first at batch {b}, position {t})")
    dead = np.isneginf(scores).all(axis=2)
    dead &= np.arange(scores.shape[1])[None, :] < lengths[:, None]
    if dead.any():
        b, t = np.argwhere(dead)[0]
        raise ValueError(f"{name}: the whole beam is -inf at batch {b}, position {t}; no path can pass there")


def table_values(E1: np.ndarray, E2: np.ndarray, side: str = "") -> None:
    finite_values(E1, f"E1{side}")
    finite_values(E2, f"E2{side}")


# The range (docs/design.md §6): with M = T (spread + |E1| |E2|), the largest magnitude a kernel meets,
# M max(1, 1/tau), must stay this far below the dtype's largest number, so that sums of a few such terms
# stay finite; for exact inference M / tau must stay below EXACT_LIMIT, where log-probabilities
# S(y)/tau - log Z are still accurate to about 1e-3 nats (benchmarks/results/extremes.md).
OVERFLOW_LIMIT = {np.dtype(t): float(np.finfo(t).max) / 64 for t in (np.float32, np.float64)}
EXACT_LIMIT = {np.dtype(np.float32): 1e6, np.dtype(np.float64): 1e12}


def beam_spread(scores: np.ndarray, lengths: np.ndarray) -> float:
    """The largest gap between the best and the worst finite beam score of a position before its
    sequence's length (the kernels see each position's scores shifted by their maximum), in the scores'
    dtype; 0 when there is none. The scores hold no NaN or +inf (``beam_score_values``)."""
    high = scores.max(axis=2, initial=-np.inf)
    low = np.where(scores == -np.inf, np.inf, scores).min(axis=2, initial=np.inf)
    live = (np.arange(scores.shape[1])[None, :] < lengths[:, None]) & (high > -np.inf)
    with np.errstate(over="ignore"):
        return float((high - low)[live].max(initial=0))


def squared_row_norm(table: np.ndarray) -> float:
    """The largest squared Euclidean norm of a row of ``table``, summed in the table's dtype (inf when it
    overflows it, NaN with a NaN entry)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.einsum("vd,vd->v", table, table).max(initial=0))


def _magnitudes(
    spread: float, squared_norms: tuple[float, float], steps: int, temperature: float, dtype: np.dtype
) -> tuple[Any, Any, Any]:
    """(1/tau, M, M/tau) in ``dtype``'s arithmetic, as ``gpu/kernels/elementwise.check_scale`` computes them
    (inf where they overflow it; M/tau is NaN where M = 0 and 1/tau is inf)."""
    scalar = np.dtype(dtype).type
    with np.errstate(over="ignore", invalid="ignore"):
        inv_temp = scalar(1.0 / temperature)
        transition = np.sqrt(scalar(squared_norms[0])) * np.sqrt(scalar(squared_norms[1]))
        untempered = scalar(steps) * (scalar(spread) + transition)
        return inv_temp, untempered, untempered * inv_temp


def scale_fits(
    spread: float, squared_norms: tuple[float, float], steps: int, temperature: float, exact: bool, dtype: np.dtype
) -> bool:
    """Whether M = T (spread + |E1| |E2|) is within the range at ``temperature`` (see OVERFLOW_LIMIT), by
    the arithmetic of ``gpu/kernels/elementwise.check_scale``."""
    _, untempered, tempered = _magnitudes(spread, squared_norms, steps, temperature, dtype)
    limit = OVERFLOW_LIMIT[np.dtype(dtype)]
    precise = EXACT_LIMIT[np.dtype(dtype)] if exact else limit
    return bool(untempered <= limit and tempered <= limit and tempered <= precise)


def scale_values(
    scores: np.ndarray,
    lengths: np.ndarray,
    E1: np.ndarray,
    E2: np.ndarray,
    temperature: float,
    exact: bool,
    scores_name: str = "scores",
    side: str = "",
) -> None:
    """The kernels' magnitudes stay in the compute dtype's range, and for exact inference (``exact``)
    where log-probabilities keep their precision (``OVERFLOW_LIMIT``, ``EXACT_LIMIT``). A transition
    score is at most ``|E1 row| |E2 row|`` (Cauchy-Schwarz). The rule is decided in the compute dtype,
    as on the GPU; the message's numbers are worked out in float64. ``side`` ends the tables' names
    (``E1_q``)."""
    e1, e2 = f"E1{side}", f"E2{side}"
    dtype = compute_dtype(scores.dtype, E1.dtype, E2.dtype)
    steps = scores.shape[1]
    spread = beam_spread(scores.astype(dtype, copy=False), lengths)
    squared_norms = (squared_row_norm(E1.astype(dtype, copy=False)), squared_row_norm(E2.astype(dtype, copy=False)))
    if scale_fits(spread, squared_norms, steps, temperature, exact, dtype):
        return
    limit, precise = OVERFLOW_LIMIT[dtype], EXACT_LIMIT[dtype]
    inv_temp = _magnitudes(spread, squared_norms, steps, temperature, dtype)[0]
    if not np.isfinite(inv_temp):
        raise ValueError(
            f"temperature {temperature:g} is too small for {dtype}: 1 / temperature overflows it "
            f"(temperature must be at least {1 / float(np.finfo(dtype).max):.3g})"
        )
    spread = beam_spread(scores.astype(np.float64), lengths)
    transition = float(np.sqrt(squared_row_norm(E1.astype(np.float64)) * squared_row_norm(E2.astype(np.float64))))
    untempered = steps * (spread + transition)
    tempered = untempered / temperature
    what = f"T (score spread + largest |{e1} row| |{e2} row|) = {untempered:.3g}"
    wider = " or compute in float64" if dtype == np.float32 else ""
    if not steps * transition <= limit:
        raise ValueError(
            f"{e1}, {e2}: transition scores {e1}[a] . {e2}[b] can reach {transition:.3g} (the largest row norms "
            f"multiplied), too large for {dtype} over T = {steps} steps (at most {limit / steps:.3g}); "
            f"scale the tables down{wider}"
        )
    if not untempered <= limit:
        raise ValueError(
            f"{scores_name}: the best and worst finite scores of a position are {spread:.3g} apart, too far for "
            f"{dtype} over T = {steps} steps (at most {limit / steps - transition:.3g}); mask slots with -inf, "
            f"not a large finite number{wider}"
        )
    if not tempered <= limit:
        raise ValueError(
            f"temperature {temperature:g} is too small for these inputs in {dtype}: {what}, divided by "
            f"the temperature, exceeds {limit:.3g}; use temperature >= {untempered / limit:.3g}"
        )
    if exact and untempered > precise:
        raise ValueError(
            f"{scores_name}, {e1}, {e2}: too large for exact inference in {dtype}: {what} exceeds {precise:g}, "
            f"where log-probabilities lose their precision; scale them down{wider}"
        )
    if exact and tempered > precise:
        raise ValueError(
            f"temperature {temperature:g} is too small for exact inference in {dtype}: {what}, divided by the "
            f"temperature, exceeds {precise:g}, where log-probabilities lose their precision; use temperature "
            f">= {untempered / precise:.3g}{wider}"
        )
    raise ValueError(  # within rounding of a bound in the compute dtype
        f"temperature {temperature:g}: {what}, divided by the temperature, is at the edge of {dtype}'s range "
        f"({precise if exact else limit:.3g}); use a larger temperature{wider}"
    )


def slot_values(slots: np.ndarray, beam: int, name: str) -> None:
    if slots.size and (slots.min() < 0 or slots.max() >= beam):
        raise ValueError(f"{name} must be beam slots in [0, {beam})")


def path_values(paths: np.ndarray, lengths: np.ndarray, beam: int) -> None:
    """Beam paths (B, T, N): slots in [0, beam) before each sequence's length (anything after it)."""
    inside = np.arange(paths.shape[1])[None, :, None] < lengths[:, None, None]
    if (inside & ((paths < 0) | (paths >= beam))).any():
        raise ValueError(f"beam_idx must be beam slots in [0, {beam}) before each sequence's length")


def target_values(targets: np.ndarray, lengths: np.ndarray, vocab: int) -> None:
    """Targets (B, T, 1): token ids in [0, vocab) before each sequence's length (anything after it, such
    as PAD)."""
    inside = np.arange(targets.shape[1])[None, :, None] < lengths[:, None, None]
    bad = inside & ((targets < 0) | (targets >= vocab))
    if bad.any():
        b, t = np.argwhere(bad)[0][:2]
        raise ValueError(
            f"targets must be token ids in [0, {vocab}) (rows of E1/E2) before each sequence's length, "
            f"got {targets[b, t, 0]} at batch {b}, position {t}"
        )


def forced_values(tokens: np.ndarray, vocab: int, name: str) -> None:
    if tokens.size and (tokens.min() < -1 or tokens.max() >= vocab):
        raise ValueError(
            f"{name} must be token ids in [0, {vocab}) or PAD (-1, nothing forced there), "
            f"got values from {tokens.min()} to {tokens.max()}"
        )


def unit_values(uniforms: np.ndarray) -> None:
    if uniforms.size and not ((uniforms >= 0) & (uniforms < 1)).all():
        raise ValueError("uniforms must lie in [0, 1) (no NaN)")


def length_values(lengths: np.ndarray, steps: int) -> None:
    if lengths.size and (lengths.min() < 1 or lengths.max() > steps):
        raise ValueError(f"lengths must lie in [1, {steps}] (T), got values from {lengths.min()} to {lengths.max()}")


# --------------------------------------------------------------------------------------------------
# the validators the public functions call
# --------------------------------------------------------------------------------------------------
def lengths(arrays: Arrays, value: Any, batch: int, steps: int) -> Any:
    """``lengths`` (B,) as int64 in [1, T] on the backend's device; None means every sequence is T long."""
    if value is None:
        return arrays.full((batch,), steps, np.int64)
    values = int_dtype(arrays.small_array(value, "lengths"), "lengths")
    if values.shape != (batch,):
        raise ValueError(f"lengths must have shape {(batch,)}, got {values.shape}")
    return arrays.checks().in_range(values, 1, steps + 1, lambda host: length_values(host, steps))


def tables(arrays: Arrays, E1: Any, E2: Any, checks: Optional[Checks], side: str = "") -> tuple[Any, Any]:
    """E1, E2 (V, D) of one shape, non-empty, finite (the finiteness is checked by ``checks``; only the
    shapes without them); ``side`` ends their names in errors (``E1_q``)."""
    e1, e2 = f"E1{side}", f"E2{side}"
    E1 = arrays.float_array(E1, e1, 2)
    E2 = arrays.float_array(E2, e2, 2)
    if E1.shape != E2.shape:
        raise ValueError(f"{e1} and {e2} must have the same shape (V, D), got {E1.shape} and {E2.shape}")
    if E1.shape[0] == 0 or E1.shape[1] == 0:
        raise ValueError(f"{e1} and {e2} must be non-empty (V, D), got {E1.shape}")
    if arrays.max_rank is not None and E1.shape[1] > arrays.max_rank:
        raise ValueError(f"{e1}, {e2}: the GPU kernels take D <= {arrays.max_rank}, got D = {E1.shape[1]}")
    if checks is not None:
        checks.tables(E1, E2, lambda host_E1, host_E2: table_values(host_E1, host_E2, side))
    return E1, E2


def beam_crf(
    arrays: Arrays,
    scores: Any,
    tokens: Any,
    E1: Any,
    E2: Any,
    lengths_value: Any,
    tokens_checked: bool = False,
    lengths_checked: bool = False,
    temperature_value: Any = 1.0,
    exact: bool = False,
    scores_name: str = "scores",
    values_checked: bool = False,
    side: str = "",
) -> BeamCRF:
    """The inputs of every operation on a given beam (docs/design.md §1); ``tokens_checked``: the tokens
    are top-K's own output, in range already; ``lengths_checked``: ``lengths_value`` is what
    :func:`lengths` returned. The magnitudes the kernels will meet at ``temperature_value`` are checked
    (:func:`scale_values`; ``exact``: for exact inference; ``scores_name`` names the scores there), unless
    ``values_checked``: a forward pass of these inputs checked them (shapes, token ids and lengths, which
    bound the kernels' reads, are checked all the same). ``side`` ends the names of the scores and the
    tables in errors (``scores_q``, ``E1_q``: one of two CRFs)."""
    name = f"scores{side}"
    scores = arrays.float_array(scores, name, 3)
    B, T, K = scores.shape
    if T == 0:
        raise ValueError(f"{name} must have at least one position (T >= 1), got shape {scores.shape}")
    if K == 0:
        raise ValueError(f"{name} must have a beam of at least one slot (K >= 1), got shape {scores.shape}")
    if arrays.max_beam is not None and K > arrays.max_beam:
        raise ValueError(f"{name}: the GPU kernels take a beam of at most {arrays.max_beam} slots, got K = {K}")
    tokens = arrays.int_array(tokens, "tokens", (B, T, K))
    E1, E2 = tables(arrays, E1, E2, None, side)
    dtype = compute_dtype(scores.dtype, E1.dtype, E2.dtype)  # the GPU refuses mixed dtypes here, before any screen
    named = ((scores, name), (E1, f"E1{side}"), (E2, f"E2{side}"))
    scores, E1, E2 = (arrays.cast(array, dtype, array_name) for array, array_name in named)
    checks = arrays.checks()
    if not values_checked:
        checks.tables(E1, E2, lambda host_E1, host_E2: table_values(host_E1, host_E2, side))
    vocab = E1.shape[0]
    if not tokens_checked:
        rows = f"rows of E1{side}/E2{side}"
        tokens = checks.in_range(tokens, 0, vocab, lambda host: token_id_values(host, vocab, of=rows))
    lengths_array = lengths_value if lengths_checked else lengths(arrays, lengths_value, B, T)
    if values_checked:
        temperature(temperature_value)
        return BeamCRF(scores, tokens, E1, E2, lengths_array)
    checks.beam(scores, lengths_array, lambda host, host_lengths: beam_score_values(host, host_lengths, name))
    tau = temperature(temperature_value)  # after the arrays' value checks: their errors come first
    checks.scale(
        scores,
        lengths_array,
        E1,
        E2,
        tau,
        exact,
        lambda host_scores, host_lengths, host_E1, host_E2: scale_values(
            host_scores, host_lengths, host_E1, host_E2, tau, exact, scores_name + side, side
        ),
    )
    return BeamCRF(scores, tokens, E1, E2, lengths_array)


def topk_inputs(
    arrays: Arrays, emissions: Any, k: Any, force_tokens: Any, force_name: str = "force_tokens"
) -> tuple[Any, int, Any]:
    """(emissions in the compute dtype, k, force_tokens as int64 or None); ``force_name`` names them."""
    emissions = arrays.float_array(emissions, "emissions", 3)
    B, T, V = emissions.shape
    k = positive_int(k, "k")
    if k > V:
        raise ValueError(f"k must be at most V = {V} (emissions.shape[2]), got {k}")
    if arrays.max_beam is not None and k > arrays.max_beam:
        raise ValueError(f"k: the GPU kernels take a beam of at most {arrays.max_beam} slots, got {k}")
    forced = None
    if force_tokens is not None:
        forced = arrays.int_array(force_tokens, force_name, (B, T))
        forced = arrays.checks().in_range(forced, -1, V, lambda host: forced_values(host, V, force_name))
    return arrays.cast(emissions, compute_dtype(emissions.dtype), "emissions"), k, forced


def gather_inputs(arrays: Arrays, emissions: Any, tokens: Any) -> tuple[Any, Any]:
    """(emissions (B, T, V) in the compute dtype, tokens (B, T, K) int64 in [0, V))."""
    emissions = arrays.float_array(emissions, "emissions", 3)
    B, T, V = emissions.shape
    values = int_dtype(arrays.small_array(tokens, "tokens"), "tokens")
    if values.ndim != 3 or tuple(values.shape[:2]) != (B, T):
        raise ValueError(f"tokens must have shape (B, T, K) = ({B}, {T}, K) like emissions, got {tuple(values.shape)}")
    tokens = arrays.int_array(values, "tokens", tuple(values.shape))
    tokens = arrays.checks().in_range(tokens, 0, V, lambda host: token_id_values(host, V, of="columns of emissions"))
    return arrays.cast(emissions, compute_dtype(emissions.dtype), "emissions"), tokens


def draws(
    arrays: Arrays, seed_value: Any, uniforms: Any, shape: tuple[int, ...], layout: str, dtype: np.dtype
) -> Draws:
    """A sampler's randomness: replayed ``uniforms`` of exactly ``shape`` (named ``layout`` in errors),
    values in [0, 1), or a seed (a fresh 64-bit one when both are None); ``dtype``: the compute dtype."""
    seed_value = seed(seed_value)
    if uniforms is None:
        return Draws(secrets.randbits(64) if seed_value is None else seed_value, None)
    if seed_value is not None:
        raise ValueError("give either seed or uniforms, not both")
    values = float_dtype(arrays.small_array(uniforms, "uniforms"), "uniforms", len(shape))
    if values.shape != tuple(shape):
        raise ValueError(f"uniforms must have shape {tuple(shape)} {layout}, got {values.shape}")
    return Draws(0, arrays.checks().unit_interval(values, dtype, unit_values))


def weights(arrays: Arrays, value: Any, shape: tuple[int, ...], dtype: Any, name: str = "grad_output") -> Any:
    """Per-sequence (B,) or per-path (B, N) finite weights in ``dtype`` on the backend's device (all 1
    when None)."""
    if value is None:
        return arrays.full(shape, 1.0, dtype)
    values = float_dtype(arrays.small_array(value, name), name, len(shape))
    if values.shape != tuple(shape):
        layout = "(B,)" if len(shape) == 1 else "(B, N)"
        raise ValueError(f"{name} must have shape {tuple(shape)} {layout}, got {values.shape}")
    return arrays.checks().finite_cast(values, np.dtype(dtype), lambda host: finite_values(host, name))


def paths(arrays: Arrays, crf: BeamCRF, beam_idx: Any) -> tuple[Any, bool]:
    """Beam paths (B, T) or (B, T, N) as (B, T, N) int64, an entry outside [0, K) at or after a length
    (PAD) read as 0; single?"""
    B, T, K = crf.scores.shape
    values = arrays.small_array(beam_idx, "beam_idx")
    if values.ndim not in (2, 3):
        raise ValueError(f"beam_idx must have shape (B, T) or (B, T, N), got {values.shape}")
    single = values.ndim == 2
    int_dtype(values, "beam_idx")
    if values.shape[:2] != (B, T):
        raise ValueError(
            f"beam_idx must have shape {(B, T) if single else (B, T, values.shape[2])}, got {values.shape}"
        )
    values = values.reshape(B, T, 1) if single else values
    rule = lambda host, lengths: path_values(host, lengths, K)  # noqa: E731
    return arrays.checks().before_lengths(values, crf.lengths, K, 0, rule), single


_FLOATS = ("scores", "E1", "E2")


def kl_crfs(
    arrays: Arrays,
    scores_p: Any,
    scores_q: Any,
    tokens: Any,
    E1_p: Any,
    E2_p: Any,
    E1_q: Any,
    E2_q: Any,
    lengths_value: Any,
    temperature_value: Any,
) -> tuple[BeamCRF, BeamCRF]:
    """Two beam CRFs on the same beam tokens and lengths (p, q), each checked as :func:`beam_crf` checks
    one for exact inference, in one compute dtype; q's tables may have their own (V, D). Errors name
    ``scores_p``, ``E1_p``, ... ."""
    p, q = (
        beam_crf(
            arrays, scores, tokens, E1, E2, lengths_value, temperature_value=temperature_value, exact=True, side=side
        )
        for side, scores, E1, E2 in (("_p", scores_p, E1_p, E2_p), ("_q", scores_q, E1_q, E2_q))
    )
    dtype = compute_dtype(p.dtype, q.dtype)
    p, q = (
        crf._replace(**{name: arrays.cast(getattr(crf, name), dtype, f"{name}{side}") for name in _FLOATS})
        for crf, side in ((p, "_p"), (q, "_q"))
    )
    return p, q


def same_beam(arrays: Arrays, p: BeamCRF, p_inv_temp: Any, q: BeamCRF, q_inv_temp: Any) -> BeamCRF:
    """A reference forward pass q can be read on p's beam (``CRFForward.kl``): the same (B, T, K), dtype
    and temperature, and p's token ids within q's vocabulary. Returns q's inputs read on p's beam: p's
    token ids (as checked for q's tables: the copy the GPU kernels read) and lengths."""
    if tuple(q.scores.shape) != tuple(p.scores.shape):
        raise ValueError(
            f"reference must be a forward pass on this beam's shape (B, T, K) = {tuple(p.scores.shape)}, "
            f"got {tuple(q.scores.shape)}"
        )
    if q.dtype != p.dtype:
        raise TypeError(f"reference must be computed in this pass's dtype {p.dtype}, got {q.dtype}")
    if float(q_inv_temp) != float(p_inv_temp):
        raise ValueError("reference must have this pass's temperature")
    vocab = q.E1.shape[0]
    rows = "rows of the reference's E1/E2"
    tokens = arrays.checks().in_range(p.tokens, 0, vocab, lambda host: token_id_values(host, vocab, of=rows))
    return q._replace(tokens=tokens, lengths=p.lengths)


def saved_forward(arrays: Arrays, crf: BeamCRF, saved: Any) -> tuple[Any, Any, Any, Any]:
    """A forward pass's saved arrays (log Z (B,), alpha, column maxima and sums (B, T, K), as
    ``CRFForward.saved`` gives them) in the compute dtype, shapes checked."""
    if not isinstance(saved, (tuple, list)) or len(saved) != 4:
        raise TypeError("saved must be the 4 arrays of CRFForward.saved: (log_z, alpha, col_max, col_sum)")
    names = ("saved log_z", "saved alpha", "saved col_max", "saved col_sum")
    B, T, K = crf.scores.shape
    out = []
    for value, name, shape in zip(saved, names, ((B,), (B, T, K), (B, T, K), (B, T, K))):
        array = arrays.cast(arrays.float_array(value, name, len(shape)), crf.dtype, name)
        if tuple(array.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(array.shape)}")
        out.append(array)
    return out[0], out[1], out[2], out[3]


class SamplerGradInputs(NamedTuple):
    crf: BeamCRF  # the sample's beam_probs stand in for the scores (no scores are needed)
    beam_probs: Any  # (B, T, K, N)
    backpointers: Any  # (B, T-1, K, N)
    grad_beam_probs: Any  # (B, T, K, N)


def sampler_grad(
    arrays: Arrays, grad_beam_probs: Any, sample: Any, tokens: Any, E1: Any, E2: Any, lengths_value: Any
) -> SamplerGradInputs:
    """Inputs of :func:`~viterbi_numba.stochastic_viterbi_backward`."""
    if not all(hasattr(sample, field) for field in ("beam_probs", "backpointers")):
        raise TypeError(
            f"sample must be the StochasticViterbiResult that stochastic_viterbi returned, got {type(sample).__name__}"
        )
    ndim = len(np.shape(sample.beam_probs))
    if ndim not in (3, 4):
        raise ValueError(
            f"sample.beam_probs must have shape (B, T, K) or (B, T, K, N), got {np.shape(sample.beam_probs)}"
        )
    beam_probs = arrays.float_array(sample.beam_probs, "sample.beam_probs", ndim)
    B, T, K = beam_probs.shape[:3]
    N = 1 if ndim == 3 else beam_probs.shape[3]
    dtype = compute_dtype(beam_probs.dtype)
    beam_probs = arrays.cast(beam_probs, dtype, "sample.beam_probs")
    grads = arrays.float_array(grad_beam_probs, "grad_beam_probs", ndim)
    if grads.shape != beam_probs.shape:
        raise ValueError(
            f"grad_beam_probs must have the shape of sample.beam_probs {beam_probs.shape}, got {grads.shape}"
        )
    backpointers = arrays.int_array(
        sample.backpointers, "sample.backpointers", (B, T - 1, K) + ((N,) if ndim == 4 else ())
    )
    tokens = arrays.int_array(tokens, "tokens", (B, T, K))
    checks = arrays.checks()
    checks.finite(grads, lambda host: finite_values(host, "grad_beam_probs"))
    backpointers = checks.in_range(backpointers, 0, K, lambda host: slot_values(host, K, "sample.backpointers"))
    E1, E2 = tables(arrays, E1, E2, checks)
    vocab = E1.shape[0]
    tokens = checks.in_range(tokens, 0, vocab, lambda host: token_id_values(host, vocab))
    shape = (B, T, K, N)
    crf = BeamCRF(
        beam_probs,
        tokens,
        arrays.cast(E1, dtype, "E1"),
        arrays.cast(E2, dtype, "E2"),
        lengths(arrays, lengths_value, B, T),
    )
    return SamplerGradInputs(
        crf,
        beam_probs.reshape(shape),
        backpointers.reshape((B, T - 1, K, N)),
        arrays.cast(grads, dtype, "grad_beam_probs").reshape(shape),
    )


def likelihood(
    arrays: Arrays, emissions: Any, targets: Any, E1: Any, E2: Any, k: Any, lengths_value: Any
) -> tuple[Any, int, Any, Any]:
    """Inputs of :func:`~viterbi_numba.log_likelihood` before the beam is built: (emissions in the
    compute dtype, k, the tokens to force, lengths). The targets must be token ids before each
    sequence's length; after it they are ignored by the CRF, forced into the beam where they are token
    ids (as fairseq does), and where they are not (PAD, as the samplers return them) nothing is
    forced. The tables' values are checked once, with the beam's CRF (:func:`beam_crf`)."""
    emissions = arrays.float_array(emissions, "emissions", 3)
    B, T, V = emissions.shape
    if T == 0:
        raise ValueError(f"emissions must have at least one position (T >= 1), got shape {emissions.shape}")
    targets = arrays.int_array(targets, "targets", (B, T))
    E1, _ = tables(arrays, E1, E2, None)
    if E1.shape[0] != V:
        raise ValueError(f"E1 and E2 must have V = {V} rows (emissions.shape[2]), got {E1.shape[0]}")
    emissions, k, _ = topk_inputs(arrays, emissions, k, None)
    lengths_array = lengths(arrays, lengths_value, B, T)
    rule = lambda host, lengths: target_values(host, lengths, V)  # noqa: E731
    forced = arrays.checks().before_lengths(targets.reshape(B, T, 1), lengths_array, V, -1, rule)
    return emissions, k, forced.reshape(B, T), lengths_array
