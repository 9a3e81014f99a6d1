"""How precise exact inference stays as the temperature falls, and where the range checks draw the line.

    python benchmarks/extremes.py      # writes benchmarks/results/extremes.md

For small problems whose paths can be enumerated, exact samples' log-probabilities are compared with
enumeration (from score differences to the best path, so that no precision is lost to S/tau - log Z),
in float32 and float64, at temperatures from 1 down to where the checks refuse them; for a problem of
the write-up's length (T = 97, K = 64, D = 32), float32 is compared with float64. M / tau is what the
checks bound, with M = T (score spread + largest |E1 row| |E2 row|) (docs/design.md §6, "Range"):
exact inference is refused above 1e6 in float32 and 1e12 in float64. The last table times the checks
themselves at the write-up's size.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from extremes import exact_log_probs  # noqa: E402

import viterbi_numba as vn  # noqa: E402
from viterbi_numba import _validate  # noqa: E402

TEMPERATURES = [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8, 1e-10, 1e-11, 1e-12, 1e-14]
SAMPLES = 32


def small_problem(T, K, table_scale, seed=0):
    rng = np.random.default_rng(seed)
    V, D = 3 * K, 4
    beam = vn.topk_beam(rng.standard_normal((1, T, V)), K)
    E1 = rng.standard_normal((V, D)) * table_scale
    E2 = rng.standard_normal((V, D)) * table_scale
    return beam.scores, beam.tokens, E1, E2


def magnitude(scores, E1, E2, dtype, temperature):
    cast = [a.astype(dtype) for a in (scores, E1, E2)]
    lengths = np.full(scores.shape[0], scores.shape[1])
    spread = _validate.beam_spread(cast[0], lengths)
    norms = np.sqrt(_validate.squared_row_norm(cast[1]) * _validate.squared_row_norm(cast[2]))
    return scores.shape[1] * (spread + norms) / temperature


def small_rows():
    rows = []
    for name, (T, K, table_scale) in {
        "T=6 K=4, tables N(0, 0.25)": (6, 4, 0.5),
        "T=5 K=5, tables N(0, 1)": (5, 5, 1.0),
    }.items():
        scores, tokens, E1, E2 = small_problem(T, K, table_scale)
        for dtype in (np.float32, np.float64):
            for tau in TEMPERATURES:
                M = magnitude(scores, E1, E2, dtype, tau)
                cast = [a.astype(dtype) for a in (scores, E1, E2)]
                try:
                    draws = vn.crf_sample(cast[0], tokens, cast[1], cast[2], SAMPLES, temperature=tau, seed=1)
                except ValueError:
                    rows.append((name, np.dtype(dtype).name, tau, M, None, None))
                    continue
                wide = [a.astype(np.float64) for a in cast]  # the inputs as the call saw them
                want = exact_log_probs(wide[0], tokens, wide[1], wide[2], 0, T, tau)
                errors = [
                    abs(float(draws.log_prob[0, n]) - want[tuple(int(y) for y in draws.beam_idx[0, :, n])])
                    for n in range(SAMPLES)
                ]
                rows.append((name, np.dtype(dtype).name, tau, M, max(errors), float(draws.log_prob.max())))
    return rows


def long_rows():
    rng = np.random.default_rng(0)
    B, T, V, K, D = 2, 97, 3000, 64, 32
    beam = vn.topk_beam(rng.standard_normal((B, T, V)), K)
    E1 = rng.standard_normal((V, D)) * 0.1
    E2 = rng.standard_normal((V, D)) * 0.1
    rows = []
    for tau in TEMPERATURES:
        M = magnitude(beam.scores, E1, E2, np.float32, tau)
        args32 = (beam.scores.astype(np.float32), beam.tokens, E1.astype(np.float32), E2.astype(np.float32))
        try:
            draws = vn.crf_sample(*args32, SAMPLES, temperature=tau, seed=1)
        except ValueError:
            rows.append(("T=97 K=64 D=32", "float32", tau, M, None, None))
            continue
        args64 = (args32[0].astype(np.float64), beam.tokens, args32[2].astype(np.float64), args32[3].astype(np.float64))
        score = vn.sequence_score(*args64, draws.beam_idx)
        want = score / tau - vn.log_partition(*args64, temperature=tau)[:, None]
        rows.append(
            (
                "T=97 K=64 D=32",
                "float32",
                tau,
                M,
                float(np.abs(draws.log_prob - want).max()),
                float(draws.log_prob.max()),
            )
        )
    return rows


def check_cost():
    """The value checks of the tables and the beam in a viterbi_decode call at the write-up's size
    (B=8, T=97, K=256, V=30000, D=32, float32), with the range and without it (the finiteness and beam
    rules alone, as before the range existed), against the call itself: medians of 9."""
    from viterbi_numba.cpu.ops import HostChecks

    rng = np.random.default_rng(0)
    B, T, V, K, D = 8, 97, 30000, 256, 32
    beam = vn.topk_beam(rng.standard_normal((B, T, V), dtype=np.float32), K)
    E1 = rng.standard_normal((V, D), dtype=np.float32) * 0.1
    E2 = rng.standard_normal((V, D), dtype=np.float32) * 0.1
    lengths = np.full(B, T)

    def with_range():
        checks = HostChecks()
        checks.tables(E1, E2, _validate.table_values)
        checks.beam(beam.scores, lengths, _validate.beam_score_values)
        checks.scale(beam.scores, lengths, E1, E2, 1.0, True, None)

    def without_range():
        _validate.table_values(E1, E2)
        _validate.beam_score_values(beam.scores, lengths)

    def median_ms(call):
        call()
        times = []
        for _ in range(9):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    return {
        "table and beam checks, with the range": median_ms(with_range),
        "the same checks without the range": median_ms(without_range),
        "viterbi_decode (the whole call)": median_ms(lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1, E2)),
    }


def table(rows):
    lines = [
        "| problem | dtype | tau | M / tau | max abs error of log p | largest log p |",
        "|---|---|---|---|---|---|",
    ]
    for name, dtype, tau, M, error, top in rows:
        if error is None:
            lines.append(f"| {name} | {dtype} | {tau:g} | {M:.2g} | refused | |")
        else:
            lines.append(f"| {name} | {dtype} | {tau:g} | {M:.2g} | {error:.2g} | {top:.2g} |")
    return lines


def main():
    small, long, cost = small_rows(), long_rows(), check_cost()
    accepted = [row[4] for row in small + long if row[4] is not None]
    lines = [
        "# Exact inference at small temperatures",
        "",
        f"`python benchmarks/extremes.py` on {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}.",
        "",
        f"{SAMPLES} exact samples per row; error against enumeration (small problems) or against float64 "
        "(T = 97). M = T (score spread + largest |E1 row| |E2 row|); exact inference is refused where M / tau "
        "exceeds 1e6 in float32 and 1e12 in float64.",
        "",
        *table(small + long),
        "",
        f"Largest error of any accepted row: {max(accepted):.2g} nats.",
        "",
        "## What the checks cost (B=8, T=97, K=256, V=30000, D=32, float32; medians of 9)",
        "",
        "| part | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.2f} |" for name, ms in cost.items()),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    with open(os.path.join(HERE, "results", "extremes.md"), "w") as out:
        out.write(report)


if __name__ == "__main__":
    main()
