"""End to end on the real data in ../shared/data: convert -> train a few steps -> predict -> evaluate."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared

from biosam2.cli import main
from biosam2.data.image_io import read_image, read_label

QUICK_TRAIN = ["--weights", "random", "--adapter", "lw", "--epochs", "1", "--batch-size", "2", "--patch-size", "128", "--lr", "1e-3",
               "--limit-train-batches", "2", "--num-workers", "0", "--no-progress"]


def run_cli(*args: str) -> None:
    assert main([str(a) for a in args]) == 0, f"biosam2 {' '.join(map(str, args))} failed"


def test_isbi2012_slices_end_to_end(tmp_path):
    source = require_shared(SHARED_DATA / "isbi2012")
    data, run, predictions = tmp_path / "isbi", tmp_path / "run", tmp_path / "pred"
    run_cli("convert", "isbi2012", source, data, "--limit", "2")
    run_cli("check-data", data)
    run_cli("train", data, "--out", run, *QUICK_TRAIN)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]["per_class_iou"]) == {"background", "membrane"}
    run_cli("predict", run, data / "imagesTs", predictions)
    written = sorted(predictions.glob("*.png"))
    assert [p.name for p in written] == ["isbi_24.png", "isbi_25.png"]  # the first 2 of the held-out block
    for path in written:
        assert read_label(path).array.shape == (512, 512)
    run_cli("evaluate", predictions, data / "labelsTs", "--out", tmp_path / "evaluation")
    result = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert result["hd95_unit"] == "pixels"
    # the run's own test evaluation and the standalone one agree (same model, same data)
    assert result["miou"] == pytest.approx(metrics["test"]["miou"], abs=1e-9)


def test_acdc_volumes_end_to_end(tmp_path):
    source = require_shared(SHARED_DATA / "acdc")
    data, run, predictions = tmp_path / "acdc", tmp_path / "run", tmp_path / "pred"
    run_cli("convert", "acdc", source, data, "--limit", "2")
    run_cli("train", data, "--out", run, *QUICK_TRAIN, "--no-test")  # the test split is predicted below
    run_cli("predict", run, data / "imagesTs", predictions)
    volumes = sorted(predictions.glob("*.nii.gz"))
    assert len(volumes) == 2
    for volume in volumes:
        image = read_image(data / "imagesTs" / volume.name.replace(".nii.gz", "_0000.nii.gz"))
        label = read_label(volume)
        assert label.array.shape == image.array.shape and np.allclose(label.affine, image.affine)
        assert set(np.unique(label.array)) <= {0, 1, 2, 3}
    run_cli("evaluate", predictions, data / "labelsTs", "--out", tmp_path / "evaluation")
    result = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert result["class_names"] == ["background", "RV", "myocardium", "LV"]  # from the dataset.json beside labelsTs
    assert result["num_cases"] == 2 and result["hd95_unit"] == "voxels"  # the SSL4MIS files store no spacing


def test_ct_nifti_prediction_keeps_the_inputs_geometry(tmp_path):
    source = require_shared(SHARED_DATA / "ct-example")
    data, run, predictions = tmp_path / "ct", tmp_path / "run", tmp_path / "pred"
    run_cli("convert", "synapse", source, data)
    run_cli("train", data, "--out", run, *QUICK_TRAIN, "--no-test")
    original = source / "example_ct_sm.nii.gz"
    run_cli("predict", run, original, predictions, "--probabilities")
    written, reference = nib.load(predictions / "example_ct_sm.nii.gz"), nib.load(original)
    assert written.shape == reference.shape == (122, 101, 30)
    np.testing.assert_array_equal(written.affine, reference.affine)
    np.testing.assert_array_equal(written.header.get_zooms(), reference.header.get_zooms())
    np.testing.assert_array_equal(written.header.get_qform(), reference.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), reference.header.get_sform())
    assert written.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(written.dataobj))) <= set(range(9))
    probabilities = nib.load(predictions / "example_ct_sm_probabilities.nii.gz")
    assert probabilities.shape == (122, 101, 30, 9)
    np.testing.assert_array_equal(probabilities.affine, reference.affine)
    # evaluated in millimetres against the converted organ labels
    run_cli("evaluate", predictions, data / "labelsTs", "--dataset", data, "--out", tmp_path / "evaluation")
    result = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert result["hd95_unit"] == "mm"
