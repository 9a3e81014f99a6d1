"""Where the time goes at the write-up's size: the floors under Viterbi and the sampler.

Times, with the same threads and data as ``run.py``, the pieces every step must do:
* the transition blocks alone: gather E1/E2 rows and the K x D x K product, for all B x (T-1) steps;
* K^2 exps per step (the sampler's weights), with the vectorised float32 ``fast_exp`` and with ``math.exp``;
* the whole ops, for comparison, and Viterbi where its branch and bound can prune nothing; the exact-inference
  ops, whose forward pass has the same two floors. Writes ``results/profile.md``.

    python benchmarks/profile.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch_baselines as tb  # noqa: E402
from run import RESULTS, WRITEUP_SIZE, fmt, machine, make_inputs, timed  # noqa: E402

import viterbi_numba as vn  # noqa: E402
from viterbi_numba.cpu import decode as cpu_decode  # noqa: E402
from viterbi_numba.cpu.intrinsics import fast_exp  # noqa: E402
from viterbi_numba.cpu.ops import single_threaded_blas  # noqa: E402


@njit(parallel=True, cache=True)
def transition_blocks_only(tokens, E1, E2, sink):
    B, T, K = tokens.shape
    D = E1.shape[1]
    for b in prange(B):
        src_emb = np.empty((K, D), E1.dtype)
        dst_emb = np.empty((K, D), E1.dtype)
        trans = np.empty((K, K), E1.dtype)
        for t in range(1, T):
            cpu_decode._transition_block(tokens[b, t - 1], tokens[b, t], E1, E2, src_emb, dst_emb, trans)
        sink[b] = trans[0, 0]


@njit(parallel=True, cache=True, fastmath={"nsz", "arcp", "afn"})
def exps_only(block, steps, use_fast, sink):
    K = block.shape[0]
    B = sink.shape[0]
    for b in prange(B):
        out = np.empty((K, K), block.dtype)
        for _ in range(steps):
            for i in range(K):
                for j in range(K):
                    out[i, j] = fast_exp(block[i, j]) if use_fast else math.exp(block[i, j])
        sink[b] = out[1, 1]


def main():
    B, T, V, K, D = (WRITEUP_SIZE[x] for x in "BTVKD")
    emissions, E1, E2 = make_inputs(B, T, V, K, D)
    beam = vn.topk_beam(emissions, K)
    sink = np.zeros(B, np.float32)
    block = -np.abs(np.random.default_rng(0).standard_normal((K, K))).astype(np.float32)
    rows = []
    with single_threaded_blas():
        rows.append(
            (
                "transition blocks (gather + BLAS gemm), all steps",
                timed(lambda: transition_blocks_only(beam.tokens, E1, E2, sink), 5),
            )
        )
    rows.append(("K^2 exps per step, fast_exp (float32)", timed(lambda: exps_only(block, T - 1, True, sink), 5)))
    rows.append(("K^2 exps per step, math.exp", timed(lambda: exps_only(block, T - 1, False, sink), 5)))
    rows.append(("topk_beam", timed(lambda: vn.topk_beam(emissions, K), 5)))
    rows.append(
        ("viterbi_decode (given the beam)", timed(lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1, E2), 5))
    )
    # worst case of the Viterbi branch and bound: transitions far wider than the scores, nothing pruned
    E1_wide, E2_wide = E1 * np.float32(30), E2 * np.float32(30)
    rows.append(
        (
            "viterbi_decode, transitions 30x wider (no pruning)",
            timed(lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1_wide, E2_wide), 5),
        )
    )
    with torch.no_grad():
        torch.set_num_threads(numba.get_num_threads())
        beam_t = (torch.from_numpy(beam.scores), torch.from_numpy(beam.tokens))
        rows.append(
            (
                "for comparison: fairseq-style torch Viterbi (given the beam)",
                timed(lambda: tb.viterbi_beam(*beam_t, torch.from_numpy(E1), torch.from_numpy(E2)), 5),
            )
        )
    rows.append(
        (
            "stochastic_viterbi N=1 (given the beam)",
            timed(lambda: vn.stochastic_viterbi(beam.scores, beam.tokens, E1, E2, seed=1), 5),
        )
    )
    rows.append(
        (
            "stochastic_viterbi N=8 (given the beam)",
            timed(lambda: vn.stochastic_viterbi(beam.scores, beam.tokens, E1, E2, num_samples=8, seed=1), 5),
        )
    )
    rows.append(
        (
            "log_partition: the forward pass (given the beam)",
            timed(lambda: vn.log_partition(beam.scores, beam.tokens, E1, E2), 5),
        )
    )
    rows.append(
        (
            "crf_sample N=8: forward pass + backward sampling (given the beam)",
            timed(lambda: vn.crf_sample(beam.scores, beam.tokens, E1, E2, num_samples=8, seed=1), 5),
        )
    )
    rows.append(
        (
            "marginals: forward-backward (given the beam)",
            timed(lambda: vn.marginals(beam.scores, beam.tokens, E1, E2), 5),
        )
    )
    rows.append(
        (
            "log_partition_grad: forward-backward + table gradients (given the beam)",
            timed(lambda: vn.log_partition_grad(beam.scores, beam.tokens, E1, E2), 5),
        )
    )
    info = machine()
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads. "
        f"B={B}, T={T}, K={K}, D={D}, float32: {B * (T - 1)} steps, "
        f"{B * (T - 1) * K * K * D / 1e9:.2f} G multiply-adds in the transition blocks, "
        f"{B * (T - 1) * K * K / 1e6:.0f} M weights per chain.",
        "",
        "| piece | ms: median (min–max) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {fmt(t)} |" for name, t in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
