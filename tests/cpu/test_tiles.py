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


@njit(cache=True)
def _crossings(weights, prev_weights, targets):
    counts = np.full(targets.shape, -1, dtype=np.int32)
    tiles.crossing_counts(weights, prev_weights, targets, counts)
    totals = np.full(targets.shape, np.nan, dtype=weights.dtype)
    tiles.column_totals(weights, prev_weights, totals)
    return counts, totals


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chains, K", [(1, 1), (3, 5), (7, 40), (8, 16), (11, 33), (16, 64)])
def test_crossing_counts_are_the_sequential_running_sums(dtype, chains, K):
    """The sampler's column totals are the running sums' last (the products rounded, then summed in
    order of i, as np.cumsum does) and its counts, for every chain tile (4, 2, 1 chains) and padded
    widths of one or more strips, the number of rows whose running sum is at most the target,
    including targets exactly equal to a running sum (counted) and rows of weight 0 (they add exactly
    0)."""
    rng = np.random.default_rng(chains * 100 + K)
    strip = tiles.STRIP_F32 if dtype == np.float32 else tiles.STRIP_F64
    width = -(-K // strip) * strip
    weights = np.zeros((K, width), dtype)
    weights[:, :K] = rng.random((K, K)) * (rng.random((K, K)) < 0.8)
    prev_weights = (rng.random((chains, K)) * (rng.random((chains, K)) < 0.7)).astype(dtype)
    running = np.cumsum(prev_weights[:, :, None] * weights[None, :, :K], axis=1)  # (chains, K rows, K)
    targets = np.zeros((chains, width), dtype)
    targets[:, :K] = (rng.random((chains, K)) * running[:, -1]).astype(dtype)
    rows = rng.integers(0, K, (chains, K))
    exact = rng.random((chains, K)) < 0.3  # targets that equal a running sum
    targets[:, :K] = np.where(exact, np.take_along_axis(running, rows[:, None, :], 1)[:, 0], targets[:, :K])
    counts, totals = _crossings(weights, prev_weights, targets)
    np.testing.assert_array_equal(totals[:, :K], running[:, -1])
    want = (running <= targets[:, None, :K]).sum(axis=1)
    np.testing.assert_array_equal(counts[:, :K], want)


@njit(cache=True)
def _strip_maxima(src_rows, dst_rows, E1, E2, offsets, scale, with_offsets):
    """Every strip's column maxima from strip_dots_max, and the strips themselves, as (K, K) blocks."""
    K = src_rows.shape[0]
    src_emb, dst_t, strip, column_max, _ = tiles.workspace(K, E1.shape[1], E1)
    tiles.gather_operands(src_rows, dst_rows, E1, E2, src_emb, dst_t)
    width = strip.shape[1]
    trans = np.empty((K, K), dtype=E1.dtype)
    maxima = np.empty(K, dtype=E1.dtype)
    for column in range(0, K, width):
        if with_offsets:
            tiles.strip_dots_max(src_emb, dst_t, column, K, strip, offsets, scale, column_max)
        else:
            tiles.strip_dots_max(src_emb, dst_t, column, K, strip, None, scale, column_max)
        for c in range(min(width, K - column)):
            maxima[column + c] = column_max[c]
            for i in range(K):
                trans[i, column + c] = strip[i, c]
    return trans, maxima


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 5, 7, 40, 100])
@pytest.mark.parametrize("with_offsets", [False, True])
def test_strip_maxima_are_taken_from_the_tiles_registers(dtype, K, with_offsets):
    """strip_dots_max's column maxima are those of offsets[i] + trans[i, j] * scale (a product, then a
    sum, as NumPy rounds them), or of trans[i, j], over the real rows only: every entry here is negative,
    so a tile's padding row (a dot of 0) would win if it were not masked, and rows with offset -inf are
    passed over."""
    rng = np.random.default_rng(K)
    V, D = 2 * K + 3, 4
    E1 = np.abs(rng.standard_normal((V, D))).astype(dtype)
    E2 = -np.abs(rng.standard_normal((V, D))).astype(dtype) - dtype(0.1)
    src_rows, dst_rows = rng.integers(0, V, K), rng.integers(0, V, K)
    offsets = (rng.standard_normal(K) - 30.0).astype(dtype)
    offsets[rng.random(K) < 0.3] = -np.inf
    scale = dtype(0.75)
    trans, maxima = _strip_maxima(src_rows, dst_rows, E1, E2, offsets, scale, with_offsets)
    assert np.all(trans < 0)
    logits = offsets[:, None] + trans * scale if with_offsets else trans
    assert maxima.dtype == dtype
    np.testing.assert_array_equal(maxima, logits.max(axis=0))
