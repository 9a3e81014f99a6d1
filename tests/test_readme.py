"""The README's code blocks run as written."""

import re
from pathlib import Path

import pytest

_README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
_BLOCKS = re.findall(r"```python\n(.*?)```", _README, re.S)


def _run(code):
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_api_tour_runs():
    namespace = _run(_BLOCKS[0])
    assert namespace["grpo"].beam_probs.shape == (8, 97, 256, 8)
    assert (namespace["forced"].tokens == namespace["targets"][:, :, None]).any(axis=2).all()
    assert namespace["draws"].log_prob.shape == (8, 8) and namespace["step"].grad_E1.shape == (30000, 32)


def test_pytorch_block_runs():
    pytest.importorskip("torch")
    (block,) = [b for b in _BLOCKS if "adapters.torch" in b]
    namespace = _run(block)
    assert namespace["emissions"].grad.shape == (8, 97, 30000)
    assert namespace["log_prob"].shape == (8, 8) and namespace["ll"].shape == (8,)
