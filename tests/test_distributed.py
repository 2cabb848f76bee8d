"""Multi-process training through the command line, for real: two processes on the CPU (gloo).

Lightning's DDP launcher re-runs ``biosam2 train ...`` for rank 1; torchrun starts both ranks at once.
Either way only rank 0 writes the run directory, every rank trains on its own shard, and validation
sums one confusion matrix over both ranks' cases.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import biosam2
from biosam2.data.cases import load_case
from biosam2.data.dataset_format import load_dataset_spec
from biosam2.data.normalization import Normalization
from biosam2.data.synthetic import write_synthetic_dataset
from biosam2.evaluation.metrics import iou_from_confusion
from biosam2.inference.predictor import Predictor

TRAIN_IMAGES, BATCH = 8, 2
# HP: no BatchNorm, so every rank validates exactly the weights that rank 0 saves.
OPTIONS = ["--weights", "random", "--adapter", "hp", "--batch-size", str(BATCH), "--patch-size", "64", "--lr", "1e-3",
           "--num-workers", "0", "--no-progress", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 3 validation cases: 2 on rank 0 and 1 on rank 1, so averaging per-rank mIoU would differ from the
    # mIoU of the summed confusion matrix.
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train=TRAIN_IMAGES, val=3, test=2, max_side=80)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def biosam2_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "biosam2", *args]


def global_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def logged_val_miou(run_dir: Path) -> list[float]:
    values = []
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with open(path) as stream:
            values += [float(row["val/mIoU"]) for row in csv.DictReader(stream) if row.get("val/mIoU")]
    return values


def val_confusions(run_dir: Path, dataset: Path) -> list[torch.Tensor]:
    """Confusion matrix of last.ckpt's model on each validation case, computed in this one process."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model = biosam2.build_model("tiny", weights="random", num_classes=4, adapter="hp")
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}, strict=False)
    spec = load_dataset_spec(dataset)
    val_ids = json.loads((run_dir / "run.json").read_text())["split"]["val"]
    cases = {c.case_id: c for c in spec.list_cases("train")}
    predictor = Predictor(model, batch_size=BATCH, device="cpu", precision="32")
    confusions = []
    for case_id in val_ids:
        case = load_case(spec, cases[case_id], Normalization("uint8"))
        labels, _ = predictor.predict(case.image)
        index = 4 * case.label.astype(np.int64).ravel() + labels.astype(np.int64).ravel()
        confusions.append(torch.bincount(torch.from_numpy(index), minlength=16).reshape(4, 4))
    return confusions


def miou(confusion: torch.Tensor) -> float:
    return float(torch.nanmean(iou_from_confusion(confusion)))


def test_ddp_from_the_cli_fresh_resume_predict(dataset, tmp_path):
    run_dir = tmp_path / "run"
    fresh = run(biosam2_command("train", str(dataset), "--out", str(run_dir), "--epochs", "1", *OPTIONS), tmp_path)
    assert fresh.stdout.count("Run directory") == 1  # one summary: rank 1 only trained
    for name in ("config.yaml", "run.json", "metrics.json", "evaluation.json", "model/biosam2.json", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]
    # Each rank took its own half of the 8 images: 2 steps of batch 2 per epoch, not 4.
    assert global_step(run_dir) == TRAIN_IMAGES // 2 // BATCH
    # Validation reduced over both ranks' cases = the single-process mIoU of the same weights; the
    # mean of the two ranks' own mIoUs (cases 0, 2 and case 1) would be another number.
    confusions = val_confusions(run_dir, dataset)
    summed = miou(sum(confusions))
    per_rank_mean = (miou(confusions[0] + confusions[2]) + miou(confusions[1])) / 2
    assert abs(summed - per_rank_mean) > 1e-4
    assert logged_val_miou(run_dir)[-1] == pytest.approx(summed, abs=1e-6)

    # Extend the finished run by one epoch, launched the same way.
    resumed = run(biosam2_command("train", str(dataset), "--out", str(run_dir), "--resume", "--epochs", "2", *OPTIONS), tmp_path)
    assert resumed.stdout.count("Run directory") == 1
    assert global_step(run_dir) == 2 * (TRAIN_IMAGES // 2 // BATCH)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_trained"] == 2

    run(biosam2_command("predict", str(run_dir), str(dataset / "imagesTs"), str(tmp_path / "predictions")), tmp_path)
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2


def test_torchrun_launch(dataset, tmp_path):
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run([*torchrun, "-m", "biosam2", "train", str(dataset), "--out", str(run_dir), "--epochs", "1", *OPTIONS], tmp_path)
    assert result.stdout.count("Run directory") == 1
    assert global_step(run_dir) == TRAIN_IMAGES // 2 // BATCH
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["num_cases"] == 2
