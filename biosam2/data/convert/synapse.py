"""Synapse multi-organ abdominal CT (MICCAI 2015 BTCV "Beyond the Cranial Vault"), as used by TransUNet:
8 organs, 30 labelled CT volumes, TransUNet's 18 train / 12 test cases.

Source layouts (detected in this order):

(a) TransUNet preprocessing: ``SRC/train_npz/caseNNNN_sliceNNN.npz`` (``image`` (512, 512) float in
    [0, 1], ``label``) and ``SRC/test_vol_h5/caseNNNN.npy.h5`` (``image``, ``label`` of shape (Z, 512, 512)).
    Training slices are stacked per case in slice order (numbering checked complete from 0), test
    volumes (Z, H, W) become (H, W, Z), the same order. TransUNet already windowed the CT to
    [-125, 275] HU and scaled it to [0, 1], so images are written unchanged as float32 with
    normalisation ``ct`` window [0, 1] (a no-op that keeps them as they are). No voxel spacing is
    stored: identity affine (1 mm), HD95 in voxels. Labels are already Synapse ids.
(b) raw BTCV NIfTI: folders ``img/`` (``img0001.nii.gz``) and ``label/`` (``label0001.nii.gz``) side by
    side anywhere under SRC (``RawData/Training``); affine, spacing and header kept; normalisation
    ``ct`` window [-125, 275] HU as TransUNet. Case ``imgNNNN`` becomes ``caseNNNN``.
(c) one CT and its label map alone in SRC (the label's file name contains ``seg``, ``label`` or
    ``gt``), e.g. the TotalSegmentator example; geometry kept, window as (b).

Labels: the Synapse ids 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 liver, 6 stomach,
7 aorta, 8 pancreas. ``source_labels`` says what the source ids mean and :func:`map_to_synapse` (one
function for every layout) maps them: ``synapse`` (ids already 0..8; layout (a)'s default; other
ids refused), ``btcv`` (BTCV's 13 organs: 1->1, 2->2, 3->3, 4->4, 6 liver->5, 7 stomach->6, 8 aorta->7,
11 pancreas->8, the rest -> 0; layout (b)'s default) or ``totalsegmentator`` (1->1, 2->2, 3->3, 4->4,
5->5, 6->6, 52 aorta->7, 7 pancreas->8, the rest -> 0; layout (c)'s default when id 52 is present,
else ``btcv``).

Split: TransUNet's. Test cases 1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38; the 18 others train. In
layout (a) the split is given by the folder a case is in. Val is carved from the training cases:
3 of them, with ``seed`` (:func:`seeded_partition`). Cases outside TransUNet's 30 (layout (b) with
other data) are split among themselves with ``seed``, 40 % test (TransUNet's 12/30). Layout (c) has
one case only: its first half of slices (``<id>_part1``) is the training case, the second half
(``<id>_part2``, origin shifted so it stays in place in world space) the validation case, and the
whole volume the test case -- which contains both halves: for pipeline checks, never accuracy.
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
from biosam2.data.image_io import NIFTI_ENDINGS, file_ending, read_image, read_label, same_geometry
from biosam2.errors import ConfigError, DataError

SYNAPSE_LABELS = {
    "background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4,
    "liver": 5, "stomach": 6, "aorta": 7, "pancreas": 8,
}
SOURCE_LABEL_MAPS: dict[str, dict[int, int]] = {
    "synapse": {i: i for i in range(1, 9)},
    "btcv": {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8},
    "totalsegmentator": {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 52: 7, 7: 8},
}
TOTALSEGMENTATOR_AORTA = 52
TRANSUNET_TEST = frozenset((1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38))
TRANSUNET_TRAIN = frozenset((5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40))
NUM_VAL = 3
FALLBACK_TEST_FRACTION = len(TRANSUNET_TEST) / (len(TRANSUNET_TEST) + len(TRANSUNET_TRAIN))
HU_WINDOW = [-125, 275]
LABEL_NAME_HINTS = ("seg", "label", "gt")
TRANSUNET_LAYOUT = "train_npz/caseNNNN_sliceNNN.npz and test_vol_h5/caseNNNN.npy.h5 (TransUNet)"
BTCV_LAYOUT = "img/imgNNNN.nii.gz and label/labelNNNN.nii.gz side by side (raw BTCV, e.g. RawData/Training)"
SINGLE_LAYOUT = "one CT volume and one label map (name containing seg, label or gt) as NIfTI in SRC"
_NPZ_SLICE = re.compile(r"(case\d+)_slice(\d+)\.npz")
_H5_VOLUME = re.compile(r"(case\d+)\.npy\.h5")
_NUMBERED = re.compile(r"[A-Za-z_-]*(\d+)")


def map_to_synapse(label: np.ndarray, source_labels: str, path: Path) -> np.ndarray:
    """Source class ids -> the 8 Synapse organ ids (uint8), by ``SOURCE_LABEL_MAPS[source_labels]``.

    Unlisted ids become background, except for ``synapse`` sources, where they mean a broken file."""
    table = SOURCE_LABEL_MAPS[source_labels]
    ids = as_label_ids(label, path, [0, *table] if source_labels == "synapse" else None)
    lookup = np.zeros(max(int(ids.max(initial=0)), *table) + 1, dtype=np.uint8)
    for source_id, synapse_id in table.items():
        lookup[source_id] = synapse_id
    return lookup[ids]


def _check_source_labels(source_labels: str | None) -> None:
    if source_labels is not None and source_labels not in SOURCE_LABEL_MAPS:
        raise ConfigError(f"source_labels {source_labels!r} is unknown; use one of {', '.join(SOURCE_LABEL_MAPS)}")


def _case_number(case: str) -> int:
    return int(case.removeprefix("case"))


def _carve_val(train_pool: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(train, val): ``NUM_VAL`` seeded cases of the training pool (fewer if the pool is tiny)."""
    train, val, _ = seeded_partition(train_pool, seed, n_val=min(NUM_VAL, len(train_pool) - 1), n_test=0)
    return train, val


