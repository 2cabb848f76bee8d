"""What every dataset converter shares: destination checks, splits, reading slices, writing the dataset.

A converter first scans its source completely (so that a wrong layout fails before anything is
written), decides the split on the full case list, and then hands a :class:`Split` and a case loader
to :func:`write_dataset`. That builds the whole nnU-Net v2 folder in a staging directory beside DST
and swaps it in (:func:`biosam2.atomic_io.replace_directory`): DST is never left half written, a
failed conversion leaves the previous DST untouched, and SRC is only ever read.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from biosam2.atomic_io import replace_directory
from biosam2.data.dataset_format import DATASET_JSON, SPLIT_FOLDERS, write_dataset_json, write_splits
from biosam2.data.image_io import LoadedImage, write_image_png, write_label_png, write_like, write_volume
from biosam2.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
MAX_WORKERS = 4  # cases converted at once (threads); bounded to keep memory low for large CT volumes
UNKNOWN_SPACING_AFFINE = np.eye(4)
UNKNOWN_SPACING_NOTE = (
    "voxel spacing is not stored in the source files: volumes are written with an identity affine "
    "(1 mm voxels), so distances such as HD95 are in voxels, not mm"
)


@dataclass
class ConversionSummary:
    """What a conversion wrote: per-split case counts (after ``limit``) and what the user should know."""

    name: str
    dst: Path
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    full_counts: dict[str, int] = field(default_factory=dict)  # the split before ``limit``
    layout: str = ""

    def __str__(self) -> str:
        def describe(counts: dict[str, int]) -> str:
            return ", ".join(f"{split} {counts.get(split, 0)}" for split in SPLIT_NAMES)

        lines = [f"{self.name}: wrote {self.dst}"]
        if self.layout:
            lines.append(f"  source layout: {self.layout}")
        cases = f"  cases: {describe(self.counts)}"
        if self.full_counts and self.full_counts != self.counts:
            cases += f" (limited; the full split is {describe(self.full_counts)})"
        lines.append(cases)
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class Split:
    """Case ids per split; ``method`` is the sentence recorded in dataset.json saying how it was made."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    method: str

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLIT_NAMES}

    def limited(self, limit: int | None) -> Split:
        """The first ``limit`` cases (sorted by id) of each split; the split itself is unchanged."""
        if limit is None:
            return self
        return Split(*(tuple(sorted(getattr(self, name))[:limit]) for name in SPLIT_NAMES), self.method)


def make_split(train: Iterable[str], val: Iterable[str], test: Iterable[str], method: str, source: Path) -> Split:
    """A checked split: every part non-empty, and disjoint (so no case is both trained on and tested)."""
    split = Split(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)), method)
    empty = [name for name in SPLIT_NAMES if not getattr(split, name)]
    if empty:
        raise DataError(
            f"{source}: too few cases for a train/val/test split ({split.counts()}): {', '.join(empty)} would be "
            "empty; the source holds fewer cases than this dataset's layout has"
        )
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(getattr(split, first)) & set(getattr(split, second)))
        if shared:
            raise DataError(
                f"{source}: case(s) {shared[:5]} are in both {first} and {second}; each case must be in one split"
            )
    return split


def seeded_order(ids: Iterable[str], seed: int) -> list[str]:
    """A seeded permutation that is the same on every machine and NumPy/Python version: ids sorted by
    SHA-256 of ``f"{seed}:{id}"``."""
    return sorted(ids, key=lambda case: hashlib.sha256(f"{seed}:{case}".encode()).hexdigest())


