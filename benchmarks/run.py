"""Side-by-side benchmark: viterbi-numba against the pure-PyTorch stochastic Viterbi and fairseq-style code.

Both run in this process, on the same inputs, with the same thread count. Each case reports the median,
min and max wall time over ``--repeats`` runs (after one warm-up) and the ratio of medians; peak memory
is measured in fresh processes. Writes ``results/results.json``, ``results/results.md`` and ``results/time_vs_k.png``.

    python benchmarks/run.py            # or: viterbi-numba bench
    python benchmarks/run.py --quick    # fewer repeats, smaller scaling sweep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_baselines as tb  # noqa: E402

import viterbi_numba as vn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WRITEUP_SIZE = dict(B=8, T=97, V=30000, K=256, D=32)


def run_times(fn, repeats, warmup=True):
    """Wall times of ``repeats`` calls of ``fn()``, after a pause and (by default) one warm-up call.

    The pause: torch's OpenMP workers keep spinning for a while after a call, and on a small machine
    they would take cores from whatever is timed next.
    """
    time.sleep(0.5)
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times):
    return statistics.median(times), min(times), max(times)


def timed(fn, repeats):
    """(median, min, max) seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    return summary(run_times(fn, repeats))


def make_inputs(B, T, V, K, D, seed=0):
    rng = np.random.default_rng(seed)
    emissions = rng.standard_normal((B, T, V), dtype=np.float32)
    E1 = (rng.standard_normal((V, D), dtype=np.float32) * 0.1).astype(np.float32)
    E2 = (rng.standard_normal((V, D), dtype=np.float32) * 0.1).astype(np.float32)
    return emissions, E1, E2


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        threads=numba.get_num_threads(),
        python=platform.python_version(),
        numpy=np.__version__,
        numba=numba.__version__,
        torch=torch.__version__,
    )