# ---- layout (a): TransUNet npz/h5 ---------------------------------------------------------------
def _transunet_source(src: Path) -> tuple[dict[str, list[Path]], dict[str, Path]]:
    """Slice files per training case (in order) and the h5 file per test case."""
    folders = {name: src / name for name in ("train_npz", "test_vol_h5")}
    for folder in folders.values():
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; the TransUNet layout needs both {TRANSUNET_LAYOUT}")
    slices: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in folders["train_npz"].iterdir():
        if match := _NPZ_SLICE.fullmatch(path.name):
            slices[match.group(1)][int(match.group(2))] = path
    volumes = {m.group(1): path for path in folders["test_vol_h5"].iterdir() if (m := _H5_VOLUME.fullmatch(path.name))}
    for folder, found in ((folders["train_npz"], slices), (folders["test_vol_h5"], volumes)):
        if not found:
            raise DataError(f"{folder}: no case files found; expected {TRANSUNET_LAYOUT}")
    train = {case: ordered_slices(numbered, case, folders["train_npz"], first=0) for case, numbered in slices.items()}
    return train, volumes


def _load_transunet(files: list[Path] | Path, source_labels: str) -> CaseData:
    """A test volume (Z, H, W) from its h5, or a training volume stacked from its (H, W) slices."""
    if isinstance(files, Path):
        arrays = read_arrays(files)
        image = zhw_to_volume(arrays["image"], files)
        label = zhw_to_volume(map_to_synapse(arrays["label"], source_labels, files), files)
        source = files
    else:
        slices = [read_arrays(path) for path in files]
        image = slices_to_volume([arrays["image"] for arrays in slices], files)
        labels = [map_to_synapse(a["label"], source_labels, path) for a, path in zip(slices, files, strict=True)]
        label = slices_to_volume(labels, files)
        source = files[0]
    return CaseData(image=image.astype(np.float32), label=label, source=source, affine=UNKNOWN_SPACING_AFFINE)


# ---- layouts (b) and (c): NIfTI with geometry -----------------------------------------------------
def _nifti_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and file_ending(path) in NIFTI_ENDINGS)


def _btcv_folders(src: Path) -> tuple[Path, Path] | None:
    """The one ``img/`` folder under SRC with a ``label/`` folder beside it, if any."""
    pairs = [(img, img.parent / "label") for img in sorted(src.rglob("img")) if (img.parent / "label").is_dir()]
    pairs = [(img, label) for img, label in pairs if img.is_dir()]
    if len(pairs) > 1:
        where = [str(img.parent) for img, _ in pairs]
        raise DataError(f"{src}: several img/ + label/ folder pairs ({where}); point SRC at the one to convert")
    return pairs[0] if pairs else None


