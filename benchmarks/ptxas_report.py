"""Compile every GPU kernel ahead of time (no GPU needed) and report ptxas's register and spill figures.

    python benchmarks/ptxas_report.py            # writes benchmarks/results/ptxas.md

For compute capabilities 8.0 and 9.0, float32 and float64, each kernel of ``viterbi_numba.gpu.kernels`` is
compiled to PTX with ``numba.cuda.compile_ptx`` at its launch signature; float32 PTX is checked for
``.f64`` instructions; ``ptxas -v`` assembles it and reports registers, stack and spills per thread.
The installed ptxas may accept an older PTX ISA than NVVM writes (``.version``); the header is then
lowered to the ptxas's own version, which only matters if a newer instruction is used (ptxas says so).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

CAPABILITIES = ((8, 0), (9, 0))
DTYPES = (np.float32, np.float64)
HERE = os.path.dirname(os.path.abspath(__file__))


def f64_instructions(ptx: str) -> list[str]:
    """The instructions of a PTX text that operate on float64 (``add.f64``, ``cvt.f64.f32``, ...)."""
    return [
        line.strip() for line in ptx.splitlines() if re.search(r"\.f64\b", line) and not line.strip().startswith("//")
    ]


def _ptxas_version():
    done = subprocess.run(["ptxas", "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+)\.(\d+)", done.stdout)
    # ptxas of CUDA 13.0 reads PTX ISA up to 9.0; 12.x up to 8.x (minor version = CUDA minor)
    return None if match is None else f"{int(match.group(1)) - 4}.{match.group(2)}"


def ptxas_usage(ptx: str, cc: tuple) -> dict:
    """Registers, stack frame and spill bytes per thread from ``ptxas -v`` for one kernel's PTX."""
    isa = _ptxas_version()
    if isa is not None:
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {isa}", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        done = subprocess.run(
            ["ptxas", "-c", "-v", f"-arch=sm_{cc[0]}{cc[1]}", path, "-o", os.devnull], capture_output=True, text=True
        )
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip()}")
    info = done.stderr
    number = lambda pattern: int(re.search(pattern, info).group(1))  # noqa: E731
    return {
        "registers": number(r"Used (\d+) registers"),
        "stack": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def compile_all(with_ptxas: bool):
    """Yield (cc, dtype name, kernel name, ptx, usage or None) for every kernel."""
    from viterbi_numba.gpu import kernels as gpu_kernels

    for cc in CAPABILITIES:
        for dtype in DTYPES:
            for name in gpu_kernels.kernels(dtype).signatures:
                ptx = gpu_kernels.compile_ptx(name, dtype, cc)
                yield cc, np.dtype(dtype).name, name, ptx, ptxas_usage(ptx, cc) if with_ptxas else None


def main() -> int:
    if shutil.which("ptxas") is None:
        print("ptxas not found: install the CUDA toolkit (only compile_ptx runs without it)", file=sys.stderr)
        return 1
    lines = [
        "# ptxas figures of the GPU kernels",
        "",
        "`python benchmarks/ptxas_report.py` (no GPU needed): `numba.cuda.compile_ptx` at each kernel's launch",
        "signature, then `ptxas -v`. Registers, stack frame and spill bytes are per thread; every kernel is",
        "launched with at most 256 threads per block, so up to 255 registers still fit an SM's 64K.",
        "",
        "| cc | dtype | kernel | registers | stack (B) | spill stores (B) | spill loads (B) | .f64 instructions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cc, dtype, name, ptx, usage in compile_all(with_ptxas=True):
        row = (
            f"| {cc[0]}.{cc[1]} | {dtype} | {name} | {usage['registers']} | {usage['stack']} | "
            f"{usage['spill_stores']} | {usage['spill_loads']} | {len(f64_instructions(ptx)) if dtype == 'float32' else '-'} |"
        )
        print(row, flush=True)
        lines.append(row)
    with open(os.path.join(HERE, "results", "ptxas.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
