"""ACDC cardiac cine MRI (Bernard et al., IEEE TMI 2018): RV, myocardium and LV at end-diastole and
end-systole, one case per volume (``patientNNN_frameNN``).

Source layouts (detected in this order):

(a) SSL4MIS preprocessing: ``SRC/data/*.h5`` with ``SRC/train.list``, ``val.list``, ``test.list``
    (volume ids, one a line). Each h5 holds ``image`` (float32 in [0, 1]) and ``label`` (uint8). A
    volume is ``data/<id>.h5`` of shape (Z, H, W) when present, otherwise it is rebuilt by stacking
    ``data/<id>_slice_N.h5`` (2-D) in slice-number order, numbering checked to be complete 1..n (how
    SSL4MIS ships its training volumes). Volumes are written as NIfTI in nibabel order: (Z, H, W)
    becomes (H, W, Z) for image and label alike, so slice k of the output is SSL4MIS slice k+1. The
    files store no voxel spacing: the affine is the identity (1 mm), and HD95 on them is in voxels.
(b) the original NIfTI release: ``SRC/**/patientNNN/patientNNN_frameNN.nii.gz`` with
    ``patientNNN_frameNN_gt.nii.gz`` beside it (``*_4d.nii.gz`` ignored); affine, spacing and header
    are kept.

Labels (both layouts, unchanged): 0 background, 1 RV, 2 myocardium, 3 LV.

Split: (a) the SSL4MIS lists: train.list -> train, val.list -> val (both in imagesTr, val listed in
splits_final.json), test.list -> test (imagesTs). (b) by patient, so both frames of a patient stay
together, with the same patient partition as those lists (the constants below, 70/10/20 patients
of ACDC's 100 training patients); patients outside them (e.g. the release's testing patients
101-150) are split among themselves with ``seed`` (:func:`seeded_partition`: 20 % test, 10 % val).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from biosam2.data.convert.common import (
    UNKNOWN_SPACING_AFFINE,
    UNKNOWN_SPACING_NOTE,
    CaseData,
    ConversionSummary,
    DatasetInfo,
    as_label_ids,
    check_paths,
    make_split,
    ordered_slices,
    read_arrays,
    seeded_partition,
    slices_to_volume,
    write_dataset,
    zhw_to_volume,
)
from biosam2.data.dataset_format import check_safe_name
from biosam2.data.image_io import read_image, read_label, same_geometry
from biosam2.errors import DataError

LABELS = {"background": 0, "RV": 1, "myocardium": 2, "LV": 3}
LIST_FILES = {"train": "train.list", "val": "val.list", "test": "test.list"}
# The SSL4MIS patient partition (from its train.list / val.list / test.list), by patient number.
SSL4MIS_PATIENTS: dict[str, frozenset[int]] = {
    "train": frozenset((
        3, 4, 5, 6, 9, 10, 12, 14, 15, 16, 17, 18, 20, 21, 23, 25, 26, 27, 29, 31, 32, 34, 35, 36, 37, 38, 40,
        41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 53, 54, 55, 56, 57, 58, 60, 61, 62, 63, 67, 69, 70, 71, 72, 73,
        74, 76, 77, 79, 86, 88, 89, 90, 91, 92, 94, 95, 96, 97, 98, 99, 100,
    )),
    "val": frozenset((2, 19, 28, 30, 39, 45, 78, 82, 85, 87)),
    "test": frozenset((1, 7, 8, 11, 13, 22, 24, 33, 52, 59, 64, 65, 66, 68, 75, 80, 81, 83, 84, 93)),
}
FALLBACK_VAL_FRACTION, FALLBACK_TEST_FRACTION = 0.1, 0.2
H5_LAYOUT = "data/*.h5 with train.list, val.list and test.list (SSL4MIS)"
NIFTI_LAYOUT = "**/patientNNN/patientNNN_frameNN.nii.gz with patientNNN_frameNN_gt.nii.gz (original release)"
_FRAME = re.compile(r"patient(\d+)_frame\d+\.nii\.gz")
_SLICE = re.compile(r"(.+)_slice_(\d+)\.h5")


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: missing; the SSL4MIS layout needs {', '.join(LIST_FILES.values())} beside data/")
    return [check_safe_name(line.strip(), path) for line in path.read_text().splitlines() if line.strip()]


def _h5_source(src: Path) -> tuple[dict[str, list[str]], dict[str, list[Path]]]:
    """The SSL4MIS lists, and for each listed volume the h5 file(s) it is read from."""
    lists = {split: _read_list(src / name) for split, name in LIST_FILES.items()}
    data = src / "data"
    slices: dict[str, dict[int, Path]] = defaultdict(dict)
    volumes = {}
    for path in data.iterdir():
        if match := _SLICE.fullmatch(path.name):
            slices[match.group(1)][int(match.group(2))] = path
        elif path.suffix == ".h5":
            volumes[path.stem] = path
    files = {}
    for split, ids in lists.items():
        for volume in ids:
            if volume in volumes:
                files[volume] = [volumes[volume]]
            elif volume in slices:
                files[volume] = ordered_slices(slices[volume], volume, data, first=1)
            else:
                raise DataError(
                    f"{data}: {volume} (in {LIST_FILES[split]}) has neither {volume}.h5 nor {volume}_slice_N.h5 files"
                )
    return lists, files


def _load_h5_volume(files: list[Path]) -> CaseData:
    """One volume from ``<id>.h5`` (Z, H, W) or from its 2-D slice files, as (H, W, Z)."""
    arrays = [read_arrays(path) for path in files]
    labels = [as_label_ids(a["label"], path, LABELS.values()) for a, path in zip(arrays, files, strict=True)]
    if len(files) == 1 and arrays[0]["image"].ndim == 3:
        image, label = zhw_to_volume(arrays[0]["image"], files[0]), zhw_to_volume(labels[0], files[0])
    else:
        image, label = slices_to_volume([a["image"] for a in arrays], files), slices_to_volume(labels, files)
    return CaseData(image=image.astype(np.float32), label=label, source=files[0], affine=UNKNOWN_SPACING_AFFINE)


def _nifti_frames(src: Path) -> dict[str, tuple[Path, Path]]:
    """``patientNNN_frameNN -> (image, gt)`` for every frame under ``src``."""
    frames: dict[str, tuple[Path, Path]] = {}
    for path in sorted(src.rglob("patient*_frame*.nii.gz")):
        if not _FRAME.fullmatch(path.name):
            continue  # *_gt.nii.gz, *_4d.nii.gz
        case = check_safe_name(path.name.removesuffix(".nii.gz"), path)
        gt = path.with_name(f"{case}_gt.nii.gz")
        if not gt.is_file():
            raise DataError(f"{gt}: missing; every frame {path.name} needs its ground truth {gt.name} beside it")
        if case in frames:
            raise DataError(f"{path}: {case} also found at {frames[case][0]}; keep one copy of each frame")
        frames[case] = (path, gt)
    return frames


def _load_nifti_frame(image_path: Path, gt_path: Path) -> CaseData:
    image, gt = read_image(image_path), read_label(gt_path)
    difference = same_geometry(image, gt)
    if difference:
        raise DataError(f"{gt_path}: ground truth does not match its image {image_path.name}: {difference}")
    label = as_label_ids(gt.array, gt_path, LABELS.values())
    return CaseData(image=image.array, label=label, source=gt_path, reference=image)


def _patient_split(frames: dict[str, tuple[Path, Path]], seed: int) -> tuple[dict[str, list[str]], str]:
    """Cases per split, all frames of a patient together: SSL4MIS's partition, seeded for other patients."""
    patients: dict[int, list[str]] = defaultdict(list)
    for case in frames:
        patients[int(_FRAME.fullmatch(f"{case}.nii.gz").group(1))].append(case)
    split_of = {p: name for name, members in SSL4MIS_PATIENTS.items() for p in members if p in patients}
    others = sorted(set(patients) - set(split_of))
    n_test, n_val = round(FALLBACK_TEST_FRACTION * len(others)), round(FALLBACK_VAL_FRACTION * len(others))
    train, val, test = seeded_partition([str(p) for p in others], seed, n_val=n_val, n_test=n_test)
    for name, members in (("train", train), ("val", val), ("test", test)):
        split_of.update({int(p): name for p in members})
    cases: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for patient, members in patients.items():
        cases[split_of[patient]].extend(members)
    method = (
        "by patient (both frames together): patients in the SSL4MIS lists keep their split (70 train / 10 val / "
        f"20 test patients of ACDC's training set); the {len(others)} other patient(s) are split with seed={seed} "
        f"(ordered by SHA-256 of '<seed>:<patient number>': first {FALLBACK_TEST_FRACTION:.0%} test, next "
        f"{FALLBACK_VAL_FRACTION:.0%} val, rest train)"
    )
    return cases, method


