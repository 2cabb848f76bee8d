"""The README's Python example must run as written (random weights, CPU)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md lost its '## Python API' example"
    monkeypatch.chdir(tmp_path)  # it saves "my-model" in the current directory
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning is expected here
        exec(compile(block.group(1), str(README), "exec"), namespace)
    assert tuple(namespace["logits"].shape) == (2, 4, 97, 211)
    assert (tmp_path / "my-model").is_dir()
    from torch import nn

    from biosam2.model.adapters import BottleneckAdapter

    reloaded = [m.spatial for m in namespace["model"].modules() if isinstance(m, BottleneckAdapter)]
    assert reloaded and all(type(s) is nn.Conv2d for s in reloaded)  # saved fused, reloaded fused
