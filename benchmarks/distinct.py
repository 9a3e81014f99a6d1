"""N distinct paths: viterbi_nbest against viterbi_decode and torch-struct's k-max, and sampling without
replacement against crf_sample.

1. At the write-up's size (B=8, T=97, V=30000, K=256, D=32, float32), interleaved rounds, median
   (min-max): viterbi_decode and viterbi_nbest for n = 1, 8, 32, with the ratio to viterbi_decode
   (target: n = 8 at most 3x); crf_sample N = 8 with and without replacement, with the ratio to the
   first (target: at most 1.3x).
2. torch-struct's LinearChainCRF.topk(8) (the k-argmax by its KMaxSemiring, on dense (B, T-1, K, K)
   potentials) against viterbi_nbest(n=8), time and peak memory, each in a fresh process under a 16 GiB
   address-space limit, for K = 16 ... 128 (B = 8, T = 97), and whether the n best scores agree.

    python benchmarks/distinct.py         # about a minute on 2 cores; writes results/distinct.md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from common import dense_potentials, interleaved, machine_line, peak_mib, probe_rows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZE = dict(B=8, T=97, V=30000, K=256, D=32)
N = 8


def problem(B, T, V, K, D, seed=0, dtype=np.float32):
    """The write-up's beam CRF at this size: N(0, 1) emissions' top-K, tables of scale 0.1."""
    rng = np.random.default_rng(seed)
    scores = np.sort(rng.standard_normal((B, T, K)).astype(dtype), axis=2)[:, :, ::-1].copy()
    tokens = np.stack([np.stack([rng.choice(V, K, replace=False) for _ in range(T)]) for _ in range(B)])
    E1, E2 = ((rng.standard_normal((V, D)) * 0.1).astype(dtype) for _ in range(2))
    return scores, tokens.astype(np.int64), E1, E2


def cost_rows(repeats):
    import viterbi_numba as vn

    scores, tokens, E1, E2 = problem(**SIZE)
    calls = {"viterbi_decode": lambda: vn.viterbi_decode(scores, tokens, E1, E2)}
    for n in (1, 8, 32):
        calls[f"viterbi_nbest n={n}"] = lambda n=n: vn.viterbi_nbest(scores, tokens, E1, E2, n)
    calls[f"crf_sample N={N}"] = lambda: vn.crf_sample(scores, tokens, E1, E2, N, seed=1)
    calls[f"crf_sample N={N} replacement=False"] = lambda: vn.crf_sample(
        scores, tokens, E1, E2, N, seed=1, replacement=False
    )
    return interleaved(calls, repeats)


def _probe(which, K):
    """Time (s), peak RSS (MiB) and the n best scores of one call; prints JSON."""
    B, T, V, D = SIZE["B"], SIZE["T"], SIZE["V"], SIZE["D"]
    scores, tokens, E1, E2 = problem(B, T, V, K, D)
    if which == "ours":
        import viterbi_numba as vn

        vn.viterbi_nbest(scores[:1, :3], tokens[:1, :3], E1, E2, N)  # compile outside the timing
        start = time.perf_counter()
        best = vn.viterbi_nbest(scores, tokens, E1, E2, N).score
        seconds = time.perf_counter() - start
    else:
        import warnings

        import torch
        import torch_struct

        warnings.simplefilter("ignore")  # its distributions do not declare arg_constraints
        torch.set_num_threads(2)
        start = time.perf_counter()
        tables = [torch.tensor(table) for table in (E1, E2)]
        potentials = dense_potentials(torch, torch.tensor(scores), tokens, *tables)
        best = torch_struct.LinearChainCRF(potentials).kmax(N).detach().numpy().T  # (B, n)
        seconds = time.perf_counter() - start
    print(json.dumps(dict(seconds=seconds, peak_mib=peak_mib(), best=np.asarray(best, dtype=float).tolist())))


def report(costs, ts_rows, machine):
    ms = lambda t: f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.1f}–{t[2] * 1e3:.1f})"  # noqa: E731
    lines = [
        "# N distinct paths: the n best, and samples without replacement",
        "",
        f"`python benchmarks/distinct.py` on {machine}. Write-up size "
        + ", ".join(f"{k}={v}" for k, v in SIZE.items())
        + ", float32. Median (min–max) of interleaved rounds; each call's ratio is to its baseline,",
        "measured in the same rounds.",
        "",
        "| call | ms | baseline | ratio | target |",
        "|---|---|---|---|---|",
    ]
    targets = {f"viterbi_nbest n={N}": 3.0, f"crf_sample N={N} replacement=False": 1.3}
    for name, t in costs.items():
        baseline = f"crf_sample N={N}" if name.startswith("crf_sample") else "viterbi_decode"
        ratio = t[0] / costs[baseline][0]
        target = ""
        if name in targets:
            target = f"≤ {targets[name]:g}× " + ("met" if ratio <= targets[name] else "not met")
        lines.append(f"| {name} | {ms(t)} | {baseline} | {ratio:.2f}× | {target} |")
    lines += [
        "",
        f"## Against torch-struct (LinearChainCRF.kmax({N}), dense (B, T-1, K, K) potentials)",
        "",
        f"B={SIZE['B']}, T={SIZE['T']}, D={SIZE['D']}, float32, n={N}, 2 threads each, one call in a fresh process",
        "under a 16 GiB address-space limit (torch-struct's time includes building the dense potentials;",
        "peak = the process's max RSS); `agree` = the largest difference between the two n best scores.",
        "",
        "| K | viterbi_nbest s | peak MiB | torch-struct s | peak MiB | agree |",
        "|---|---|---|---|---|---|",
    ]
    for row in ts_rows:
        ours, theirs = row["ours"], row["torch-struct"]
        cell = lambda r: (f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}") if r else ("out of memory", "—")  # noqa: E731
        agree = f"{np.abs(np.array(ours['best']) - np.array(theirs['best'])).max():.1e}" if ours and theirs else "—"
        lines.append(f"| {row['K']} | {' | '.join(cell(ours))} | {' | '.join(cell(theirs))} | {agree} |")
    return "\n".join(lines) + "\n"


def main():
    if sys.argv[1:2] == ["--probe"]:
        _probe(sys.argv[2], int(sys.argv[3]))
        return

    start = time.perf_counter()
    costs = cost_rows(5)
    ts_rows = probe_rows(__file__, [16, 32, 64, 128])
    machine = machine_line()
    text = report(costs, ts_rows, machine)
    print(text)
    (RESULTS / "distinct.md").write_text(text)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
