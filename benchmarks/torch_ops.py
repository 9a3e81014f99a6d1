"""What the PyTorch operator layer costs: ``torch.ops.viterbi_numba.*`` against the array API on the same
data, eager and under ``torch.compile``, and a whole GRPO step compiled against eager.

Per-call rows time a loop of calls (so that a call of tens of microseconds is measured, not the timer)
and give the median, min and max over ``--repeats`` loops; "added" is the operator's median minus the
array API's, per call. Writes ``results/torch_ops.md``.

    python benchmarks/torch_ops.py            # about 3 minutes on 2 cores
    python benchmarks/torch_ops.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# this folder's profile.py would shadow the standard library's, which torch.compile imports (cProfile)
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
import cProfile  # noqa: E402, F401

import torch  # noqa: E402

sys.path.insert(0, str(HERE))
from run import RESULTS, WRITEUP_SIZE, machine, make_inputs, summary  # noqa: E402

import viterbi_numba as vn  # noqa: E402
from viterbi_numba.adapters.torch import DynamicCRF  # noqa: E402

ops = torch.ops.viterbi_numba
TINY = dict(B=1, T=4, V=16, K=4, D=4)
SAMPLES = 8


def per_call(variants, calls, repeats):
    """{name: (median, min, max) seconds per call} of each ``variants[name]()``: ``repeats`` rounds, each
    timing a loop of ``calls`` calls of every variant in turn (interleaved, so that the machine's drift
    falls on all of them alike)."""
    for fn in variants.values():
        fn()  # warm-up
    times: dict = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: summary(values) for name, values in times.items()}


def call_pairs(size):
    """(name, array API call, operator call) at ``size``, on the same memory (NumPy views of the tensors)."""
    emissions_np, E1_np, E2_np = make_inputs(**size)
    B, T, K = size["B"], size["T"], size["K"]
    beam = vn.topk_beam(emissions_np, K)
    emissions, E1, E2 = (torch.from_numpy(a) for a in (emissions_np, E1_np, E2_np))
    scores, tokens = torch.from_numpy(beam.scores), torch.from_numpy(beam.tokens)
    targets_np = beam.tokens[:, :, 1].copy()
    targets = torch.from_numpy(targets_np)
    seed = torch.tensor(3)
    return [
        ("topk_beam", lambda: vn.topk_beam(emissions_np, K), lambda: ops.topk_beam(emissions, K)),
        (
            "viterbi_decode",
            lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1_np, E2_np),
            lambda: ops.viterbi_decode(scores, tokens, E1, E2),
        ),
        (
            f"crf_sample N={SAMPLES}",
            lambda: vn.crf_sample(beam.scores, beam.tokens, E1_np, E2_np, SAMPLES, seed=3),
            lambda: ops.crf_sample(scores, tokens, E1, E2, None, SAMPLES, 1.0, seed),
        ),
        (
            "log_likelihood",
            lambda: vn.log_likelihood_forward(emissions_np, targets_np, E1_np, E2_np, K),
            lambda: ops.log_likelihood(emissions, targets, E1, E2, K),
        ),
    ], (B, T, K)


def overhead_rows(size, label, calls, repeats, progress):
    pairs, _ = call_pairs(size)
    rows = []
    for name, direct, operator in pairs:
        compiled = torch.compile(operator, fullgraph=True)
        compiled()  # compiles here, not in the timing
        times = per_call({"array": direct, "op": operator, "compiled": compiled}, calls, repeats)
        rows.append((label, name, times))
        progress(f"{label} {name}: " + ", ".join(f"{k} {v[0] * 1e6:.1f} us" for k, v in times.items()))
    return rows


def compile_floor(calls, repeats):
    """What a compiled call costs by itself: a compiled ``x + 1`` against the eager one, per call."""
    x = torch.zeros(4)
    compiled = torch.compile(lambda: x + 1, fullgraph=True)
    compiled()
    return per_call({"eager": lambda: x + 1, "compiled": compiled}, calls, repeats)


def grpo_step(crf, emissions, targets, clip=0.2):
    """One GRPO step's loss: SAMPLES exact samples, re-scored by ``forward`` (old and new), clipped PPO."""
    batch, steps, _ = emissions.shape
    tokens, _ = crf.sample(emissions.detach(), SAMPLES)
    flat = tokens.permute(0, 2, 1).reshape(batch * SAMPLES, steps)
    repeated = emissions.repeat_interleave(SAMPLES, 0)
    old_log_prob = crf(repeated.detach(), flat).detach()
    log_prob = crf(repeated, flat)
    rewards = (flat == targets.repeat_interleave(SAMPLES, 0)).to(emissions.dtype).mean(1).view(batch, SAMPLES)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1)
    ratio = torch.exp(log_prob - old_log_prob)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()


