"""GPU benchmark: viterbi-numba's CUDA kernels against the pure-PyTorch stochastic Viterbi on the same GPU.

    python benchmarks/gpu.py            # seed's size + a scaling sweep; writes results/gpu_<card>_<date>.md/.json
    python benchmarks/gpu.py --quick    # fewer repeats, smaller sweep

Needs a CUDA GPU, numba-cuda and a CUDA build of torch; without them it says what is missing and exits 2.
Both sides get CUDA tensors on the same device and run on torch's current stream; each case is timed
with CUDA events around the whole call (our calls include their input checks and the one flag read-back
they do), ``--repeats`` times after a warm-up, reported as median / min / max and the ratio of medians.

Each row also gives its efficiency against the card's floor: the emissions and the factor rows read once
and the outputs written once at the card's memory bandwidth, plus the 2 K^2 D flops per step of the
transition blocks at the card's FP32 peak; bandwidth and peak come from the device's attributes
(memory clock x bus width; SMs x FP32 lanes per SM x clock), so the distance to the hardware is visible.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
WRITEUP_SIZE = dict(B=8, T=97, V=30000, K=256, D=32)
FP32_LANES_PER_SM = {
    (7, 0): 64,
    (7, 5): 64,
    (8, 0): 64,
    (8, 6): 128,
    (8, 7): 128,
    (8, 9): 128,
    (9, 0): 128,
    (10, 0): 128,
    (12, 0): 128,
}
TARGETS = {"stochastic Viterbi N=8": 30, "stochastic Viterbi N=1": 20, "Viterbi": 5, "exact sampler N=8": 100}


def _requirements():
    """(torch, numba.cuda) or exit 2 with what is missing."""
    try:
        import torch
    except ImportError:
        sys.exit("benchmarks/gpu.py needs torch with CUDA")
    if not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: torch sees no CUDA GPU (a CPU build of torch, or no GPU here); "
            "the CPU benchmark is benchmarks/run.py",
            file=sys.stderr,
        )
        sys.exit(2)
    from viterbi_numba.gpu.arrays import require_gpu

    try:
        require_gpu()
    except RuntimeError as error:
        print(f"benchmarks/gpu.py: {error}", file=sys.stderr)
        sys.exit(2)
    from numba import cuda

    return torch, cuda


def card(cuda) -> dict:
    """Name, bandwidth (bytes/s) and FP32 peak (flop/s) of the current device, from its attributes."""
    device = cuda.get_current_device()
    cc = device.compute_capability
    bandwidth = 2 * device.MEMORY_CLOCK_RATE * 1e3 * device.GLOBAL_MEMORY_BUS_WIDTH / 8  # DDR: 2 transfers/clock
    lanes = FP32_LANES_PER_SM.get(tuple(cc), 128)
    peak = device.MULTIPROCESSOR_COUNT * lanes * 2 * device.CLOCK_RATE * 1e3  # an FMA is 2 flops
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    return dict(name=name, cc=f"{cc[0]}.{cc[1]}", sms=device.MULTIPROCESSOR_COUNT, bandwidth=bandwidth, fp32_peak=peak)


def floor_seconds(info, B, T, V, K, D, N, with_topk):
    """The card's floor for one call: bytes once at full bandwidth + the transition flops at FP32 peak."""
    read = (B * T * V * 4 if with_topk else B * T * K * 8) + 2 * B * T * K * D * 4  # emissions (or beam) + factor rows
    written = B * T * K * N * 4 * 2 + B * T * N * 16  # beam_probs and path scores, indices and tokens (upper bound)
    flops = 2 * B * (T - 1) * K * K * D
    return (read + written) / info["bandwidth"] + flops / info["fp32_peak"]