def seeded_partition(ids: Iterable[str], seed: int, n_val: int, n_test: int) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test): the first ``n_test`` ids of :func:`seeded_order` are test, the next ``n_val`` val."""
    order = seeded_order(sorted(ids), seed)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


def check_paths(name: str, src: Path, dst: Path, *, overwrite: bool, limit: int | None) -> tuple[Path, Path]:
    """Refuse a missing SRC, a DST inside/around SRC (SRC is never modified), and a non-empty DST unless
    ``overwrite`` -- and even then only a DST that holds a dataset, so no unrelated folder is replaced.
    Runs before the source is scanned, so these mistakes cost nothing."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive number of cases per split, got {limit!r}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise DataError(f"{src}: source folder for {name} not found (or not a folder)")
    source, target = src.resolve(), dst.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise DataError(
            f"{dst}: the destination must lie outside the source {src} (the source is only read, never modified)"
        )
    if dst.exists():
        if not dst.is_dir():
            raise DataError(f"{dst}: exists and is not a folder; choose a new or empty folder as destination")
        if any(dst.iterdir()):
            if not overwrite:
                raise DataError(
                    f"{dst}: destination is not empty; choose a new or empty folder, or pass overwrite=True "
                    "(--overwrite) to replace the dataset there"
                )
            if not (dst / DATASET_JSON).is_file():
                raise DataError(
                    f"{dst}: not empty and holds no {DATASET_JSON}, so it is not a converted dataset; refusing to "
                    "replace it even with overwrite -- choose a new or empty folder"
                )
    return src, dst


def ordered_slices(numbered: dict[int, Path], volume: str, folder: Path, first: int) -> list[Path]:
    """Slice files of one volume in slice order, after checking the numbering is complete
    (``first`` .. ``first + n - 1``): a gap would silently stack a wrong volume."""
    numbers = sorted(numbered)
    expected = list(range(first, first + len(numbers)))
    if numbers != expected:
        missing = sorted(set(range(first, max(numbers) + 1)) - set(numbers))
        raise DataError(
            f"{folder}: slices of {volume} are numbered {numbers[0]}..{numbers[-1]}, expected a complete run from "
            f"{first}; missing {missing[:10] or 'none'}{' ...' if len(missing) > 10 else ''}. Restore the missing "
            "slice files (the volume cannot be rebuilt without them)"
        )
    return [numbered[number] for number in numbers]


def read_arrays(path: Path, keys: tuple[str, ...] = ("image", "label")) -> dict[str, np.ndarray]:
    """The named arrays of an HDF5 (``.h5``) or NumPy ``.npz`` file, as stored by SSL4MIS and TransUNet."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as stored:
                found = list(stored.files)
                arrays = {key: np.asarray(stored[key]) for key in keys if key in stored.files}
        else:
            import h5py

            with h5py.File(path, "r") as stored:
                found = list(stored.keys())
                arrays = {key: np.asarray(stored[key][()]) for key in keys if key in stored}
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot be read ({type(error).__name__}: {error}); is it truncated?") from None
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; expected {list(keys)}, found {found}")
    return arrays


def as_label_ids(array: np.ndarray, path: Path, allowed: Iterable[int] | None = None) -> np.ndarray:
    """Class ids as integers (floats must hold whole numbers); ``allowed``, when given, is enforced."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise DataError(f"{path}: label has non-integer values; labels must be class ids")
    elif array.dtype.kind not in "biu":
        raise DataError(f"{path}: label of type {array.dtype} is not a map of class ids")
    if array.size and array.min() < 0:
        raise DataError(f"{path}: label has negative values ({array.min()})")
    ids = array.astype(np.int64)
    if allowed is not None:
        unexpected = sorted(set(np.unique(ids).tolist()) - set(allowed))
        if unexpected:
            raise DataError(
                f"{path}: unexpected label value(s) {unexpected[:10]}; this dataset's labels are {sorted(allowed)}"
            )
    return ids


def slices_to_volume(slices: list[np.ndarray], sources: list[Path]) -> np.ndarray:
    """2-D ``(H, W)`` slices stacked along the last axis: an ``(H, W, Z)`` volume (nibabel order)."""
    shape = slices[0].shape
    for array, path in zip(slices, sources, strict=True):
        if array.ndim != 2 or array.shape != shape:
            raise DataError(
                f"{path}: slice of shape {array.shape}, expected a 2-D slice of shape {shape} like {sources[0].name}"
            )
    return np.stack(slices, axis=-1)


def zhw_to_volume(array: np.ndarray, path: Path) -> np.ndarray:
    """A ``(Z, H, W)`` array (SSL4MIS/TransUNet h5) as ``(H, W, Z)``, the same order as stacked slices."""
    if array.ndim != 3:
        raise DataError(f"{path}: expected a (slices, H, W) volume, found shape {array.shape}")
    return np.ascontiguousarray(np.transpose(array, (1, 2, 0)))


