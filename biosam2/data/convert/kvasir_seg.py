"""Kvasir-SEG polyp segmentation (Jha et al., MMM 2020): 1000 colonoscopy images with polyp masks.

Source layout: ``SRC/images/<id>.jpg`` and ``SRC/masks/<id>.jpg``, paired by id; ids are matched
without regard to letter case (``ABC.JPG`` pairs with ``abc.jpg``). Images come in 333 different
sizes; each mask must have its image's size. ``kavsir_bboxes.json`` is not needed.

Labels: masks are JPEG, so values near 0 and 255 are noisy; grey value >= 128 is ``polyp`` (1),
anything darker background (0).

Output: images re-encoded as lossless PNG (nnU-Net wants one file ending for images and labels, and
a JPEG label would be lossy), the RGB image in one file (channels R, G, B); normalisation ``uint8``.

Split: there is no official one. The sorted ids are permuted with ``seed`` (:func:`seeded_order`,
SHA-256 of ``"{seed}:{id}"``, identical on every machine); the first 12 % are test and the next 8 %
val, the rest train: 800 train / 80 val / 120 test for the original 1000 pairs (880/120 train+val vs
test, val = 80 of the 880).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biosam2.data.convert.common import (
    CaseData,
    ConversionSummary,
    DatasetInfo,
    check_paths,
    make_split,
    seeded_partition,
    write_dataset,
)
from biosam2.data.dataset_format import check_safe_name
from biosam2.data.image_io import IMAGE_2D_ENDINGS, file_ending, read_image
from biosam2.errors import DataError

TEST_FRACTION = 0.12
VAL_FRACTION = 0.08
MASK_THRESHOLD = 128
LAYOUT = "images/<id>.jpg and masks/<id>.jpg (one mask per image, same id and size)"


def _by_id(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` keyed by lower-cased id; two files whose ids differ only in case are refused."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; a Kvasir-SEG source holds {LAYOUT}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and file_ending(path) in IMAGE_2D_ENDINGS:
            key = path.name[: -len(file_ending(path))].lower()
            if key in files:
                raise DataError(
                    f"{folder}: {files[key].name} and {path.name} have the same id up to letter case; keep one"
                )
            files[key] = path
    return files


def pair_images_and_masks(src: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """``case id -> (image, mask)`` (the case id is the image's file name without its ending), and the
    names of masks that have no image."""
    images, masks = _by_id(src / "images"), _by_id(src / "masks")
    if not images:
        raise DataError(f"{src / 'images'}: no images found; a Kvasir-SEG source holds {LAYOUT}")
    missing = sorted(images[key].name for key in images.keys() - masks.keys())
    if missing:
        raise DataError(
            f"{src / 'masks'}: no mask for {len(missing)} image(s), e.g. {missing[:5]}; every image in "
            f"{src / 'images'} needs a mask with the same id"
        )
    pairs = {}
    for key, image in images.items():
        case = check_safe_name(image.name[: -len(file_ending(image))], image)
        pairs[case] = (image, masks[key])
    return pairs, sorted(masks[key].name for key in masks.keys() - images.keys())


def polyp_label(mask: np.ndarray) -> np.ndarray:
    """1 where the (JPEG-noisy) mask is bright, 0 elsewhere; a colour mask is averaged to grey first."""
    grey = mask.mean(axis=-1) if mask.ndim == 3 else mask
    return (grey >= MASK_THRESHOLD).astype(np.uint8)


def convert_kvasir_seg(
    src: Path, dst: Path, *, seed: int = 0, limit: int | None = None, overwrite: bool = False
) -> ConversionSummary:
    """Convert Kvasir-SEG to an nnU-Net v2 2-D dataset (RGB PNG images, binary PNG labels) in ``dst``."""
    src, dst = check_paths("kvasir-seg", src, dst, overwrite=overwrite, limit=limit)
    pairs, orphans = pair_images_and_masks(src)
    n_test = max(1, round(TEST_FRACTION * len(pairs)))
    n_val = max(1, round(VAL_FRACTION * len(pairs)))
    train, val, test = seeded_partition(pairs, seed, n_val=n_val, n_test=n_test)
    method = (
        f"seeded permutation (seed={seed}) of the sorted ids: ids ordered by SHA-256 of '<seed>:<id>'; the first "
        f"{n_test} ({TEST_FRACTION:.0%}) are test, the next {n_val} ({VAL_FRACTION:.0%}) val, the remaining "
        f"{len(train)} train"
    )
    split = make_split(train, val, test, method, src)

    def load_case(case: str) -> CaseData:
        image_path, mask_path = pairs[case]
        image, mask = read_image(image_path), read_image(mask_path)
        if image.spatial_shape != mask.spatial_shape:
            raise DataError(
                f"{mask_path}: mask size {mask.spatial_shape} differs from its image {image_path} "
                f"{image.spatial_shape}; each mask must have its image's size"
            )
        if image.array.dtype != np.uint8:
            raise DataError(f"{image_path}: pixel type {image.array.dtype}; expected 8-bit colour images")
        pixels = image.array if image.array.ndim == 3 else np.repeat(image.array[..., None], 3, axis=-1)
        return CaseData(image=pixels, label=polyp_label(mask.array), source=mask_path)

    info = DatasetInfo(
        name="KvasirSEG",
        description=(
            "Kvasir-SEG colonoscopy polyps; JPEG images re-encoded as lossless PNG, JPEG masks thresholded at "
            f"{MASK_THRESHOLD} to class 1 (polyp)"
        ),
        channel_names={"0": "R", "1": "G", "2": "B"},
        labels={"background": 0, "polyp": 1},
        file_ending=".png",
        normalization={"scheme": "uint8"},
        source={
            "dataset": "Kvasir-SEG (original 1000 image/mask pairs)",
            "reference": "Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020",
            "layout": LAYOUT,
            "labels": f"mask grey value >= {MASK_THRESHOLD} -> 1 (polyp), else 0",
        },
    )
    notes = ["Kvasir-SEG has no official split: the seeded split above is this converter's, recorded in dataset.json"]
    if orphans:
        notes.append(f"{len(orphans)} mask(s) without an image were ignored, e.g. {orphans[:3]}")
    return write_dataset(src, dst, info=info, split=split, load_case=load_case, seed=seed, limit=limit, notes=notes)