def writeup_size_cases(repeats, progress):
    """Each op at the write-up's size: ours vs torch, from emissions (end to end) and from a given beam.

    A baseline shared by several cases (the 8-sample stochastic Viterbi) is timed once.
    """
    B, T, V, K, D = (WRITEUP_SIZE[x] for x in "BTVKD")
    emissions, E1, E2 = make_inputs(B, T, V, K, D)
    E1_unit, E2_unit = E1 * np.float32(10), E2 * np.float32(10)  # the write-up's nn.Embedding: N(0, 1) entries
    em_t, E1_t, E2_t = (torch.from_numpy(a) for a in (emissions, E1, E2))
    beam = vn.topk_beam(emissions, K)
    beam_t = (torch.from_numpy(beam.scores), torch.from_numpy(beam.tokens))
    weights = torch.from_numpy(np.random.default_rng(2).standard_normal((B, T, K, 8), dtype=np.float32))
    module = stochastic_viterbi_module(E1, E2, K, 8)
    targets = np.random.default_rng(1).integers(0, V, (B, T))
    no_grad = torch.no_grad

    def ours_stochastic_viterbi(N, end_to_end):
        def run():
            scores, tokens = vn.topk_beam(emissions, K) if end_to_end else beam
            return vn.stochastic_viterbi(scores, tokens, E1, E2, num_samples=None if N == 1 else N, seed=1)

        return run

    # baseline name -> (description, function, repeats); functions that need no autograd run under no_grad
    baselines = {
        "topk": ("torch.topk", lambda: torch.topk(em_t, K, 2), repeats),
        "viterbi": ("fairseq-style torch Viterbi", lambda: tb.viterbi(em_t, E1_t, E2_t, K), repeats),
        "viterbi-unit": (
            "fairseq-style torch Viterbi",
            lambda: tb.viterbi(em_t, torch.from_numpy(E1_unit), torch.from_numpy(E2_unit), K),
            repeats,
        ),
        "viterbi-beam": ("fairseq-style torch Viterbi", lambda: tb.viterbi_beam(*beam_t, E1_t, E2_t), repeats),
        "stochastic-viterbi-1": (
            "torch stochastic Viterbi",
            lambda: tb.stochastic_viterbi(em_t, E1_t, E2_t, K, 1),
            repeats,
        ),
        "stochastic-viterbi-1-beam": (
            "torch stochastic Viterbi",
            lambda: tb.stochastic_viterbi_beam(*beam_t, E1_t, E2_t, 1),
            repeats,
        ),
        "stochastic-viterbi-8": (
            "torch stochastic Viterbi, N=8",
            lambda: tb.stochastic_viterbi(em_t, E1_t, E2_t, K, 8),
            1,
        ),
        "stochastic-viterbi-8-beam": (
            "torch stochastic Viterbi, N=8",
            lambda: tb.stochastic_viterbi_beam(*beam_t, E1_t, E2_t, 8),
            1,
        ),
        "train": ("torch autograd, stochastic Viterbi", lambda: torch_training_step(em_t, E1_t, E2_t, K, weights), 1),
        "likelihood": (
            "torch autograd, fairseq-style forward",
            lambda: torch_log_likelihood_step(em_t, torch.from_numpy(targets), E1_t, E2_t, K),
            3,
        ),
    }
    with_autograd = {"train", "likelihood"}
    cases = [
        ("topk_beam (B,T,V)->(B,T,K)", lambda: vn.topk_beam(emissions, K), "topk", 1 / 1.5),
        (
            "Viterbi, end to end (top-K + decode)",
            lambda: vn.viterbi_decode(*vn.topk_beam(emissions, K), E1, E2),
            "viterbi",
            5,
        ),
        (
            "Viterbi, end to end, N(0, 1) tables (the write-up's initialisation)",
            lambda: vn.viterbi_decode(*vn.topk_beam(emissions, K), E1_unit, E2_unit),
            "viterbi-unit",
            3,
        ),
        ("Viterbi, given the beam", lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1, E2), "viterbi-beam", 3),
        ("stochastic Viterbi N=1, end to end", ours_stochastic_viterbi(1, True), "stochastic-viterbi-1", 25),
        ("stochastic Viterbi N=1, given the beam", ours_stochastic_viterbi(1, False), "stochastic-viterbi-1-beam", 15),
        ("stochastic Viterbi N=8, end to end", ours_stochastic_viterbi(8, True), "stochastic-viterbi-8", 100),
        ("stochastic Viterbi N=8, given the beam", ours_stochastic_viterbi(8, False), "stochastic-viterbi-8-beam", 40),
        (
            "exact sampler (crf_sample) N=8, end to end",
            lambda: vn.crf_sample(*vn.topk_beam(emissions, K), E1, E2, num_samples=8, seed=1),
            "stochastic-viterbi-8",
            150,
        ),
        (
            "exact sampler (crf_sample) N=8, given the beam",
            lambda: vn.crf_sample(beam.scores, beam.tokens, E1, E2, num_samples=8, seed=1),
            "stochastic-viterbi-8-beam",
            80,
        ),
        (
            "training step: write-up's classes N=8 (beam_probs + backward)",
            lambda: ours_training_step(em_t, module, weights),
            "train",
            20,
        ),
        (
            "log-likelihood + gradients (emissions, E1, E2)",
            lambda: log_likelihood_step(emissions, targets, E1, E2, K),
            "likelihood",
            5,
        ),
    ]
    # Per baseline: its cases' runs are split, half before and half after it, so that a slow or fast
    # spell of this shared machine falls on both sides; after a long baseline the machine gets a pause
    # as long as a tenth of it, since the biggest ones leave it busy reclaiming their memory.
    ours, measured = {}, {}
    for key in dict.fromkeys(key for _, _, key, _ in cases):
        group = [(name, fn) for name, fn, case_key, _ in cases if case_key == key]
        for name, fn in group:
            progress(name)
            ours[name] = run_times(fn, (repeats + 1) // 2)
        description, fn, torch_repeats = baselines[key]
        with torch.enable_grad() if key in with_autograd else no_grad():
            start = time.perf_counter()
            measured[key] = timed(fn, torch_repeats)
            time.sleep(0.1 * (time.perf_counter() - start))
        for name, fn in group:
            ours[name] = summary(ours[name] + run_times(fn, repeats // 2, warmup=False))
    return [
        dict(
            case=name,
            ours=ours[name],
            baseline_name=baselines[key][0],
            baseline=measured[key],
            speedup=measured[key][0] / ours[name][0],
            target=target,
        )
        for name, _, key, target in cases
    ]


def stochastic_viterbi_module(E1, E2, K, N):
    """The adapter's drop-in for the write-up's StochasticViterbiSamples, holding the tables E1, E2."""
    from viterbi_numba.adapters.torch import StochasticViterbiSamples

    module = StochasticViterbiSamples(E1.shape[0], low_rank=E1.shape[1], beam_size=K, num_samples=N)
    with torch.no_grad():
        module.E1.weight.copy_(torch.from_numpy(E1))
        module.E2.weight.copy_(torch.from_numpy(E2))
    return module


def ours_training_step(emissions, module, weights):
    """N samples of stochastic Viterbi with beam_probs, then the backward pass of sum(beam_probs * weights)."""
    emissions = emissions.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    beam_probs = module._compute_grpo_samples(emissions)[0]
    (beam_probs * weights).sum().backward()
    return emissions.grad, module.E1.weight.grad, module.E2.weight.grad


def torch_training_step(emissions, E1, E2, K, weights):
    """The same with the write-up's algorithm in plain PyTorch and autograd."""
    leaves = [a.detach().requires_grad_() for a in (emissions, E1, E2)]
    beam_probs = tb.stochastic_viterbi(leaves[0], leaves[1], leaves[2], K, weights.shape[3])[0]
    (beam_probs * weights).sum().backward()
    return [a.grad for a in leaves]


def log_likelihood_step(emissions, targets, E1, E2, K):
    """log p(targets) and the gradients a training step needs, the emissions' as a dense (B, T, V) array."""
    result = vn.log_likelihood_grad(emissions, targets, E1, E2, K)
    grad_emissions = np.zeros_like(emissions)
    np.put_along_axis(grad_emissions, result.beam_tokens, result.grad_scores, axis=2)
    return result.log_likelihood, grad_emissions, result.grad_E1, result.grad_E2


def torch_log_likelihood_step(emissions, targets, E1, E2, K):
    leaves = [a.detach().requires_grad_() for a in (emissions, E1, E2)]
    log_likelihood = tb.log_likelihood(leaves[0], targets, leaves[1], leaves[2], K)
    log_likelihood.sum().backward()
    return log_likelihood.detach(), *(a.grad for a in leaves)


# --------------------------------------------------------------------------------------------------
# peak memory: each case in a fresh process (``--memory-probe CASE``), so one case's freed pages never
# hide another's; the peak is the resident-set high-water mark above the process after its inputs were
# built and everything was compiled / initialised on a tiny problem.
# --------------------------------------------------------------------------------------------------
MEMORY_CASES = {
    "gradients for the beam scores and tables: viterbi-numba": "ours-beam",
    "gradients for the beam scores and tables: torch autograd": "torch-beam",
    "gradients for the emissions (dense) and tables: viterbi-numba": "ours-dense",
    "gradients for the emissions (dense) and tables: torch autograd": "torch-dense",
    "training step, write-up's classes N=8 (beam_probs + backward): viterbi-numba": "ours-train",
    "training step, write-up's classes N=8 (beam_probs + backward): torch autograd": "torch-train",
}


def _rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def memory_probe(which):
    B, T, V, K, D = (WRITEUP_SIZE[x] for x in "BTVKD")
    emissions, E1, E2 = make_inputs(B, T, V, K, D)
    targets = np.random.default_rng(1).integers(0, V, (B, T))
    if which.endswith("-train"):
        weights = torch.from_numpy(np.random.default_rng(2).standard_normal((B, T, K, 8), dtype=np.float32))
        if which == "ours-train":
            module = stochastic_viterbi_module(E1, E2, K, 8)
            step = lambda em, tg: ours_training_step(torch.from_numpy(em), module, weights[:, : em.shape[1]])  # noqa: E731
        else:
            E1_t, E2_t = torch.from_numpy(E1), torch.from_numpy(E2)
            step = lambda em, tg: torch_training_step(torch.from_numpy(em), E1_t, E2_t, K, weights[:, : em.shape[1]])  # noqa: E731
    elif which == "ours-dense":
        step = lambda em, tg: log_likelihood_step(em, tg, E1, E2, K)  # noqa: E731
    elif which == "ours-beam":
        step = lambda em, tg: vn.log_likelihood_grad(em, tg, E1, E2, K)  # noqa: E731
    else:
        E1, E2 = torch.from_numpy(E1), torch.from_numpy(E2)

        def step(em, tg):
            em, tg = torch.from_numpy(em), torch.from_numpy(tg)
            if which == "torch-dense":
                return torch_log_likelihood_step(em, tg, E1, E2, K)
            leaves = [a.detach().requires_grad_() for a in (E1, E2)]
            beam_tokens = tb.forced_beam(em, tg, K)
            beam_scores = em.gather(2, beam_tokens).requires_grad_()
            tb.log_likelihood_beam(beam_scores, beam_tokens, tg, *leaves).sum().backward()
            return beam_scores.grad, leaves[0].grad, leaves[1].grad

    step(emissions[:1, :3, :], targets[:1, :3])  # compile / initialise
    before = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    step(emissions, targets)
    print(json.dumps(dict(peak_mb=_rss_mb("VmHWM") - before)))


def memory_cases(progress):
    import subprocess

    rows = []
    for name, which in MEMORY_CASES.items():
        progress(f"memory: {name}")
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", which], capture_output=True, text=True, check=True
        )
        rows.append(dict(case=name, peak_mb=json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]))
    return rows


def scaling_cases(repeats, quick, progress):
    """Sampler time (given the beam) over K, D, T and N around the write-up's size; torch where it is affordable."""
    base = dict(WRITEUP_SIZE, N=1)
    sweeps = {
        "K": [64, 128, 256] if quick else [64, 128, 256, 512, 1024],
        "D": [16, 32] if quick else [16, 32, 64, 128],
        "T": [25, 97] if quick else [25, 50, 97, 200],
        "N": [1, 8] if quick else [1, 2, 4, 8, 16],
    }
    rows = []
    with torch.no_grad():
        for axis, values in sweeps.items():
            for value in values:
                size = dict(base, **{axis: value})
                progress(f"scaling {axis}={value}")
                emissions, E1, E2 = make_inputs(
                    size["B"], size["T"], 2000 if axis != "K" else 4000, size["K"], size["D"]
                )
                beam = vn.topk_beam(emissions, size["K"])
                N = size["N"]
                ours = timed(
                    lambda: vn.stochastic_viterbi(beam.scores, beam.tokens, E1, E2, num_samples=N, seed=1), repeats
                )
                viterbi = timed(lambda: vn.viterbi_decode(beam.scores, beam.tokens, E1, E2), repeats)
                exact = timed(lambda: vn.crf_sample(beam.scores, beam.tokens, E1, E2, num_samples=N, seed=1), repeats)
                theirs = None
                if size["K"] * size["K"] * size["T"] * N <= 256 * 256 * 97 * 8:
                    beam_t = (torch.from_numpy(beam.scores), torch.from_numpy(beam.tokens))
                    E_t = (torch.from_numpy(E1), torch.from_numpy(E2))
                    theirs = timed(
                        lambda: tb.stochastic_viterbi_beam(*beam_t, *E_t, N), 1 if N * size["K"] >= 1024 else repeats
                    )
                rows.append(
                    dict(
                        axis=axis,
                        value=value,
                        size=size,
                        ours=ours,
                        viterbi=viterbi,
                        exact=exact,
                        torch=theirs,
                        speedup=None if theirs is None else theirs[0] / ours[0],
                    )
                )
    return rows


def fmt(t):
    return f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.1f}–{t[2] * 1e3:.1f})"


