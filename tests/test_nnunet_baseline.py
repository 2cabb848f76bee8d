"""The nnU-Net baseline of `biosam2 bench accuracy`, run for real by nnU-Net v2's own package (plan,
preprocess, train, predict) on a tiny crop of the real ISBI 2012 data: nothing is mocked."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from biosam2.bench.accuracy import FINISHED, Cell, cell_state, configure_parser, load_grid, run_from_args
from conftest import SHARED_DATA, require_shared


def bench(*argv) -> int:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return run_from_args(parser.parse_args([str(a) for a in argv]))


def tiny_isbi(dst: Path, side: int = 64) -> Path:
    """Two train, two val and two test sections of ISBI 2012, cropped to side x side (fast to train)."""
    from biosam2.data.convert import convert_dataset

    convert_dataset("isbi2012", require_shared(SHARED_DATA / "isbi2012"), dst, limit=2)
    for png in dst.glob("*/*.png"):
        Image.fromarray(np.asarray(Image.open(png))[:side, :side]).save(png)
    return dst


def test_the_nnunet_baseline_trains_predicts_and_is_scored_by_biosam2s_evaluation(tmp_path):
    data = tiny_isbi(tmp_path / "isbi")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "seeds": [0],
        "datasets": {"tiny": {"path": str(data)}},
        "methods": {"nnunet-2d": {"nnunet": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1,
                                             "device": "cpu", "augmentation_processes": 0}}},
    }))
    out = tmp_path / "out"
    assert bench(path, "--out", out) == 0
    run = out / "runs" / "tiny" / "nnunet-2d" / "seed0"

    # nnU-Net's own trainer ran for the grid's budget, on nnU-Net's plans for this data
    fold = run / "nnunet" / "results" / "Dataset001_ISBI2012" / "nnUNetTrainerBudget__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    trainer = json.loads((fold / "debug.json").read_text())  # nnU-Net's record of its trainer's attributes
    assert (trainer["num_epochs"], trainer["num_iterations_per_epoch"], trainer["device"]) == ("1", "2", "cpu")
    plans = json.loads((fold.parent / "plans.json").read_text())["configurations"]["2d"]
    assert plans["patch_size"] == [64, 64] and plans["batch_size"] == 2
    # ... with biosam2's split: nnU-Net validated on our fold 0's validation cases
    val = json.loads((data / "splits_final.json").read_text())[0]["val"]
    assert sorted(p.stem for p in (fold / "validation").glob("*.png")) == sorted(val)

    # nnU-Net's test predictions, scored by biosam2's evaluation: mIoU recomputed here from the files
    labels = sorted((data / "labelsTs").glob("*.png"))
    predictions = [run / "test_predictions" / p.name for p in labels]
    assert len(labels) == 2 and all(p.is_file() for p in predictions)
    pred = np.concatenate([np.asarray(Image.open(p)).ravel() for p in predictions])
    truth = np.concatenate([np.asarray(Image.open(p)).ravel() for p in labels])
    miou = np.mean([np.sum((pred == c) & (truth == c)) / np.sum((pred == c) | (truth == c)) for c in (0, 1)])
    results = json.loads((out / "results.json").read_text())
    cell = next(c for c in results["cells"] if c["method"] == "nnunet-2d")
    assert cell["state"] == FINISHED and cell["miou"] == pytest.approx(miou, abs=1e-9)
    assert results["budgets"]["nnunet-2d"]["tiny"] == "2 x 2, patch 64x64"
    assert cell["trainable_parameters"] > 1_000_000

    # finished: a second run of the grid trains nothing
    stamp = (run / "metrics.json").stat().st_mtime_ns
    grid = load_grid(path)
    assert cell_state(run, grid.wanted(Cell("tiny", "nnunet-2d", 0))).state == FINISHED
    assert bench(path, "--out", out) == 0
    assert (run / "metrics.json").stat().st_mtime_ns == stamp
