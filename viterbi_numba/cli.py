"""``viterbi-numba`` command line: ``demo`` runs the main job, ``bench`` the benchmarks.

viterbi-numba demo                      # write-up-size problem from a fixed seed
viterbi-numba demo --emissions e.npy --tables tables.npz --samples 4
viterbi-numba bench [--quick] [--gpu]   # needs a source checkout (benchmarks/) and the [bench] extra
"""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import crf_sample, stochastic_viterbi, topk_beam, viterbi_decode


def _load_problem(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Emissions (B, T, V) and tables E1, E2 (V, D): from files where given, else from ``args.seed``."""
    rng = np.random.default_rng(args.seed)
    if args.emissions:
        emissions = np.load(args.emissions)
        if emissions.ndim != 3:
            raise SystemExit(f"--emissions: expected a (B, T, V) array, got shape {emissions.shape}")
    else:
        emissions = rng.standard_normal((args.batch, args.length, args.vocab), dtype=np.float32)
    V = emissions.shape[2]
    if args.tables:
        with np.load(args.tables) as tables:
            if "E1" not in tables or "E2" not in tables:
                raise SystemExit(f"--tables: expected an .npz with arrays E1 and E2, found {sorted(tables)}")
            E1, E2 = tables["E1"], tables["E2"]
    else:
        E1 = rng.standard_normal((V, args.rank), dtype=np.float32) * np.float32(0.1)
        E2 = rng.standard_normal((V, args.rank), dtype=np.float32) * np.float32(0.1)
    return emissions, E1, E2


def demo(args: argparse.Namespace) -> None:
    emissions, E1, E2 = _load_problem(args)
    B, T, V = emissions.shape
    print(
        f"emissions (B, T, V) = {emissions.shape} {emissions.dtype}; E1, E2 (V, D) = {E1.shape}; "
        f"beam K = {args.beam}; samples N = {args.samples}; temperature {args.temperature}"
    )
    timings = {}

    def run(name: str, fn: Callable[[], Any]) -> Any:
        """fn() twice: the first call includes compiling (or loading the kernel cache), the second not."""
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - start)
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
    shown = min(T, args.show)
    print(f"\nbeam: scores {beam.scores.shape}, tokens {beam.tokens.shape}")
    print(
        f"samples: beam_probs {samples.beam_probs.shape}, beam_idx {samples.beam_idx.shape}, "
        f"tokens {samples.tokens.shape}"
    )
    print(f"\nsequence 0, first {shown} tokens")
    print(f"  Viterbi         (score {best.score[0]:9.3f}): {best.tokens[0, :shown].tolist()}")
    for n in range(min(args.samples, 3)):
        print(f"  stochastic Viterbi {n}  (score {samples.score[0, n]:9.3f}): {samples.tokens[0, :shown, n].tolist()}")
    for n in range(min(args.samples, 3)):
        print(f"  exact sample {n}  (log p {exact.log_prob[0, n]:9.3f}): {exact.tokens[0, :shown, n].tolist()}")
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="viterbi-numba", description="Decode and sample the low-rank beam CRF.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="decode and sample a write-up-size problem and print a summary")
    p.add_argument("--emissions", help=".npy file with (B, T, V) emissions (default: random, from --seed)")
    p.add_argument("--tables", help=".npz file with E1 and E2 (V, D) (default: random, from --seed)")
    p.add_argument("--batch", type=int, default=8, help="B for random emissions (default 8)")
    p.add_argument("--length", type=int, default=97, help="T for random emissions (default 97)")
    p.add_argument("--vocab", type=int, default=30000, help="V for random emissions (default 30000)")
    p.add_argument("--rank", type=int, default=32, help="D for random tables (default 32)")
    p.add_argument("--beam", type=int, default=256, help="beam size K (default 256)")
    p.add_argument("--samples", type=int, default=8, help="samples N per sequence (default 8)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the random problem and of the sampler")
    p.add_argument("--show", type=int, default=12, help="tokens shown per sequence (default 12)")
    p.set_defaults(func=demo)
    p = commands.add_parser("bench", help="run benchmarks/run.py (source checkout, [bench] extra)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gpu", action="store_true", help="benchmarks/gpu.py: the CUDA kernels against PyTorch on a GPU")
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"viterbi-numba {args.command}: {error}") from None


if __name__ == "__main__":
    main()
