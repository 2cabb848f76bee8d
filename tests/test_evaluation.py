"""Evaluation metrics on hand-checkable label maps, folder evaluation, and the written reports.

Every expected number is worked out in the comments from the pixels drawn, not taken from the code.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from biosam2.data.dataset_format import write_dataset_json
from biosam2.data.image_io import write_label_png, write_volume
from biosam2.errors import DataError
from biosam2.evaluation import CONVENTION, Evaluator, evaluate_folders


def square(shape: tuple[int, ...], *ranges: tuple[int, int], value: int = 1) -> np.ndarray:
    """A label map of zeros with ``value`` in the box given by one (start, stop) range per axis."""
    label = np.zeros(shape, dtype=np.uint8)
    label[tuple(slice(a, b) for a, b in ranges)] = value
    return label


@pytest.fixture(autouse=True)
def _no_warnings():
    """MONAI must not warn about empty masks: absent classes are handled before calling it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---- per-case metrics ------------------------------------------------------------------------
def test_perfect_prediction():
    truth = square((10, 10), (2, 6), (2, 6))
    truth[7:9, 1:8] = 2
    evaluator = Evaluator(3, ["background", "a", "b"])
    case = evaluator.add_case("perfect", truth.copy(), truth)
    result = evaluator.result()
    assert result.miou == 1.0
    assert result.per_class_iou == {"background": 1.0, "a": 1.0, "b": 1.0}
    assert case.dice == {"background": 1.0, "a": 1.0, "b": 1.0}
    assert case.hd95["a"] == 0.0 and case.hd95["b"] == 0.0
    assert result.mean_foreground_dice == 1.0 and result.mean_foreground_hd95 == 0.0
    assert case.absent == [] and case.penalised == []


def test_empty_prediction_gets_zero_dice_and_the_diagonal_penalty():
    truth = square((10, 10), (2, 6), (2, 6))  # 16 foreground pixels
    evaluator = Evaluator(2)
    case = evaluator.add_case("empty", np.zeros_like(truth), truth)
    result = evaluator.result()
    # background: TP 84, FN 0, FP 16 -> 84/100; foreground: TP 0 -> 0
    assert result.per_class_iou["background"] == pytest.approx(0.84)
    assert result.per_class_iou["class_1"] == 0.0
    assert result.miou == pytest.approx(0.42)
    assert case.dice["class_1"] == 0.0
    assert case.hd95["class_1"] == pytest.approx(math.sqrt(10**2 + 10**2))  # pixels, no spacing
    assert case.penalised == ["class_1"]
    assert result.dice_count["class_1"] == 1 and result.hd95_count["class_1"] == 1


def test_disjoint_masks():
    truth = square((4, 8), (0, 2), (0, 2))
    prediction = square((4, 8), (0, 2), (6, 8))
    evaluator = Evaluator(2)
    case = evaluator.add_case("disjoint", prediction, truth)
    result = evaluator.result()
    assert result.per_class_iou["class_1"] == 0.0
    # background: 32 pixels, 4 + 4 foreground -> TP 24, FP 4, FN 4 -> 24/32
    assert result.per_class_iou["background"] == pytest.approx(0.75)
    assert case.dice["class_1"] == 0.0
    # every pixel of a 2x2 square is a boundary pixel; columns 6 and 7 are 5 and 6 from column 1,
    # so the distances are [5, 5, 6, 6] both ways and their 95th percentile is 6
    assert case.hd95["class_1"] == pytest.approx(6.0)
    assert case.penalised == []  # both present: a real distance, not the penalty


def test_one_pixel_shift_of_a_square():
    truth = square((10, 10), (2, 6), (2, 6))  # 4x4 = 16 pixels
    prediction = square((10, 10), (2, 6), (3, 7))  # shifted one column
    evaluator = Evaluator(2)
    case = evaluator.add_case("shift", prediction, truth)
    result = evaluator.result()
    # foreground: intersection 4x3 = 12, union 20 -> IoU 0.6, Dice 24/32 = 0.75
    assert result.per_class_iou["class_1"] == pytest.approx(0.6)
    assert case.dice["class_1"] == pytest.approx(0.75)
    # background: 100 - 20 = 80 common, union 88 -> IoU 80/88, Dice 160/168
    assert result.per_class_iou["background"] == pytest.approx(80 / 88)
    assert case.dice["background"] == pytest.approx(160 / 168)
    assert result.miou == pytest.approx((0.6 + 80 / 88) / 2)
    # half of the boundary pixels are 0 away, the other half 1 -> 95th percentile 1 pixel
    assert case.hd95["class_1"] == pytest.approx(1.0)
    assert result.hd95_unit == "pixels"


