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

top-K has no single hot loop: its phases (``topk.build(...).devices``: a chunk of the scan, a radix
select, the final sort) are compiled alone and counted, and an emulation of the kernel's rules on
random rows gives each phase's trips per row (``topk_estimate``). Static counts charge every branch,
so that figure is an estimate above the issue-rate bound, not a bound.
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

SEED = {"B": 8, "T": 97, "K": 256, "D": 32, "N": 8}
GPUS = {  # multiprocessors, boost clock (GHz), HBM bandwidth (TB/s): vendors' datasheets
    "H100 SXM": (132, 1.98, 3.35),
    "H200": (132, 1.98, 4.8),
}
# The work instruction of each analysed kernel, and whether its work sits in one loop region (a product:
# the smallest loop holding the most markers, staging included) or in passes (innermost loops).
MARKERS = {
    "transitions_kernel": ("FFMA", "region"),
    "xi_rows": ("FFMA", "region"),
    "xi_columns": ("FFMA", "region"),
    "sample_kernel": ("FFMA", "region"),
    "viterbi_steps": ("LDG", "passes"),
    "forward_steps": ("LDG", "passes"),
    "chains_steps": ("LDG", "passes"),
    "backward_steps": (r"MUFU\.EX2", "passes"),
    "ratio_forward_steps": (r"MUFU\.EX2", "passes"),
    "ratio_backward_steps": (r"MUFU\.EX2", "passes"),
    "topk_kernel": ("LDG", "region"),
    # the kernels before the redesign (one block per sequence or chain, transitions recomputed per pass)
    "viterbi_kernel": ("FFMA", "passes"),
    "forward_kernel": ("FFMA", "passes"),
    "stochastic_viterbi_kernel": ("FFMA", "passes"),
    "backward_kernel": ("FFMA", "passes"),
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


def spans(sass: str) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """The listing and its loops: (first, last) addresses of each backward branch's body."""
    listing, labels = instructions(sass)
    found = []
    for address, text in listing:
        target = _TARGET.search(text)
        if re.search(r"\bBRA\b", text) and target and labels.get(target.group(1), address + 1) <= address:
            found.append((labels[target.group(1)], address))
    return listing, found


def loops(sass: str) -> list[list[str]]:
    """The innermost loops of a listing, as their instructions."""
    listing, found = spans(sass)
    inner = [s for s in found if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in found)]
    return [[text for address, text in listing if start <= address <= end] for start, end in inner]


def opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def _summary(body: list[str], marker: str) -> dict:
    ops = [opcode(text) for text in body]
    count = lambda prefix: sum(1 for op in ops if re.match(prefix + r"\b", op))  # noqa: E731
    return {
        "instructions": len(ops),
        "markers": count(marker),
        "local": count("LDL") + count("STL"),
        "exp": count(r"MUFU\.EX2"),
        "max": count("FMNMX") + count("DMNMX"),
        "compare": count("FSETP") + count("DSETP"),
        "loads": count("LDG"),
    }


def hot_loops(sass: str, marker: str, kind: str = "passes") -> list[dict]:
    """Loops holding ``marker`` instructions, most markers first: per loop its instructions, markers,
    local accesses (LDL/STL) and a few instruction classes. ``passes``: the innermost loops; ``region``:
    the smallest loop holding the most markers (nested staging loops counted once)."""
    listing, found = spans(sass)
    if kind == "region":
        bodies = [[text for address, text in listing if start <= address <= end] for start, end in found]
        summaries = [_summary(body, marker) for body in bodies]
        if not summaries:
            return []
        most = max(summary["markers"] for summary in summaries)
        chosen = [summary for summary in summaries if summary["markers"] == most and most]
        return sorted(chosen, key=lambda summary: summary["instructions"])[:1]
    found = [_summary(body, marker) for body in loops(sass)]
    return sorted([summary for summary in found if summary["markers"]], key=lambda summary: -summary["markers"])


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
    """Per kernel (float32, sm_90, compiled at ``rank``): resources and hot loops."""
    out = {}
    for _, _, name, _, usage, sass in compile_all(True, capabilities=((9, 0),), dtypes=(np.float32,), rank=rank):
        entry = dict(usage)
        entry["local_accesses"] = local_accesses(sass) if sass else None
        marker, kind = MARKERS.get(name, ("FFMA", "passes"))
        entry["hot_loops"] = hot_loops(sass, marker, kind) if sass and name in MARKERS else []
        out[name] = entry
    return out


