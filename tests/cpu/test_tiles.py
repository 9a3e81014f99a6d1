"""cpu/tiles.py: the register tiles of the transition blocks, against float64 products of the same rows."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from viterbi_numba.cpu import tiles


@njit(cache=True)
def _block(src_rows, dst_rows, E1, E2):
    K = src_rows.shape[0]
    work = tiles.workspace(K, E1.shape[1], E1)
    trans = np.full((K, K), np.nan, dtype=E1.dtype)
    tiles.transition_block(src_rows, dst_rows, E1, E2, work, trans)
    return trans, work[2].shape[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K, D", [(1, 1), (5, 3), (6, 32), (33, 7), (40, 8), (256, 32), (70, 128)])
def test_transition_block_is_the_product_of_the_gathered_rows(dtype, K, D):
    """Every entry of the block, whatever K and D (tiles and strips padded at both ends), equals the dot
    product of its rows up to the rounding of D fused multiply-adds in the dtype."""
    rng = np.random.default_rng(K * 1000 + D)
    V = 3 * K + 5
    E1 = rng.standard_normal((V, D)).astype(dtype)
    E2 = rng.standard_normal((V, D)).astype(dtype)
    src_rows = rng.integers(0, V, K)
    dst_rows = rng.integers(0, V, K)
    trans, width = _block(src_rows, dst_rows, E1, E2)
    exact = E1[src_rows].astype(np.float64) @ E2[dst_rows].astype(np.float64).T
    scale = np.abs(E1[src_rows]).astype(np.float64) @ np.abs(E2[dst_rows]).astype(np.float64).T
    assert not np.isnan(trans).any()
    assert np.all(np.abs(trans - exact) <= D * np.finfo(dtype).eps * scale + np.finfo(dtype).tiny)
    assert width == (tiles.STRIP_F32 if dtype == np.float32 else tiles.STRIP_F64)


def test_every_entry_is_one_chain_of_fmas_over_d():
    """An entry is fma(a[D-1], b[D-1], ... fma(a[0], b[0], 0)), in order of d: with a = 1 + 2^-30, the
    chain -(1 + 2^-29) + a * a keeps a * a's last bit (2^-60) in its fused step, where a product rounded
    first, or the other order, gives 0."""
    a = 1.0 + 2.0**-30
    E1 = np.array([[-1.0, a]] * 2)
    E2 = np.array([[1.0 + 2.0**-29, a]] * 2)
    trans, _ = _block(np.arange(2), np.arange(2), E1, E2)
    assert np.all(trans == 2.0**-60)
    E1r, E2r = E1[:, ::-1].copy(), E2[:, ::-1].copy()  # the other order: a * a rounded first
    trans, _ = _block(np.arange(2), np.arange(2), E1r, E2r)
    assert np.all(trans == 0.0)


def test_the_vector_width_follows_the_compile_target():
    assert tiles.VECTOR_BYTES in (32, 64)
    assert tiles.STRIP_F32 == 2 * tiles.VECTOR_BYTES // 4 and tiles.STRIP_F64 == 2 * tiles.VECTOR_BYTES // 8