def test_anisotropic_spacing_gives_millimetres_along_the_right_axis():
    truth = square((12, 12, 8), (2, 10), (2, 10), (2, 5))  # 8x8x3 = 192 voxels
    along_z = square((12, 12, 8), (2, 10), (2, 10), (3, 6))  # one voxel up the 3rd axis
    along_x = square((12, 12, 8), (3, 11), (2, 10), (2, 5))  # one voxel along the 1st axis
    evaluator = Evaluator(2)
    z_case = evaluator.add_case("z", along_z, truth, spacing=(1.0, 1.0, 3.0))
    x_case = evaluator.add_case("x", along_x, truth, spacing=(1.0, 1.0, 3.0))
    assert z_case.hd95["class_1"] == pytest.approx(3.0)  # one voxel of 3 mm
    assert x_case.hd95["class_1"] == pytest.approx(1.0)  # one voxel of 1 mm
    # intersection 8x8x2 = 128, union 256 -> Dice 256/384
    assert z_case.dice["class_1"] == pytest.approx(2 / 3)
    assert z_case.iou["class_1"] == pytest.approx(0.5)
    result = evaluator.result()
    assert result.hd95_unit == "mm"
    assert result.hd95_mean["class_1"] == pytest.approx(2.0)
    assert result.hd95_std["class_1"] == pytest.approx(1.0)  # population std of [3, 1]
    # without a spacing the same shift is one voxel
    unitless = Evaluator(2)
    assert unitless.add_case("z", along_z, truth).hd95["class_1"] == pytest.approx(1.0)
    assert unitless.result().hd95_unit == "voxels"


def test_absent_class_convention():
    names = ["background", "a", "b"]
    evaluator = Evaluator(3, names)
    a = square((10, 10), (1, 5), (1, 5))  # class a: a 4x4 square in every case
    b_only = a.copy()
    b_only[7:9, 7:9] = 2
    both_absent = evaluator.add_case("both_absent", a, a)
    missed = evaluator.add_case("missed", a, b_only)  # b in the ground truth only
    hallucinated = evaluator.add_case("hallucinated", b_only, a)  # b in the prediction only
    diagonal = math.sqrt(10**2 + 10**2)

    assert math.isnan(both_absent.dice["b"]) and math.isnan(both_absent.hd95["b"])
    assert both_absent.absent == ["b"] and both_absent.penalised == []
    for case in (missed, hallucinated):
        assert case.dice["b"] == 0.0
        assert case.hd95["b"] == pytest.approx(diagonal)
        assert case.penalised == ["b"]
        assert case.dice["a"] == 1.0  # the other class is unaffected

    result = evaluator.result()
    assert result.dice_count == {"background": 3, "a": 3, "b": 2}  # b's mean excludes "both_absent"
    assert result.dice_mean["b"] == 0.0
    assert result.hd95_count["b"] == 2 and result.hd95_mean["b"] == pytest.approx(diagonal)
    assert result.hd95_count["background"] == 0  # not computed for the background
    # foreground mean = mean of class means: (1 + 0) / 2; per-case foreground means are 1, 0.5, 0.5
    assert result.mean_foreground_dice == pytest.approx(0.5)
    assert result.std_foreground_dice == pytest.approx(np.std([1.0, 0.5, 0.5]))
    assert result.foreground_case_count == 3


def test_class_absent_from_the_whole_set_is_left_out_of_miou():
    truth = square((10, 10), (2, 6), (2, 6))
    evaluator = Evaluator(3)
    evaluator.add_case("only", square((10, 10), (2, 6), (3, 7)), truth)
    result = evaluator.result()
    assert math.isnan(result.per_class_iou["class_2"])
    assert result.miou == pytest.approx((0.6 + 80 / 88) / 2)  # not divided by 3
    assert result.dice_count["class_2"] == 0 and math.isnan(result.dice_mean["class_2"])


