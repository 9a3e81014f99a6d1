"""A GRPO step under DistributedDataParallel (2 CPU processes, gloo): the gradients are the same on
both ranks and equal to one process's gradients on the whole batch."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_single_process(tmp_path):
    port = str(_free_port())
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--rank",
                str(r),
                "--world",
                "2",
                "--port",
                port,
                "--out",
                str(tmp_path / f"rank{r}.pt"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for proc in ranks:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    alone = subprocess.run(
        [sys.executable, str(WORKER), "--out", str(tmp_path / "alone.pt")], capture_output=True, text=True, timeout=300
    )
    assert alone.returncode == 0, alone.stderr
    grads = [torch.load(tmp_path / name) for name in ("rank0.pt", "rank1.pt", "alone.pt")]
    assert set(grads[0]) == {"encoder.weight", "encoder.bias", "crf.E1.weight", "crf.E2.weight"}
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
        torch.testing.assert_close(grads[0][name], grads[2][name], rtol=1e-10, atol=1e-12)
        assert grads[2][name].abs().sum() > 0, name