def convert_acdc(
    src: Path, dst: Path, *, seed: int = 0, limit: int | None = None, overwrite: bool = False
) -> ConversionSummary:
    """Convert ACDC (SSL4MIS h5 or the original NIfTI release) to an nnU-Net v2 NIfTI dataset in ``dst``."""
    src, dst = check_paths("acdc", src, dst, overwrite=overwrite, limit=limit)
    notes = []
    if (src / "data").is_dir() and any((src / name).exists() for name in LIST_FILES.values()):
        cases, files = _h5_source(src)
        method = "the SSL4MIS lists: train.list -> train, val.list -> val, test.list -> test (seed not used)"
        layout = H5_LAYOUT
        notes.append(UNKNOWN_SPACING_NOTE)
        notes.append("volumes are (H, W, Z) = the SSL4MIS (Z, H, W) arrays transposed; slice k is SSL4MIS slice k+1")

        def load_case(case: str) -> CaseData:
            return _load_h5_volume(files[case])

    else:
        frames = _nifti_frames(src)
        if not frames:
            raise DataError(f"{src}: not an ACDC source; expected {H5_LAYOUT}, or {NIFTI_LAYOUT}")
        cases, method = _patient_split(frames, seed)
        layout = NIFTI_LAYOUT
        notes.append("affine and voxel spacing kept from the source NIfTI files (HD95 in mm)")

        def load_case(case: str) -> CaseData:
            return _load_nifti_frame(*frames[case])

    split = make_split(cases["train"], cases["val"], cases["test"], method, src)
    description = "ACDC cardiac cine MRI, end-diastolic and end-systolic frames: RV, myocardium, LV"
    if layout == H5_LAYOUT:
        description += "; voxel spacing unknown in the SSL4MIS files, written as 1 mm (distances in voxels)"
    info = DatasetInfo(
        name="ACDC",
        description=description,
        channel_names={"0": "cine MRI"},
        labels=dict(LABELS),
        file_ending=".nii.gz",
        normalization={"scheme": "zscore"},
        source={
            "dataset": "ACDC (Automated Cardiac Diagnosis Challenge)",
            "reference": "Bernard et al., IEEE TMI 2018",
            "layout": layout,
            "labels": "unchanged: 0 background, 1 RV, 2 myocardium, 3 LV",
            **({"spacing": "unknown, written as 1 mm (identity affine)"} if layout == H5_LAYOUT else {}),
        },
        spacing_known=layout != H5_LAYOUT,
    )
    return write_dataset(src, dst, info=info, split=split, load_case=load_case, seed=seed, limit=limit, notes=notes)