def test_miou_is_accumulated_over_the_set_not_averaged_over_cases():
    evaluator = Evaluator(2)
    # case "big": 8 foreground pixels, predicted exactly -> per-case IoUs 1 and 1
    big = square((4, 4), (0, 2), (0, 4))
    evaluator.add_case("big", big, big)
    # case "small": one foreground pixel, predicted at the wrong place -> fg 0/2, bg 14/16
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth[0, 0] = 1
    prediction = np.zeros((4, 4), dtype=np.uint8)
    prediction[3, 3] = 1
    small = evaluator.add_case("small", prediction, truth)
    assert small.iou == {"background": pytest.approx(14 / 16), "class_1": 0.0}
    mean_of_case_mious = ((1 + 1) / 2 + (14 / 16 + 0) / 2) / 2  # 0.71875
    result = evaluator.result()
    # whole set: fg TP 8, FP 1, FN 1 -> 8/10; bg TP 8 + 14 = 22, FP 1, FN 1 -> 22/24
    assert result.per_class_iou["class_1"] == pytest.approx(0.8)
    assert result.per_class_iou["background"] == pytest.approx(22 / 24)
    assert result.miou == pytest.approx((0.8 + 22 / 24) / 2)
    assert result.miou != pytest.approx(mean_of_case_mious)
    assert result.confusion_matrix.tolist() == [[22, 1], [1, 8]]


def test_torch_tensors_give_the_same_numbers_as_numpy():
    truth = square((10, 10), (2, 6), (2, 6))
    prediction = square((10, 10), (2, 6), (3, 7))
    from_numpy, from_torch = Evaluator(2), Evaluator(2)
    from_numpy.add_case("c", prediction, truth)
    from_torch.add_case("c", torch.from_numpy(prediction).long(), torch.from_numpy(truth).long())
    assert from_numpy.result().to_dict() == from_torch.result().to_dict()


def test_inconsistent_input_is_refused():
    truth = square((10, 10), (2, 6), (2, 6))
    evaluator = Evaluator(2)
    with pytest.raises(ValueError, match="outside the 2 classes"):
        evaluator.add_case("c", truth * 3, truth)
    with pytest.raises(ValueError, match="shape"):
        evaluator.add_case("c", truth[:5], truth)
    with pytest.raises(ValueError, match="non-integer"):
        evaluator.add_case("c", truth + 0.5, truth)
    evaluator.add_case("c", truth, truth)
    with pytest.raises(ValueError, match="already added"):
        evaluator.add_case("c", truth, truth)
    with pytest.raises(ValueError, match="in mm but earlier cases are in pixels"):
        evaluator.add_case("d", truth, truth, spacing=(0.5, 0.5))
    with pytest.raises(ValueError, match="no cases"):
        Evaluator(2).result()


# ---- reports ---------------------------------------------------------------------------------
def test_json_and_markdown_contain_the_numbers(tmp_path):
    evaluator = Evaluator(3, ["background", "cell", "nucleus"])
    truth = square((10, 10), (2, 6), (2, 6))
    evaluator.add_case("shift", square((10, 10), (2, 6), (3, 7)), truth)
    result = evaluator.result()
    result.write_json(tmp_path / "metrics.json")
    result.write_markdown(tmp_path / "metrics.md")

    written = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: NaN became null
    assert written["miou"] == pytest.approx((0.6 + 80 / 88) / 2)
    assert written["classes"]["cell"]["iou"] == pytest.approx(0.6)
    assert written["per_class_iou"] == {
        "background": pytest.approx(80 / 88),
        "cell": pytest.approx(0.6),
        "nucleus": None,
    }
    assert written["classes"]["cell"]["dice"] == {"mean": pytest.approx(0.75), "std": 0.0, "count": 1}
    assert written["classes"]["cell"]["hd95"]["mean"] == pytest.approx(1.0)
    assert written["classes"]["nucleus"]["iou"] is None
    assert written["classes"]["nucleus"]["dice"] == {"mean": None, "std": None, "count": 0}
    assert written["hd95_unit"] == "pixels" and written["num_cases"] == 1
    assert written["convention"] == CONVENTION
    assert written["cases"][0]["case_id"] == "shift"
    assert written["confusion_matrix"]["counts"] == [[80, 4, 0], [4, 12, 0], [0, 0, 0]]

    markdown = (tmp_path / "metrics.md").read_text()
    assert markdown == str(result)
    assert "| cell (1) | 0.6000 | 0.7500 ± 0.0000 | 1 | 1.0000 ± 0.0000 | 1 |" in markdown
    assert "HD95 [pixels]" in markdown
    assert f"{(0.6 + 80 / 88) / 2:.4f}" in markdown
    assert "**Cases**: 1" in markdown
    assert CONVENTION in markdown


