"""Compiling the CPU kernels ahead, in parallel processes (viterbi_numba/cpu/warmup.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from viterbi_numba.cpu import warmup

# In a fresh kernel cache (NUMBA_CACHE_DIR): two operations compiled by two processes, this one and a
# helper, each reporting; then nothing is left to compile.
PRECOMPILE = r"""
import json, numpy as np
from viterbi_numba.cpu import warmup
operations = ["sequence_score", "topk_beam"]
before = [warmup.cached(name, np.float32) for name in operations]
lines = []
done = warmup.precompile(operations, np.float32, processes=2, progress=lines.append)
print(json.dumps({
    "before": before,
    "done": done,
    "lines": lines,
    "after": [warmup.cached(name, np.float32) for name in operations],
    "float64": [warmup.cached(name, np.float64) for name in operations],
    "again": warmup.precompile(operations, np.float32, processes=2),
}))
"""

# A later process: both operations' kernels load from the cache, none compiles.
LOAD = r"""
import json, numpy as np
from viterbi_numba.cpu import warmup
for name in ("sequence_score", "topk_beam"):
    warmup._run(name, np.dtype(np.float32))
kernels = [kernel for name in ("sequence_score", "topk_beam") for kernel in warmup.KERNELS[name]]
print(json.dumps([[len(kernel.stats.cache_hits), len(kernel.stats.cache_misses)] for kernel in kernels]))
"""


def _run(script, cache_dir):
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_precompile_in_two_processes_fills_the_cache_that_later_processes_load(tmp_path):
    found = _run(PRECOMPILE, tmp_path)
    assert found["before"] == [False, False]
    assert sorted(found["done"]) == ["sequence_score", "topk_beam"]
    assert sorted(line.split()[0] for line in found["lines"]) == ["sequence_score", "topk_beam"]  # both reported
    assert found["after"] == [True, True] and found["float64"] == [False, False]
    assert found["again"] == []
    assert _run(LOAD, tmp_path) == [[1, 0], [1, 0]]  # one signature each, loaded, none compiled


def test_split_balances_compile_time():
    groups = warmup._split(list(warmup.KERNELS), 2)
    loads = [sum(warmup.COMPILE_SECONDS[name] for name in group) for group in groups]
    assert sorted(name for group in groups for name in group) == sorted(warmup.KERNELS)
    assert max(loads) - min(loads) <= max(warmup.COMPILE_SECONDS.values()) / 2
    assert warmup._split(["topk_beam"], 4) == [["topk_beam"]]  # no empty groups, no idle helper


def test_unknown_operations_are_named():
    with pytest.raises(ValueError, match=r"operations must be among .* got \['log_z'\]"):
        warmup.precompile(["log_z"], np.float32)


def test_a_failed_helper_is_reported_and_its_operations_are_not_claimed(monkeypatch):
    """A helper process that dies (here: not Python at all) is reported through ``progress`` with its exit
    code, and precompile returns only what is cached afterwards."""
    monkeypatch.setattr(warmup, "cached", lambda name, dtype: False)
    monkeypatch.setattr(warmup, "_run", lambda name, dtype: None)  # this process's share: nothing to do
    monkeypatch.setattr(warmup.sys, "executable", "false")
    lines = []
    assert warmup.precompile(["topk_beam", "stochastic_viterbi"], np.float32, processes=2, progress=lines.append) == []
    assert any(line.startswith("a helper process failed (exit 1") for line in lines), lines
    assert sum(line.endswith("[1/2]") for line in lines) == 1  # this process's operation was reported
