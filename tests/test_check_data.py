"""check-data reports every problem of a dataset at once, each naming its file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from biosam2.data.check import check_dataset
from biosam2.data.image_io import write_image_png, write_label_png
from biosam2.data.synthetic import write_synthetic_dataset


@pytest.fixture
def dataset(tmp_path):
    return write_synthetic_dataset(tmp_path / "data", train=6, val=2, test=2, max_side=96)


def test_a_good_dataset_is_ok_and_described(dataset):
    report = check_dataset(dataset)
    assert report.ok, str(report)
    text = str(report)
    assert "4 classes (background, cell, nucleus, fibre)" in text
    assert "fold 0 has 6 train / 2 val cases" in text


def test_every_problem_is_reported_not_only_the_first(dataset):
    (dataset / "imagesTr" / "syn_000_0000.png").write_bytes(b"not a png at all")
    write_label_png(dataset / "labelsTr" / "syn_001.png", np.full((5, 7), 1, np.uint8))  # wrong size
    shape = np.asarray(Image.open(dataset / "imagesTr" / "syn_002_0000.png")).shape
    write_label_png(dataset / "labelsTr" / "syn_002.png", np.full(shape, 9, np.uint8))
    image = np.zeros((40, 40), np.uint8)
    write_image_png(dataset / "imagesTr" / "syn_003_0000.png", image)
    write_label_png(dataset / "labelsTr" / "syn_003.png", np.full((40, 40), 7, np.uint8))
    (dataset / "labelsTr" / "syn_004.png").unlink()
    report = check_dataset(dataset)
    assert not report.ok
    problems = "\n".join(report.problems)
    assert len(report.problems) >= 5, problems
    assert "syn_000_0000.png: cannot be read" in problems
    assert "syn_001.png: label map does not match its image" in problems
    assert "label value(s) [9] are not declared" in problems and "label value(s) [7]" in problems
    assert "case syn_004: label map missing" in problems


def test_splits_that_leak_the_test_set_or_escape_the_folder_are_refused(dataset):
    splits = dataset / "splits_final.json"
    fold = json.loads(splits.read_text())[0]
    fold["val"] = fold["val"] + ["syn_008"]  # a test case
    splits.write_text(json.dumps([fold]))
    report = check_dataset(dataset)
    assert any("test set must never be used for validation" in p for p in report.problems), report.problems

    fold["val"] = ["../../etc/passwd"]
    splits.write_text(json.dumps([fold]))
    report = check_dataset(dataset)
    assert any("'../../etc/passwd' is not a plain file name" in p for p in report.problems), report.problems


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda root: (root / "dataset.json").unlink(), "dataset.json: missing"),
        (lambda root: (root / "dataset.json").write_text("{\"labels\": {}}"), "missing key(s) channel_names, file_ending"),
        (lambda root: (root / "dataset.json").write_text("{oops"), "not valid JSON"),
        (lambda root: shutil.rmtree(root / "imagesTr"), "no training cases"),
    ],
)
def test_broken_dataset_descriptions_are_named(dataset, change, message):
    change(dataset)
    report = check_dataset(dataset)
    assert not report.ok
    assert any(message in p for p in report.problems), report.problems


def test_grey_image_in_a_colour_dataset_is_a_problem(dataset):
    description = json.loads((dataset / "dataset.json").read_text())
    description["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    (dataset / "dataset.json").write_text(json.dumps(description))
    report = check_dataset(dataset)
    assert any("has 1 channel(s) (grey) but dataset.json declares 3" in p for p in report.problems), report.problems


def test_palette_label_maps_are_read_as_their_indices(dataset):
    """A "P" PNG's indices are the class ids; its colours (here all different from the ids) are not."""
    from biosam2.data.image_io import read_label

    for path in sorted((dataset / "labelsTr").glob("*.png")):
        indices = np.asarray(Image.open(path))
        palette = Image.fromarray(indices, mode="P")
        palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [255] * 756)
        palette.save(path)
        assert Image.open(path).mode == "P"
        np.testing.assert_array_equal(read_label(path).array, indices)
    report = check_dataset(dataset)
    assert report.ok, str(report)
