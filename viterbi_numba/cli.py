"""``viterbi-numba`` command line: ``demo`` runs the main job, ``bench`` the benchmarks.

viterbi-numba demo                      # write-up-size problem from a fixed seed
viterbi-numba demo --emissions e.npy --tables tables.npz --samples 4
viterbi-numba compile [--dtype float32 float64]   # compile the CPU kernels now, in parallel
viterbi-numba bench [--quick] [--gpu]   # needs a source checkout (benchmarks/) and the [bench] extra

Bad options and files give one line naming the option, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import runpy
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import __version__, crf_sample, sequence_score, stochastic_viterbi, topk_beam, viterbi_decode
from ._validate import compute_dtype

BENCH_REPEATS = 8  # the README's benchmark table was measured with this many timed runs per case


def _load(path: str, option: str) -> Any:
    """np.load of ``path`` (no pickles), or SystemExit naming ``option``."""
    if not Path(path).is_file():
        raise SystemExit(f"{option}: no such file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise SystemExit(f"{option}: {path} is not a NumPy .npy/.npz file ({error})") from None


def _load_problem(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Emissions (B, T, V) and tables E1, E2 (V, D): from files where given, else from ``args.seed``."""
    rng = np.random.default_rng(args.seed)
    if args.emissions:
        emissions = _load(args.emissions, "--emissions")
        if not isinstance(emissions, np.ndarray):
            emissions.close()
            raise SystemExit("--emissions: expected a .npy file with one (B, T, V) array, got an .npz archive")
        if emissions.ndim != 3 or not np.issubdtype(emissions.dtype, np.floating):
            raise SystemExit(
                f"--emissions: expected a (B, T, V) float array, got {emissions.dtype} of shape {emissions.shape}"
            )
    else:
        emissions = rng.standard_normal((args.batch, args.length, args.vocab), dtype=np.float32)
    V = emissions.shape[2]
    if args.tables:
        tables = _load(args.tables, "--tables")
        if isinstance(tables, np.ndarray):
            raise SystemExit(f"--tables: expected an .npz with arrays E1 and E2, got one array of shape {tables.shape}")
        with tables:
            if "E1" not in tables or "E2" not in tables:
                raise SystemExit(f"--tables: expected an .npz with arrays E1 and E2, found {sorted(tables)}")
            E1, E2 = tables["E1"], tables["E2"]
        if E1.ndim != 2 or E1.shape != E2.shape or E1.shape[0] != V:
            raise SystemExit(
                f"--tables: E1 and E2 must both be (V, D) with V = {V} (the emissions' last axis), "
                f"got {E1.shape} and {E2.shape}"
            )
    else:
        E1 = rng.standard_normal((V, args.rank), dtype=np.float32) * np.float32(0.1)
        E2 = rng.standard_normal((V, args.rank), dtype=np.float32) * np.float32(0.1)
    return emissions, E1, E2


def _compile(operations: Sequence[str], dtype: Any, processes: Optional[int] = None) -> bool:
    """Compile the kernels of ``operations`` for ``dtype`` that are not cached yet, in parallel processes,
    saying so (``cpu.warmup.precompile``); whether all are cached now."""
    from .cpu.warmup import cached, precompile

    todo = [name for name in operations if not cached(name, dtype)]
    if not todo:
        return True
    workers = min(len(todo), processes or os.cpu_count() or 1)
    print(
        f"Compiling the CPU kernels for {np.dtype(dtype)} ({', '.join(todo)}) in {workers} "
        f"process{'es' if workers > 1 else ''}, once per machine: numba caches them on disk ...",
        flush=True,
    )
    start = time.perf_counter()
    done = precompile(todo, dtype, workers, progress=lambda line: print(f"  {line}", flush=True))
    print(f"compiled in {time.perf_counter() - start:.0f} s\n", flush=True)
    return len(done) == len(todo)


def compile_kernels(args: argparse.Namespace) -> None:
    from .cpu.warmup import KERNELS

    if not all([_compile(list(KERNELS), np.dtype(dtype), args.processes) for dtype in args.dtype]):
        raise SystemExit("viterbi-numba compile: some kernels could not be cached (see above)")
    print("the kernels are cached")


