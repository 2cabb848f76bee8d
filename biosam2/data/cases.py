"""Loading the cases of a dataset: normalised image, label map and geometry, checked together."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from biosam2.data.dataset_format import IGNORE_INDEX, CaseFiles, DatasetSpec
from biosam2.data.image_io import LoadedImage, read_image, read_label, same_geometry
from biosam2.data.normalization import Normalization, ct_window_from_cases, scheme_for
from biosam2.errors import DataError


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # float32, (C, H, W) or (C, X, Y, Z); C is 1 or 3
    label: np.ndarray | None  # int64, (H, W) or (X, Y, Z): class ids, IGNORE_INDEX where unannotated
    reference: LoadedImage  # geometry for writing results (its array is a zero-memory placeholder)

    @property
    def is_volume(self) -> bool:
        return self.reference.is_volume

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.reference.spacing

    # What the training data asks of a case, whether it is held here or read from the cache (CachedCase).
    @property
    def num_slices(self) -> int | None:
        return self.image.shape[-1] if self.is_volume else None

    @cached_property
    def foreground_slices(self) -> tuple[int, ...]:
        """Slices of a volume that hold a class above the background (for foreground-centred samples)."""
        if not self.is_volume or self.label is None:
            return ()
        planes = (self.label > 0) & (self.label != IGNORE_INDEX)
        return tuple(np.flatnonzero(planes.reshape(-1, planes.shape[-1]).any(0)).tolist())

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(H, W) of the 2-D image, or of each slice."""
        return tuple(self.image.shape[1:3])

    def labels_of(self, z: int | None) -> np.ndarray:
        return self.label if z is None else self.label[..., z]

    def sample(self, z: int | None, region: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The normalised (C, H, W) image and label map of slice ``z`` (None: the 2-D image), or of its ``region``."""
        image, label = (self.image, self.label) if z is None else (self.image[..., z], self.label[..., z])
        return (image, label) if region is None else (image[(slice(None), *region)], label[region])

    def load(self) -> Case:
        return self


def geometry_only(loaded: LoadedImage) -> LoadedImage:
    """The same geometry without the pixel data (keeps memory down when cases are cached)."""
    placeholder = np.broadcast_to(np.zeros((), dtype=loaded.array.dtype), loaded.array.shape)
    return LoadedImage(placeholder, loaded.path, loaded.spacing, loaded.affine, loaded.reference)


def channels_first(loaded: LoadedImage) -> np.ndarray:
    array = loaded.array
    if loaded.is_volume:
        return array[None]
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def read_case_image(spec: DatasetSpec, files: CaseFiles) -> tuple[np.ndarray, LoadedImage]:
    """Raw (not normalised) channels-first image of a case, and its first file's geometry."""
    loaded = [read_image(path) for path in files.images]
    reference = loaded[0]
    if reference.is_volume and not spec.is_volumetric:  # a multi-page TIFF among 2-D images
        raise DataError(
            f"{reference.path}: a {reference.array.shape[-1]}-page TIFF z-stack in a 2-D dataset (file_ending "
            f"{spec.file_ending}); give each page as its own case, or the stack as a volume (.nii.gz)"
        )
    for other in loaded[1:]:
        difference = same_geometry(reference, other)
        if difference:
            raise DataError(f"{other.path}: channel file does not match {reference.path}: {difference}")
        if other.array.dtype != reference.array.dtype:
            raise DataError(f"{other.path}: pixel type {other.array.dtype} differs from {reference.path} ({reference.array.dtype})")
    image = np.concatenate([channels_first(item) for item in loaded], axis=0)
    expected = len(spec.channel_names)
    if image.shape[0] != expected:
        kind = {1: "grey", 3: "colour (RGB)"}
        raise DataError(
            f"{reference.path}: has {image.shape[0]} channel(s) ({kind.get(image.shape[0], 'other')}) but dataset.json "
            f"declares {expected} ({', '.join(spec.channel_names.values())}); all images of a dataset must agree "
            "(convert the odd ones, or fix channel_names)"
        )
    return image, reference


def read_case_label(spec: DatasetSpec, files: CaseFiles, reference: LoadedImage) -> np.ndarray:
    """The case's label map, checked against its image and dataset.json: class ids 0..K-1, and
    IGNORE_INDEX where the file has the dataset's ignore label."""
    if files.label is None:
        raise DataError(f"case {files.case_id}: label map missing (expected {spec.file_ending} in the labels folder)")
    label = read_label(files.label)
    difference = same_geometry(reference, label)
    if difference:
        raise DataError(f"{files.label}: label map does not match its image {reference.path}: {difference}")
    values = np.unique(label.array)
    declared = sorted(spec.declared_labels.values())
    undeclared = sorted(set(values.tolist()) - set(declared))
    if undeclared:
        raise DataError(
            f"{files.label}: label value(s) {undeclared} are not declared in dataset.json "
            f"(declared: {declared}); add them to \"labels\" or fix the label map"
        )
    array = label.array.astype(np.int64)
    if spec.ignore_label is not None:
        array[array == spec.ignore_label] = IGNORE_INDEX
    return array


def check_pixel_type(scheme: str, raw: np.ndarray, reference: LoadedImage) -> None:
    if scheme == "uint8" and raw.dtype != np.uint8:
        raise DataError(
            f"{reference.path}: {raw.dtype} pixels in a dataset normalised as 8-bit images; convert it to 8 bits "
            "or state \"normalization\": {\"scheme\": \"percentile\"} in dataset.json"
        )


def load_case(spec: DatasetSpec, files: CaseFiles, normalization: Normalization, with_label: bool = True) -> Case:
    raw, reference = read_case_image(spec, files)
    check_pixel_type(normalization.scheme, raw, reference)
    label = read_case_label(spec, files, reference) if with_label else None
    image = np.ascontiguousarray(normalization.apply(raw), dtype=np.float32)
    return Case(files.case_id, image, label, geometry_only(reference))


def resolve_normalization(spec: DatasetSpec, train_files: list[CaseFiles], max_cases: int = 20) -> Normalization:
    """The normalisation stated in dataset.json, or derived from the training cases (see normalization.py)."""
    if spec.normalization is not None:
        return Normalization.from_dict(spec.normalization, f"{spec.root / 'dataset.json'}: normalization")
    scheme = normalization_scheme(spec, train_files)
    if scheme != "ct":
        return Normalization(scheme)
    chosen = train_files[:: max(1, len(train_files) // max_cases)][:max_cases]

    def foreground_cases():  # one case in memory at a time, whatever max_cases is
        for files in chosen:
            raw, reference = read_case_image(spec, files)
            yield raw[0], read_case_label(spec, files, reference)

    return Normalization("ct", ct_window_from_cases(foreground_cases(), len(chosen)))


def normalization_scheme(spec: DatasetSpec, train_files: list[CaseFiles]) -> str:
    """The scheme stated in dataset.json, or the one derived from the first training case."""
    if spec.normalization is not None:
        return Normalization.from_dict(spec.normalization, f"{spec.root / 'dataset.json'}: normalization").scheme
    if not train_files:
        raise DataError(f"{spec.root}: no training cases to derive the intensity normalisation from")
    first, _ = read_case_image(spec, train_files[0])
    return scheme_for(spec.channel_names, first.dtype)
