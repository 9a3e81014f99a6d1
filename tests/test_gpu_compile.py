"""The GPU kernels read without a GPU (``benchmarks/gpu_model.py``): every kernel compiles for compute
capability 8.0 and 9.0 in both dtypes, float32 kernels use no float64 instruction, every kernel fits an
SM at its largest launch, and the float32 kernels use no local memory (no stack, no LDL/STL) at the ranks
up to 64. The SASS checks need ptxas and nvdisasm (the ``test`` extra installs them from PyPI)."""

import importlib.util
import os

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "gpu_model", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_model.py")
)
gpu_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_model)

HAVE_TOOLS = gpu_model.tool("ptxas") is not None and gpu_model.tool("nvdisasm") is not None
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="ptxas/nvdisasm not installed (pip install -e '.[test]')")
MAIN_KERNELS = {
    "topk_kernel",
    "transitions_kernel",
    "viterbi_steps",
    "forward_steps",
    "chains_steps",
    "stochastic_viterbi_backward_kernel",
    "sample_kernel",
    "backward_steps",
    "xi_rows",
    "xi_columns",
    "ratio_forward_steps",
    "ratio_backward_steps",
}
# float32 kernels that compute in float64 on purpose: sampling without replacement keeps its perturbed
# values and log-probabilities in float64 on both targets, so that a seed draws the same samples
FLOAT64_BY_DESIGN = {"distinct_sample_kernel"}


def test_f64_instructions_are_found():
    assert gpu_model.f64_instructions("\tadd.f64 \t%fd1, %fd2, %fd3;\n\tadd.f32 \t%f1, %f2, %f3;") == [
        "add.f64 \t%fd1, %fd2, %fd3;"
    ]


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/              @P0 BRA `(.L_x_1) ;
        /*0040*/                   STL [R1], R3 ;
        /*0050*/              @P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""


def test_loops_are_read_from_sass():
    """A backward branch closes a loop; the innermost ones hold the passes, a region the most markers."""
    assert gpu_model.loops(SASS) == [["FFMA R3, R2, R2, R3", "@P0 BRA `(.L_x_1)"]]
    (inner,) = gpu_model.hot_loops(SASS, "FFMA")
    assert (inner["instructions"], inner["markers"], inner["local"]) == (2, 1, 0)
    (region,) = gpu_model.hot_loops(SASS, "LDG", "region")
    assert (region["instructions"], region["markers"], region["local"]) == (5, 1, 1)
    assert gpu_model.local_accesses(SASS) == 1


def test_every_kernel_compiles_for_sm80():
    """(sm_90 is compiled and assembled by the resource test below.)"""
    seen = set()
    for cc, dtype, name, ptx, _, _ in gpu_model.compile_all(False, capabilities=((8, 0),)):
        seen.add((dtype, name))
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        if dtype == "float32" and name not in FLOAT64_BY_DESIGN:
            assert gpu_model.f64_instructions(ptx) == [], f"{name} (float32) has float64 instructions"
    assert MAIN_KERNELS | FLOAT64_BY_DESIGN | {"nbest_steps"} <= {name for _, name in seen}
    assert len({name for _, name in seen}) * 2 == len(seen)


@needs_tools
def test_every_kernel_fits_a_multiprocessor_at_its_largest_launch():
    """registers x threads within the 64K registers of an SM and static + dynamic shared memory within
    the 48 KiB default, at K = 1024, the largest rank, top-k = 1024, both dtypes (sm_90)."""
    from viterbi_numba.gpu.kernels import block, kernels
    from viterbi_numba.gpu.ops import dynamic_shared

    checked = 0
    for _, dtype, name, _, usage, _ in gpu_model.compile_all(True, capabilities=((9, 0),), rank=block.RANKS[-1]):
        threads = kernels(dtype, block.RANKS[-1]).threads[name]
        assert usage["registers"] * threads <= 64 * 1024, (dtype, name, usage["registers"], threads)
        shared = usage["shared"] + dynamic_shared(name, block.MAX_K, dtype, N=1024, k=block.MAX_K)
        assert shared <= 48 * 1024, (dtype, name, shared)
        assert usage["spill_stores"] == usage["spill_loads"] == 0, (dtype, name, usage)
        checked += 1
    assert checked >= 2 * len(MAIN_KERNELS)


@needs_tools
@pytest.mark.parametrize("rank", [16, 32, 64])
def test_float32_kernels_use_no_local_memory(rank):
    """Factor rows, accumulators and tiles live in registers: no stack frame and no LDL/STL anywhere,
    and the hot loops found are the ones the model counts."""
    found = 0
    for _, _, name, _, usage, sass in gpu_model.compile_all(
        True, capabilities=((9, 0),), dtypes=(np.float32,), rank=rank
    ):
        assert usage["stack"] == 0, (name, usage)
        assert gpu_model.local_accesses(sass) == 0, name
        if name in MAIN_KERNELS and name != "topk_kernel" and name != "stochastic_viterbi_backward_kernel":
            marker, kind = gpu_model.MARKERS[name]
            assert gpu_model.unit_cost(name, gpu_model.hot_loops(sass, marker, kind)) > 0, name
            found += 1
    assert found == len(MAIN_KERNELS) - 2
