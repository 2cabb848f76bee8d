"""The one on-disk dataset format: nnU-Net v2's raw layout.

::

    DATASET/
      dataset.json          channel_names, labels (name -> id, 0 = background, consecutive; optionally
                            "ignore": the next id, nnU-Net v2's unannotated pixels), file_ending,
                            numTraining; optional "normalization" (see normalization.py),
                            optional "spacing": "unknown" when the files' voxel sizes are stand-ins
                            (distances such as HD95 are then reported in voxels, not mm)
      splits_final.json     [{"train": [case, ...], "val": [case, ...]}, ...]: one entry per fold
      imagesTr/CASE_0000.png    (one file per channel: _0000, _0001, ...; an RGB image is one file)
      labelsTr/CASE.png
      imagesTs/CASE_0000.png    the test split
      labelsTs/CASE.png

Validation cases come from ``splits_final.json`` (a subset of imagesTr), never from imagesTs.
Case ids and file endings are checked so that nothing read from these files can point outside the
dataset folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biosam2.data.image_io import IMAGE_2D_ENDINGS, VOLUME_ENDINGS
from biosam2.errors import DataError

DATASET_JSON = "dataset.json"
SPLITS_JSON = "splits_final.json"
REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SPLIT_FOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
IGNORE_KEY = "ignore"  # nnU-Net v2's ignore label: its pixels are unannotated
# The one value that marks pixels to leave out of loss and metrics once a label map is loaded for
# training: the dataset's ignore label, and padding or rotation from outside the image. Training
# label maps are uint8 (albumentations), so class ids must stay below it.
IGNORE_INDEX = 255
MAX_CLASSES = IGNORE_INDEX


def check_safe_name(name: Any, source: Path, what: str = "case id") -> str:
    """Refuse names that are paths ('../../etc/passwd', 'a/b', absolute paths)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise DataError(
            f"{source}: {what} {name!r} is not a plain file name (letters, digits, '.', '_', '-'); "
            "paths are refused so that nothing can point outside the dataset folder"
        )
    return name


def is_colour(channel_names: dict[str, str]) -> bool:
    """channel_names of an RGB image (R, G, B): one colour file per case, not three channel files."""
    names = [str(n).upper() for n in channel_names.values()]
    return names in (["R", "G", "B"], ["RED", "GREEN", "BLUE"])


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    images: tuple[Path, ...]  # one per channel file
    label: Path | None


@dataclass
class DatasetSpec:
    root: Path
    channel_names: dict[str, str]
    labels: dict[str, int]  # the classes (the model's outputs), without the ignore label
    file_ending: str
    num_training: int | None = None
    ignore_label: int | None = None  # id of nnU-Net's "ignore" label (== num_classes), if declared
    name: str = ""
    normalization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in sorted(self.labels.items(), key=lambda item: item[1])]

    @property
    def declared_labels(self) -> dict[str, int]:
        """``labels`` as dataset.json states them: the classes and, if any, "ignore"."""
        return {**self.labels, IGNORE_KEY: self.ignore_label} if self.ignore_label is not None else dict(self.labels)

    @property
    def spacing_known(self) -> bool:
        """False when dataset.json says the voxel sizes in the files are stand-ins (e.g. 1 mm)."""
        return self.raw.get("spacing") != "unknown"

    @property
    def is_volumetric(self) -> bool:
        return self.file_ending in VOLUME_ENDINGS

    @property
    def num_channel_files(self) -> int:
        """Files per case: one per channel, except a colour 2-D image that holds all three."""
        if not self.is_volumetric and is_colour(self.channel_names):
            return 1
        return len(self.channel_names)

    def list_cases(self, split: str) -> list[CaseFiles]:
        """Cases of ``train`` (imagesTr) or ``test`` (imagesTs), sorted by id."""
        image_folder, label_folder = (self.root / f for f in SPLIT_FOLDERS[split])
        if not image_folder.is_dir():
            return []
        pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(self.file_ending)}$")
        channels: dict[str, dict[int, Path]] = {}
        for path in image_folder.iterdir():
            match = pattern.match(path.name)
            if match:
                channels.setdefault(match.group(1), {})[int(match.group(2))] = path
        cases = []
        for case_id in sorted(channels):
            files = channels[case_id]
            # The same rule as for ids in splits_final.json, which names these cases.
            check_safe_name(case_id, files[min(files)])
            wanted = list(range(self.num_channel_files))
            if sorted(files) != wanted:
                raise DataError(
                    f"{image_folder}: case {case_id} has channel files {sorted(files)}, expected "
                    f"{wanted} (dataset.json lists {len(self.channel_names)} channel(s))"
                )
            label = label_folder / f"{case_id}{self.file_ending}"
            cases.append(CaseFiles(case_id, tuple(files[i] for i in wanted), label if label.exists() else None))
        return cases

    def load_splits(self) -> list[dict[str, list[str]]]:
        """The folds of ``splits_final.json`` (ids checked), or [] when the file does not exist."""
        path = self.root / SPLITS_JSON
        if not path.exists():
            return []
        try:
            folds = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        if isinstance(folds, dict):
            folds = [folds]
        if not isinstance(folds, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in folds):
            raise DataError(f"{path}: expected a list of folds, each {{'train': [...], 'val': [...]}}")
        for fold in folds:
            for key in ("train", "val"):
                fold[key] = [check_safe_name(case, path) for case in fold[key]]
        return folds