def plot_time_vs_k(scaling_rows, threads):
    """results/time_vs_k.png from the K sweep and the N sweep (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'viterbi-numba[bench]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, axis in zip(axes, ("K", "N")):
        sweep = [r for r in scaling_rows if r["axis"] == axis]
        x = [r["value"] for r in sweep]
        ax.plot(x, [r["ours"][0] * 1e3 for r in sweep], "o-", label="viterbi-numba stochastic Viterbi")
        ax.plot(x, [r["exact"][0] * 1e3 for r in sweep], "d-", label="viterbi-numba exact sampler")
        ax.plot(x, [r["viterbi"][0] * 1e3 for r in sweep], "s-", label="viterbi-numba Viterbi")
        with_torch = [r for r in sweep if r["torch"] is not None]
        ax.plot(
            [r["value"] for r in with_torch],
            [r["torch"][0] * 1e3 for r in with_torch],
            "^-",
            label="PyTorch stochastic Viterbi",
        )
        fixed = "N=1" if axis == "K" else "K=256"
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="beam size K" if axis == "K" else "samples per sequence N",
            ylabel="time (ms)",
            title=f"B=8, T=97, D=32, {fixed}, float32; {threads} threads",
        )
        ax.set_xticks(x, [str(v) for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "time_vs_k.png", dpi=110)


def write_report(info, writeup_rows, memory_rows, scaling_rows):
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "results.json", "w") as f:
        json.dump(
            dict(machine=info, writeup_size=WRITEUP_SIZE, cases=writeup_rows, memory=memory_rows, scaling=scaling_rows),
            f,
            indent=1,
        )
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads for both numba and torch; "
        f"numpy {info['numpy']}, numba {info['numba']}, torch {info['torch']}.",
        f"Write-up size B={WRITEUP_SIZE['B']}, T={WRITEUP_SIZE['T']}, V={WRITEUP_SIZE['V']}, K={WRITEUP_SIZE['K']}, "
        f"D={WRITEUP_SIZE['D']}, float32. Times in ms: median (min–max).",
        "",
        "| case | viterbi-numba | baseline | baseline time | speed-up | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in writeup_rows:
        target = f"≥ {r['target']:g}×" if r["target"] >= 1 else f"≥ {r['target']:.2f}× (no slower than 1.5×)"
        met = "met" if r["speedup"] >= r["target"] else "not met"
        lines.append(
            f"| {r['case']} | {fmt(r['ours'])} | {r['baseline_name']} | {fmt(r['baseline'])} | "
            f"{r['speedup']:.1f}× | {target}: {met} |"
        )
    if memory_rows:
        lines += [
            "",
            "Peak memory of one call at the write-up's size, each in a fresh process: resident-set high-water "
            "mark above the process with its inputs built and its code compiled. The dense emissions gradient "
            "(B, T, V) is itself 93 MB; the table gradients (V, D) 7.7 MB.",
            "",
            "| case | peak MB | viterbi-numba / torch | target ≤ 0.1 |",
            "|---|---|---|---|",
        ]
        for ours, theirs in zip(memory_rows[0::2], memory_rows[1::2]):
            ratio = ours["peak_mb"] / theirs["peak_mb"]
            lines.append(
                f"| {ours['case']} | {ours['peak_mb']:.0f} | {ratio:.3f} | {'met' if ratio <= 0.1 else 'not met'} |"
            )
            lines.append(f"| {theirs['case']} | {theirs['peak_mb']:.0f} | | |")
    lines += [
        "",
        "Scaling (given the beam; B=8 and the write-up's size but for the varied axis; V=4000 for the K sweep, "
        "2000 otherwise): stochastic Viterbi, Viterbi and exact sampler time, ms.",
        "",
        "| varied | K | D | T | N | stochastic Viterbi | Viterbi | exact sampler | torch stochastic Viterbi | speed-up (stochastic Viterbi) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in scaling_rows:
        s = r["size"]
        torch_t = "—" if r["torch"] is None else fmt(r["torch"])
        speed = "—" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        lines.append(
            f"| {r['axis']} | {s['K']} | {s['D']} | {s['T']} | {s['N']} | {fmt(r['ours'])} | {fmt(r['viterbi'])} | "
            f"{fmt(r['exact'])} | {torch_t} | {speed} |"
        )
    (RESULTS / "results.md").write_text("\n".join(lines) + "\n")
    plot_time_vs_k(scaling_rows, info["threads"])
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--quick", action="store_true", help="3 repeats and a smaller scaling sweep")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from results/results.json")
    parser.add_argument("--memory-probe", choices=sorted(set(MEMORY_CASES.values())), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    if args.replot:
        saved = json.loads((RESULTS / "results.json").read_text())
        plot_time_vs_k(saved["scaling"], saved["machine"]["threads"])
        return
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(numba.get_num_threads())
    try:
        from tqdm import tqdm

        bar = tqdm(total=12 + len(MEMORY_CASES) + (9 if args.quick else 18), unit="case")
    except ImportError:
        bar = None

    def progress(name):
        if bar is None:
            print(name, flush=True)
        else:
            bar.set_description(name)
            bar.update(1)

    info = machine()
    writeup_rows = writeup_size_cases(repeats, progress)
    memory_rows = memory_cases(progress)
    scaling_rows = scaling_cases(repeats, args.quick, progress)
    if bar is not None:
        bar.close()
    print(write_report(info, writeup_rows, memory_rows, scaling_rows))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
