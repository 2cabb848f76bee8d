"""Dataset converters: on the real data in ../shared/data where it exists, and on small files written
here in the layouts that are not available there (ISBI TIFF stacks, ACDC NIfTI release, Synapse
TransUNet npz/h5, raw BTCV NIfTI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from biosam2.data.cases import load_case
from biosam2.data.convert import CONVERTERS, convert_dataset, map_to_synapse
from biosam2.data.convert.common import seeded_partition
from biosam2.data.convert.kvasir_seg import pair_images_and_masks
from biosam2.data.dataset_format import SPLITS_JSON, DatasetSpec, load_dataset_spec
from biosam2.data.normalization import Normalization
from biosam2.evaluation.evaluate import evaluate_folders
from biosam2.errors import ConfigError, DataError
from conftest import SHARED_DATA, require_shared

SPLITS = ("train", "val", "test")


def check_dataset(dst: Path, full: dict[str, int], written: dict[str, int]) -> DatasetSpec:
    """The written dataset is valid: spec loads, split counts, disjoint splits, test never in
    splits_final, every case loads with a label map holding only declared ids."""
    spec = load_dataset_spec(dst)
    payload = json.loads((dst / "dataset.json").read_text())
    assert payload["labels"]["background"] == 0
    assert payload["split"]["counts"] == full and payload["split"]["written"] == written
    assert payload["split"]["method"]
    (fold,) = json.loads((dst / SPLITS_JSON).read_text())
    train_ids, test_ids = [c.case_id for c in spec.list_cases("train")], [c.case_id for c in spec.list_cases("test")]
    assert (len(fold["train"]), len(fold["val"]), len(test_ids)) == tuple(written[s] for s in SPLITS)
    assert sorted(set(fold["train"]) | set(fold["val"])) == train_ids
    assert spec.num_training == len(train_ids)
    assert not set(fold["train"]) & set(fold["val"])
    assert not set(test_ids) & (set(fold["train"]) | set(fold["val"]))
    normalization = Normalization.from_dict(spec.normalization)
    for split in ("train", "test"):
        for files in spec.list_cases(split):
            case = load_case(spec, files, normalization)
            assert set(np.unique(case.label).tolist()) <= set(spec.labels.values())
            assert case.image.shape[0] == len(spec.channel_names)
    return spec


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ---- ISBI 2012 -------------------------------------------------------------------------------------
def test_isbi2012_real_folder_maps_membrane_and_splits_blocks(tmp_path):
    src = require_shared(SHARED_DATA / "isbi2012")
    summary = convert_dataset("isbi2012", src, tmp_path / "isbi")
    dst = tmp_path / "isbi"
    assert summary.counts == {"train": 20, "val": 4, "test": 6}
    spec = check_dataset(dst, summary.counts, summary.counts)
    assert spec.labels == {"background": 0, "membrane": 1} and spec.normalization == {"scheme": "uint8"}
    (fold,) = json.loads((dst / SPLITS_JSON).read_text())
    assert fold["train"] == [f"isbi_{i:02d}" for i in range(20)]
    assert fold["val"] == [f"isbi_{i:02d}" for i in range(20, 24)]
    assert [c.case_id for c in spec.list_cases("test")] == [f"isbi_{i:02d}" for i in range(24, 30)]
    for section, folder in ((0, "Tr"), (22, "Tr"), (27, "Ts")):
        source = read_png(src / "labels" / f"{section}.png")
        label = read_png(dst / f"labels{folder}" / f"isbi_{section:02d}.png")
        assert np.array_equal(label == 1, source == 0) and 0.05 < label.mean() < 0.5  # membrane is a minority
        image = read_png(dst / f"images{folder}" / f"isbi_{section:02d}_0000.png")
        assert np.array_equal(image, read_png(src / "images" / f"{section}.png"))


def write_isbi_stacks(folder: Path, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (30, 12, 10), dtype=np.uint8)
    if labels is None:
        labels = np.where(rng.random((30, 12, 10)) < 0.3, 0, 255).astype(np.uint8)
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "train-volume.tif", volume)
    tifffile.imwrite(folder / "train-labels.tif", labels)
    return volume, labels


def test_isbi2012_tiff_stacks(tmp_path):
    volume, labels = write_isbi_stacks(tmp_path / "src")
    summary = convert_dataset("isbi2012", tmp_path / "src", tmp_path / "out")
    assert summary.counts == {"train": 20, "val": 4, "test": 6} and "TIFF" in summary.layout
    check_dataset(tmp_path / "out", summary.counts, summary.counts)
    assert np.array_equal(read_png(tmp_path / "out/labelsTs/isbi_29.png"), (labels[29] == 0).astype(np.uint8))
    assert np.array_equal(read_png(tmp_path / "out/imagesTr/isbi_21_0000.png"), volume[21])


def test_isbi2012_refuses_other_label_values(tmp_path):
    labels = np.full((30, 12, 10), 255, np.uint8)
    labels[5, 0, 0] = 128
    write_isbi_stacks(tmp_path / "src", labels)
    with pytest.raises(DataError, match=r"train-labels.tif page 5: label value\(s\) \[128\]"):
        convert_dataset("isbi2012", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half written


# ---- Kvasir-SEG ------------------------------------------------------------------------------------
def test_kvasir_seg_real_split_and_pixels(tmp_path):
    src = require_shared(SHARED_DATA / "kvasir-seg")
    summary = convert_dataset("kvasir-seg", src, tmp_path / "kvasir", limit=3)
    assert summary.full_counts == {"train": 800, "val": 80, "test": 120}
    assert summary.counts == {"train": 3, "val": 3, "test": 3}
    spec = check_dataset(tmp_path / "kvasir", summary.full_counts, summary.counts)
    assert spec.num_channel_files == 1 and spec.channel_names == {"0": "R", "1": "G", "2": "B"}
    # the split is fixed: the full one is reproduced, pinned for seed 0, and moves with the seed
    test_cases = json.loads((tmp_path / "kvasir/dataset.json").read_text())["split"]["test_cases"]
    pairs, _ = pair_images_and_masks(src)
    train, val, test = seeded_partition(pairs, 0, n_val=80, n_test=120)
    assert test == test_cases and not set(test) & (set(train) | set(val)) and len(train) == 800
    assert test[:3] == ["cju0t4oil7vzk099370nun5h9", "cju0vtox5ain6099360pu62rp", "cju13hp5rnbjx0835bf0jowgx"]
    assert seeded_partition(pairs, 1, n_val=80, n_test=120)[2] != test
    for files in spec.list_cases("test"):
        image_jpg, mask_jpg = pairs[files.case_id]
        assert np.array_equal(read_png(files.images[0]), read_png(image_jpg))  # lossless re-encoding
        expected = (read_png(mask_jpg).mean(axis=-1) >= 128).astype(np.uint8)
        assert np.array_equal(read_png(files.label), expected) and expected.any()


def write_kvasir(folder: Path, sizes: list[tuple[int, int]], names: list[tuple[str, str]]) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(1)
    for (height, width), (image_name, mask_name) in zip(sizes, names, strict=True):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / "images" / image_name)
        mask = np.zeros((height, width), np.uint8)
        mask[: height // 2, : width // 3] = 255
        Image.fromarray(np.stack([mask] * 3, -1)).save(folder / "masks" / mask_name, quality=75)


def test_kvasir_seg_pairs_ids_ignoring_case_and_checks_masks(tmp_path):
    names = [(f"c{i}.jpg", f"c{i}.jpg") for i in range(5)] + [("MixedCase.JPG", "mixedcase.jpg")]
    sizes = [(20 + 3 * i, 30 + i) for i in range(6)]
    write_kvasir(tmp_path / "src", sizes, names)
    summary = convert_dataset("kvasir-seg", tmp_path / "src", tmp_path / "out")
    assert summary.counts == {"train": 4, "val": 1, "test": 1}  # 12 % and 8 % of 6, at least one each
    spec = check_dataset(tmp_path / "out", summary.counts, summary.counts)
    every = {f.case_id: f for split in ("train", "test") for f in spec.list_cases(split)}
    assert sorted(every) == ["MixedCase", "c0", "c1", "c2", "c3", "c4"]
    label = read_png(every["MixedCase"].label)
    assert label.shape == (35, 35) and label[:17, :11].all() and not label[18:].any() and not label[:, 12:].any()

    (tmp_path / "src/masks/c3.jpg").unlink()
    with pytest.raises(DataError, match=r"masks: no mask for 1 image\(s\), e.g. \['c3.jpg'\]"):
        convert_dataset("kvasir-seg", tmp_path / "src", tmp_path / "out2")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "src/masks/c3.jpg")
    with pytest.raises(DataError, match=r"c3.jpg: mask size \(5, 5\) differs from its image"):
        convert_dataset("kvasir-seg", tmp_path / "src", tmp_path / "out2")


# ---- ACDC ------------------------------------------------------------------------------------------
def test_acdc_h5_real_rebuilds_volumes(tmp_path):
    src = require_shared(SHARED_DATA / "acdc")
    summary = convert_dataset("acdc", src, tmp_path / "acdc", limit=2)
    assert summary.full_counts == {"train": 140, "val": 20, "test": 40}
    assert summary.counts == {"train": 2, "val": 2, "test": 2}
    assert any("1 mm" in note and "voxels" in note for note in summary.notes)
    spec = check_dataset(tmp_path / "acdc", summary.full_counts, summary.counts)
    assert "1 mm" in spec.raw["description"] and spec.labels == {"background": 0, "RV": 1, "myocardium": 2, "LV": 3}
    assert not spec.spacing_known  # evaluations of this dataset report HD95 in voxels
    (fold,) = json.loads((tmp_path / "acdc" / SPLITS_JSON).read_text())
    val_list = (src / "val.list").read_text().split()
    assert set(fold["val"]) <= set(val_list) and not set(fold["train"]) & set(val_list)

    # a training volume is its slices stacked in slice-number order along the last axis
    case = fold["train"][0]
    slices = sorted((src / "data").glob(f"{case}_slice_*.h5"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    stacked = np.stack([h5py.File(path, "r")["label"][()] for path in slices], axis=-1)
    written = nib.load(tmp_path / "acdc/labelsTr" / f"{case}.nii.gz")
    assert np.array_equal(np.asarray(written.dataobj), stacked) and len(slices) == stacked.shape[-1] >= 6
    assert np.allclose(written.affine, np.eye(4))
    # the files themselves say the spacing is a stand-in: copied away from dataset.json, HD95 is in voxels
    copied = tmp_path / "copied_labels"
    shutil.copytree(tmp_path / "acdc" / "labelsTr", copied)
    assert evaluate_folders(copied, copied).hd95_unit == "voxels"
    # a test volume (Z, H, W) is written (H, W, Z), image and label alike
    test_case = spec.list_cases("test")[0]
    with h5py.File(src / "data" / f"{test_case.case_id}.h5", "r") as stored:
        image, label = stored["image"][()], stored["label"][()]
    identity = Normalization("ct", window=(0.0, 1.0))  # the h5 images are already in [0, 1]
    loaded = load_case(spec, test_case, identity)
    assert loaded.spacing == (1.0, 1.0, 1.0) and loaded.label.shape == label.transpose(1, 2, 0).shape
    assert np.array_equal(loaded.label, label.transpose(1, 2, 0))
    assert np.allclose(loaded.image[0], image.transpose(1, 2, 0), atol=1e-6)


def write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    with h5py.File(path, "w") as stored:
        stored["image"], stored["label"] = image, label


def test_acdc_h5_refuses_incomplete_slice_numbering(tmp_path):
    (tmp_path / "src/data").mkdir(parents=True)
    for number in (1, 2, 4):
        path = tmp_path / f"src/data/patient003_frame01_slice_{number}.h5"
        write_h5(path, np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))
    for split, volume in (("val", "patient002_frame01"), ("test", "patient001_frame01")):
        write_h5(tmp_path / f"src/data/{volume}.h5", np.zeros((3, 8, 8), np.float32), np.zeros((3, 8, 8), np.uint8))
        (tmp_path / f"src/{split}.list").write_text(volume + "\n")
    (tmp_path / "src/train.list").write_text("patient003_frame01\n")
    with pytest.raises(DataError, match=r"slices of patient003_frame01 are numbered 1..4, .* missing \[3\]"):
        convert_dataset("acdc", tmp_path / "src", tmp_path / "out")


def write_acdc_release(root: Path, patients: list[int]) -> np.ndarray:
    affine = np.diag([1.5, 1.25, 10.0, 1.0])
    affine[:3, 3] = [-100.0, 20.0, 5.0]
    rng = np.random.default_rng(2)
    for patient in patients:
        folder = root / "training" / f"patient{patient:03d}"
        folder.mkdir(parents=True)
        for frame in (1, 12):
            name = f"patient{patient:03d}_frame{frame:02d}"
            image = rng.integers(0, 400, (9, 8, 4)).astype(np.int16)
            label = rng.integers(0, 4, (9, 8, 4)).astype(np.uint8)
            nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_gt.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((9, 8, 4, 2), np.int16), affine), folder / f"patient{patient:03d}_4d.nii.gz")
    return affine


def test_acdc_nifti_release_splits_by_patient_and_keeps_geometry(tmp_path):
    # 1 is an SSL4MIS test patient, 2 val, 3 and 4 train; 101-105 are outside the lists (seeded split)
    affine = write_acdc_release(tmp_path / "src", [1, 2, 3, 4, 101, 102, 103, 104, 105])
    summary = convert_dataset("acdc", tmp_path / "src", tmp_path / "out", seed=0)
    spec = check_dataset(tmp_path / "out", summary.full_counts, summary.counts)
    assert summary.counts == {"train": 12, "val": 2, "test": 4}  # 5 other patients: 1 test, 0 val, 4 train
    (fold,) = json.loads((tmp_path / "out" / SPLITS_JSON).read_text())
    test_ids = [c.case_id for c in spec.list_cases("test")]
    assert fold["val"] == ["patient002_frame01", "patient002_frame12"]
    assert {"patient001_frame01", "patient001_frame12"} <= set(test_ids)
    assert {"patient003_frame01", "patient004_frame12"} <= set(fold["train"])
    for ids in (fold["train"], fold["val"], test_ids):  # both frames of a patient stay together
        patients = [case.split("_")[0] for case in ids]
        assert all(patients.count(p) == 2 for p in patients)
    assert not any("4d" in case for case in fold["train"] + test_ids)
    files = spec.list_cases("test")[0]
    case = load_case(spec, files, Normalization("zscore"))
    assert case.spacing == (1.5, 1.25, 10.0) and np.allclose(case.reference.affine, affine)
    source = tmp_path / "src/training/patient001/patient001_frame01_gt.nii.gz"
    assert np.array_equal(case.label, np.asarray(nib.load(source).dataobj))

    (tmp_path / "src/training/patient003/patient003_frame12_gt.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient003_frame12_gt.nii.gz: missing"):
        convert_dataset("acdc", tmp_path / "src", tmp_path / "out2")


# ---- Synapse ---------------------------------------------------------------------------------------
def test_map_to_synapse_schemes():
    source = np.arange(0, 120).reshape(8, 15)
    btcv = map_to_synapse(source, "btcv", Path("x"))
    total = map_to_synapse(source, "totalsegmentator", Path("x"))
    kept = {int(s): int(btcv.flat[s]) for s in np.flatnonzero(btcv)}
    assert kept == {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
    kept = {int(s): int(total.flat[s]) for s in np.flatnonzero(total)}
    assert kept == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 8, 52: 7}
    assert np.array_equal(map_to_synapse(np.arange(9.0), "synapse", Path("x")), np.arange(9))
    with pytest.raises(DataError, match=r"x: unexpected label value\(s\) \[9\]"):
        map_to_synapse(np.arange(10), "synapse", Path("x"))


def write_transunet(root: Path, train: dict[int, int], test: list[int]) -> dict[str, np.ndarray]:
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    rng = np.random.default_rng(3)
    volumes = {}
    for case, depth in train.items():
        image, label = rng.random((depth, 8, 8), dtype=np.float32), rng.integers(0, 9, (depth, 8, 8)).astype(np.float32)
        for index in range(depth):
            np.savez(root / f"train_npz/case{case:04d}_slice{index:03d}.npz", image=image[index], label=label[index])
        volumes[f"case{case:04d}"] = label
    for case in test:
        image, label = rng.random((5, 8, 8), dtype=np.float32), rng.integers(0, 9, (5, 8, 8)).astype(np.uint8)
        write_h5(root / f"test_vol_h5/case{case:04d}.npy.h5", image, label)
        volumes[f"case{case:04d}"] = label
    return volumes


def test_synapse_transunet_layout(tmp_path):
    volumes = write_transunet(tmp_path / "src", {5: 3, 6: 4, 7: 2, 9: 3, 10: 12}, [1, 2])
    summary = convert_dataset("synapse", tmp_path / "src", tmp_path / "out", seed=0)
    assert summary.counts == {"train": 2, "val": 3, "test": 2}
    spec = check_dataset(tmp_path / "out", summary.counts, summary.counts)
    assert spec.normalization == {"scheme": "ct", "window": [0.0, 1.0]} and spec.channel_names == {"0": "CT"}
    assert not spec.spacing_known
    assert spec.labels["aorta"] == 7 and spec.labels["pancreas"] == 8 and len(spec.labels) == 9
    assert any("voxels" in note for note in summary.notes)
    (fold,) = json.loads((tmp_path / "out" / SPLITS_JSON).read_text())
    assert fold["val"] == seeded_partition(["case0005", "case0006", "case0007", "case0009", "case0010"], 0, 3, 0)[1]
    for files in spec.list_cases("train") + spec.list_cases("test"):
        label = nib.load(files.label)
        assert np.array_equal(np.asarray(label.dataobj), volumes[files.case_id].transpose(1, 2, 0))
        assert np.allclose(label.affine, np.eye(4))
    image = nib.load(tmp_path / "out/imagesTr/case0010_0000.nii.gz")
    stored = np.load(tmp_path / "src/train_npz/case0010_slice011.npz")["image"]
    assert image.get_data_dtype() == np.float32 and np.array_equal(np.asarray(image.dataobj)[..., 11], stored)
    # a different seed carves a different val set; the test set never moves
    other = convert_dataset("synapse", tmp_path / "src", tmp_path / "out_seed2", seed=2)
    (fold2,) = json.loads((tmp_path / "out_seed2" / SPLITS_JSON).read_text())
    assert fold2["val"] != fold["val"] and other.counts == summary.counts
    test_files = sorted(p.name for p in (tmp_path / "out_seed2/imagesTs").iterdir())
    assert test_files == ["case0001_0000.nii.gz", "case0002_0000.nii.gz"]


def test_synapse_transunet_refuses_bad_labels_and_gaps(tmp_path):
    write_transunet(tmp_path / "src", {5: 3, 6: 3}, [1])
    np.savez(tmp_path / "src/train_npz/case0006_slice001.npz", image=np.zeros((8, 8)), label=np.full((8, 8), 12.0))
    with pytest.raises(DataError, match=r"case0006_slice001.npz: unexpected label value\(s\) \[12\]"):
        convert_dataset("synapse", tmp_path / "src", tmp_path / "out")
    (tmp_path / "src/train_npz/case0006_slice001.npz").unlink()
    with pytest.raises(DataError, match=r"slices of case0006 .* missing \[1\]"):
        convert_dataset("synapse", tmp_path / "src", tmp_path / "out")


def write_btcv(root: Path, cases: list[int]) -> np.ndarray:
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [170.0, 150.0, -300.0]
    for case in cases:
        label = np.arange(14, dtype=np.uint8).repeat(4).reshape(7, 8)[..., None].repeat(3, axis=-1)
        image = (np.arange(7 * 8 * 3).reshape(7, 8, 3) * 10 - 1000).astype(np.int16)
        for kind, array in (("img", image), ("label", label)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), root / kind / f"{kind}{case:04d}.nii.gz")
    return affine


def test_synapse_raw_btcv_maps_labels_and_keeps_geometry(tmp_path):
    affine = write_btcv(tmp_path / "src/RawData/Training", [1, 3, 5, 6, 7, 9, 50])
    summary = convert_dataset("synapse", tmp_path / "src", tmp_path / "out", seed=0)
    # case 50 is not one of TransUNet's 30: split on its own (40 % of 1 case rounds to 0 test), so it joins the
    # training pool 5, 6, 7, 9, 50, of which 3 are val
    assert summary.counts == {"train": 2, "val": 3, "test": 2}
    spec = check_dataset(tmp_path / "out", summary.counts, summary.counts)
    assert spec.normalization == {"scheme": "ct", "window": [-125, 275]}
    assert [c.case_id for c in spec.list_cases("test")] == ["case0001", "case0003"]
    (fold,) = json.loads((tmp_path / "out" / SPLITS_JSON).read_text())
    assert sorted(fold["train"] + fold["val"]) == ["case0005", "case0006", "case0007", "case0009", "case0050"]
    files = spec.list_cases("test")[0]
    case = load_case(spec, files, Normalization.from_dict(spec.normalization))
    assert case.spacing == pytest.approx((0.8, 0.8, 2.5)) and np.allclose(case.reference.affine, affine)
    source = np.asarray(nib.load(tmp_path / "src/RawData/Training/label/label0001.nii.gz").dataobj)
    expected = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0, 11: 8, 12: 0, 13: 0}
    for source_id, synapse_id in expected.items():
        assert set(np.unique(case.label[source == source_id]).tolist()) == {synapse_id}
    image = nib.load(tmp_path / "out/imagesTs/case0001_0000.nii.gz")
    assert image.get_data_dtype() == np.int16
    source_image = nib.load(tmp_path / "src/RawData/Training/img/img0001.nii.gz")
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(source_image.dataobj))


def test_synapse_ct_example_single_case(tmp_path):
    src = require_shared(SHARED_DATA / "ct-example")
    summary = convert_dataset("synapse", src, tmp_path / "ct")
    assert summary.counts == {"train": 1, "val": 1, "test": 1}
    assert any("totalsegmentator" in note for note in summary.notes)
    assert any("NEVER to report accuracy" in note for note in summary.notes)
    spec = check_dataset(tmp_path / "ct", summary.counts, summary.counts)
    assert "ONE CASE ONLY" in spec.raw["description"]
    # train and val are the two halves of the slices, each keeping its place in world space
    normalization = Normalization.from_dict(spec.normalization)
    halves = {c.case_id: load_case(spec, c, normalization) for c in spec.list_cases("train")}
    first, second = halves["example_ct_sm_part1"], halves["example_ct_sm_part2"]
    assert first.label.shape == (122, 101, 15) and second.label.shape == (122, 101, 15)
    assert np.allclose(second.reference.affine[:3, 3], first.reference.affine[:3, 3] + [0, 0, 45.0])
    (files,) = spec.list_cases("test")
    case = load_case(spec, files, Normalization.from_dict(spec.normalization))
    source_image, source_label = (nib.load(src / name) for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"))
    assert case.label.shape == (122, 101, 30) and case.spacing == (3.0, 3.0, 3.0)
    assert np.allclose(case.reference.affine, source_image.affine)
    source = np.asarray(source_label.dataobj)
    for source_id, synapse_id in {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 52: 7, 7: 8}.items():
        assert np.array_equal(case.label == synapse_id, source == source_id) and (source == source_id).any()
    assert not case.label[~np.isin(source, [1, 2, 3, 4, 5, 6, 7, 52])].any()
    image = nib.load(tmp_path / "ct/imagesTs/example_ct_sm_0000.nii.gz")
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(source_image.dataobj))


# ---- destination, source layout and options ----------------------------------------------------------
def test_destination_is_refused_when_not_empty_and_replaced_with_overwrite(tmp_path):
    write_isbi_stacks(tmp_path / "src")
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"out: destination is not empty.*overwrite"):
        convert_dataset("isbi2012", tmp_path / "src", dst)
    with pytest.raises(DataError, match=r"holds no dataset.json.*refusing"):
        convert_dataset("isbi2012", tmp_path / "src", dst, overwrite=True)
    assert (dst / "notes.txt").read_text() == "mine"
    (dst / "notes.txt").unlink()
    convert_dataset("isbi2012", tmp_path / "src", dst, limit=2)
    (dst / "imagesTr" / "stale_0000.png").write_bytes(b"old")
    summary = convert_dataset("isbi2012", tmp_path / "src", dst, overwrite=True)
    assert summary.counts["train"] == 20 and not (dst / "imagesTr" / "stale_0000.png").exists()
    with pytest.raises(DataError, match=r"must lie outside the source"):
        convert_dataset("isbi2012", tmp_path / "src", tmp_path / "src" / "converted")
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before  # SRC untouched


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("isbi2012", r"not an ISBI 2012 source; expected images/0.png"),
        ("kvasir-seg", r"images: folder not found; a Kvasir-SEG source holds images/<id>.jpg"),
        ("acdc", r"not an ACDC source; expected data/\*.h5 with train.list"),
        ("synapse", r"not a Synapse source; expected train_npz/"),
    ],
)
def test_wrong_source_layout_names_path_and_expected_layout(tmp_path, name, expected):
    src = tmp_path / "wrong"
    (src / "somewhere").mkdir(parents=True)
    (src / "somewhere" / "readme.txt").write_text("not a dataset")
    with pytest.raises(DataError, match=expected) as error:
        convert_dataset(name, src, tmp_path / "out")
    assert str(src) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_options_are_checked(tmp_path):
    assert set(CONVERTERS) == {"isbi2012", "kvasir-seg", "acdc", "synapse"}
    with pytest.raises(ConfigError, match=r"unknown dataset 'brats'.*isbi2012, kvasir-seg, acdc, synapse"):
        convert_dataset("brats", tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"isbi2012 converter has no option\(s\) source_labels"):
        convert_dataset("isbi2012", tmp_path, tmp_path / "out", source_labels="btcv")
    with pytest.raises(ConfigError, match=r"source_labels 'amos' is unknown"):
        convert_dataset("synapse", tmp_path, tmp_path / "out", source_labels="amos")
    with pytest.raises(ConfigError, match=r"limit must be a positive number"):
        convert_dataset("isbi2012", tmp_path, tmp_path / "out", limit=0)
    with pytest.raises(DataError, match=r"missing: source folder for acdc not found"):
        convert_dataset("acdc", tmp_path / "missing", tmp_path / "out")
