"""Exact entropy and KL: their cost against log_partition_grad, torch-struct's dense entropy, and how
many samples a Monte Carlo estimate needs to be as precise.

1. At the write-up's size (B=8, T=97, V=30000, K=256, D=32, float32): log_partition_grad, crf_entropy
   (+ grad) and crf_kl (+ grad), interleaved rounds, median (min-max) and the ratio to
   log_partition_grad (targets: entropy with its gradient <= 2x, KL with its gradients <= 2.5x).
2. torch-struct's LinearChainCRF entropy (+ backward) on the same beam CRF's dense (B, T-1, K, K)
   potentials against crf_entropy_grad, time and peak memory (each in a fresh process, under a 16 GiB
   address-space limit), for K = 32 ... 256 (T = 97, B = 8).
3. The samples that the sample estimates need: the surprisal mean -log p(y) for H and the k3 estimator
   (r - 1) - log r, r = q(y) / p(y), for KL, with y ~ p: their per-sample standard deviation and the N
   at which the standard error reaches 1e-3 nats and the float32 exact value's error (against float64).

    python benchmarks/entropy.py            # about 5 minutes on 2 cores; writes results/entropy.md
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


def problem(B, T, V, K, D, seed=0, dtype=np.float32):
    """A beam CRF p and a reference q on the same beam: q's scores and tables are p's, perturbed."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((B, T, K)).astype(dtype)
    tokens = np.stack([np.stack([rng.choice(V, K, replace=False) for _ in range(T)]) for _ in range(B)])
    E1, E2 = ((rng.standard_normal((V, D)) * 0.1).astype(dtype) for _ in range(2))
    scores_q = (scores + 0.3 * rng.standard_normal(scores.shape)).astype(dtype)
    E1_q, E2_q = ((table * (1 + 0.2 * rng.standard_normal(table.shape))).astype(dtype) for table in (E1, E2))
    return scores, scores_q, tokens.astype(np.int64), E1, E2, E1_q, E2_q


def cost_rows(repeats):
    import viterbi_numba as vn

    sp, sq, tokens, E1, E2, E1q, E2q = problem(**SIZE)
    return interleaved(
        {
            "log_partition_grad": lambda: vn.log_partition_grad(sp, tokens, E1, E2),
            "crf_entropy": lambda: vn.crf_entropy(sp, tokens, E1, E2),
            "crf_entropy_grad": lambda: vn.crf_entropy_grad(sp, tokens, E1, E2),
            "crf_kl": lambda: vn.crf_kl(sp, sq, tokens, E1, E2, E1q, E2q),
            "crf_kl_grad": lambda: vn.crf_kl_grad(sp, sq, tokens, E1, E2, E1q, E2q),
        },
        repeats,
    )


# --------------------------------------------------------------------------------------------------
# torch-struct, in a fresh process per (which, K)
# --------------------------------------------------------------------------------------------------
def _probe(which, K):
    """Time (s) and peak RSS (MiB) of one entropy + backward; prints JSON."""
    import torch

    B, T, V, D = SIZE["B"], SIZE["T"], SIZE["V"], SIZE["D"]
    sp, _, tokens, E1, E2, _, _ = problem(B, T, V, K, D)
    if which == "ours":
        import viterbi_numba as vn

        vn.crf_entropy_grad(sp[:1, :3], tokens[:1, :3], E1, E2)  # compile outside the timing
        start = time.perf_counter()
        grad = vn.crf_entropy_grad(sp, tokens, E1, E2)
        seconds = time.perf_counter() - start
        value = float(grad.entropy.sum())
    else:
        import warnings

        import torch_struct

        warnings.simplefilter("ignore")  # its distributions do not declare arg_constraints

        torch.set_num_threads(2)
        scores = torch.tensor(sp, requires_grad=True)
        tables = [torch.tensor(table) for table in (E1, E2)]
        start = time.perf_counter()
        potentials = dense_potentials(torch, scores, tokens, *tables)
        entropy = torch_struct.LinearChainCRF(potentials).entropy
        entropy.sum().backward()
        seconds = time.perf_counter() - start
        value = float(entropy.sum())
    print(json.dumps(dict(seconds=seconds, peak_mib=peak_mib(), entropy=value)))


