"""Test-time augmentation (mirroring) and ensembles: averaged probabilities, as one model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import biosam2
from biosam2.cli import main
from biosam2.inference.averaging import Averaged
from biosam2.inference.predictor import Predictor


def test_mirroring_a_flip_symmetric_model_changes_nothing():
    torch.manual_seed(0)
    pointwise = nn.Conv2d(3, 4, 1)  # every pixel on its own: flipping the input flips the output
    images = torch.rand(2, 3, 20, 30)
    with torch.no_grad():
        expected = torch.softmax(pointwise(images), dim=1)
        averaged = torch.softmax(Averaged([pointwise], mirror=True)(images), dim=1)
    torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=0)


def test_mirroring_averages_the_four_flipped_back_predictions():
    torch.manual_seed(0)
    spatial = nn.Conv2d(3, 4, 5, padding=2)  # not symmetric: each mirroring gives another prediction
    images = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        manual = sum(torch.softmax(torch.flip(spatial(torch.flip(images, axes)), axes), dim=1)
                     for axes in [(), (-1,), (-2,), (-2, -1)]) / 4
        averaged = torch.softmax(Averaged([spatial], mirror=True)(images), dim=1)
        plain = torch.softmax(spatial(images), dim=1)
    torch.testing.assert_close(averaged, manual, atol=1e-6, rtol=0)
    assert (averaged - plain).abs().max() > 1e-3


def test_an_ensemble_of_two_copies_of_one_model_equals_the_model_in_the_predictor():
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter="lw").eval()
    image = np.random.default_rng(0).random((3, 40, 56), dtype=np.float32)
    labels, probabilities = Predictor(model, device="cpu").predict(image, return_probabilities=True)
    twin_labels, twin_probabilities = Predictor(Averaged([model, model]), device="cpu").predict(image, return_probabilities=True)
    np.testing.assert_allclose(twin_probabilities, probabilities, atol=1e-5)
    assert (twin_labels == labels).mean() > 0.999  # random weights: near-ties may round either way


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    for name, classes in (("a", 3), ("other", 4)):
        model = biosam2.build_model("tiny", weights="random", num_classes=classes, adapter="lw")
        model.save_pretrained(root / name / "model", metadata={})
        description = json.loads((root / name / "model" / "biosam2.json").read_text())
        description["metadata"] = {"normalization": {"scheme": "uint8"}, "labels": {f"c{i}": i for i in range(classes)}}
        (root / name / "model" / "biosam2.json").write_text(json.dumps(description))
    return root / "a", root / "other"


def test_predict_with_tta_and_an_ensemble_on_the_command_line(runs, tmp_path, capsys):
    run, other = runs
    shutil.copytree(run, tmp_path / "copy")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 44), dtype=np.uint8)).save(tmp_path / "x.png")
    common = ["--device", "cpu", "--probabilities"]
    assert main(["predict", str(run), str(tmp_path / "x.png"), str(tmp_path / "plain"), *common]) == 0
    assert main(["predict", str(run), str(tmp_path / "x.png"), str(tmp_path / "twin"), *common, "--ensemble", str(tmp_path / "copy")]) == 0
    assert main(["predict", str(run), str(tmp_path / "x.png"), str(tmp_path / "tta"), *common, "--tta"]) == 0
    plain, twin = (np.asarray(Image.open(tmp_path / f / "x.png")) for f in ("plain", "twin"))
    assert (plain == twin).mean() > 0.999
    assert main(["predict", str(run), str(tmp_path / "x.png"), str(tmp_path / "bad"), *common, "--ensemble", str(other)]) == 2
    assert "--ensemble" in capsys.readouterr().err and not (tmp_path / "bad").exists()
