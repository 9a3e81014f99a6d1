"""The GPU kernels read without a GPU: resources, hot-loop SASS and lower bounds at the seed's size.

    python benchmarks/gpu_model.py                      # writes benchmarks/results/gpu_model.md
    python benchmarks/gpu_model.py --before CHECKOUT    # also the kernels of another checkout (a git worktree)

Every kernel is compiled with ``numba.cuda.compile_ptx`` at its launch signature (and launch bounds),
assembled with ``ptxas -c -v`` (registers, stack, spills, static shared memory) and disassembled with
``nvdisasm``. A loop is a backward branch; a kernel's hot loops are the innermost loops that hold its
work instruction (``MARKERS``): the multiply-add of a product, or the load of a transition entry in a
recursion. Per trip of a hot loop: SASS instructions, work instructions, local-memory accesses (LDL/STL).

The model (``SEED``, ``GPUS``) turns those counts into lower bounds for one call at the seed's size:
issue = warp instructions / (multiprocessors used x min(4, warps per multiprocessor) x clock), one warp
instruction per scheduler per cycle; step latency (recursions) = steps x the instructions one thread
issues per step, which no parallelism hides; memory = bytes that must cross HBM / bandwidth. These are
bounds, not predictions: a real run (``benchmarks/gpu.py``) checks them the first time a GPU is lent.
The tools come from PyPI (``nvidia-cuda-nvcc``, ``nvidia-cuda-nvdisasm``: the ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
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

SEED = {"B": 8, "T": 97, "K": 256, "D": 32, "N": 8, "V": 30522, "k": 256}
GPUS = {  # multiprocessors, boost clock (GHz), HBM bandwidth (TB/s): vendors' datasheets
    "H100 SXM": (132, 1.98, 3.35),
    "H200": (132, 1.98, 4.8),
}
MARKERS = {  # kernel: the SASS instruction whose count is the kernel's work (float32)
    "transitions_kernel": r"FFMA",
    "viterbi_steps": r"LDG",
    "forward_steps": r"LDG",
    "chains_steps": r"LDG",
    "sample_kernel": r"FFMA",
    "backward_kernel": r"FFMA",
    "topk_kernel": r"LDG",
    # the kernels before the redesign (one block per sequence or chain, transitions recomputed)
    "viterbi_kernel": r"FFMA",
    "forward_kernel": r"FFMA",
    "stochastic_viterbi_kernel": r"FFMA",
}


def tool(name: str) -> str | None:
    """A CUDA tool on PATH or in the ``nvidia`` wheels (``nvidia/cu13/bin``)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for sub in ("cu13", "cu12", "cuda_nvcc", "cuda_nvdisasm"):
            path = os.path.join(root, sub, "bin", name)
            if os.path.exists(path):
                return path
    return None


def f64_instructions(ptx: str) -> list[str]:
    """The instructions of a PTX text that operate on float64 (``add.f64``, ``cvt.f64.f32``, ...)."""
    return [
        line.strip() for line in ptx.splitlines() if re.search(r"\.f64\b", line) and not line.strip().startswith("//")
    ]


