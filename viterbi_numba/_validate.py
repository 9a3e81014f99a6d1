"""Argument checks shared by the public functions. Every failure names the argument it is about."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def _not_on_gpu(value: Any, name: str) -> None:
    from ._gpu import is_gpu_array

    if is_gpu_array(value):
        raise TypeError(f"{name} is a GPU array but the main inputs are host arrays; pass all arrays on one device")


def float_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """``value`` as a NumPy floating array of rank ``ndim`` (not yet cast or made contiguous)."""
    _not_on_gpu(value, name)
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float16, float32 or float64), got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def int_array(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as a contiguous int64 array of exactly ``shape``."""
    _not_on_gpu(value, name)
    array = np.asarray(value)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
    return np.ascontiguousarray(array, dtype=np.int64)


def compute_dtype(*arrays: np.ndarray) -> np.dtype:
    """float64 if any input is float64, else float32 (float16 is computed in float32)."""
    return np.dtype(np.float64) if any(a.dtype == np.float64 for a in arrays) else np.dtype(np.float32)


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


def seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be None or an integer, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {value}")
    return value


def uniforms(value: Any, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """Replayed uniforms: exactly ``shape`` (named ``layout`` in errors), values in [0, 1); as float64."""
    array = float_array(value, "uniforms", len(shape))
    if array.shape != tuple(shape):
        raise ValueError(f"uniforms must have shape {tuple(shape)} {layout}, got {array.shape}")
    if array.size and not ((array >= 0) & (array < 1)).all():
        raise ValueError("uniforms must lie in [0, 1) (no NaN)")
    return np.ascontiguousarray(array, dtype=np.float64)


def beam_scores(scores: np.ndarray, lengths: np.ndarray, name: str = "scores") -> None:
    """No NaN or +inf anywhere; no position before a sequence's length whose whole beam is -inf."""
    if np.isnan(scores).any() or np.isposinf(scores).any():
        b, t = np.argwhere(~(np.isfinite(scores) | np.isneginf(scores)))[0][:2]
        raise ValueError(f"{name} contains NaN or +inf (first at batch {b}, position {t})")
    dead = np.isneginf(scores).all(axis=2)
    dead &= np.arange(scores.shape[1])[None, :] < lengths[:, None]
    if dead.any():
        b, t = np.argwhere(dead)[0]
        raise ValueError(f"{name}: the whole beam is -inf at batch {b}, position {t}; no path can pass there")


def lengths(value: Any, batch: int, steps: int) -> np.ndarray:
    """``lengths`` (B,) with values in [1, T]; None means every sequence is T long."""
    if value is None:
        return np.full(batch, steps, dtype=np.int64)
    array = int_array(value, "lengths", (batch,))
    if array.size and (array.min() < 1 or array.max() > steps):
        raise ValueError(f"lengths must lie in [1, {steps}] (T), got values from {array.min()} to {array.max()}")
    return array


def token_ids(tokens: np.ndarray, vocab: int, name: str = "tokens") -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(
            f"{name} must be token ids in [0, {vocab}) (rows of E1/E2), got values from {tokens.min()} to {tokens.max()}"
        )


def embedding_tables(E1: Any, E2: Any) -> tuple[np.ndarray, np.ndarray]:
    E1 = float_array(E1, "E1", 2)
    E2 = float_array(E2, "E2", 2)
    if E1.shape != E2.shape:
        raise ValueError(f"E1 and E2 must have the same shape (V, D), got {E1.shape} and {E2.shape}")
    if E1.shape[0] == 0 or E1.shape[1] == 0:
        raise ValueError(f"E1 and E2 must be non-empty (V, D), got {E1.shape}")
    for name, table in (("E1", E1), ("E2", E2)):
        if not np.isfinite(table).all():
            raise ValueError(f"{name} contains NaN or inf")
    return E1, E2
