"""Every GPU kernel compiles for real hardware (compute capability 8.0 and 9.0, float32 and float64)
without a GPU, float32 kernels use no float64 instruction, and ptxas accepts each within 255 registers."""

import importlib.util
import os
import shutil

import pytest

_spec = importlib.util.spec_from_file_location(
    "ptxas_report", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "ptxas_report.py")
)
ptxas_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ptxas_report)


def test_f64_instructions_are_found():
    assert ptxas_report.f64_instructions("\tadd.f64 \t%fd1, %fd2, %fd3;\n\tadd.f32 \t%f1, %f2, %f3;") == [
        "add.f64 \t%fd1, %fd2, %fd3;"
    ]


def test_every_kernel_compiles_for_sm80_and_sm90():
    with_ptxas = shutil.which("ptxas") is not None
    seen = set()
    for cc, dtype, name, ptx, usage in ptxas_report.compile_all(with_ptxas):
        seen.add((cc, dtype, name))
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        if dtype == "float32":
            assert ptxas_report.f64_instructions(ptx) == [], f"{name} (float32) has float64 instructions"
        if usage is not None:
            print(cc, dtype, name, usage)
            assert usage["registers"] <= 255, (name, usage)
    kernels = {name for _, _, name in seen}
    assert {
        "topk_kernel",
        "transitions_kernel",
        "viterbi_steps",
        "chains_steps",
        "stochastic_viterbi_backward_kernel",
        "forward_steps",
        "sample_kernel",
        "backward_kernel",
    } <= kernels
    assert len(seen) == 4 * len(kernels)
    if not with_ptxas:
        pytest.skip("compile_ptx checked; ptxas not installed, so no register figures")
