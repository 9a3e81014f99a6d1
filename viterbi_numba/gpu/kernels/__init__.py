"""GPU kernels (``numba.cuda``) by family, the counterparts of ``cpu/decode.py`` and ``cpu/crf.py``.

Imported only when a GPU array is passed; importing needs numba-cuda but no GPU. ``kernels(dtype)``
compiles lazily, once per float dtype, so every float constant in a float32 kernel is a float32.

Launch shape: one block per sequence (Viterbi, forward, backward) or per (sequence, sample) chain (the
stochastic Viterbi sampler, FFBS, the sampler's backward) runs the whole time loop; the block's threads
cover the K beam slots (``j = tid, tid + threads, ...``). The K x D factor rows of the step's other side
are staged in shared memory in tiles of ``tile_rows`` rows, so each thread computes its transition
column ``E1[tok[t-1, i]] . E2[tok[t, j]]`` from shared memory with its own row held in registers/local
memory: K^2 D multiply-adds per pass, no (K, K) block is ever stored. Back-pointers and per-step state
go to global memory; scores of the current step live in shared memory. Results equal the CPU kernels'
up to float rounding: the same Philox numbers drive the same inverse-CDF rule (float32 kernels use the
uniform's top 24 bits), but sums are added in another order, so a draw whose target lies within
rounding of a CDF boundary may pick the neighbouring slot (docs/design.md §6).
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np
from numba import cuda

from . import block, crf, elementwise, sampler, topk, viterbi

FAMILIES = (elementwise, topk, viterbi, sampler, crf)


@cache
def kernels(dtype: Any) -> SimpleNamespace:
    """Every GPU kernel for float dtype ``dtype`` (np.float32 or np.float64), compiled on first launch;
    ``signatures`` maps each kernel's name to the argument types it is launched with."""
    blk = block.build(np.dtype(dtype))
    merged: dict[str, Any] = {}
    signatures: dict[str, tuple] = {}
    for family in FAMILIES:
        built = family.build(blk)
        signatures.update(built.signatures)
        merged.update({name: getattr(built, name) for name in built.signatures})
    return SimpleNamespace(signatures=signatures, **merged)


def compile_ptx(name: str, dtype: Any, cc: tuple[int, int]) -> str:
    """PTX of kernel ``name`` for ``dtype`` and compute capability ``cc``, without a GPU.

    numba-cuda 0.30 asks the current device for its compute capability when it compiles a kernel's
    device functions, which fails where there is no GPU; during this call that question is answered
    with ``cc``.
    """
    from numba.cuda import dispatcher

    compiled = kernels(dtype)
    asked = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        ptx, _ = cuda.compile_ptx(getattr(compiled, name).py_func, compiled.signatures[name], cc=cc)
    finally:
        dispatcher.get_current_device = asked
    return ptx