def step_row(size, repeats, progress):
    emissions_np, E1_np, E2_np = make_inputs(**size)
    crf = DynamicCRF(size["V"], low_rank=size["D"], beam_size=size["K"])
    with torch.no_grad():
        crf.E1.weight.copy_(torch.from_numpy(E1_np))
        crf.E2.weight.copy_(torch.from_numpy(E2_np))
    emissions = torch.from_numpy(emissions_np).requires_grad_()
    targets = torch.from_numpy(emissions_np.argmax(2))
    compiled = torch.compile(grpo_step, fullgraph=True)

    def run(step):
        def once():
            emissions.grad = None
            crf.zero_grad()
            step(crf, emissions, targets).backward()

        return once

    torch.manual_seed(0)
    run(compiled)()  # compiles here
    times = per_call({"eager": run(grpo_step), "compiled": run(compiled)}, 1, repeats)
    progress("GRPO step: " + ", ".join(f"{k} {v[0] * 1e3:.1f} ms" for k, v in times.items()))
    return times


def fmt_us(t):
    return f"{t[0] * 1e6:.1f} ({t[1] * 1e6:.1f}–{t[2] * 1e6:.1f})"


def report(info, rows, floor, step, size):
    lines = [
        "# PyTorch operator layer: per-call overhead",
        "",
        f"`python benchmarks/torch_ops.py` on {info['cpu']}, {info['cores']} cores, {info['threads']} numba threads, "
        f"torch {torch.__version__}, numba {info['numba']}. Per call: median (min–max) µs over loops of calls;",
        "**added** = operator median − array API median (the target: at most 30 µs per call, and nothing",
        "measurable at the write-up's size, where a call takes milliseconds).",
        "",
        "| size | call | array API µs | operator µs | compiled operator µs | added (eager) | added (compiled) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name, times in rows:
        base = times["array"][0]
        lines.append(
            f"| {label} | {name} | {fmt_us(times['array'])} | {fmt_us(times['op'])} | {fmt_us(times['compiled'])} "
            f"| {(times['op'][0] - base) * 1e6:+.1f} µs ({times['op'][0] / base:.3f}×) "
            f"| {(times['compiled'][0] - base) * 1e6:+.1f} µs ({times['compiled'][0] / base:.3f}×) |"
        )
    lines += [
        "",
        f"torch.compile's own per-call cost in the same run (a compiled `x + 1`, no operator of ours): "
        f"{fmt_us(floor['compiled'])} µs against {fmt_us(floor['eager'])} µs eager, so "
        f"{(floor['compiled'][0] - floor['eager'][0]) * 1e6:+.1f} µs of each compiled row's added time is "
        "the compiled call itself, not the operator layer.",
    ]
    eager, compiled = step["eager"], step["compiled"]
    ms = lambda t: f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.1f}–{t[2] * 1e3:.1f})"  # noqa: E731
    lines += [
        "",
        f"## A GRPO step ({size}, {SAMPLES} samples, re-scored with `forward`, clipped PPO loss, backward)",
        "",
        "| | eager ms | compiled (fullgraph) ms | compiled / eager |",
        "|---|---|---|---|",
        f"| training step | {ms(eager)} | {ms(compiled)} | {compiled[0] / eager[0]:.3f} |",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    progress = lambda message: print(message, flush=True)  # noqa: E731
    start = time.perf_counter()
    info = machine()
    info["numba"] = __import__("numba").__version__
    size = WRITEUP_SIZE
    rows = overhead_rows(TINY, "B=1, T=4, K=4", 2000 if not args.quick else 300, repeats, progress)
    label = ", ".join(f"{k}={v}" for k, v in size.items())
    rows += overhead_rows(size, label, 3 if not args.quick else 1, repeats, progress)
    floor = compile_floor(2000, repeats)
    step_size = dict(size, K=64)  # DynamicCRF's own beam
    step = step_row(step_size, repeats, progress)
    text = report(info, rows, floor, step, ", ".join(f"{k}={v}" for k, v in step_size.items()))
    (RESULTS / "torch_ops.md").write_text(text)
    print(text)
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
