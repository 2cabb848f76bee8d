"""nnU-Net v2's ignore label: unannotated pixels that count in neither the loss nor any metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import biosam2
from biosam2.cli import main
from biosam2.data.cases import load_case
from biosam2.data.dataset_format import IGNORE_INDEX, load_dataset_spec
from biosam2.data.image_io import read_label, write_label_png
from biosam2.data.normalization import Normalization, ct_window_from_foreground
from biosam2.data.synthetic import CLASSES, write_synthetic_dataset
from biosam2.data.training_data import SliceDataset
from biosam2.errors import DataError
from biosam2.evaluation import Evaluator, evaluate_folders
from biosam2.training import TrainConfig, train
from biosam2.training.module import SegmentationLoss
from biosam2.visualization import colour_overlay

IGNORE = len(CLASSES)  # 4: right after background, cell, nucleus, fibre


def with_ignore_label(root: Path) -> Path:
    """The synthetic dataset with "ignore": 4 declared and the left quarter of every label map unannotated."""
    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"]["ignore"] = IGNORE
    (root / "dataset.json").write_text(json.dumps(spec))
    for path in sorted(root.glob("labels*/*.png")):
        label = read_label(path).array.copy()
        label[:, : label.shape[1] // 4] = IGNORE
        write_label_png(path, label)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train=3, val=1, test=2, min_side=48, max_side=72)
    return with_ignore_label(root)


def _set_labels(root: Path, labels: dict) -> None:
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "labels": labels}))


# ---- dataset.json --------------------------------------------------------------------------------
def test_the_ignore_label_is_parsed_and_is_no_class(dataset):
    spec = load_dataset_spec(dataset)
    assert spec.ignore_label == IGNORE
    assert spec.labels == CLASSES and spec.num_classes == 4
    assert spec.class_names == ["background", "cell", "nucleus", "fibre"]
    assert spec.declared_labels == {**CLASSES, "ignore": IGNORE}


@pytest.mark.parametrize("ignore", [2, 3, 5])
def test_an_ignore_label_that_is_not_the_next_id_is_refused(tmp_path, ignore):
    root = write_synthetic_dataset(tmp_path / "syn", train=1, val=1, test=0, min_side=40, max_side=40)
    _set_labels(root, {**CLASSES, "ignore": ignore})
    with pytest.raises(DataError, match=rf"dataset.json: \"ignore\": {ignore} must be the highest label id.*set \"ignore\": 4"):
        load_dataset_spec(root)


def test_more_classes_than_the_training_label_maps_hold_are_refused(tmp_path):
    root = write_synthetic_dataset(tmp_path / "syn", train=1, val=1, test=0, min_side=40, max_side=40)
    _set_labels(root, {f"c{i}": i for i in range(256)})  # class 255 would be taken for unannotated
    with pytest.raises(DataError, match="dataset.json: 256 classes; biosam2 trains at most 255"):
        load_dataset_spec(root)
    _set_labels(root, {**{f"c{i}": i for i in range(255)}, "ignore": 255})  # the largest that fits
    spec = load_dataset_spec(root)
    assert spec.num_classes == 255 and spec.ignore_label == 255


# ---- training data -------------------------------------------------------------------------------
def test_loaded_label_maps_mark_the_ignore_label_with_the_one_ignore_index(dataset):
    spec = load_dataset_spec(dataset)
    files = spec.list_cases("train")[0]
    case = load_case(spec, files, Normalization("uint8"))
    raw = read_label(files.label).array
    assert np.array_equal(case.label == IGNORE_INDEX, raw == IGNORE)
    assert np.array_equal(case.label[raw != IGNORE], raw[raw != IGNORE])
    # augmentation (flips, rotation, scaling) and the resize keep it as it is: nearest neighbour
    samples = SliceDataset([case], patch_size=40, input_mode="resize", augment=True, seed=1)
    values = set()
    for epoch in range(6):
        _, label = samples[(epoch, 0)]
        values |= set(label.unique().tolist())
    assert IGNORE_INDEX in values and values <= {0, 1, 2, 3, IGNORE_INDEX}


def test_the_ct_window_is_taken_from_annotated_foreground_only():
    image = np.full((10, 10), 40.0)
    image[:, :5] = 3000.0  # metal, say, in the unannotated half
    label = np.ones((10, 10), np.int64)
    label[:, :5] = IGNORE_INDEX
    assert ct_window_from_foreground([image], [label]) == (40.0, 41.0)


def test_overlays_leave_unannotated_pixels_uncoloured():
    rgb = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [IGNORE_INDEX, IGNORE_INDEX]])
    out = colour_overlay(rgb, labels)
    assert np.array_equal(out[1], rgb[1]) and np.array_equal(out[0, 0], rgb[0, 0]) and not np.array_equal(out[0, 1], rgb[0, 1])


# ---- loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ce", "dice_ce"])
def test_the_loss_does_not_see_ignored_pixels(kind):
    loss = SegmentationLoss(kind)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=generator)
    target = torch.randint(0, 4, (2, 16, 16), generator=generator)
    target[:, :, :6] = IGNORE_INDEX
    reference = loss(logits, target)

    changed = logits.clone()
    changed[:, :, :, :6] = torch.randn(2, 4, 16, 6, generator=generator) * 10  # only at ignored pixels
    assert torch.equal(loss(changed, target), reference)

    changed[:, :, :, 6:] += torch.randn(2, 4, 16, 10, generator=generator)  # and at annotated ones: it counts
    assert not torch.allclose(loss(changed, target), reference)


@pytest.mark.parametrize("kind", ["ce", "dice_ce"])
def test_a_crop_without_any_annotated_pixel_has_loss_zero(kind):
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    value = SegmentationLoss(kind)(logits, torch.full((2, 8, 8), IGNORE_INDEX))
    assert math.isfinite(float(value.detach())) and float(value.detach()) == 0.0
    value.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


# ---- metrics -------------------------------------------------------------------------------------
def _square_case():
    truth = np.zeros((32, 32), np.uint8)
    truth[8:16, 8:16] = 1
    truth[:, 24:] = 2  # the ignore label
    prediction = np.zeros((32, 32), np.uint8)
    prediction[8:16, 8:16] = 1
    prediction[2:30, 26:30] = 1  # wrong, but only where nothing is annotated
    return prediction, truth


def test_a_prediction_wrong_only_at_ignored_pixels_scores_perfectly():
    prediction, truth = _square_case()
    evaluator = Evaluator(2, ["background", "cell"], ignore_label=2)
    case = evaluator.add_case("a", prediction, truth)
    assert case.ignored_pixels == 32 * 8
    assert case.iou == {"background": 1.0, "cell": 1.0} and case.dice == {"background": 1.0, "cell": 1.0}
    assert case.hd95["cell"] == 0.0
    result = evaluator.result()
    assert result.miou == 1.0 and result.mean_foreground_dice == 1.0 and result.mean_foreground_hd95 == 0.0
    assert result.confusion_matrix.sum() == 32 * 32 - 32 * 8
    payload = result.to_dict()
    assert payload["ignore_label"] == 2 and payload["ignored_pixels"] == 32 * 8
    assert "ignore label (2)" in payload["convention"] and "**Ignore label** 2: 256" in result.to_markdown()
    # without the ignore label the same maps are refused: its value is no class
    with pytest.raises(ValueError, match="ground truth has label values 0..2"):
        Evaluator(2, ["background", "cell"]).add_case("a", prediction, truth)


def test_the_ignore_label_is_never_a_valid_prediction():
    prediction, truth = _square_case()
    prediction[0, 0] = 2
    with pytest.raises(ValueError, match="prediction has label values 0..2, outside the 2 classes"):
        Evaluator(2, ["background", "cell"], ignore_label=2).add_case("a", prediction, truth)
    with pytest.raises(ValueError, match="ignore_label 1 must be an id above the classes 0..1"):
        Evaluator(2, ["background", "cell"], ignore_label=1)


def test_evaluate_folders_takes_the_ignore_label_from_the_dataset(dataset, tmp_path):
    predictions = tmp_path / "pred"
    for path in sorted((dataset / "labelsTs").glob("*.png")):
        truth = read_label(path).array
        prediction = np.where(truth == IGNORE, 3, truth)  # fibre wherever nothing is annotated
        write_label_png(predictions / path.name, prediction.astype(np.uint8))
    result = evaluate_folders(predictions, dataset / "labelsTs", dataset=dataset)
    assert result.ignore_label == IGNORE and result.class_names == ["background", "cell", "nucleus", "fibre"]
    assert result.miou == 1.0 and result.mean_foreground_dice == 1.0
    assert result.ignored_pixels == sum(int((read_label(p).array == IGNORE).sum()) for p in (dataset / "labelsTs").glob("*.png"))
    # the same with the labels given directly, "ignore" included; without it the fibre is penalised
    assert evaluate_folders(predictions, dataset / "labelsTs", labels={**CLASSES, "ignore": IGNORE}).miou == 1.0
    with pytest.raises(DataError, match=r"ground truth has label value\(s\) 4 outside the 4 classes"):
        evaluate_folders(predictions, dataset / "labelsTs", labels=CLASSES)


# ---- end to end ----------------------------------------------------------------------------------
def test_check_data_reports_the_ignore_label_and_its_share(dataset, capsys):
    assert main(["check-data", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert 'ignore label 4 ("ignore"): unannotated pixels' in out
    for split, folder in (("train", "labelsTr"), ("test", "labelsTs")):
        maps = [read_label(path).array for path in sorted((dataset / folder).glob("*.png"))]
        ignored, total = sum(int((m == IGNORE).sum()) for m in maps), sum(m.size for m in maps)
        assert f"{split}: {ignored / total:.1%} of the label pixels are ignore label ({ignored} of {total})" in out


def test_training_with_an_ignore_label_leaves_it_out_end_to_end(dataset, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(weights="random", adapter="lw", epochs=1, batch_size=2, patch_size=48, lr=1e-3, num_workers=0, overlays=1)
    summary = train(dataset, run, config, progress_bar=False)
    assert summary["ignore_label"] == IGNORE
    metrics = json.loads((run / "metrics.json").read_text())
    ignored = sum(int((read_label(p).array == IGNORE).sum()) for p in (dataset / "labelsTs").glob("*.png"))
    assert metrics["ignore_label"] == IGNORE and metrics["test"]["ignore_label"] == IGNORE
    assert metrics["test"]["ignored_pixels"] == ignored > 0
    assert set(metrics["test"]["per_class_iou"]) == {"background", "cell", "nucleus", "fibre"}
    assert json.loads((run / "evaluation.json").read_text())["ignore_label"] == IGNORE
    assert json.loads((run / "run.json").read_text())["ignore_label"] == IGNORE
    description = json.loads((run / "model" / "biosam2.json").read_text())
    assert description["model"]["num_classes"] == 4  # no output channel for the ignore label
    assert description["metadata"]["labels"] == CLASSES and description["metadata"]["ignore_label"] == IGNORE
    assert biosam2.load_model(run / "model").num_classes == 4
    for path in (run / "test_predictions").glob("*.png"):
        assert read_label(path).array.max() < IGNORE  # predictions never contain it