def load_dataset_spec(root: str | Path) -> DatasetSpec:
    """Read and validate ``dataset.json``; every problem is named with the file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    path = root / DATASET_JSON
    if not path.is_file():
        raise DataError(
            f"{path}: missing. A dataset needs dataset.json with {', '.join(REQUIRED_KEYS)} "
            "(nnU-Net v2 format); `biosam2 convert` writes it for public datasets"
        )
    try:
        raw = json.loads(path.read_text())
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; required: {', '.join(REQUIRED_KEYS)}")

    channel_names = raw["channel_names"]
    if not isinstance(channel_names, dict) or not channel_names:
        raise DataError(f"{path}: channel_names must be a non-empty object like {{\"0\": \"CT\"}}")
    if sorted(channel_names, key=int) != [str(i) for i in range(len(channel_names))]:
        raise DataError(f"{path}: channel_names keys must be 0, 1, ...; found {list(channel_names)}")
    labels, ignore_label = split_labels(raw["labels"], path)
    if len(labels) > MAX_CLASSES:
        raise DataError(
            f"{path}: {len(labels)} classes; biosam2 trains at most {MAX_CLASSES} (ids 0..{MAX_CLASSES - 1}): "
            f"id {IGNORE_INDEX} marks unannotated pixels in its 8-bit training label maps. Merge classes"
        )
    ending = raw["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in IMAGE_2D_ENDINGS + VOLUME_ENDINGS:
        raise DataError(
            f"{path}: file_ending {ending!r} is not supported; use one of {', '.join(IMAGE_2D_ENDINGS + VOLUME_ENDINGS)}"
        )
    spec = DatasetSpec(
        root=root,
        channel_names={str(k): str(v) for k, v in channel_names.items()},
        labels=labels,
        file_ending=ending,
        num_training=raw.get("numTraining"),
        ignore_label=ignore_label,
        name=str(raw.get("name", root.name)),
        normalization=raw.get("normalization"),
        raw=raw,
    )
    if spec.num_channel_files not in (1, 3) and len(channel_names) not in (1, 3):
        # SAM2's frozen encoder takes three channels: one channel is repeated, three are taken as they are.
        # Other counts would need a learned projection in front of it, which biosam2 does not have.
        raise DataError(
            f"{path}: biosam2 takes 1 (grey) or 3 (colour, or three modalities) input channels; dataset.json lists "
            f"{len(channel_names)} ({', '.join(map(str, channel_names.values()))}). Keep 1 or 3 of them: list those in "
            "channel_names and renumber their files _0000, _0001, _0002 (e.g. BraTS: T1ce, T2, FLAIR)"
        )
    return spec


def split_labels(labels: Any, source: Any, error: type[Exception] = DataError) -> tuple[dict[str, int], int | None]:
    """dataset.json's ``labels`` -> (the classes, the ignore label's id or None), validated.

    Classes: ids 0 (background) .. K-1, consecutive. nnU-Net v2's "ignore" label must be the highest
    id, and with consecutive classes that is K. Regions (lists of ids) are refused.
    """
    regions = sorted(k for k, v in labels.items() if isinstance(v, (list, tuple))) if isinstance(labels, dict) else []
    if regions:
        raise error(
            f"{source}: labels {', '.join(map(repr, regions))} are nnU-Net regions (lists of ids); region-based "
            "training is not supported by biosam2: give each class one id (e.g. BraTS: edema, non-enhancing, enhancing)"
        )
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise error(f"{source}: labels must map names to integer ids, e.g. {{\"background\": 0, \"tumour\": 1}}")
    classes = {str(name): value for name, value in labels.items() if name != IGNORE_KEY}
    ids = sorted(classes.values())
    if ids != list(range(len(ids))) or len(ids) < 2:
        raise error(
            f"{source}: label ids must be consecutive from 0 (background) with at least one class; found {ids}"
        )
    ignore = labels.get(IGNORE_KEY)
    if ignore is not None and ignore != len(ids):
        raise error(
            f"{source}: \"{IGNORE_KEY}\": {ignore} must be the highest label id, right after the classes "
            f"0..{len(ids) - 1} (nnU-Net v2's rule): set \"{IGNORE_KEY}\": {len(ids)}"
        )
    return classes, ignore


def write_dataset_json(
    root: Path,
    *,
    name: str,
    channel_names: dict[str, str],
    labels: dict[str, int],
    file_ending: str,
    num_training: int,
    description: str = "",
    **extra: Any,
) -> None:
    from biosam2.atomic_io import atomic_write_json

    payload = {
        "name": name,
        "description": description,
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": num_training,
        "file_ending": file_ending,
        **extra,
    }
    atomic_write_json(root / DATASET_JSON, payload)


def write_splits(root: Path, folds: list[dict[str, list[str]]]) -> None:
    from biosam2.atomic_io import atomic_write_json

    atomic_write_json(root / SPLITS_JSON, [{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in folds])