def cuda_times(torch, fn, repeats):
    """Milliseconds of ``fn()`` by CUDA events on the current stream, ``repeats`` times after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def inputs(torch, B, T, V, K, D, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    emissions = torch.randn(B, T, V, device="cuda", generator=generator)
    E1 = torch.randn(V, D, device="cuda", generator=generator) * 0.1
    E2 = torch.randn(V, D, device="cuda", generator=generator) * 0.1
    return emissions, E1, E2


def cases(torch, size, repeats, info):
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_baselines, beside this script
    import torch_baselines as tb

    import viterbi_numba as vn

    B, T, V, K, D = (size[x] for x in "BTVKD")
    emissions, E1, E2 = inputs(torch, B, T, V, K, D)
    beam = vn.topk_beam(emissions, K)
    rows = []

    def row(name, ours, theirs, N, with_topk=True):
        ours_t = cuda_times(torch, ours, repeats)
        theirs_t = cuda_times(torch, theirs, max(1, repeats // 2 if N > 1 else repeats))
        ours_m, theirs_m = statistics.median(ours_t), statistics.median(theirs_t)
        floor = floor_seconds(info, B, T, V, K, D, N, with_topk)
        rows.append(
            dict(
                case=name,
                **size,
                N=N,
                ours=[ours_m, min(ours_t), max(ours_t)],
                torch=[theirs_m, min(theirs_t), max(theirs_t)],
                speedup=theirs_m / ours_m,
                floor=floor,
                efficiency=floor / ours_m,
                target=TARGETS.get(name.split(" (")[0]),
            )
        )
        print(
            f"{name:40s} ours {ours_m * 1e3:9.3f} ms  torch {theirs_m * 1e3:10.3f} ms  "
            f"x{theirs_m / ours_m:7.1f}  floor {floor * 1e3:7.3f} ms ({floor / ours_m:.1%})",
            flush=True,
        )

    def ours_topk(fn):
        return lambda: fn(vn.topk_beam(emissions, K))

    row(
        "Viterbi",
        ours_topk(lambda b: vn.viterbi_decode(b.scores, b.tokens, E1, E2)),
        lambda: tb.viterbi(emissions, E1, E2, K),
        1,
    )
    row(
        "Viterbi (given the beam)",
        lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1, E2),
        lambda: tb.viterbi_beam(beam.scores, beam.tokens, E1, E2),
        1,
        with_topk=False,
    )
    for N in (1, 8):
        label = "stochastic Viterbi N=1" if N == 1 else "stochastic Viterbi N=8"
        row(
            label,
            ours_topk(lambda b, N=N: vn.stochastic_viterbi(b.scores, b.tokens, E1, E2, None if N == 1 else N, seed=1)),
            lambda N=N: tb.stochastic_viterbi(emissions, E1, E2, K, N),
            N,
        )
    row(
        "exact sampler N=8",
        ours_topk(lambda b: vn.crf_sample(b.scores, b.tokens, E1, E2, 8, seed=1)),
        lambda: tb.stochastic_viterbi(emissions, E1, E2, K, 8),
        8,
    )
    # issue 16's ratios, against our own operation in the baseline column (targets: 1/3 and 1/1.3)
    row(
        "N-best n=8 vs our Viterbi (given the beam)",
        lambda: vn.viterbi_nbest(beam.scores, beam.tokens, E1, E2, 8),
        lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1, E2),
        1,
        with_topk=False,
    )
    row(
        "without replacement N=8 vs our exact sampler N=8 (given the beam)",
        lambda: vn.crf_sample(beam.scores, beam.tokens, E1, E2, 8, seed=1, replacement=False),
        lambda: vn.crf_sample(beam.scores, beam.tokens, E1, E2, 8, seed=1),
        8,
        with_topk=False,
    )
    # precomputing the transition blocks: torch.bmm of all of them alone, against our whole forward pass
    row(
        "forward pass vs bmm of the blocks alone",
        lambda: vn.log_partition(beam.scores, beam.tokens, E1, E2),
        lambda: tb.transition_blocks(beam.tokens, E1, E2),
        1,
        with_topk=False,
    )
    return rows


def mismatch_rate(torch, size):
    """Fraction of stochastic Viterbi's draws (float32, same seed) where the GPU and the CPU pick differently."""
    import viterbi_numba as vn

    B, T, V, K, D = (size[x] for x in "BTVKD")
    emissions, E1, E2 = inputs(torch, B, T, V, K, D, seed=3)
    beam = vn.topk_beam(emissions, K)
    gpu = vn.stochastic_viterbi(beam.scores, beam.tokens, E1, E2, 8, seed=7).backpointers.cpu().numpy()
    cpu = vn.stochastic_viterbi(*(x.cpu().numpy() for x in (beam.scores, beam.tokens, E1, E2)), 8, seed=7).backpointers
    return float(np.mean(gpu != cpu)), gpu.size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch, cuda = _requirements()
    info = card(cuda)
    print(
        f"{info['name']} (cc {info['cc']}, {info['sms']} SMs): {info['bandwidth'] / 1e9:.0f} GB/s, "
        f"FP32 {info['fp32_peak'] / 1e12:.1f} TFLOP/s (from the device attributes)",
        flush=True,
    )
    repeats = 3 if args.quick else args.repeats
    writeup_rows = cases(torch, WRITEUP_SIZE, repeats, info)
    rate, draws = mismatch_rate(torch, dict(WRITEUP_SIZE, B=2))
    print(
        f"stochastic Viterbi, float32, same seed: GPU and CPU picks differ in {rate:.2e} of {draws} draws", flush=True
    )
    scaling = []
    for K in (64, 256) if args.quick else (64, 128, 256, 512, 1024):
        scaling += cases(torch, dict(WRITEUP_SIZE, K=K), max(2, repeats // 2), info)
    today = datetime.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "_" for c in info["name"]).strip("_")
    RESULTS.mkdir(exist_ok=True)
    report = dict(
        date=today,
        card=info,
        torch=torch.__version__,
        writeup_size=writeup_rows,
        scaling=scaling,
        mismatch=dict(rate=rate, draws=draws),
    )
    (RESULTS / f"gpu_{slug}_{today}.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# GPU benchmark: {info['name']}, {today}",
        "",
        f"cc {info['cc']}, {info['sms']} SMs, {info['bandwidth'] / 1e9:.0f} GB/s, FP32 "
        f"{info['fp32_peak'] / 1e12:.1f} TFLOP/s; torch {torch.__version__}. `python benchmarks/gpu.py`.",
        "",
        "| case | K | N | ours ms (median / min / max) | torch ms (median) | speedup | target | floor ms | efficiency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in writeup_rows + scaling:
        ours = " / ".join(f"{x * 1e3:.3f}" for x in r["ours"])
        lines.append(
            f"| {r['case']} | {r['K']} | {r['N']} | {ours} | {r['torch'][0] * 1e3:.3f} | "
            f"{r['speedup']:.1f}x | {r['target'] or '-'} | {r['floor'] * 1e3:.3f} | {r['efficiency']:.1%} |"
        )
    lines += ["", f"Stochastic Viterbi, float32, same seed: GPU and CPU picks differ in {rate:.2e} of {draws} draws."]
    (RESULTS / f"gpu_{slug}_{today}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
