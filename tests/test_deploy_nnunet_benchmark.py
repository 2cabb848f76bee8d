"""The nnU-Net rows of benchmarks/deploy.py: nnU-Net's planned 2-D network and its default predictor
run beside biosam2 in the same interleaved rounds (a tiny dataset, so that nnU-Net plans a small network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from biosam2.data.synthetic import write_synthetic_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "deploy.py"


def test_deploy_benchmark_times_nnunet_beside_biosam2(tmp_path):
    pytest.importorskip("nnunetv2", reason="the nnU-Net rows need nnU-Net v2: pip install 'biosam2[nnunet]'")
    pytest.importorskip("onnxruntime", reason="the benchmark needs onnxruntime: pip install 'biosam2[deploy]'")
    data = write_synthetic_dataset(tmp_path / "data", train=4, val=1, test=1, min_side=64, max_side=64)
    out = tmp_path / "deploy.md"
    subprocess.run([sys.executable, str(SCRIPT), "--nnunet-data", str(data), "--sizes", "64", "--rounds", "2",
                    "--no-memory", "--threads", "1", "--markdown", str(out)], check=True, capture_output=True, timeout=300)
    text = out.read_text()
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| 64 |")}
    assert list(rows) == ["pytorch", "ort", "ort-basic", "nnunet"]
    assert rows["nnunet"].split("|")[5].strip() == "1.00x"  # its own time over itself: the column is nnU-Net's
    whole = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith(("| biosam2 ", "| nnU-Net "))]
    assert whole == ["biosam2 pytorch", "biosam2 ort", "nnU-Net predictor"]
    # nnU-Net's default predictor: one 64x64 tile, mirrored along both axes
    assert "syn_005_0000.png (64x64)" in text and "runs its network 4 times on it" in text
