"""``biosam2 selfcheck``: the real checks pass on the CPU, a missing GPU is one clear FAIL line, and a
failed check is reported without stopping the checks that do not depend on it."""

from __future__ import annotations

import json
import re

import pytest
import torch

import biosam2.data.synthetic
from biosam2.cli import main
from biosam2.selfcheck import CHECKS

LINE = re.compile(r"^(PASS|FAIL) ([a-z]+): (.+) \((\d+\.\d) s\)$")


def _check_lines(out: str) -> dict[str, tuple[str, str]]:
    found = {}
    for line in out.splitlines():
        match = LINE.match(line)
        if match:
            found[match[2]] = (match[1], match[3])
    return found


def test_selfcheck_on_the_cpu_passes_every_check(tmp_path, capsys):
    out = tmp_path / "selfcheck"
    assert main(["selfcheck", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    lines = _check_lines(printed.out)
    assert list(lines) == list(CHECKS)  # every check, in order, one line each
    assert all(verdict == "PASS" for verdict, _ in lines.values()), printed.out
    assert "bf16-mixed" in lines["train"][1] and "epochs_trained=2" in lines["resume"][1]
    fraction = float(re.search(r": (\d\.\d+) of \d+ pixels equal", lines["agreement"][1])[1])
    assert 0.99 <= fraction <= 1.0
    assert printed.out.splitlines()[-1].startswith("selfcheck all passed: 7/7 checks passed on cpu")
    assert "Traceback" not in printed.err and "randomly initialised" not in printed.err
    # What the lines claim is on disk.
    assert (out / "run" / "model" / "biosam2.json").exists()
    assert len(list((out / "predictions-cpu").glob("*.png"))) == len(list((out / "data" / "imagesTs").glob("*.png")))
    assert len(list((out / "predictions-cpu-fp32").glob("*.png"))) == len(list((out / "predictions-cpu").glob("*.png")))
    assert {r["config"] for r in json.loads((out / "efficiency" / "efficiency.json").read_text())["rows"]} == {
        "biosam2-lw-fused", "biosam2-hp"}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_selfcheck_without_a_gpu_fails_with_one_clear_line(tmp_path, capsys):
    assert main(["selfcheck", "--device", "cuda", "--out", str(tmp_path / "never")]) == 1
    printed = capsys.readouterr()
    lines = _check_lines(printed.out)
    assert list(lines) == ["environment"] and lines["environment"][0] == "FAIL"
    assert "torch.cuda.is_available() is False" in lines["environment"][1] and "--device cpu" in lines["environment"][1]
    assert "Traceback" not in printed.out + printed.err
    assert not (tmp_path / "never").exists()  # nothing is written when nothing can run


def test_a_failed_check_skips_its_dependants_and_the_rest_still_run(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(biosam2.data.synthetic, "write_synthetic_dataset", broken)
    assert main(["selfcheck", "--device", "cpu", "--quick", "--out", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr()
    lines = _check_lines(printed.out)
    assert list(lines) == list(CHECKS)
    assert lines["train"] == ("FAIL", "OSError: disk on fire")
    for name in ("resume", "artifact", "predict", "agreement"):
        assert lines[name][0] == "FAIL" and lines[name][1].startswith("not run: needs"), lines[name]
    assert lines["environment"][0] == "PASS" and lines["efficiency"][0] == "PASS"  # independent of training
    assert "selfcheck FAILED: train, resume, artifact, predict, agreement:" in printed.out.splitlines()[-1]
