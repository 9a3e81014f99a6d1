"""A/B timing of two checkouts of viterbi-numba, in alternating processes on the same inputs.

Each round runs one process per checkout (``PYTHONPATH`` set to it), which times the ops below at the
write-up's size (median of 5 after a warm-up); rounds alternate so that a slow or fast spell of the
machine falls on both. Prints a markdown table of every round and the ratio of the medians.

    git worktree add /tmp/before <rev>   # the older checkout
    python benchmarks/ab.py /tmp/before . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def time_ops() -> dict[str, float]:
    import numpy as np

    import viterbi_numba as vn

    rng = np.random.default_rng(0)
    B, T, V, K, D = 8, 97, 30000, 256, 32
    emissions = rng.standard_normal((B, T, V), dtype=np.float32)
    E1 = rng.standard_normal((V, D), dtype=np.float32) * np.float32(0.1)
    E2 = rng.standard_normal((V, D), dtype=np.float32) * np.float32(0.1)
    targets = np.random.default_rng(1).integers(0, V, (B, T))
    s, t = vn.topk_beam(emissions, K)
    ops = {
        "topk_beam": lambda: vn.topk_beam(emissions, K),
        "viterbi_decode": lambda: vn.viterbi_decode(s, t, E1, E2),
        "stochastic_viterbi N=1": lambda: vn.stochastic_viterbi(s, t, E1, E2, seed=1),
        "stochastic_viterbi N=8": lambda: vn.stochastic_viterbi(s, t, E1, E2, num_samples=8, seed=1),
        "crf_sample N=8": lambda: vn.crf_sample(s, t, E1, E2, num_samples=8, seed=1),
        "log_partition_grad": lambda: vn.log_partition_grad(s, t, E1, E2),
        "log_likelihood_grad (from emissions)": lambda: vn.log_likelihood_grad(emissions, targets, E1, E2, K),
    }
    medians = {}
    for name, run in ops.items():
        run()
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        medians[name] = statistics.median(seconds) * 1e3
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="checkout A (the reference)")
    parser.add_argument("after", help="checkout B")
    parser.add_argument("--rounds", type=int, default=3, help="processes per checkout (default 3)")
    parser.add_argument("--time-ops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_ops:
        print(json.dumps(time_ops()))
        return
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            done = subprocess.run(
                [sys.executable, __file__, args.before, args.after, "--time-ops"],
                env=dict(os.environ, PYTHONPATH=tree),
                capture_output=True,
                text=True,
                check=True,
                cwd="/",
            )
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"before: {trees['before']}; after: {trees['after']}; {args.rounds} alternating rounds; ms per call")
    print("| op (write-up size) | before (each round) | after (each round) | after / before (medians) |")
    print("|---|---|---|---|")
    for name in runs["after"][0]:
        before = [r[name] for r in runs["before"]]
        after = [r[name] for r in runs["after"]]
        ratio = statistics.median(after) / statistics.median(before)
        print(
            f"| {name} | {' / '.join(f'{x:.1f}' for x in before)} | {' / '.join(f'{x:.1f}' for x in after)} | "
            f"{ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
