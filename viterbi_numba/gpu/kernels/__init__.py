"""GPU kernels (``numba.cuda``) by family, the counterparts of ``cpu/decode.py`` and ``cpu/crf.py``.

Imported only when a GPU array is passed; importing needs numba-cuda but no GPU. ``kernels(dtype)``
compiles lazily, once per float dtype, so every float constant in a float32 kernel is a float32.

Launch shape (docs/design.md §8): the recursions (Viterbi, forward, stochastic Viterbi, backward) run
chunk by chunk of steps. ``transitions_kernel`` first computes the chunk's (K, K) transition blocks over
the whole card (a register-tiled batched product, rank fixed at compile time); the recursion kernel
then does K^2 work per step, its columns split over several blocks of a cooperative grid that meet at a
grid barrier after each step, and the chains of a sequence share each block. The backward pass turns
each chunk's blocks into xi, then into the table gradients with two products per step (``xi_rows``,
``xi_columns``). FFBS keeps a block per chain, computing its few transitions from factor rows. Results
equal the CPU kernels' up to float rounding: the same Philox numbers drive the same inverse-CDF rule
(float32 kernels use the uniform's top 24 bits and the hardware exp), but sums are added in another
order, so a draw whose target lies within rounding of a CDF boundary may pick the neighbouring slot
(docs/design.md §6).
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np
from numba import cuda

from . import block, crf, elementwise, sampler, topk, transitions, viterbi

FAMILIES = (elementwise, topk, transitions, viterbi, sampler, crf)


@cache
def kernels(dtype: Any, rank: int = block.RANKS[0]) -> SimpleNamespace:
    """Every GPU kernel for float dtype ``dtype`` (np.float32 or np.float64) and compiled rank ``rank``
    (one of ``block.RANKS``; kernels that read no factor rows ignore it), compiled on first launch.
    ``signatures`` maps each kernel's name to the argument types it is launched with, ``threads`` to the
    most threads per block it is launched with (its launch bounds)."""
    blk = block.build(np.dtype(dtype), rank)
    merged: dict[str, Any] = {}
    signatures: dict[str, tuple] = {}
    threads: dict[str, int] = {}
    for family in FAMILIES:
        built = family.build(blk)
        signatures.update(built.signatures)
        threads.update(built.threads)
        merged.update({name: getattr(built, name) for name in built.signatures})
    return SimpleNamespace(signatures=signatures, threads=threads, **merged)


def compile_ptx(name: str, dtype: Any, cc: tuple[int, int], rank: int = block.RANKS[0]) -> str:
    """PTX of kernel ``name`` for ``dtype`` and compute capability ``cc``, without a GPU."""
    compiled = kernels(dtype, rank)
    return compile_function_ptx(getattr(compiled, name).py_func, compiled.signatures[name], cc, compiled.threads[name])


def compile_function_ptx(function: Any, signature: tuple, cc: tuple[int, int], threads: int) -> str:
    """PTX of the Python kernel ``function`` at ``signature`` for compute capability ``cc`` with launch
    bounds ``threads``, without a GPU.

    numba-cuda 0.30 asks the current device for its compute capability when it compiles a kernel's
    device functions, which fails where there is no GPU; during this call that question is answered
    with ``cc``.
    """
    from numba.cuda import dispatcher

    asked = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        ptx, _ = cuda.compile_ptx(function, signature, cc=cc, launch_bounds=threads)
    finally:
        dispatcher.get_current_device = asked
    return ptx