def _ptx_isa(ptxas: str) -> str | None:
    done = subprocess.run([ptxas, "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+)\.(\d+)", done.stdout)
    # ptxas of CUDA 13.x reads PTX ISA 9.x; 12.x reads 8.x (minor version = CUDA minor)
    return None if match is None else f"{int(match.group(1)) - 4}.{match.group(2)}"


def assemble(ptx: str, cc: tuple[int, int]) -> tuple[dict, str | None]:
    """(ptxas -v figures, SASS text or None without nvdisasm) of one kernel's PTX. ``-c``: calls into the
    device runtime (the cooperative grid barrier) stay external, as numba links them at load time."""
    ptxas = tool("ptxas")
    isa = _ptx_isa(ptxas)
    if isa is not None:
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {isa}", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(source, "w") as handle:
            handle.write(ptx)
        done = subprocess.run(
            [ptxas, "-c", "-v", f"-arch=sm_{cc[0]}{cc[1]}", source, "-o", cubin], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"ptxas failed: {done.stderr.strip()}")
        disassembler = tool("nvdisasm")
        sass = None
        if disassembler is not None:
            sass = subprocess.run([disassembler, "-c", cubin], capture_output=True, text=True, check=True).stdout
    info = done.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else 0  # noqa: E731
    usage = {
        "registers": number(r"Used (\d+) registers"),
        "stack": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "shared": number(r"(\d+) bytes smem"),
    }
    return usage, sass


_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """[(address, instruction text)] of a SASS listing, and each label's address."""
    listing: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _INSTRUCTION.search(line)
        if found:
            address = int(found.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            listing.append((address, found.group(2)))
    return listing, labels


def loops(sass: str) -> list[list[str]]:
    """The innermost loops (a backward branch and the instructions from its target to it) of a listing."""
    listing, labels = instructions(sass)
    spans = []
    for address, text in listing:
        target = _TARGET.search(text)
        if "BRA" in text.split() or re.search(r"\bBRA\b", text):
            if target and labels.get(target.group(1), address + 1) <= address:
                spans.append((labels[target.group(1)], address))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [[text for address, text in listing if start <= address <= end] for start, end in inner]


def opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def hot_loops(sass: str, marker: str) -> list[dict]:
    """Per innermost loop holding ``marker`` instructions: instructions, markers, local accesses."""
    found = []
    for body in loops(sass):
        ops = [opcode(text) for text in body]
        markers = sum(1 for op in ops if re.match(marker + r"\b", op))
        if markers:
            found.append(
                {
                    "instructions": len(ops),
                    "markers": markers,
                    "local": sum(1 for op in ops if op.startswith(("LDL", "STL"))),
                }
            )
    return sorted(found, key=lambda loop: -loop["markers"])


def local_accesses(sass: str) -> int:
    return sum(1 for _, text in instructions(sass)[0] if opcode(text).startswith(("LDL", "STL")))


def compile_all(with_ptxas: bool, names=None, capabilities=CAPABILITIES, dtypes=DTYPES, rank=None):
    """Yield (cc, dtype name, kernel name, ptx, usage or None, sass or None) for every kernel."""
    from viterbi_numba.gpu import kernels as gpu_kernels
    from viterbi_numba.gpu.kernels import block

    rank = rank or block.RANKS[0]
    for cc in capabilities:
        for dtype in dtypes:
            try:
                compiled = gpu_kernels.kernels(dtype, rank)
            except TypeError:  # a checkout from before the rank existed
                compiled = gpu_kernels.kernels(dtype)
            for name in compiled.signatures:
                if names is not None and name not in names:
                    continue
                try:
                    ptx = gpu_kernels.compile_ptx(name, dtype, cc, rank)
                except TypeError:  # a checkout from before the rank existed
                    ptx = gpu_kernels.compile_ptx(name, dtype, cc)
                usage, sass = assemble(ptx, cc) if with_ptxas else (None, None)
                yield cc, np.dtype(dtype).name, name, ptx, usage, sass


def analyse(rank: int) -> dict:
    """Per kernel (float32, sm_90, the seed's rank): resources and hot loops."""
    out = {}
    for _, _, name, _, usage, sass in compile_all(True, capabilities=((9, 0),), dtypes=(np.float32,), rank=rank):
        entry = dict(usage)
        entry["local_accesses"] = local_accesses(sass) if sass else None
        entry["hot_loops"] = hot_loops(sass, MARKERS[name]) if sass and name in MARKERS else []
        out[name] = entry
    return out


def _bounds(name: str, entry: dict, gpu: tuple) -> dict | None:
    """Lower bounds (ms) for one call of kernel ``name`` at the seed's size on ``gpu``."""
    from viterbi_numba.gpu.kernels.block import TRANSITIONS_BUDGET

    B, T, K, N, D = SEED["B"], SEED["T"], SEED["K"], SEED["N"], SEED["D"]
    sms, clock, bandwidth = gpu
    loops_ = entry["hot_loops"]
    if not loops_:
        return None
    per_trip = loops_[0]["instructions"] / loops_[0]["markers"]  # instructions per unit of work
    steps = T - 1
    cells = B * steps * K * K
    latency = 0.0
    memory_bytes = 0.0
    if name == "transitions_kernel":
        rank = 32
        work, blocks, warps = cells * rank, B * steps * (-(-K // 64)) ** 2, 8
        memory_bytes = cells * 4  # written once (and read once from L2 when a chunk fits it)
        del TRANSITIONS_BUDGET
    elif name in ("viterbi_steps", "forward_steps"):
        split = min(-(-K // 32), -(-sms // B))
        work, blocks, warps = cells, B * split, max(1, K // split // 32)
        latency = steps * K * per_trip / (clock * 1e9) * 1e3  # a thread's column: K trips per step
    elif name == "chains_steps":
        chains = min(N, 20 * 1024 // (K * 4))
        split = min(-(-K // 32), -(-sms // (B * -(-N // chains))))
        work = cells * N * 1.5  # pass 1 over every i, pass 2 to the crossing (K / 2 on average)
        blocks = B * -(-N // chains) * split
        warps = max(1, K // split * chains // 32)
        latency = steps * 1.5 * K * per_trip / (clock * 1e9) * 1e3
    elif name in ("viterbi_kernel", "forward_kernel"):
        work, blocks, warps = cells * D, B, K // 32
    elif name == "stochastic_viterbi_kernel":
        work, blocks, warps = cells * D * N * 1.5, B * N, K // 32
    else:
        return None
    warps_per_sm = warps * max(1, blocks // sms)
    used = min(blocks, sms)
    warp_instructions = work * per_trip / 32
    issue = warp_instructions / (used * min(4, warps_per_sm) * clock * 1e9) * 1e3
    memory = memory_bytes / (bandwidth * 1e12) * 1e3
    return {
        "per_unit": per_trip,
        "blocks": blocks,
        "sm_fraction": used / sms,
        "issue_ms": issue,
        "latency_ms": latency,
        "memory_ms": memory,
        "bound_ms": max(issue, latency, memory),
    }


def report(after: dict, before: dict | None) -> str:
    lines = [
        "# GPU kernels read without a GPU: hot-loop SASS and lower bounds at the seed's size",
        "",
        "`python benchmarks/gpu_model.py [--before CHECKOUT]` (no GPU needed; see its docstring for the method).",
        f"Seed size: B={SEED['B']}, T={SEED['T']}, K={SEED['K']}, D={SEED['D']}, N={SEED['N']}, float32, sm_90.",
        "Per unit: SASS instructions per unit of work in the hot loop (a multiply-add of a product, or a",
        "transition entry of a recursion step). Bounds in ms for one call; `bound` is the largest of issue",
        "rate, one thread's serial work per step (recursions) and HBM traffic. Not counted: launch overhead",
        "(a few microseconds per launch), the grid barrier after each recursion step (one per step: 96 here),",
        "and the small start/finish kernels.",
        "",
    ]
    for label, table in (("after", after), ("before", before)):
        if table is None:
            continue
        lines += [
            f"## {label}",
            "",
            "| kernel | registers | stack (B) | static shared (B) | local accesses | hot-loop instructions / markers | per unit | blocks | SMs used | H100 issue / latency / memory (ms) | H200 bound (ms) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in table.items():
            loops_ = entry["hot_loops"]
            shape = ", ".join(f"{loop['instructions']}/{loop['markers']}" for loop in loops_[:2]) or "-"
            h100 = _bounds(name, entry, GPUS["H100 SXM"])
            h200 = _bounds(name, entry, GPUS["H200"])
            model = (
                f"{h100['per_unit']:.2f} | {h100['blocks']} | {h100['sm_fraction']:.0%} | "
                f"{h100['issue_ms']:.3f} / {h100['latency_ms']:.3f} / {h100['memory_ms']:.3f} | {h200['bound_ms']:.3f}"
                if h100
                else "- | - | - | - | -"
            )
            lines.append(
                f"| {name} | {entry['registers']} | {entry['stack']} | {entry['shared']} | "
                f"{entry['local_accesses']} | {shape} | {model} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a checkout of the kernels to compare with (its analysis runs there)")
    parser.add_argument("--json", action="store_true", help="print this checkout's analysis as JSON and stop")
    args = parser.parse_args()
    if tool("ptxas") is None or tool("nvdisasm") is None:
        print("ptxas/nvdisasm not found: pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm", file=sys.stderr)
        return 2
    rank = 32
    after = analyse(rank)
    if args.json:
        print(json.dumps(after))
        return 0
    before = None
    if args.before:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--json"],
            cwd=args.before,
            env={**os.environ, "PYTHONPATH": args.before},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        before = {name: entry for name, entry in json.loads(done.stdout).items() if name in MARKERS}
    text = report({name: e for name, e in after.items() if name in MARKERS or e["hot_loops"]}, before)
    print(text)
    with open(os.path.join(HERE, "results", "gpu_model.md"), "w") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
