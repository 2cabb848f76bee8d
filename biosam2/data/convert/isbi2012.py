"""ISBI 2012 EM segmentation challenge (Cardona et al.; Drosophila VNC, 30 serial ssTEM sections).

Source layouts (either):

- ``SRC/images/0.png .. 29.png`` and ``SRC/labels/0.png .. 29.png``: 8-bit grey PNGs, one per section;
- the challenge files ``SRC/train-volume.tif`` and ``SRC/train-labels.tif``: 30-page TIFF stacks
  (``test-volume.tif``, which has no public labels, is not used).

Labels: the source marks membrane with 0 and cell interior with 255. Membrane becomes class 1
(``membrane``), the usual convention, 255 becomes background 0; any other value is refused.

Split, fixed: sections 0-19 train, 20-23 val, 24-29 test. The sections are adjacent slices of one
volume and neighbours look almost alike, so a random per-slice split would put near-duplicates of
test slices into training. Contiguous blocks limit that leak to the two block boundaries (19|20 and
23|24). No labelled test volume exists publicly, hence the held-out block.

Output: ``isbi_00 .. isbi_29`` (section index) as 512x512 PNGs; normalisation ``uint8``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from biosam2.data.convert.common import CaseData, ConversionSummary, DatasetInfo, check_paths, make_split, write_dataset
from biosam2.data.image_io import read_image
from biosam2.errors import DataError

NUM_SECTIONS = 30
TRAIN_SECTIONS = range(20)
VAL_SECTIONS = range(20, 24)
TEST_SECTIONS = range(24, 30)
MEMBRANE, INTERIOR = 0, 255  # source label values
VOLUME_TIF, LABELS_TIF = "train-volume.tif", "train-labels.tif"
LAYOUTS = (
    f"images/0.png..{NUM_SECTIONS - 1}.png with labels/0.png..{NUM_SECTIONS - 1}.png, "
    f"or the challenge files {VOLUME_TIF} and {LABELS_TIF}"
)
SPLIT_METHOD = (
    "fixed contiguous blocks of serial sections: 0-19 train, 20-23 val, 24-29 test; adjacent sections are "
    "nearly identical, so blocks (not a random slice split) keep near-duplicates out of the held-out sets"
)


def case_id(section: int) -> str:
    return f"isbi_{section:02d}"


def membrane_label(raw: np.ndarray, source: str) -> np.ndarray:
    """Class 1 where the source says membrane (0), 0 where it says cell interior (255)."""
    unexpected = sorted(set(np.unique(raw).tolist()) - {MEMBRANE, INTERIOR})
    if unexpected:
        raise DataError(
            f"{source}: label value(s) {unexpected[:10]} found; ISBI 2012 labels hold only {MEMBRANE} (membrane) "
            f"and {INTERIOR} (cell interior)"
        )
    return (raw == MEMBRANE).astype(np.uint8)


def _check_grey(array: np.ndarray, source: str, what: str) -> np.ndarray:
    if array.ndim != 2 or array.dtype != np.uint8:
        raise DataError(
            f"{source}: {what} of shape {array.shape} and type {array.dtype}; expected 8-bit grey 2-D sections"
        )
    return array


def _png_sections(src: Path) -> tuple[list[Path], list[Path]]:
    """Section files of the folder layout, by index; the set of indices must be exactly 0..29."""
    found = {}
    for kind in ("images", "labels"):
        files = {
            int(match.group(1)): path
            for path in (src / kind).iterdir()
            if (match := re.fullmatch(r"(\d+)\.png", path.name))
        }
        if sorted(files) != list(range(NUM_SECTIONS)):
            raise DataError(
                f"{src / kind}: holds sections {sorted(files)[:5]}{'...' if len(files) > 5 else ''} ({len(files)} "
                f"files); expected exactly 0.png..{NUM_SECTIONS - 1}.png (the ISBI 2012 training volume)"
            )
        found[kind] = [files[index] for index in range(NUM_SECTIONS)]
    return found["images"], found["labels"]


def _read_stack(path: Path) -> np.ndarray:
    import tifffile

    try:
        stack = tifffile.imread(path)
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise DataError(f"{path}: cannot be read as a TIFF stack ({type(error).__name__}: {error})") from None
    if stack.ndim != 3 or stack.shape[0] != NUM_SECTIONS:
        raise DataError(f"{path}: stack of shape {stack.shape}; expected {NUM_SECTIONS} pages of 2-D grey sections")
    return stack


def convert_isbi2012(
    src: Path, dst: Path, *, seed: int = 0, limit: int | None = None, overwrite: bool = False
) -> ConversionSummary:
    """Convert the ISBI 2012 training volume (either layout) to an nnU-Net v2 2-D dataset in ``dst``.

    ``seed`` is accepted for a uniform interface; the split is fixed and does not use it."""
    src, dst = check_paths("isbi2012", src, dst, overwrite=overwrite, limit=limit)
    if (src / VOLUME_TIF).is_file() or (src / LABELS_TIF).is_file():
        for name in (VOLUME_TIF, LABELS_TIF):
            if not (src / name).is_file():
                raise DataError(f"{src / name}: missing; the challenge layout needs both {VOLUME_TIF} and {LABELS_TIF}")
        volume, labels = _read_stack(src / VOLUME_TIF), _read_stack(src / LABELS_TIF)
        if volume.shape != labels.shape:
            raise DataError(f"{src / LABELS_TIF}: shape {labels.shape} differs from {VOLUME_TIF} {volume.shape}")
        layout = f"challenge TIFF stacks ({VOLUME_TIF}, {LABELS_TIF})"

        def section(index: int) -> tuple[np.ndarray, np.ndarray, Path, str]:
            return volume[index], labels[index], src / LABELS_TIF, f"{src / LABELS_TIF} page {index}"

    elif (src / "images").is_dir() and (src / "labels").is_dir():
        image_files, label_files = _png_sections(src)
        layout = "images/N.png + labels/N.png"

        def section(index: int) -> tuple[np.ndarray, np.ndarray, Path, str]:
            image, label = read_image(image_files[index]), read_image(label_files[index])
            return image.array, label.array, label.path, str(label.path)

    else:
        raise DataError(f"{src}: not an ISBI 2012 source; expected {LAYOUTS}")

    def load_case(case: str) -> CaseData:
        image, raw_label, path, where = section(int(case.removeprefix("isbi_")))
        image = _check_grey(image, where, "image")
        label = membrane_label(_check_grey(raw_label, where, "label"), where)
        return CaseData(image=image, label=label, source=path)

    split = make_split(
        [case_id(i) for i in TRAIN_SECTIONS], [case_id(i) for i in VAL_SECTIONS], [case_id(i) for i in TEST_SECTIONS],
        SPLIT_METHOD, src,
    )
    info = DatasetInfo(
        name="ISBI2012",
        description=(
            "ISBI 2012 EM segmentation challenge training volume (Drosophila VNC, serial-section TEM), "
            "membrane (source value 0) as class 1"
        ),
        channel_names={"0": "EM"},
        labels={"background": 0, "membrane": 1},
        file_ending=".png",
        normalization={"scheme": "uint8"},
        source={
            "dataset": "ISBI 2012 EM segmentation challenge, training volume",
            "reference": "Arganda-Carreras et al., Front. Neuroanat. 2015; Cardona et al., PLoS Biol. 2010",
            "layout": layout,
            "labels": "source 0 (membrane) -> 1, source 255 (cell interior) -> 0",
        },
    )
    notes = ["no public test labels exist: the test split is the held-out block of sections 24-29"]
    return write_dataset(src, dst, info=info, split=split, load_case=load_case, seed=seed, limit=limit, notes=notes)