def demo(args: argparse.Namespace) -> None:
    emissions, E1, E2 = _load_problem(args)
    B, T, V = emissions.shape
    print(
        f"emissions (B, T, V) = {emissions.shape} {emissions.dtype}; E1, E2 (V, D) = {E1.shape}; "
        f"beam K = {args.beam}; samples N = {args.samples}; temperature {args.temperature}"
    )
    from .cpu.warmup import KERNELS  # the demo's operations

    _compile(list(KERNELS), compute_dtype(emissions.dtype, E1.dtype, E2.dtype))
    timings = {}

    def run(name: str, fn: Callable[[], Any]) -> Any:
        """fn() twice: the first call includes compiling (or loading the kernel cache), the second not."""
        print(f"  {name} ...", end="", flush=True)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - start)
        print(f" {seconds[0]:.1f} s", flush=True)
        timings[name] = seconds
        return out

    beam = run("topk_beam", lambda: topk_beam(emissions, args.beam))
    best = run("viterbi_decode", lambda: viterbi_decode(beam.scores, beam.tokens, E1, E2))
    samples = run(
        "stochastic_viterbi",
        lambda: stochastic_viterbi(
            beam.scores, beam.tokens, E1, E2, num_samples=args.samples, temperature=args.temperature, seed=args.seed
        ),
    )
    exact = run(
        "crf_sample",
        lambda: crf_sample(
            beam.scores, beam.tokens, E1, E2, num_samples=args.samples, temperature=args.temperature, seed=args.seed
        ),
    )
    if B == 0:
        print("\nB = 0: no sequences, so nothing to show")
        return
    exact_scores = sequence_score(beam.scores, beam.tokens, E1, E2, exact.beam_idx)
    shown = min(T, args.show)
    print(f"\nbeam: scores {beam.scores.shape}, tokens {beam.tokens.shape}")
    print(
        f"stochastic Viterbi: beam_probs {samples.beam_probs.shape}, beam_idx {samples.beam_idx.shape}, "
        f"tokens {samples.tokens.shape}; exact CRF samples: tokens {exact.tokens.shape}, log p {exact.log_prob.shape}"
    )
    print(f"\nsequence 0, first {shown} tokens; S(y) = the path's score (emissions plus transitions)")
    print(f"  {'Viterbi (the best path)':<40} S(y) {best.score[0]:10.3f}: {best.tokens[0, :shown].tolist()}")
    for n in range(min(args.samples, 3)):
        label = f"stochastic Viterbi {n} (the write-up's sampler)"
        print(f"  {label:<40} S(y) {samples.score[0, n]:10.3f}: {samples.tokens[0, :shown, n].tolist()}")
    for n in range(min(args.samples, 3)):
        label = f"exact CRF sample {n} (log p {exact.log_prob[0, n]:.1f})"
        print(f"  {label:<40} S(y) {exact_scores[0, n]:10.3f}: {exact.tokens[0, :shown, n].tolist()}")
    print(
        f"\nAn exact sample's log p is far below 0 at this size: p(y) spreads over K^T = {args.beam}^{T} beam paths,\n"
        "so even a likely path has a tiny probability; log p = S(y) / temperature - log Z."
    )
    print("\nwall time          first call (compile or cache load)   second call")
    for name, (first, second) in timings.items():
        print(f"  {name:<20} {first * 1e3:12.1f} ms {second * 1e3:26.1f} ms")


def bench(args: argparse.Namespace) -> None:
    name = "gpu.py" if args.gpu else "run.py"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / name
    if not script.exists():
        raise SystemExit(
            f"bench runs benchmarks/{name} from a source checkout of viterbi-numba; none found at {script.parent}"
        )
    needed = ("torch",) if args.gpu else ("torch", "matplotlib", "tqdm")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"bench needs {', '.join(missing)}: pip install -e '.[bench]' (with torch==2.13.0 for the CPU build)"
        )
    sys.argv = [str(script)] + (["--quick"] if args.quick else []) + ["--repeats", str(args.repeats)]
    runpy.run_path(str(script), run_name="__main__")


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser, with its ``demo`` and ``bench`` subcommands."""
    parser = argparse.ArgumentParser(prog="viterbi-numba", description="Decode and sample the low-rank beam CRF.")
    parser.add_argument("--version", action="version", version=f"viterbi-numba {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="decode and sample a write-up-size problem and print a summary")
    p.add_argument("--emissions", help=".npy file with (B, T, V) emissions (default: random, from --seed)")
    p.add_argument("--tables", help=".npz file with E1 and E2 (V, D) (default: random, from --seed)")
    p.add_argument("--batch", type=_at_least(0), default=8, help="B for random emissions (default 8)")
    p.add_argument("--length", type=_at_least(1), default=97, help="T for random emissions (default 97)")
    p.add_argument("--vocab", type=_at_least(1), default=30000, help="V for random emissions (default 30000)")
    p.add_argument("--rank", type=_at_least(1), default=32, help="D for random tables (default 32)")
    p.add_argument("--beam", type=_at_least(1), default=256, help="beam size K (default 256)")
    p.add_argument("--samples", type=_at_least(1), default=8, help="samples N per sequence (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of both samplers (> 0, default 1)")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random problem and of the samplers")
    p.add_argument("--show", type=_at_least(0), default=12, help="tokens shown per sequence (default 12)")
    p.set_defaults(func=demo)
    p = commands.add_parser(
        "compile",
        help="compile the demo's CPU kernels now (top-K, Viterbi, both samplers, S(y)), in parallel processes",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=["float32", "float64"],
        default=["float32"],
        help="compute dtypes (default float32)",
    )
    p.add_argument("--processes", type=_at_least(1), help="processes compiling at once (default: one per core)")
    p.set_defaults(func=compile_kernels)
    p = commands.add_parser("bench", help="run benchmarks/run.py (source checkout, [bench] extra)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and a smaller scaling sweep")
    p.add_argument("--gpu", action="store_true", help="benchmarks/gpu.py: the CUDA kernels against PyTorch on a GPU")
    p.add_argument(
        "--repeats",
        type=_at_least(1),
        default=BENCH_REPEATS,
        help=f"timed runs per case (default {BENCH_REPEATS}, as in the README's table)",
    )
    p.set_defaults(func=bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"viterbi-numba {args.command}: {error}") from None


if __name__ == "__main__":
    main()
