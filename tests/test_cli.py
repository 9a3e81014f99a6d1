"""The console script: demo on a small problem, from files, and its errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from viterbi_numba.cli import main

SMALL = ["--batch", "2", "--length", "6", "--vocab", "50", "--rank", "4", "--beam", "8", "--samples", "3"]


def test_demo_prints_a_summary(capsys):
    main(["demo", *SMALL])
    out = capsys.readouterr().out
    assert "emissions (B, T, V) = (2, 6, 50)" in out
    assert "beam_probs (2, 6, 8, 3)" in out and "tokens (2, 6, 3)" in out
    assert "Viterbi (the best path)" in out and "stochastic Viterbi 2 (the write-up's sampler)" in out
    assert "exact CRF sample 2 (log p" in out and "crf_sample" in out and "stochastic_viterbi" in out
    assert "An exact sample's log p is far below 0" in out


def test_demo_from_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "e.npy", rng.standard_normal((1, 4, 20)).astype(np.float32))
    np.savez(tmp_path / "t.npz", E1=rng.standard_normal((20, 3)), E2=rng.standard_normal((20, 3)))
    main(
        [
            "demo",
            "--emissions",
            str(tmp_path / "e.npy"),
            "--tables",
            str(tmp_path / "t.npz"),
            "--beam",
            "5",
            "--samples",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "emissions (B, T, V) = (1, 4, 20)" in out and "E1, E2 (V, D) = (20, 3)" in out


def test_demo_reports_bad_input(tmp_path):
    np.savez(tmp_path / "t.npz", E1=np.zeros((50, 4)))
    proc = subprocess.run(
        [sys.executable, "-m", "viterbi_numba", "demo", *SMALL, "--tables", str(tmp_path / "t.npz")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "expected an .npz with arrays E1 and E2" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "viterbi_numba", "demo", *SMALL, "--beam", "51"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "k must be at most V = 50" in proc.stderr


def test_bench_names_what_is_missing(monkeypatch):
    import importlib.util

    import pytest

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit, match=r"bench needs torch.*\[bench\]"):
        main(["bench", "--quick"])


def test_bench_gpu_says_when_there_is_no_gpu():
    import pytest

    pytest.importorskip("torch")
    # a process of its own: the benchmark script puts benchmarks/ on sys.path once it runs
    proc = subprocess.run(
        [sys.executable, "-m", "viterbi_numba", "bench", "--gpu", "--quick"],
        capture_output=True,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def _files(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "e.npy", rng.standard_normal((1, 4, 20)).astype(np.float32))
    np.savez(tmp_path / "t.npz", E1=rng.standard_normal((20, 3)), E2=rng.standard_normal((20, 3)))
    np.savez(tmp_path / "t19.npz", E1=rng.standard_normal((19, 3)), E2=rng.standard_normal((19, 3)))
    np.savez(tmp_path / "t_no_E2.npz", E1=rng.standard_normal((20, 3)))
    np.save(tmp_path / "ints.npy", np.zeros((1, 4, 20), np.int64))
    (tmp_path / "notes.txt").write_text("not an array\n")
    return tmp_path


# Bad options and files: one row per case, (arguments, what stderr says). Each is one line, no traceback.
BAD_DEMO = [
    (["--emissions", "{d}/missing.npy"], "--emissions: no such file"),
    (["--emissions", "{d}/t.npz"], "--emissions: expected a .npy file with one (B, T, V) array, got an .npz archive"),
    (["--emissions", "{d}/notes.txt"], "--emissions: {d}/notes.txt is not a NumPy .npy/.npz file"),
    (["--emissions", "{d}/ints.npy"], "--emissions: expected a (B, T, V) float array, got int64"),
    (
        ["--emissions", "{d}/e.npy", "--tables", "{d}/e.npy"],
        "--tables: expected an .npz with arrays E1 and E2, got one array",
    ),
    (
        ["--emissions", "{d}/e.npy", "--tables", "{d}/t_no_E2.npz"],
        "--tables: expected an .npz with arrays E1 and E2, found ['E1']",
    ),
    (["--emissions", "{d}/e.npy", "--tables", "{d}/t19.npz"], "--tables: E1 and E2 must both be (V, D) with V = 20"),
    (["--emissions", "{d}/e.npy", "--tables", "{d}/missing.npz"], "--tables: no such file"),
    (["--length", "0"], "argument --length: must be at least 1, got 0"),
    (["--beam", "x"], "argument --beam: expected an integer, got 'x'"),
    (["--temperature", "0"], "temperature must be finite and > 0"),
    (["--beam", "51", "--vocab", "50"], "k must be at most V = 50"),
]


@pytest.mark.parametrize("arguments, message", BAD_DEMO, ids=[" ".join(row[0]) for row in BAD_DEMO])
def test_demo_bad_options_and_files_give_one_line(tmp_path, arguments, message):
    d = _files(tmp_path)
    small = ["--batch", "1", "--length", "3", "--vocab", "20", "--rank", "2", "--beam", "4", "--samples", "2"]
    arguments = [a.format(d=d) for a in arguments]
    proc = subprocess.run(
        [sys.executable, "-m", "viterbi_numba", "demo", *small, *arguments], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert message.format(d=d) in proc.stderr.strip().splitlines()[-1], proc.stderr  # after argparse's usage


def test_demo_with_no_sequences(capsys):
    main(["demo", "--batch", "0", "--length", "3", "--vocab", "20", "--rank", "2", "--beam", "4", "--samples", "2"])
    assert "B = 0: no sequences" in capsys.readouterr().out


def test_version_and_help():
    from viterbi_numba import __version__

    proc = subprocess.run([sys.executable, "-m", "viterbi_numba", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"viterbi-numba {__version__}"
    import argparse

    from viterbi_numba.cli import build_parser

    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    for name, parser in commands.choices.items():
        options = [action for action in parser._actions if action.option_strings]
        assert options and all(action.help for action in options), name  # every option has help text


def test_bench_repeats_match_the_readme():
    from pathlib import Path

    from viterbi_numba.cli import BENCH_REPEATS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"python benchmarks/run.py --repeats {BENCH_REPEATS}`" in readme


def test_compile_compiles_what_is_not_cached_and_says_so(monkeypatch, capsys):
    """``compile`` (and a first demo) hands the operations not cached yet to cpu.warmup.precompile, in as
    many processes as asked (at most one per operation), and says what it is doing."""
    from viterbi_numba.cpu import warmup

    calls = []
    monkeypatch.setattr(warmup, "cached", lambda name, dtype: name != "crf_sample" or np.dtype(dtype) == np.float32)
    monkeypatch.setattr(warmup, "precompile", lambda *args, **kwargs: calls.append(args) or list(args[0]))
    main(["compile", "--dtype", "float32", "float64", "--processes", "3"])
    out = capsys.readouterr().out
    assert calls == [(["crf_sample"], np.dtype(np.float64), 1)]
    assert "Compiling the CPU kernels for float64 (crf_sample) in 1 process, once per machine" in out
    assert out.strip().endswith("the kernels are cached")
    monkeypatch.setattr(warmup, "precompile", lambda *args, **kwargs: [])  # a helper failed: nothing cached
    with pytest.raises(SystemExit, match="some kernels could not be cached"):
        main(["compile", "--dtype", "float64"])