def _main(loops_: list[dict], test) -> float:
    """Instructions per unit of work of the most unrolled loop that passes ``test`` (0 if none)."""
    chosen = [loop for loop in loops_ if test(loop)]
    if not chosen:
        return 0.0
    loop = max(chosen, key=lambda loop: loop["markers"])
    return loop["instructions"] / loop["markers"]


RATIO_KERNELS = ("ratio_forward_steps", "ratio_backward_steps")
WITH_Q = " (KL)"  # a ratio kernel's loop with a reference q (the compiler makes one loop per value of use_q)


def ratio_costs(loops_: list[dict]) -> tuple[float, float]:
    """SASS instructions per transition entry of a ratio kernel's two loops: without q (the entropy, the
    shorter, one transition load per entry) and with q (the KL; unrolled alike)."""
    if len(loops_) < 2:
        raise ValueError(f"a ratio kernel should have a loop without q and one with q, found {len(loops_)}")
    shorter, longer = sorted(loops_, key=lambda loop: loop["instructions"])[:2]
    entries = shorter["loads"]
    return shorter["instructions"] / entries, longer["instructions"] / entries


def unit_cost(name: str, loops_: list[dict]) -> float:
    """SASS instructions per unit of work: per multiply-add (products, the old kernels), per transition
    entry of a step (recursions: the sum over its passes, the chains' crossing pass at half a row; the
    ratio kernels without q, ``ratio_costs`` for both)."""
    if name in RATIO_KERNELS:
        return ratio_costs(loops_)[0]
    if name == "viterbi_steps":
        return _main(loops_, lambda loop: loop["compare"] and loop["loads"])
    if name == "forward_steps":
        return _main(loops_, lambda loop: loop["max"] and not loop["exp"]) + _main(loops_, lambda loop: loop["exp"])
    if name == "chains_steps":
        crossing = [loop for loop in loops_ if loop["exp"] and loop["loads"] == 1]
        summing = [loop for loop in loops_ if loop["exp"] and loop["loads"] > 1]
        return (
            _main(loops_, lambda loop: loop["max"] and not loop["exp"])
            + _main(summing, lambda loop: True)
            + 0.5 * _main(crossing, lambda loop: True)
        )
    return _main(loops_, lambda loop: True)


