"""Compiling the CPU kernels before a run, in parallel processes (docs/design.md §7).

numba compiles one kernel at a time in a process, and a first run on a machine spends most of its time
there (the write-up-size demo: about 57 s of compiling on 2 cores, 23 s of it for the stochastic Viterbi
kernel). The kernels are cached on disk (``cache=True``), so other processes can compile some of them
while this one compiles the rest, and every process then loads them. :func:`precompile` does that for
the operations a caller names, and only for the kernels not cached yet for the dtype on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
from numba import from_dtype

from . import crf as crf_kernels
from . import decode as decode_kernels

# Each operation's kernels, and their compile time in seconds on the development machine (for dividing
# them between processes; the ratios matter, not the values).
KERNELS: dict[str, tuple[Any, ...]] = {
    "topk_beam": (decode_kernels.topk_beam_kernel,),
    "viterbi_decode": (decode_kernels.viterbi_kernel,),
    "stochastic_viterbi": (decode_kernels.stochastic_viterbi_kernel,),
    "crf_sample": (crf_kernels.forward_kernel, crf_kernels.sample_kernel),
    "sequence_score": (crf_kernels.sequence_score_kernel,),
}
COMPILE_SECONDS = {
    "topk_beam": 8,
    "viterbi_decode": 12,
    "stochastic_viterbi": 23,
    "crf_sample": 13,
    "sequence_score": 1,
}


def _tiny_beam(dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """A beam CRF of one sequence, 3 positions, 4 slots, rank 2, in ``dtype``: the kernels' argument types
    are those of any problem of that dtype."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((1, 3, 4)).astype(dtype)
    tokens = np.tile(np.arange(4), (1, 3, 1))
    E1 = rng.standard_normal((6, 2)).astype(dtype)
    return scores, tokens, E1, E1.copy()


def _run(operation: str, dtype: np.dtype) -> None:
    """``operation`` once on a tiny problem of ``dtype``, with the argument kinds the CLI's demo uses."""
    import viterbi_numba as vn

    beam = _tiny_beam(dtype)
    if operation == "topk_beam":
        vn.topk_beam(beam[0], 2)
    elif operation == "viterbi_decode":
        vn.viterbi_decode(*beam)
    elif operation == "stochastic_viterbi":
        vn.stochastic_viterbi(*beam, num_samples=2, seed=0)
    elif operation == "crf_sample":
        vn.crf_sample(*beam, num_samples=2, seed=0)
    elif operation == "sequence_score":
        vn.sequence_score(*beam, np.zeros((1, 3, 2), np.int64))
    else:  # pragma: no cover - KERNELS names every operation
        raise ValueError(operation)


def cached(operation: str, dtype: Any) -> bool:
    """Whether every kernel of ``operation`` is in the cache for ``dtype`` (that of its first argument, the
    scores or emissions) and this machine's CPU. Other argument kinds (top-K with forced tokens, say) are
    separate specialisations that this does not tell apart: at worst such a call compiles when made."""
    nb_dtype = from_dtype(np.dtype(dtype))
    for kernel in KERNELS[operation]:
        try:  # numba's internals: index keys are (signature, this machine, hashes of this source)
            cache = kernel._cache
            machine_and_source = cache._index_key(None, kernel.targetctx.codegen())[1:]
            index = cache._cache_file._load_index()
        except AttributeError:  # pragma: no cover - another numba: compile to be sure
            return False
        if not any(
            key[1:] == machine_and_source and getattr(key[0][0], "dtype", None) == nb_dtype  # scores, emissions
            for key in index
        ):
            return False
    return True


def _split(operations: list[str], processes: int) -> list[list[str]]:
    """``operations`` in ``processes`` groups of about equal compile time (longest first, to the lightest)."""
    groups: list[list[str]] = [[] for _ in range(processes)]
    loads = [0.0] * processes
    for operation in sorted(operations, key=lambda name: -COMPILE_SECONDS[name]):
        lightest = loads.index(min(loads))
        groups[lightest].append(operation)
        loads[lightest] += COMPILE_SECONDS[operation]
    return [group for group in groups if group]


def precompile(
    operations: Optional[Iterable[str]] = None,
    dtype: Any = np.float32,
    processes: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[str]:
    """Compile the CPU kernels of ``operations`` (default: all of ``KERNELS``) for ``dtype`` that are not
    cached yet, in ``processes`` processes at once (this one and ``processes - 1`` others; default: one
    per core); later calls and processes load them from the cache. ``progress`` is told of each
    operation compiled.

    Returns the operations it had to compile that are cached now (none when all were cached already). A
    helper process that fails is reported to ``progress``, not raised: what it left compiles when the
    operation is first called.
    """
    dtype = np.dtype(dtype)
    names = list(KERNELS) if operations is None else list(operations)
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        raise ValueError(f"operations must be among {sorted(KERNELS)}, got {unknown}")
    todo = [name for name in names if not cached(name, dtype)]
    if not todo:
        return []
    say = progress or (lambda line: None)
    lock = threading.Lock()
    done: list[str] = []

    def report(operation: str, seconds: float) -> None:
        with lock:
            done.append(operation)
            say(f"{operation} compiled in {seconds:.0f} s [{len(done)}/{len(todo)}]")

    groups = _split(todo, max(1, processes or os.cpu_count() or 1))
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    helpers: list[tuple[subprocess.Popen, Any]] = []
    listeners = []

    def listen(helper: subprocess.Popen) -> None:
        for line in helper.stdout or ():
            fields = line.split()
            if len(fields) == 2 and fields[0] in KERNELS:  # "operation seconds"; anything else is not ours
                report(fields[0], float(fields[1]))

    try:
        for group in groups[1:]:
            errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a helper never blocks on it
            helper = subprocess.Popen(
                [sys.executable, "-m", "viterbi_numba.cpu.warmup", dtype.name, *group],
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env=env,
            )
            helpers.append((helper, errors))
            listeners.append(threading.Thread(target=listen, args=(helper,), daemon=True))
            listeners[-1].start()
        for operation in groups[0]:
            start = time.perf_counter()
            _run(operation, dtype)
            report(operation, time.perf_counter() - start)
        for (helper, errors), listener in zip(helpers, listeners):
            if helper.wait() != 0:
                errors.seek(0)
                last = (errors.read().strip().splitlines() or ["no message"])[-1]
                say(f"a helper process failed (exit {helper.returncode}: {last}); its kernels compile when first used")
            listener.join()
    finally:
        for helper, errors in helpers:
            if helper.poll() is None:  # this process failed or was interrupted: stop its helpers too
                helper.terminate()
                helper.wait()
            errors.close()
    return [name for name in todo if cached(name, dtype)]


def main(argv: list[str]) -> None:
    """``python -m viterbi_numba.cpu.warmup DTYPE OPERATION...``: compile them here, printing
    "operation seconds" as each is done (the helper process of :func:`precompile`)."""
    dtype = np.dtype(argv[0])
    for operation in argv[1:]:
        start = time.perf_counter()
        _run(operation, dtype)
        print(operation, f"{time.perf_counter() - start:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