# ---- folders ---------------------------------------------------------------------------------
def _png_dataset(root, cases: dict[str, np.ndarray]) -> None:
    write_dataset_json(
        root,
        name="Toy",
        channel_names={"0": "grey"},
        labels={"background": 0, "cell": 1, "nucleus": 2},
        file_ending=".png",
        num_training=0,
    )
    for case_id, label in cases.items():
        write_label_png(root / "labelsTs" / f"{case_id}.png", label)


def test_evaluate_png_folders_uses_dataset_json_and_ignores_extra_predictions(tmp_path):
    truth_a = square((10, 10), (2, 6), (2, 6))
    truth_b = square((10, 10), (1, 4), (1, 4), value=2)
    prediction_a = square((10, 10), (2, 6), (3, 7))
    _png_dataset(tmp_path / "Dataset", {"a": truth_a, "b": truth_b})
    predictions = tmp_path / "predictions"
    write_label_png(predictions / "a.png", prediction_a)
    write_label_png(predictions / "b.png", truth_b)
    write_label_png(predictions / "extra.png", truth_b)
    (predictions / "notes.txt").write_text("not a label map")

    result = evaluate_folders(predictions, tmp_path / "Dataset" / "labelsTs")  # dataset.json found in the parent

    expected = Evaluator(3, ["background", "cell", "nucleus"])
    expected.add_case("a", prediction_a, truth_a)
    expected.add_case("b", truth_b, truth_b)
    assert result.class_names == ["background", "cell", "nucleus"]
    assert result.ignored_predictions == ["extra.png"]
    assert [case.case_id for case in result.cases] == ["a", "b"]
    assert result.miou == pytest.approx(expected.result().miou)
    assert result.per_class_iou["cell"] == pytest.approx(0.6)
    assert result.hd95_unit == "pixels"
    assert "extra.png" in str(result)


def test_evaluate_nifti_folders_in_millimetres(tmp_path):
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    truth = square((12, 12, 8), (2, 10), (2, 10), (2, 5))
    write_volume(tmp_path / "gt" / "case_1.nii.gz", truth, affine)
    write_volume(tmp_path / "pred" / "case_1.nii.gz", square((12, 12, 8), (2, 10), (2, 10), (3, 6)), affine)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "organ": 1})
    assert [case.case_id for case in result.cases] == ["case_1"]  # ".nii.gz" removed as one ending
    assert result.cases[0].spacing == (1.0, 1.0, 3.0)
    assert result.hd95_unit == "mm"
    assert result.hd95_mean["organ"] == pytest.approx(3.0)
    assert result.dice_mean["organ"] == pytest.approx(2 / 3)
    # stand-in spacing (dataset.json "spacing": "unknown"): the same shift is 1 voxel, said as voxels
    in_voxels = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "organ": 1}, spacing_known=False)
    assert in_voxels.hd95_unit == "voxels" and in_voxels.hd95_mean["organ"] == pytest.approx(1.0)


def test_stand_in_spacing_recorded_in_the_files_gives_voxels_without_a_dataset_json(tmp_path):
    """A converted volume whose source stored no spacing says so in its own header, and a prediction
    written on its grid copies that: copied away from dataset.json, HD95 is still reported in voxels."""
    from biosam2.data.image_io import read_image, write_like

    truth = square((12, 12, 8), (2, 10), (2, 10), (2, 5))
    write_volume(tmp_path / "gt" / "case_1.nii.gz", truth, np.eye(4), spacing_known=False)
    reference = read_image(tmp_path / "gt" / "case_1.nii.gz")
    assert not reference.spacing_known
    write_like(tmp_path / "pred" / "case_1.nii.gz", square((12, 12, 8), (2, 10), (2, 10), (3, 6)), reference)
    assert not read_image(tmp_path / "pred" / "case_1.nii.gz").spacing_known
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "organ": 1})
    assert result.hd95_unit == "voxels" and result.hd95_mean["organ"] == pytest.approx(1.0)
    # the same files written with their spacing known are in mm
    write_volume(tmp_path / "gt" / "case_1.nii.gz", truth, np.eye(4))
    assert evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "organ": 1}).hd95_unit == "mm"