# --------------------------------------------------------------------------------------------------
# sample estimates
# --------------------------------------------------------------------------------------------------
def sample_rows(num_samples):
    import viterbi_numba as vn

    B, T, V, K, D = 4, SIZE["T"], SIZE["V"], 64, SIZE["D"]
    p64 = problem(B, T, V, K, D, seed=1, dtype=np.float64)
    p32 = problem(B, T, V, K, D, seed=1, dtype=np.float32)
    sp, sq, tokens, E1, E2, E1q, E2q = p64
    exact_H = vn.crf_entropy(sp, tokens, E1, E2)
    exact_KL = vn.crf_kl(sp, sq, tokens, E1, E2, E1q, E2q)
    error_H = np.abs(vn.crf_entropy(p32[0], tokens, p32[3], p32[4]) - exact_H)
    error_KL = np.abs(vn.crf_kl(p32[0], p32[1], tokens, *p32[3:]) - exact_KL)
    draws = vn.crf_sample(sp, tokens, E1, E2, num_samples, seed=7)
    log_q = vn.sequence_score(sq, tokens, E1q, E2q, draws.beam_idx) - vn.log_partition(sq, tokens, E1q, E2q)[:, None]
    log_ratio = log_q - draws.log_prob  # log r
    k3 = np.expm1(log_ratio) - log_ratio
    rows = []
    for name, estimates, exact, f32_error in (
        ("entropy (mean -log p)", -draws.log_prob, exact_H, error_H),
        ("KL (k3)", k3, exact_KL, error_KL),
    ):
        sd = estimates.std(axis=1)
        rows.append(
            dict(
                name=name,
                exact=exact.tolist(),
                estimate=estimates.mean(axis=1).tolist(),
                se=(sd / np.sqrt(num_samples)).tolist(),
                sd=sd.tolist(),
                f32_error=f32_error.tolist(),
                n_for_1e3=np.ceil((sd / 1e-3) ** 2).tolist(),
                n_for_f32=np.ceil((sd / np.maximum(f32_error, 1e-12)) ** 2).tolist(),
            )
        )
    return rows, dict(B=B, T=T, K=K, D=D, N=num_samples)


def report(costs, ts_rows, sample, sample_size, machine):
    base = costs["log_partition_grad"][0]
    ms = lambda t: f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.1f}–{t[2] * 1e3:.1f})"  # noqa: E731
    targets = {"crf_entropy_grad": "≤ 2×", "crf_kl_grad": "≤ 2.5×"}
    lines = [
        "# Exact entropy and KL",
        "",
        f"`python benchmarks/entropy.py` on {machine}. Write-up size "
        + ", ".join(f"{k}={v}" for k, v in SIZE.items())
        + ", float32; q is p with perturbed scores and tables. Median (min–max) of interleaved rounds.",
        "",
        "| call | ms | / log_partition_grad | target |",
        "|---|---|---|---|",
    ]
    for name, t in costs.items():
        target = targets.get(name, "")
        verdict = ("met" if t[0] / base <= float(target[2:-1]) else "not met") if target else ""
        lines.append(f"| {name} | {ms(t)} | {t[0] / base:.2f}× | {target} {verdict} |")
    lines += [
        "",
        "## Against torch-struct (LinearChainCRF.entropy + backward, dense (B, T-1, K, K) potentials)",
        "",
        "B=8, T=97, D=32, float32, 2 threads each, one call in a fresh process under a 16 GiB address-space",
        "limit (time includes building the dense potentials from the tables; peak = the process's max RSS).",
        "",
        "| K | crf_entropy_grad s | peak MiB | torch-struct s | peak MiB | entropies agree |",
        "|---|---|---|---|---|---|",
    ]
    for row in ts_rows:
        ours, theirs = row["ours"], row["torch-struct"]
        cell = lambda r: (f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}") if r else ("out of memory", "—")  # noqa: E731
        agree = (
            f"{abs(ours['entropy'] - theirs['entropy']) / abs(ours['entropy']):.1e} rel." if ours and theirs else "—"
        )
        lines.append(f"| {row['K']} | {' | '.join(cell(ours))} | {' | '.join(cell(theirs))} | {agree} |")
    lines += [
        "",
        f"## Samples a Monte Carlo estimate needs (B={sample_size['B']}, T={sample_size['T']}, "
        f"K={sample_size['K']}, D={sample_size['D']}, {sample_size['N']} samples per sequence, float64)",
        "",
        "N for 1e-3 = samples for a standard error of 1e-3 nats; N for f32 = for the float32 exact value's",
        "error (against float64), per sequence.",
        "",
        "| estimate | exact | sample mean ± SE | per-sample SD | N for 1e-3 | f32 exact error | N for f32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sample:
        for b in range(len(row["exact"])):
            lines.append(
                f"| {row['name']}, seq {b} | {row['exact'][b]:.4f} | {row['estimate'][b]:.4f} ± {row['se'][b]:.4f} "
                f"| {row['sd'][b]:.3f} | {row['n_for_1e3'][b]:.2g} | {row['f32_error'][b]:.1e} "
                f"| {row['n_for_f32'][b]:.2g} |"
            )
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        _probe(sys.argv[2], int(sys.argv[3]))
        return
    label = machine_line()
    start = time.perf_counter()
    costs = cost_rows(5)
    print(costs, flush=True)
    ts_rows = probe_rows(__file__, [32, 64, 128, 256])
    sample, sample_size = sample_rows(4000)
    text = report(costs, ts_rows, sample, sample_size, label)
    (RESULTS / "entropy.md").write_text(text)
    print(text)
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
