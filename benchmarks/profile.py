"""Where the time goes at the write-up's size, against the machine's own floor.

Measures, in one run and on the same threads:

* the machine's peaks: multiply-adds per second of an FMA-bound Numba loop (the transition tiles'
  micro-kernel, ``cpu/tiles.py``, on operands that stay in L1) and exps per second of the vectorised
  float32 ``fast_exp`` over an L1-resident array;
* each kernel's time, and from the work it must do (the K x D x K multiply-adds of every step's block,
  the K^2 exps of the sums, the samplers' K^2 running sums per chain) its achieved rates and its
  floor: the multiply-adds at the FMA peak plus the exps at the exp peak. ``time / floor`` is the
  distance to the floor (1 = at the floor).

Viterbi runs on two kinds of tables: the benchmark's scaled ones (N(0, 1) / 10, where the branch and
bound prunes most rows) and the write-up's own ``nn.Embedding`` initialisation (N(0, 1) entries, so the
transitions have a standard deviation of about sqrt(D) and prune almost nothing). Writes
``results/profile.md``.

    python benchmarks/profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch_baselines as tb  # noqa: E402
from common import interleaved  # noqa: E402
from run import RESULTS, WRITEUP_SIZE, fmt, machine, make_inputs  # noqa: E402

import viterbi_numba as vn  # noqa: E402
from viterbi_numba.cpu import tiles  # noqa: E402
from viterbi_numba.cpu.intrinsics import fast_exp  # noqa: E402

_PEAK_ROUNDS = 2000


@njit(parallel=True, cache=True)
def fma_peak(src_emb, dst_t, rounds, sink):
    """rounds x (rows x columns x D) multiply-adds per thread slot, on operands that stay in L1."""
    width = sink.shape[1]
    for p in prange(sink.shape[0]):
        strip = np.empty((src_emb.shape[0], width), dtype=src_emb.dtype)
        for _ in range(rounds):
            for row in range(0, src_emb.shape[0], tiles.ROWS):
                tiles.tile_dots(src_emb, dst_t, row, 0, strip)
        sink[p, :] = strip[0]


@njit(parallel=True, cache=True, fastmath={"nsz", "arcp", "afn"})
def exp_peak(values, rounds, sink):
    """rounds x len(values) exps per thread slot, summed so that none is optimised away."""
    for p in prange(sink.shape[0]):
        total = np.zeros(values.shape[0], dtype=values.dtype)
        for _ in range(rounds):
            for i in range(values.shape[0]):
                total[i] += fast_exp(values[i])
        sink[p] = total.sum()


def peaks():
    """(multiply-adds per second, exps per second), all threads, median of 5."""
    threads = numba.get_num_threads()
    D = 32
    width = tiles.STRIP_F32
    rng = np.random.default_rng(0)
    src_emb = rng.standard_normal((tiles.ROWS * 8, D), dtype=np.float32)
    dst_t = rng.standard_normal((D, width), dtype=np.float32)
    fma_sink = np.zeros((threads, width), np.float32)
    values = -rng.random(2048, dtype=np.float32) * 20
    exp_sink = np.zeros(threads, np.float32)
    times = interleaved(
        {
            "fma": lambda: fma_peak(src_emb, dst_t, _PEAK_ROUNDS, fma_sink),
            "exp": lambda: exp_peak(values, _PEAK_ROUNDS, exp_sink),
        },
        5,
    )
    multiply_adds = threads * _PEAK_ROUNDS * src_emb.shape[0] * width * D
    exps = threads * _PEAK_ROUNDS * values.shape[0]
    return multiply_adds / times["fma"][0], exps / times["exp"][0]


def main():
    B, T, V, K, D = (WRITEUP_SIZE[x] for x in "BTVKD")
    emissions, E1, E2 = make_inputs(B, T, V, K, D)
    E1_unit, E2_unit = E1 * np.float32(10), E2 * np.float32(10)  # nn.Embedding's N(0, 1) entries
    scores, tokens = vn.topk_beam(emissions, K)
    steps = B * (T - 1)
    block = steps * K * K * D  # multiply-adds of the transition blocks
    weights = steps * K * K  # entries of the blocks: their exps, or a chain's running sums
    # name -> (function, multiply-adds, exps)
    cases = {
        "topk_beam": (lambda: vn.topk_beam(emissions, K), 0, 0),
        "viterbi_decode, scaled tables": (lambda: vn.viterbi_decode(scores, tokens, E1, E2), block, 0),
        "viterbi_decode, N(0, 1) tables": (lambda: vn.viterbi_decode(scores, tokens, E1_unit, E2_unit), block, 0),
        "log_partition": (lambda: vn.log_partition(scores, tokens, E1, E2), block, weights),
        "crf_sample N=8": (lambda: vn.crf_sample(scores, tokens, E1, E2, num_samples=8, seed=1), block, weights),
        "stochastic_viterbi N=1": (
            lambda: vn.stochastic_viterbi(scores, tokens, E1, E2, seed=1),
            block + weights,
            weights,
        ),
        "stochastic_viterbi N=8": (
            lambda: vn.stochastic_viterbi(scores, tokens, E1, E2, num_samples=8, seed=1),
            block + 8 * weights,
            weights,
        ),
        "marginals": (lambda: vn.marginals(scores, tokens, E1, E2), 2 * block, 2 * weights),
        "log_partition_grad": (lambda: vn.log_partition_grad(scores, tokens, E1, E2), 4 * block, 2 * weights),
    }
    fma_rate, exp_rate = peaks()
    times = interleaved({name: fn for name, (fn, _, _) in cases.items()}, 7)
    with torch.no_grad():
        torch.set_num_threads(numba.get_num_threads())
        beam_t = (torch.from_numpy(scores), torch.from_numpy(tokens))
        torch_times = interleaved(
            {
                "scaled": lambda: tb.viterbi_beam(*beam_t, torch.from_numpy(E1), torch.from_numpy(E2)),
                "unit": lambda: tb.viterbi_beam(*beam_t, torch.from_numpy(E1_unit), torch.from_numpy(E2_unit)),
            },
            3,
        )
    info = machine()
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads. "
        f"B={B}, T={T}, K={K}, D={D}, float32, given the beam: {steps} steps, "
        f"{block / 1e9:.2f} G multiply-adds in the transition blocks, {weights / 1e6:.0f} M entries.",
        "",
        f"Peaks measured in this run: {fma_rate / 1e9:.1f} G multiply-adds/s (the tiles' micro-kernel, "
        f"operands in L1), {exp_rate / 1e9:.2f} G exps/s (fast_exp, float32).",
        "",
        "| kernel | ms: median (min–max) | G multiply-adds/s | G exps/s | floor, ms | time / floor |",
        "|---|---|---|---|---|---|",
    ]
    for name, (_, multiply_adds, exps) in cases.items():
        median = times[name][0]
        floor = multiply_adds / fma_rate + exps / exp_rate
        rates = (
            f"{multiply_adds / median / 1e9:.1f} | {exps / median / 1e9:.2f} | {floor * 1e3:.1f} | {median / floor:.2f}"
            if floor
            else "— | — | — | —"
        )
        lines.append(f"| {name} | {fmt(times[name])} | {rates} |")
    lines += [
        "",
        "For comparison, the fairseq-style torch Viterbi given the beam: "
        f"{fmt(torch_times['scaled'])} ms (scaled tables), {fmt(torch_times['unit'])} ms (N(0, 1) tables).",
        "",
        "The floor counts the work each kernel cannot avoid: every step's K x D x K block (twice for "
        "marginals, four times for the gradients: the forward and backward blocks and the two products "
        "with the edge marginals), K^2 exps per block pass, and the stochastic sampler's K^2 running "
        "sums per chain. Viterbi's floor is its block alone; its branch and bound can go below it.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
