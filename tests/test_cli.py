"""The console script: demo on a small problem, from files, and its errors."""

import os
import subprocess
import sys

import numpy as np

from viterbi_numba.cli import main

SMALL = ["--batch", "2", "--length", "6", "--vocab", "50", "--rank", "4", "--beam", "8", "--samples", "3"]


def test_demo_prints_a_summary(capsys):
    main(["demo", *SMALL])
    out = capsys.readouterr().out
    assert "emissions (B, T, V) = (2, 6, 50)" in out
    assert "beam_probs (2, 6, 8, 3)" in out and "tokens (2, 6, 3)" in out
    assert "Viterbi" in out and "stochastic Viterbi 2" in out and "stochastic_viterbi" in out
    assert "exact sample 2  (log p" in out and "crf_sample" in out


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
