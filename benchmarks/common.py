"""What the side-by-side benchmarks share (``entropy.py``, ``distinct.py``): interleaved timing rounds,
one call per fresh process under a memory limit, torch-struct's dense potentials and the machine line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

MEMORY_LIMIT = 16 * 2**30  # address space of a probe process, bytes


def interleaved(fns, repeats):
    """{name: (median, min, max) seconds}, each round running every function once in turn (after one
    warm-up call each), so that the machine's drift reaches every function alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(v)), min(v), max(v)) for name, v in times.items()}


def probe_rows(script, ks, which=("ours", "torch-struct")):
    """For each K, ``python script --probe WHICH K`` in a fresh process under MEMORY_LIMIT with 2 threads:
    {"K": K, WHICH: the JSON line it prints last, or None where it failed (out of memory)}."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    rows = []
    for K in ks:
        row = {"K": K}
        for name in which:
            done = subprocess.run(
                [sys.executable, str(script), "--probe", name, str(K)],
                capture_output=True,
                text=True,
                preexec_fn=limit,
                env={**os.environ, "OMP_NUM_THREADS": "2"},
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row[name] = json.loads(lines[-1]) if done.returncode == 0 and lines else None
        rows.append(row)
        print(K, {k: (v["seconds"] if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)
    return rows


def peak_mib():
    """This process's peak resident memory so far, MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_potentials(torch, scores, tokens, E1, E2):
    """torch-struct's LinearChainCRF potentials (B, T-1, K, K) of a beam CRF: edge n holds (next label,
    previous label), and the node scores go on the edges (position 0's on the first)."""
    index = torch.as_tensor(tokens)
    trans = torch.einsum("btid,btjd->btij", E1[index[:, :-1]], E2[index[:, 1:]])
    potentials = trans.transpose(-1, -2) + scores[:, 1:, :, None]
    return torch.cat([potentials[:, :1] + scores[:, :1, None, :], potentials[:, 1:]], 1)


def machine_line():
    """'CPU, cores, numba and torch versions' of this machine (``run.machine``)."""
    from run import machine

    info = machine()
    return f"{info['cpu']}, {info['cores']} cores, numba {info['numba']}, torch {info['torch']}"
