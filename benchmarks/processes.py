"""Processes sharing the cores: one call's time alone and with a second process running the same loop.

    python benchmarks/processes.py      # writes benchmarks/results/processes.md

Each layer (numba's GNU OpenMP and TBB) runs in fresh processes: a Viterbi decode plus a log-partition
at each of ``SIZES`` (D=32, V=3000, float32), timed REPEATS times after a warm-up. "two" starts two such
processes at once, each timing its own calls. Ratios are two / one, medians of the same run. Idle OpenMP
workers spin, so a process sharing the cores with another loses far more than half of them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

REPEATS = 40
HERE = os.path.dirname(os.path.abspath(__file__))

WORKLOAD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import make_problem
import numba, viterbi_numba as vn
B, T, K = (int(x) for x in sys.argv[3].split(","))
scores, tokens, E1, E2 = make_problem(np.random.default_rng(0), B, T, K, V=3000, D=32, dtype=np.float32)
vn.viterbi_decode(scores, tokens, E1, E2); vn.log_partition(scores, tokens, E1, E2)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    vn.viterbi_decode(scores, tokens, E1, E2)
    vn.log_partition(scores, tokens, E1, E2)
    times.append(time.perf_counter() - start)
print(json.dumps({"layer": numba.threading_layer(), "ms": [1e3 * t for t in times]}))
"""


SIZES = {"B=8, T=97, K=64 (the write-up's B and T)": "8,97,64", "B=2, T=20, K=16 (a small call)": "2,20,16"}


def _start(layer: str, size: str) -> subprocess.Popen:
    tests = os.path.join(os.path.dirname(HERE), "tests")
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    command = [sys.executable, "-c", WORKLOAD, tests, str(REPEATS), size]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def _times(processes: list[subprocess.Popen]) -> list[dict]:
    found = []
    for process in processes:
        out, _ = process.communicate(timeout=600)
        found.append(json.loads(out.strip().splitlines()[-1]))
    return found


def _stats(ms: list[float]) -> tuple[float, float, float]:
    ordered = sorted(ms)
    return ordered[len(ordered) // 2], ordered[0], ordered[-1]


def main() -> int:
    rows = []
    for name, size in SIZES.items():
        for layer in ("omp", "tbb"):
            alone = _times([_start(layer, size)])[0]
            together = _times([_start(layer, size), _start(layer, size)])
            one = _stats(alone["ms"])
            two = _stats([t for run in together for t in run["ms"]])
            rows.append((name, alone["layer"], one, two, two[0] / one[0]))
    lines = [
        "# Two processes sharing the cores",
        "",
        "`python benchmarks/processes.py` (method in its docstring). Machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}.",
        "ms per call (Viterbi + log partition, D=32, V=3000, float32): median (min-max).",
        "",
        "| size | threading layer | one process | two processes at once | two / one |",
        "|---|---|---|---|---|",
    ]
    for name, layer, one, two, ratio in rows:
        lines.append(
            f"| {name} | {layer} | {one[0]:.2f} ({one[1]:.2f}-{one[2]:.2f}) | "
            f"{two[0]:.2f} ({two[1]:.2f}-{two[2]:.2f}) | {ratio:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(HERE, "results", "processes.md"), "w") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