def _btcv_cases(img: Path, label: Path) -> dict[str, tuple[Path, Path]]:
    """``caseNNNN -> (image, label)``, paired by the number in the file names (img0001 <-> label0001)."""
    def numbered(folder: Path) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for path in _nifti_files(folder):
            match = _NUMBERED.fullmatch(path.name[: -len(file_ending(path))])
            if not match:
                raise DataError(f"{path}: expected a numbered file such as img0001.nii.gz / label0001.nii.gz")
            number = int(match.group(1))
            if number in found:
                raise DataError(f"{path}: case number {number} also used by {found[number].name}")
            found[number] = path
        return found

    images, labels = numbered(img), numbered(label)
    if not images:
        raise DataError(f"{img}: no NIfTI images found; expected {BTCV_LAYOUT}")
    missing = sorted(images.keys() - labels.keys())
    if missing:
        names = [images[number].name for number in missing[:5]]
        raise DataError(f"{label}: no label map for image(s) {names}; expected {BTCV_LAYOUT}")
    return {f"case{number:04d}": (images[number], labels[number]) for number in sorted(images)}


def _btcv_split(cases: list[str], seed: int) -> tuple[list[str], list[str], list[str], str]:
    """TransUNet's test/train cases; others split among themselves; then val carved from train."""
    known = [c for c in cases if _case_number(c) in TRANSUNET_TEST | TRANSUNET_TRAIN]
    others = sorted(set(cases) - set(known))
    n_other_test = round(FALLBACK_TEST_FRACTION * len(others))
    other_train, _, other_test = seeded_partition(others, seed, n_val=0, n_test=n_other_test)
    test = [c for c in known if _case_number(c) in TRANSUNET_TEST] + other_test
    train, val = _carve_val([c for c in known if _case_number(c) in TRANSUNET_TRAIN] + other_train, seed)
    method = (
        f"TransUNet's split: test = cases {sorted(TRANSUNET_TEST)}, train = the 18 others; val = {NUM_VAL} of the "
        f"training cases chosen with seed={seed} (ordered by SHA-256 of '<seed>:<case>')"
    )
    if others:
        method += (
            f"; the {len(others)} case(s) outside TransUNet's 30 were split with the same seed, "
            f"{FALLBACK_TEST_FRACTION:.0%} test"
        )
    return train, val, test, method


def _single_case(src: Path) -> tuple[str, Path, Path] | None:
    """(case id, image, label) when SRC holds exactly one CT and one label map; None if no NIfTI at all."""
    files = _nifti_files(src)
    if not files:
        return None
    labels = [p for p in files if any(hint in p.name.lower() for hint in LABEL_NAME_HINTS)]
    images = [p for p in files if p not in labels]
    if len(images) != 1 or len(labels) != 1:
        raise DataError(
            f"{src}: found {[p.name for p in files]}; the single-case layout needs exactly one CT volume and one label "
            f"map whose name contains {' / '.join(LABEL_NAME_HINTS)} (or use {TRANSUNET_LAYOUT}, or {BTCV_LAYOUT})"
        )
    image = images[0]
    return check_safe_name(image.name[: -len(file_ending(image))], image), image, labels[0]


def _load_nifti_case(image_path: Path, label_path: Path, source_labels: str) -> CaseData:
    image, label = read_image(image_path), read_label(label_path)
    difference = same_geometry(image, label)
    if difference:
        raise DataError(f"{label_path}: label map does not match its image {image_path.name}: {difference}")
    mapped = map_to_synapse(label.array, source_labels, label_path)
    return CaseData(image=image.array, label=mapped, source=label_path, reference=image)