def test_classes_are_inferred_without_labels_or_dataset_json(tmp_path):
    truth = square((10, 10), (2, 6), (2, 6), value=2)
    write_label_png(tmp_path / "gt" / "a.png", truth)
    write_label_png(tmp_path / "pred" / "a.png", truth)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert result.class_names == ["background", "class_1", "class_2"]
    assert result.per_class_iou["class_2"] == 1.0 and math.isnan(result.per_class_iou["class_1"])


def test_geometry_mismatch_names_both_files(tmp_path):
    write_label_png(tmp_path / "gt" / "a.png", square((10, 10), (2, 6), (2, 6)))
    write_label_png(tmp_path / "pred" / "a.png", square((10, 12), (2, 6), (2, 6)))
    with pytest.raises(DataError, match="different geometry") as error:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "cell": 1})
    assert str(tmp_path / "gt" / "a.png") in str(error.value)
    assert str(tmp_path / "pred" / "a.png") in str(error.value)

    volume = square((6, 6, 4), (1, 4), (1, 4), (1, 3))
    write_volume(tmp_path / "gt3" / "v.nii.gz", volume, np.diag([1.0, 1.0, 3.0, 1.0]))
    write_volume(tmp_path / "pred3" / "v.nii.gz", volume, np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match="spacing"):
        evaluate_folders(tmp_path / "pred3", tmp_path / "gt3", labels={"background": 0, "cell": 1})


def test_missing_prediction_is_an_error_listing_the_cases(tmp_path):
    label = square((10, 10), (2, 6), (2, 6))
    for case_id in ("a", "b", "c"):
        write_label_png(tmp_path / "gt" / f"{case_id}.png", label)
    write_label_png(tmp_path / "pred" / "b.png", label)
    with pytest.raises(DataError, match=r"no prediction for 2 of 3 .*: a, c;"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "cell": 1})


def test_prediction_values_outside_the_classes_name_the_file(tmp_path):
    label = square((10, 10), (2, 6), (2, 6))
    write_label_png(tmp_path / "gt" / "a.png", label)
    write_label_png(tmp_path / "pred" / "a.png", label * 5)
    with pytest.raises(DataError, match=r"pred/a\.png: prediction has label value\(s\) 5 outside the 2 classes"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={"background": 0, "cell": 1})


def test_the_protocols_other_communities_report_on_hand_computable_volumes():
    """TransUNet's Synapse convention (a missed or absent organ counts Dice 0 / HD95 0, a hallucinated one
    Dice 1 / HD95 0, every case counted) and the per-image mDice/mIoU, next to biosam2's own convention."""
    from biosam2.evaluation.metrics import Evaluator

    def volume(*organs):
        array = np.zeros((6, 6, 6), np.uint8)
        for label in organs:
            array[(label - 1) * 3 : label * 3, 1:4, 1:4] = label
        return array

    evaluator = Evaluator(3, ["background", "liver", "spleen"])
    evaluator.add_case("a", volume(1), volume(1, 2), spacing=(1.0, 1.0, 2.0))  # spleen missed
    evaluator.add_case("b", volume(2), volume(), spacing=(1.0, 1.0, 2.0))  # liver in neither, spleen hallucinated
    evaluator.add_case("c", volume(1, 2), volume(1, 2), spacing=(1.0, 1.0, 2.0))  # perfect
    result = evaluator.result()
    protocols = result.to_dict()["protocols"]
    transunet = protocols["transunet"]
    assert transunet["per_class"] == {"liver": {"dice": pytest.approx(2 / 3), "hd95": 0.0},
                                      "spleen": {"dice": pytest.approx(2 / 3), "hd95": 0.0}}
    assert transunet["mean_dice"] == pytest.approx(2 / 3) and transunet["hd95_unit"] == "mm"
    # biosam2's own convention on the same cases: the absent liver is left out, the missed and the
    # hallucinated spleen count Dice 0
    assert result.dice_mean["liver"] == 1.0 and result.dice_mean["spleen"] == pytest.approx(1 / 3)
    # per image: a = mean(1, 0), b = spleen 0 (liver undefined), c = 1
    assert protocols["per_image"]["mdice"] == pytest.approx(0.5) and protocols["per_image"]["miou"] == pytest.approx(0.5)
    assert result.cases[0].missed == ["spleen"] and result.cases[1].missed == []
    markdown = result.to_markdown()
    assert "TransUNet's protocol" in markdown and "mean Dice 0.6667" in markdown and "0.5000 / 0.5000" in markdown
