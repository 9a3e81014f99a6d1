"""GPU launch geometry and the warp-shuffle reduction, checked on the CPU (no GPU, no simulator).

The simulator has no warps, so ``block.build``'s shuffle reduction never runs there: it is emulated here
in lock step, instruction by instruction (``shfl_down_sync`` returns the caller's own value when the
source lane is past the warp), for every block size the kernels use. The launch layout of the
recursions is a pure function, checked for every shape class.
"""

import numpy as np
import pytest

from viterbi_numba.gpu.ops import PAIRS_PER_BLOCK, recursion_layout

WARP = 32


def shfl_down(values, offset):
    """One ``shfl_down_sync`` over a warp's registers: lane l reads lane l + offset, or keeps its own."""
    shifted = values.copy()
    shifted[: WARP - offset] = values[offset:]
    return shifted


def combine(a, b, op):
    return {"max": np.maximum, "sum": np.add, "min": np.minimum}[op](a, b)


def emulate_block_reduce(values, op, guard_second_stage=True):
    """``block.build``'s GPU block_reduce, in lock step over every thread of a block of len(values)."""
    threads = len(values)
    warps = threads // WARP
    lanes = values.reshape(warps, WARP).copy()
    offset = 16
    while offset > 0:  # within each warp
        lanes = np.stack([combine(warp, shfl_down(warp, offset), op) for warp in lanes])
        offset //= 2
    scratch = lanes[:, 0].copy()  # lane 0 of each warp writes scratch[warp]
    lane = np.arange(WARP)
    second = np.where(lane < warps, scratch[np.minimum(lane, warps - 1)], scratch[0])
    offset = 16
    while offset > 0:
        other = shfl_down(second, offset)
        take = lane + offset < warps if guard_second_stage else np.ones(WARP, bool)
        second = np.where(take, combine(second, other, op), second)
        offset //= 2
    return second[0]  # broadcast from lane 0


@pytest.mark.parametrize("threads", [32, 64, 128, 256])
@pytest.mark.parametrize("op", ["max", "sum", "min"])
def test_shuffle_reduction_in_lock_step(threads, op):
    rng = np.random.default_rng(threads)
    for trial in range(20):
        values = rng.standard_normal(threads)
        if trial % 3 == 0:
            values[rng.integers(threads, size=5)] = -np.inf
        expected = {"max": np.max, "sum": np.sum, "min": np.min}[op](values)
        np.testing.assert_allclose(emulate_block_reduce(values, op), expected, rtol=1e-12)


def test_the_emulation_catches_a_missing_guard():
    """Without the second stage's ``lane + offset < warps`` guard, lanes past the warps' results (copies
    of warp 0's) are added in: the emulation must see that, or it could not see a real slip either."""
    values = np.ones(64)
    assert emulate_block_reduce(values, "sum") == 64
    assert emulate_block_reduce(values, "sum", guard_second_stage=False) != 64


def _capacity(threads):
    return 132 * max(1, 1024 // threads) // 2


@pytest.mark.parametrize("units", [1, 2, 8, 64, 1000])
@pytest.mark.parametrize("K", [1, 5, 33, 64, 256, 257, 1024])
@pytest.mark.parametrize("per_column", [1, 8, 32])
def test_recursion_layout_covers_every_column(units, K, per_column):
    layout = recursion_layout(units, K, per_column, 132, _capacity)
    assert layout.blocks % layout.split == 0 and layout.blocks <= _capacity(layout.threads)
    assert layout.threads in (32, 64, 128, 256)
    width = -(-K // layout.split)
    assert layout.split * width >= K and (layout.split - 1) * width < K  # every part holds a column
    lanes = layout.threads // layout.parts
    assert 1 <= layout.parts <= max(1, per_column) and lanes * layout.parts <= layout.threads
    groups = layout.blocks // layout.split
    assert 1 <= groups <= units  # rounds serve the rest


def test_the_seed_size_uses_the_whole_card():
    """B = 8, K = 256: the Viterbi/forward steps split each sequence's columns so that nearly every one
    of an H100's 132 multiprocessors has a block of at least PAIRS_PER_BLOCK threads' work."""
    layout = recursion_layout(8, 256, 8, 132, _capacity)
    assert layout.blocks >= 0.9 * 132
    assert -(-256 // layout.split) * 8 >= PAIRS_PER_BLOCK
    assert recursion_layout(8, 256, 8, 1, lambda threads: 1).blocks == 1  # the simulator: one block


def test_an_old_driver_is_told_which_extra_to_install():
    from viterbi_numba.gpu.arrays import cuda_version_problem

    assert cuda_version_problem((13, 0), 13) is None and cuda_version_problem((12, 8), 12) is None
    message = cuda_version_problem((12, 4), 13)
    assert "CUDA 12.4" in message and "CUDA 13 toolkit" in message and "viterbi-numba[cuda12]" in message