def _slab(case: CaseData, first_half: bool) -> CaseData:
    """Half of a volume's slices (last axis), with the affine moved so each voxel keeps its world position."""
    from biosam2.data.image_io import LoadedImage

    depth = case.image.shape[2]
    start, stop = (0, depth // 2) if first_half else (depth // 2, depth)
    reference = case.reference
    affine = reference.affine.copy()
    affine[:3, 3] += affine[:3, 2] * start
    image = np.ascontiguousarray(case.image[:, :, start:stop])
    slab = LoadedImage(image, reference.path, reference.spacing, affine, reference.reference)
    return CaseData(image=image, label=np.ascontiguousarray(case.label[:, :, start:stop]), source=case.source, reference=slab)


def convert_synapse(
    src: Path,
    dst: Path,
    *,
    seed: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    source_labels: str | None = None,
) -> ConversionSummary:
    """Convert Synapse/BTCV (TransUNet npz/h5, raw BTCV NIfTI or one CT + label) to an nnU-Net v2 dataset.

    ``source_labels``: ``synapse``, ``btcv`` or ``totalsegmentator`` (what the source ids mean); None
    picks the layout's default (see the module docstring)."""
    _check_source_labels(source_labels)
    src, dst = check_paths("synapse", src, dst, overwrite=overwrite, limit=limit)
    notes: list[str] = []
    normalization = {"scheme": "ct", "window": list(HU_WINDOW)}
    single_case = False
    if (src / "train_npz").exists() or (src / "test_vol_h5").exists():
        layout, source_labels = TRANSUNET_LAYOUT, source_labels or "synapse"
        train_files, test_files = _transunet_source(src)
        train, val = _carve_val(sorted(train_files), seed)
        test = sorted(test_files)
        method = (
            f"TransUNet's split as given by the folders: train_npz cases are train, test_vol_h5 cases test; val = "
            f"{NUM_VAL} of the training cases chosen with seed={seed} (ordered by SHA-256 of '<seed>:<case>')"
        )
        normalization = {"scheme": "ct", "window": [0.0, 1.0]}
        notes.append(
            "images are TransUNet's: CT already clipped to [-125, 275] HU and scaled to [0, 1], written unchanged "
            "(normalization ct window [0, 1] keeps them as they are)"
        )
        notes.append(UNKNOWN_SPACING_NOTE)

        def load_case(case: str) -> CaseData:
            return _load_transunet(train_files.get(case) or test_files[case], source_labels)

    elif folders := _btcv_folders(src):
        layout, source_labels = BTCV_LAYOUT, source_labels or "btcv"
        pairs = _btcv_cases(*folders)
        train, val, test, method = _btcv_split(list(pairs), seed)
        notes.append("affine and voxel spacing kept from the source NIfTI files (HD95 in mm)")

        def load_case(case: str) -> CaseData:
            return _load_nifti_case(*pairs[case], source_labels)

    elif single := _single_case(src):
        case, image_path, label_path = single
        layout = SINGLE_LAYOUT
        if source_labels is None:
            found = set(np.unique(read_label(label_path).array).tolist())
            source_labels = "totalsegmentator" if TOTALSEGMENTATOR_AORTA in found else "btcv"
            notes.append(
                f"source_labels auto-detected as {source_labels!r} (label id {TOTALSEGMENTATOR_AORTA} "
                f"{'present' if source_labels == 'totalsegmentator' else 'absent'}); pass source_labels to override"
            )
        train, val, test = [f"{case}_part1"], [f"{case}_part2"], [case]
        single_case = True
        method = (
            "a single case: train = its first half of slices, val = the second half, test = the whole volume "
            "(which contains both: no honest split is possible)"
        )
        notes.append(
            "ONLY ONE CASE: train and val are the two halves of its slices and test is the whole volume, so the "
            "test case overlaps training; use this dataset for pipeline checks only, NEVER to report accuracy"
        )
        notes.append("affine and voxel spacing kept from the source NIfTI files (HD95 in mm)")

        def load_case(case_id: str) -> CaseData:
            whole = _load_nifti_case(image_path, label_path, source_labels)
            if case_id == case:
                return whole
            return _slab(whole, first_half=case_id.endswith("_part1"))

    else:
        raise DataError(
            f"{src}: not a Synapse source; expected {TRANSUNET_LAYOUT}, or {BTCV_LAYOUT}, or {SINGLE_LAYOUT}"
        )

    split = make_split(train, val, test, method, src)
    mapping = ", ".join(f"{s}->{d}" for s, d in SOURCE_LABEL_MAPS[source_labels].items())
    description = "Synapse multi-organ abdominal CT (BTCV), the 8 organs of TransUNet's benchmark"
    if layout == TRANSUNET_LAYOUT:
        description += (
            "; images preprocessed by TransUNet (window [-125, 275] HU scaled to [0, 1]), spacing unknown (1 mm)"
        )
    if single_case:
        description += "; ONE CASE ONLY, split into halves for train/val, whole for test: pipeline checks only, never accuracy"
    info = DatasetInfo(
        name="Synapse",
        description=description,
        channel_names={"0": "CT"},
        labels=dict(SYNAPSE_LABELS),
        file_ending=".nii.gz",
        normalization=normalization,
        source={
            "dataset": "Synapse multi-organ CT (MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault)",
            "reference": "Landman et al., MICCAI 2015 BTCV workshop; split of Chen et al., TransUNet, 2021",
            "layout": layout,
            "labels": f"source_labels={source_labels}: {mapping}, "
            + ("other ids refused" if source_labels == "synapse" else "other ids -> 0"),
        },
        spacing_known=layout != TRANSUNET_LAYOUT,
    )
    return write_dataset(src, dst, info=info, split=split, load_case=load_case, seed=seed, limit=limit, notes=notes)