@dataclass
class CaseData:
    """One case ready to write. 2-D: ``affine`` and ``reference`` None (PNG). 3-D: ``reference`` keeps a
    source NIfTI's header and affine exactly; otherwise ``affine`` makes a new NIfTI."""

    image: np.ndarray
    label: np.ndarray
    source: Path
    affine: np.ndarray | None = None
    reference: LoadedImage | None = None

    @property
    def is_volume(self) -> bool:
        return self.affine is not None or self.reference is not None


def _write_case(root: Path, folder_key: str, case_id: str, case: CaseData, file_ending: str, spacing_known: bool) -> None:
    images, labels = (root / f for f in SPLIT_FOLDERS[folder_key])
    spatial = case.image.shape[:3] if case.is_volume else case.image.shape[:2]
    if spatial != case.label.shape:
        raise DataError(
            f"{case.source}: image of shape {case.image.shape} and label of shape {case.label.shape} differ"
        )
    image_path, label_path = images / f"{case_id}_0000{file_ending}", labels / f"{case_id}{file_ending}"
    label = case.label.astype(np.uint8)
    if case.reference is not None:
        write_like(image_path, case.image, case.reference)
        write_like(label_path, label, case.reference)
    elif case.affine is not None:
        write_volume(image_path, case.image, case.affine, spacing_known=spacing_known)
        write_volume(label_path, label, case.affine, spacing_known=spacing_known)
    else:
        write_image_png(image_path, case.image)
        write_label_png(label_path, label)


@dataclass
class DatasetInfo:
    """What dataset.json says besides the split: names, labels, format, normalisation, provenance."""

    name: str
    description: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str
    source: dict[str, str]  # dataset, reference, layout
    normalization: dict[str, Any] | None = None
    spacing_known: bool = True  # False: written with a 1 mm stand-in; evaluations then report voxels


def write_dataset(
    src: Path,
    dst: Path,
    *,
    info: DatasetInfo,
    split: Split,
    load_case: Callable[[str], CaseData],
    seed: int,
    limit: int | None,
    notes: list[str],
) -> ConversionSummary:
    """Write every case of ``split`` (after ``limit``), dataset.json and splits_final.json, atomically."""
    kept = split.limited(limit)
    notes = list(notes)
    if limit is not None:
        notes.append(f"limit={limit}: only the first {limit} case(s) of each split (by id) were written")

    jobs = [(split_name, case_id) for split_name in SPLIT_NAMES for case_id in getattr(kept, split_name)]

    def build(root: Path) -> None:
        def convert_one(job: tuple[str, str]) -> None:
            split_name, case_id = job
            log.info("%s: writing %s case %s", info.name, split_name, case_id)
            folder_key = "test" if split_name == "test" else "train"
            _write_case(root, folder_key, case_id, load_case(case_id), info.file_ending, info.spacing_known)

        # decoding and compressing images release the GIL: threads give most of a multi-core speed-up
        pool = ThreadPoolExecutor(max_workers=min(MAX_WORKERS, os.cpu_count() or 1))
        try:
            for _ in pool.map(convert_one, jobs):
                pass
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, do not convert the remaining cases
        extra: dict[str, Any] = {}
        if info.normalization is not None:
            extra["normalization"] = info.normalization
        if not info.spacing_known:
            extra["spacing"] = "unknown"
        extra["source"] = info.source
        extra["split"] = {
            "method": split.method,
            "seed": seed,
            "counts": split.counts(),
            "written": kept.counts(),
            "limit": limit,
            "test_cases": list(split.test),
        }
        extra["notes"] = notes
        write_dataset_json(
            root,
            name=info.name,
            description=info.description,
            channel_names=info.channel_names,
            labels=info.labels,
            file_ending=info.file_ending,
            num_training=len(set(kept.train) | set(kept.val)),
            **extra,
        )
        write_splits(root, [{"train": list(kept.train), "val": list(kept.val)}])

    replace_directory(build, dst)
    return ConversionSummary(info.name, dst, kept.counts(), notes, split.counts(), info.source.get("layout", ""))