def _layout(units: int, K: int, per_column: int, sms: int):
    from viterbi_numba.gpu.ops import recursion_layout

    return recursion_layout(units, K, per_column, sms, lambda threads: sms * max(1, 1024 // threads) // 2)


def bounds(name: str, cost: float, gpu: tuple) -> dict | None:
    """Lower bounds (ms) for kernel ``name``'s launches in one call at the seed's size on ``gpu``:
    issue rate, one thread's serial instructions per step (recursions) and HBM traffic."""
    from viterbi_numba.gpu.kernels.crf import PRODUCT_TILE, ROW_LANES
    from viterbi_numba.gpu.kernels.transitions import TILE
    from viterbi_numba.gpu.ops import PARTS, chains_per_block

    B, T, K, N, D = SEED["B"], SEED["T"], SEED["K"], SEED["N"], SEED["D"]
    sms, clock, bandwidth = gpu
    name = name.removesuffix(WITH_Q)
    steps = T - 1
    cells = B * steps * K * K
    serial = 0.0  # one thread's instructions per step
    memory = 0.0  # bytes through HBM
    barriers = 0
    if not cost:
        return None
    if name == "transitions_kernel":
        work, blocks, warps = cells * D, B * steps * (-(-K // TILE)) ** 2, 8
    elif name in ("xi_rows", "xi_columns"):
        work, blocks, warps = cells * D, B * steps * -(-K // PRODUCT_TILE), 8
    elif name in ("viterbi_steps", "forward_steps", "ratio_forward_steps"):
        layout = _layout(B, K, PARTS, sms)
        work, blocks, warps = cells, layout.blocks, layout.threads // 32
        lanes = layout.threads // layout.parts
        columns = -(-K // layout.split)
        serial = -(-columns // lanes) * -(-K // layout.parts) * cost
        barriers = steps
    elif name == "chains_steps":
        chains = chains_per_block(K, N, np.dtype(np.float32))
        layout = _layout(B * -(-N // chains), K, chains, sms)
        work, blocks, warps = cells * N, layout.blocks, layout.threads // 32
        pairs = -(-K // layout.split) * chains
        serial = -(-pairs // layout.threads) * K * cost
        memory = B * T * K * N * (4 + 4 + 8)  # beam_probs, path_scores, backpointers
        barriers = steps
    elif name in ("backward_steps", "ratio_backward_steps"):
        layout = _layout(B, K, ROW_LANES, sms)
        work, blocks, warps = cells, layout.blocks, layout.threads // 32
        rows = -(-K // layout.split)
        serial = -(-rows // (layout.threads // 32)) * -(-K // 32) * cost
        barriers = steps
    elif name == "sample_kernel":
        work, blocks, warps = B * N * steps * K * D, B * N, K // 32
    elif name in ("viterbi_kernel", "forward_kernel"):
        work, blocks, warps = cells * D, B, K // 32
        serial = K * D * cost
    elif name == "stochastic_viterbi_kernel":
        work, blocks, warps = cells * D * N * 1.5, B * N, K // 32
        serial = 1.5 * K * D * cost
    elif name == "backward_kernel":
        work, blocks, warps = 2 * cells * D, B, K // 32
        serial = 2 * K * D * cost
    else:
        return None
    used = min(blocks, sms)
    warps_per_sm = warps * max(1, blocks // sms)
    issue = work * cost / 32 / (used * min(4, warps_per_sm) * clock * 1e9) * 1e3
    latency = steps * serial / (clock * 1e9) * 1e3
    hbm = memory / (bandwidth * 1e12) * 1e3
    return {
        "blocks": blocks,
        "sm_fraction": used / sms,
        "issue_ms": issue,
        "latency_ms": latency,
        "memory_ms": hbm,
        "bound_ms": max(issue, latency, hbm),
        "barriers": barriers,
    }


BARRIER_US = 1.5  # an assumed cost of one cooperative grid barrier (microseconds), until a GPU measures it

FORWARD = ("transitions_kernel", "forward_steps")
BACKWARD = ("transitions_kernel", "backward_steps", "xi_rows", "xi_columns")
CALLS = {  # public call at the seed's size: (its main kernels, the issue's target)
    "viterbi_decode": (("transitions_kernel", "viterbi_steps"), 0.5),
    "log_partition (forward)": (FORWARD, 0.5),
    "stochastic_viterbi N=8": (("transitions_kernel", "chains_steps"), 1.0),
    "crf_sample N=8": (FORWARD + ("sample_kernel",), 0.6),
    "backward (marginals and table gradients)": (BACKWARD, 2.0),
    "log_partition_grad (forward, backward)": (FORWARD + BACKWARD, "-"),
    # from raw inputs: the forward sweep reads the forward passes' transition blocks (ops.forward_log_ratio)
    "crf_entropy_grad": (
        FORWARD + ("ratio_forward_steps", "transitions_kernel", "ratio_backward_steps", "xi_rows", "xi_columns"),
        "2x log_partition_grad",
    ),
    "crf_kl_grad": (
        FORWARD * 2 + ("ratio_forward_steps" + WITH_Q,) + ("transitions_kernel",) * 2
        + ("ratio_backward_steps" + WITH_Q,) + ("xi_rows", "xi_columns") * 2,
        "2.5x log_partition_grad",
    ),
}  # fmt: skip
BEFORE_CALLS = {
    "viterbi_decode": ("viterbi_kernel",),
    "log_partition (forward)": ("forward_kernel",),
    "stochastic_viterbi N=8": ("stochastic_viterbi_kernel",),
    "crf_sample N=8": ("forward_kernel", "sample_kernel"),
    "backward (marginals and table gradients)": ("backward_kernel",),
}


# --------------------------------------------------------------------------------------------------
# top-K: its phases compiled alone, their trip counts from an emulation of the kernel on random rows
# --------------------------------------------------------------------------------------------------
TOPK_V = 30000  # the write-up's vocabulary (benchmarks/gpu.py)


def topk_phases(cc: tuple[int, int] = (9, 0)) -> dict:
    """SASS instructions per thread of top-K's phases (float32), each compiled alone in a small kernel
    (global arrays in place of shared ones): ``chunk`` (one admit_chunk), ``select_fixed`` (keep_best
    outside its pass loop) and ``select_pass`` (one histogram pass), ``sort_step`` (one trip of the
    sort's innermost loop) and ``sort_stage`` (a stage's own instructions)."""
    from numba import float32, int32, int64

    from viterbi_numba.gpu.kernels import block, compile_function_ptx, topk

    devices = topk.build(block.build(np.dtype(np.float32), block.RANKS[0])).devices
    admit_chunk, keep_best, bitonic_sort = devices.admit_chunk, devices.keep_best, devices.bitonic_sort
    f1, i1, n1 = float32[::1], int64[::1], int32[::1]

    def chunk(row, base, forced, key, token, keys, ids, region, state):
        admit_chunk(row, base, forced, key, token, keys, ids, region, state)

    def select(keys, ids, size, k, state, hist, kept, out_key, out_id):
        key, token = keep_best(keys, ids, size, k, state, hist, kept)
        out_key[0] = key
        out_id[0] = token

    def sort(keys, ids, size):
        bitonic_sort(keys, ids, size)

    threads = block.MAX_THREADS
    signatures = {
        "chunk": (chunk, (f1, int64, int64, float32, int64, f1, i1, int64, n1)),
        "select": (select, (f1, i1, int64, int64, n1, n1, n1, f1, i1)),
        "sort": (sort, (f1, i1, int64)),
    }
    sass = {name: assemble(compile_function_ptx(fn, sig, cc, threads), cc)[1] for name, (fn, sig) in signatures.items()}
    out = {"chunk": sum(1 for _, text in instructions(sass["chunk"])[0] if opcode(text) != "NOP")}
    listing, found = spans(sass["select"])
    passes = [
        (start, end)
        for start, end in found
        if any(opcode(text).startswith("MATCH") for address, text in listing if start <= address <= end)
    ]
    start, end = min(passes, key=lambda span: span[1] - span[0])
    body = [text for address, text in listing if start <= address <= end]
    per_trip = sum(1 for text in body if opcode(text).startswith("MATCH")) / topk.ENTRIES
    out["select_pass"] = len(body) / per_trip
    out["select_fixed"] = sum(1 for _, text in listing if opcode(text) != "NOP") - len(body)
    listing, found = spans(sass["sort"])
    found = [span for span in found if span[1] - span[0] > 0x20]  # not the trailing self-branch
    innermost = min(found, key=lambda span: span[1] - span[0])
    stage = min(
        (s for s in found if s != innermost and s[0] <= innermost[0] and innermost[1] <= s[1]),
        key=lambda s: s[1] - s[0],
    )
    size = lambda span: sum(1 for address, _ in listing if span[0] <= address <= span[1])  # noqa: E731
    out["sort_step"] = size(innermost)
    out["sort_stage"] = size(stage) - size(innermost)
    return out


def _keep_best(values: np.ndarray, ids: np.ndarray, k: int) -> tuple[int, float, int]:
    """keep_best's histogram passes over these entries (more than k), and the threshold it returns: the
    composite (order key of the value, 2**31 - 1 - id) read in 8-bit digits from the top, stopping when
    the chosen digit's entries are exactly those still needed; the threshold is the lowest completion of
    the digits chosen (any id while only key digits are chosen)."""
    bits = (values.astype(np.float32) + np.float32(0)).view(np.uint32).astype(np.uint64)  # -0.0 -> +0.0
    keys = np.where(bits & np.uint64(0x80000000), ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))
    composite = (keys << np.uint64(32)) | ((1 << 31) - 1 - ids).astype(np.uint64)
    need, high, mask, passes = k, np.uint64(0), np.uint64(0), 0
    for p in range(8):
        shift = np.uint64(56 - 8 * p)
        digits = ((composite[(composite & mask) == high] >> shift) & np.uint64(0xFF)).astype(np.int64)
        counts = np.bincount(digits, minlength=256)
        above = np.concatenate([np.cumsum(counts[::-1])[::-1][1:], [0]])  # entries with a higher digit
        chosen = int(np.nonzero((above < need) & (above + counts >= need))[0][0])
        need -= int(above[chosen])
        high |= np.uint64(chosen) << shift
        mask |= np.uint64(0xFF) << shift
        passes = p + 1
        if counts[chosen] == need:
            break
    key_bits = int(high >> np.uint64(32))
    key_bits = key_bits ^ 0x80000000 if key_bits & 0x80000000 else ~key_bits & 0xFFFFFFFF
    key = float(np.array([key_bits], np.uint32).view(np.float32)[0])
    key = key if key >= -np.inf else -np.inf  # a NaN pattern below -inf's key
    token = (1 << 62) if passes <= 4 else (1 << 31) - 1 - int(high & np.uint64(0xFFFFFFFF))
    return passes, key, token


def topk_trips(rows: int = 32, k: int = 256, seed: int = 0) -> dict:
    """Mean trips per row of each phase, over rows of N(0, 1) float32 scores of TOPK_V tokens, by the
    kernel's rules: an entry is admitted when it ranks above the threshold, a flush comes when the next
    chunk might overflow the candidates' room; this design: the k kept, then 2 region - k candidate
    slots, keep_best's passes and conservative threshold; the design before it: region kept, region
    candidate slots, a sort of the whole buffer and the exact k-th best as threshold."""
    from viterbi_numba.gpu.kernels import block
    from viterbi_numba.gpu.kernels.topk import LOADS
    from viterbi_numba.gpu.ops import topk_region

    threads = block.MAX_THREADS
    region, chunk = topk_region(k), threads * LOADS
    rng = np.random.default_rng(seed)
    out = {"chunks": -(-TOPK_V // chunk), "selects": 0.0, "passes": 0.0, "sorts": 0.0}
    for _ in range(rows):
        row = rng.standard_normal(TOPK_V).astype(np.float32)
        for design in ("select", "sort"):
            held = np.empty(0, np.int64)
            candidates, key, token = 0, -np.inf, 1 << 62
            room = 2 * region - k if design == "select" else region
            for base in range(0, TOPK_V + chunk, chunk):
                if base >= TOPK_V or candidates + chunk > room:
                    order = held[np.lexsort((held, -row[held]))]
                    if design == "select":
                        out["selects"] += 1 / rows
                        if held.size > k:
                            passes, key, token = _keep_best(row[held], held, k)
                            out["passes"] += passes / rows
                        held = order[:k]
                    else:
                        out["sorts"] += 1 / rows
                        held = order[:region]
                        if held.size >= k:
                            key, token = float(row[held[k - 1]]), int(held[k - 1])
                    candidates = 0
                    if base >= TOPK_V:
                        break
                admitted = np.arange(base, min(base + chunk, TOPK_V))
                values = row[admitted]
                admitted = admitted[(values > key) | ((values == key) & (admitted < token))]
                held = np.concatenate([held, admitted])
                candidates += admitted.size
    return out


def topk_estimate(gpu: tuple, k: int = 256) -> dict:
    """top-K at the seed's size (B * T rows of TOPK_V, k = K): warp instructions per row from the phases'
    static counts (every instruction of a phase counted once per trip, branches included, so this is an
    estimate above the issue-rate bound, not a bound) times their trips, for this design and for a sort
    of the whole buffer at each flush (the design before it, with the same sort code)."""
    from viterbi_numba.gpu.kernels import block
    from viterbi_numba.gpu.ops import topk_region

    sms, clock, bandwidth = gpu
    phases, trips = topk_phases(), topk_trips(k=k)
    threads = block.MAX_THREADS

    def sort_cost(size: int) -> float:
        levels = int(np.log2(size))
        stages = levels * (levels + 1) // 2
        return stages * (phases["sort_stage"] + phases["sort_step"] * -(-size // threads))

    width = 1 << int(np.ceil(np.log2(k)))
    per_thread = {
        "radix select": trips["chunks"] * phases["chunk"]
        + trips["selects"] * phases["select_fixed"]
        + trips["passes"] * phases["select_pass"]
        + sort_cost(width),
        "sort per flush (before)": trips["chunks"] * phases["chunk"] + trips["sorts"] * sort_cost(2 * topk_region(k)),
    }
    rows = SEED["B"] * SEED["T"]
    warps = threads // 32
    memory = rows * TOPK_V * 4 / (bandwidth * 1e12) * 1e3
    estimate = {
        name: max(rows * warps * cost / (sms * 4 * clock * 1e9) * 1e3, memory) for name, cost in per_thread.items()
    }
    return {"phases": phases, "trips": trips, "per_thread": per_thread, "estimate_ms": estimate, "memory_ms": memory}


def topk_report() -> list[str]:
    found = topk_estimate(GPUS["H200"])
    phases, trips = found["phases"], found["trips"]
    lines = [
        "## top-K (topk_beam at the seed's size: 776 rows of V = 30000, k = 256, float32)",
        "",
        "Each phase compiled alone (SASS instructions per thread, branches included): one chunk of the",
        f"scan {phases['chunk']}, a select outside its passes {phases['select_fixed']}, a histogram pass "
        f"{phases['select_pass']:.0f}, a sort stage {phases['sort_stage']} + {phases['sort_step']} per "
        "compare-exchange trip.",
        f"Trips per row (an emulation of the kernel's rules on 32 rows of N(0, 1) scores): {trips['chunks']} chunks; "
        f"{trips['selects']:.2f} selects making {trips['passes']:.2f} passes in all (this design), or "
        f"{trips['sorts']:.2f} sorts of the 2 x region buffer (the design before it).",
        "Estimate = rows x warps x instructions per thread / (132 SMs x 4 schedulers x 1.98 GHz), at least",
        f"the HBM time of reading the scores ({found['memory_ms']:.3f} ms). Static counts charge every",
        "branch, so this is above the issue-rate bound. Target: 0.1 ms.",
        "",
        "| design | instructions per thread per row | H200 estimate (ms) |",
        "|---|---|---|",
    ]
    for name, cost in found["per_thread"].items():
        lines.append(f"| {name} | {cost:.0f} | {found['estimate_ms'][name]:.3f} |")
    return lines + [""]


def report(after: dict, before: dict | None) -> str:
    lines = [
        "# GPU kernels read without a GPU: hot-loop SASS and lower bounds at the seed's size",
        "",
        "`python benchmarks/gpu_model.py --before CHECKOUT` (no GPU needed; the method is in its docstring).",
        f"Seed size: B={SEED['B']}, T={SEED['T']}, K={SEED['K']}, D={SEED['D']}, N={SEED['N']}, float32, sm_90;",
        "H100 SXM / H200: 132 multiprocessors at 1.98 GHz, 4 schedulers each; HBM 3.35 / 4.8 TB/s.",
        "Per unit: SASS instructions per unit of work in the hot loops (a multiply-add of a product; a",
        "transition entry of a recursion step, summed over its passes). Bounds in ms for one call: issue",
        "rate, one thread's serial instructions over all steps (recursions), HBM traffic; `bound` is the",
        "largest. Not counted: launch overheads (a few microseconds each), the small start/finish kernels,",
        "and the grid barriers after each recursion step (`barriers`: about 1-2 microseconds each on",
        "Hopper by NVIDIA's cooperative-groups figures; unmeasured here).",
        "",
    ]
    tables = (("after", after, {n: c[0] for n, c in CALLS.items()}), ("before", before, BEFORE_CALLS))
    for label, table, calls in tables:
        if table is None:
            continue
        lines += [
            f"## {label}",
            "",
            "| kernel | registers | stack (B) | local accesses | per unit | blocks | SMs used | "
            "H100 issue / latency / memory (ms) | H200 bound (ms) | barriers |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        costs = {}
        rows = []
        for name, entry in table.items():
            costs[name] = unit_cost(name, entry["hot_loops"])
            rows.append((name, entry))
            if name in RATIO_KERNELS:
                costs[name + WITH_Q] = ratio_costs(entry["hot_loops"])[1]
                rows.append((name + WITH_Q, entry))
        for name, entry in rows:
            cost = costs[name]
            h100 = bounds(name, cost, GPUS["H100 SXM"])
            h200 = bounds(name, cost, GPUS["H200"])
            model = (
                f"{cost:.2f} | {h100['blocks']} | {h100['sm_fraction']:.0%} | "
                f"{h100['issue_ms']:.3f} / {h100['latency_ms']:.3f} / {h100['memory_ms']:.3f} | "
                f"{h200['bound_ms']:.3f} | {h100['barriers']}"
                if h100
                else "- | - | - | - | - | -"
            )
            lines.append(f"| {name} | {entry['registers']} | {entry['stack']} | {entry['local_accesses']} | {model} |")
        lines += ["", f"Calls ({label}), H200 bound as the sum of their kernels' bounds:", ""]
        lines += [
            f"| call | kernels | H200 bound (ms) | with its grid barriers at {BARRIER_US} us (ms) | target (ms) |",
            "|---|---|---|---|---|",
        ]
        for call, names in calls.items():
            found = [bounds(n, costs.get(n, 0.0), GPUS["H200"]) for n in names]
            total = sum(b["bound_ms"] for b in found if b)
            barriers = sum(b["barriers"] for b in found if b)
            listed = ", ".join(f"{n} x{names.count(n)}" if names.count(n) > 1 else n for n in dict.fromkeys(names))
            lines.append(
                f"| {call} | {listed} | {total:.3f} | {total + barriers * BARRIER_US / 1e3:.3f} | {CALLS[call][1]} |"
            )
        lines.append("")
    lines += topk_report()
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
