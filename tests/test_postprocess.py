"""Largest-connected-component postprocessing: the operation on a drawn example, the per-class choice
on validation predictions, and predict applying what the run chose."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

import biosam2
from biosam2.cli import main
from biosam2.data.image_io import write_label_png
from biosam2.inference.postprocess import choose_classes, keep_largest_component


def drawn() -> np.ndarray:
    labels = np.zeros((20, 30), np.uint8)
    labels[2:10, 2:12] = 1  # class 1: a large blob ...
    labels[15:17, 20:22] = 1  # ... and a speck
    labels[2:5, 20:23] = 2  # class 2: two blobs of 9
    labels[12:15, 2:5] = 2
    return labels


def test_only_the_largest_component_of_the_chosen_classes_is_kept():
    labels = drawn()
    kept = keep_largest_component(labels, [1])
    assert (kept[15:17, 20:22] == 0).all() and (kept[2:10, 2:12] == 1).all()  # the speck became background
    assert (kept == 2).sum() == 18 and kept.dtype == labels.dtype  # class 2 untouched
    volume = np.stack([labels, labels * 0], axis=-1)  # 3-D: components are 3-D
    assert (keep_largest_component(volume, [1]) == 1).sum() == 80
    assert keep_largest_component(labels, []) is labels


def test_a_class_keeps_the_postprocessing_only_where_validation_dice_rises(tmp_path):
    truth = drawn()
    truth[15:17, 20:22] = 0  # no speck in the ground truth: removing it helps class 1
    predictions, labels = tmp_path / "pred", tmp_path / "labels"
    write_label_png(predictions / "a.png", drawn())
    write_label_png(labels / "a.png", truth)  # class 2 really has two blobs: keeping one hurts
    chosen = choose_classes(predictions, labels, ["a"], num_classes=3)
    assert chosen["classes"] == [1]
    dice = chosen["validation_dice"]
    assert dice["1"]["without"] == 2 * 80 / (84 + 80) and dice["1"]["with"] == 1.0
    assert dice["2"]["without"] == 1.0 and dice["2"]["with"] == 2 * 9 / (9 + 18)


def test_predict_applies_the_runs_postprocessing_unless_told_not_to(tmp_path):
    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw")
    model.save_pretrained(tmp_path / "run" / "model", metadata={})
    description_file = tmp_path / "run" / "model" / "biosam2.json"
    description = json.loads(description_file.read_text())
    description["metadata"] = {"normalization": {"scheme": "uint8"}, "labels": {"background": 0, "fg": 1},
                               "postprocessing": {"largest_component": [1]}}
    description_file.write_text(json.dumps(description))
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64), dtype=np.uint8)).save(tmp_path / "x.png")
    for name, extra in (("post", []), ("raw", ["--no-postprocess"])):
        assert main(["predict", str(tmp_path / "run"), str(tmp_path / "x.png"), str(tmp_path / name), "--device", "cpu", *extra]) == 0
    raw, post = (np.asarray(Image.open(tmp_path / name / "x.png")) for name in ("raw", "post"))
    np.testing.assert_array_equal(post, keep_largest_component(raw, [1]))
    assert (post != raw).any()  # the random model's foreground has more than one component
