"""The README's API tour runs as written."""

import re
from pathlib import Path


def test_api_tour_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["grpo"].beam_probs.shape == (8, 97, 256, 8)
    assert (namespace["forced"].tokens == namespace["targets"][:, :, None]).any(axis=2).all()
