"""``predict``: label maps for a file, a folder or a volume, written next to nothing the user gave us.

- Every input file is its own image and keeps its name (``frame_0001.png`` -> ``frame_0001.png``,
  ``scan.nii.gz`` -> ``scan.nii.gz``). nnU-Net channel files (``CASE_0000.png``, ``CASE_0001.png``,
  ...) are grouped into one case written as ``CASE.png`` only in a dataset's images folder
  (``imagesTr``/``imagesTs`` beside a ``dataset.json``) or when asked for (``channel_files=True``,
  ``--channel-files``): a plain folder of ``frame_0000.png, frame_0001.png, ...`` is a sequence of
  separate frames, not one multi-channel case.
- 2-D results are PNG label maps of the input's size; 3-D results are volumes in the input's format
  with exactly its affine, spacing and header.
- Consecutive 2-D inputs of the same size are predicted in batches of ``batch_size``.
- Optional: probabilities (``CASE_probabilities.npy`` for 2-D, a 4-D ``.nii.gz`` for volumes) and
  overlays (PNG).
- The output folder may not be, or lie inside, an input folder, and no output may replace an input.
- Nothing half-written: a new output folder appears whole, with one rename; see :func:`predict_files`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biosam2.atomic_io import INCOMPLETE_MARKER, atomic_write_text, disk_full, make_staging_dir, publish_directory
from biosam2.data.cases import channels_first
from biosam2.data.image_io import (
    IMAGE_2D_ENDINGS,
    NIFTI_ENDINGS,
    VOLUME_ENDINGS,
    LoadedImage,
    file_ending,
    read_image,
    write_like,
)
from biosam2.data.normalization import Normalization
from biosam2.errors import ConfigError, DataError
from biosam2.inference.predictor import Predictor
from biosam2.visualization import write_overlay

log = logging.getLogger("biosam2")
_CHANNEL_FILE = re.compile(r"(.+)_(\d{4})$")


@dataclass
class InputCase:
    name: str
    files: list[Path]  # one per channel file, in channel order


def is_dataset_images_folder(source: Path) -> bool:
    """``DATASET/imagesTs`` (or imagesTr, ...): nnU-Net's channel-file naming applies there."""
    return source.is_dir() and source.name.startswith("images") and (source.parent / "dataset.json").is_file()


def find_inputs(source: Path, channel_files: bool | None = None) -> list[InputCase]:
    """The cases to predict: one file, or every supported image/volume in a folder (not recursive).

    ``channel_files``: group nnU-Net channel files into cases; None: only in a dataset's images folder.
    """
    if not source.exists():
        raise DataError(f"{source}: input not found")
    files = [source] if source.is_file() else sorted(
        p for p in source.iterdir() if p.is_file() and not p.name.startswith(".") and file_ending(p) in IMAGE_2D_ENDINGS + VOLUME_ENDINGS
    )
    if not files:
        raise DataError(f"{source}: no images or volumes to predict (supported: {', '.join(IMAGE_2D_ENDINGS + VOLUME_ENDINGS)})")
    if channel_files is None:
        channel_files = is_dataset_images_folder(source)
    groups: dict[str, dict[int, Path]] = {}
    for path in files:
        stem = path.name[: -len(file_ending(path))]
        match = _CHANNEL_FILE.match(stem) if channel_files else None
        if channel_files and not match:
            raise DataError(
                f"{path}: not named like an nnU-Net channel file (CASE_0000{file_ending(path)}, CASE_0001...); "
                "rename it, or leave out --channel-files to predict every file as its own image"
            )
        name, channel = (match.group(1), int(match.group(2))) if match else (stem, 0)
        if channel in groups.setdefault(name, {}):
            raise DataError(f"{path}: two inputs would both be written as {name}; rename one")
        groups[name][channel] = path
    cases = []
    for name, channels in sorted(groups.items()):
        if sorted(channels) != list(range(len(channels))):
            raise DataError(f"{source}: case {name} has channel files {sorted(channels)}; expected 0..n-1")
        cases.append(InputCase(name, [channels[i] for i in sorted(channels)]))
    return cases


def check_device(device: str | None) -> str | None:
    """Refuse a device this machine does not have, before any work, instead of a CUDA traceback."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu (or leave --device out)")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return device


def check_output_location(inputs: Path, output: Path) -> None:
    """A folder of inputs is never written into (a single input file is only protected from overwriting)."""
    if not inputs.is_dir():
        return
    input_folder, out = inputs.resolve(), output.resolve()
    if out == input_folder or input_folder in out.parents:
        raise ConfigError(f"{output}: the output folder must not be (inside) the input folder {input_folder}; choose another")


def normalization_for(image: np.ndarray, normalization: Normalization, path: Path) -> Normalization:
    """The trained normalisation, unless it cannot apply to this image's pixel type."""
    if normalization.scheme == "uint8" and image.dtype != np.uint8:
        warnings.warn(f"{path}: {image.dtype} image but the model was trained on 8-bit images; scaling by percentiles", stacklevel=2)
        return Normalization("percentile")
    return normalization


def load_input(case: InputCase, channel_names: dict[str, str] | None = None) -> tuple[np.ndarray, LoadedImage]:
    loaded = [read_image(path) for path in case.files]
    image = np.concatenate([channels_first(item) for item in loaded], axis=0)
    if channel_names:
        image = check_channels(image, case, channel_names, loaded[0].is_volume)
    if image.shape[0] not in (1, 3):
        raise DataError(f"{case.files[0]}: {image.shape[0]} channels; biosam2 models take 1 (grey) or 3 (colour)")
    return image, loaded[0]


def check_channels(image: np.ndarray, case: InputCase, channel_names: dict[str, str], is_volume: bool) -> np.ndarray:
    """The input's channels against the run's ``channel_names``.

    A grey 2-D image into an RGB model is accepted (with a warning) as the colour image R = G = B it
    is: SAM2 itself sees grey images that way. Anything else that differs is refused: a T1-only file
    into a T1/T2/FLAIR model, or a colour image into a grey model, would be predicted from the wrong
    inputs.
    """
    from biosam2.data.dataset_format import is_colour

    expected, found = len(channel_names), image.shape[0]
    if found == expected:
        return image
    colour_model = is_colour(channel_names) and not is_volume
    if found == 1 and colour_model:
        warnings.warn(f"{case.files[0]}: grey image into a colour (RGB) model; predicted as the colour image R = G = B", stacklevel=2)
        return np.repeat(image, 3, axis=0)
    kind = {1: "grey", 3: "colour (RGB)"}.get(found, "")
    has = f"{found} channel(s){f' ({kind})' if kind and len(case.files) == 1 else ''}"
    if found < expected and not colour_model:
        fix = (f"give the {expected} channels as files CASE_0000..CASE_{expected - 1:04d} with --channel-files"
               if len(case.files) == 1 else f"give all {expected} channel files CASE_0000..CASE_{expected - 1:04d}")
    elif found == 3 and expected == 1:
        fix = "convert it to grey, or use a model trained on colour images"
    else:
        fix = "use a model trained on this kind of image"
    raise DataError(
        f"{case.files[0]}: has {has} but the model was trained on {expected} "
        f"({', '.join(channel_names.values())}); {fix}"
    )


def output_path(folder: Path, case: InputCase, reference: LoadedImage) -> Path:
    ending = file_ending(reference.path) if reference.is_volume else ".png"
    return folder / f"{case.name}{ending}"


def predict_files(
    model,
    inputs: str | Path,
    output: str | Path,
    *,
    normalization: Normalization,
    class_names: list[str] | None = None,
    probabilities: bool = False,
    overlays: bool = False,
    batch_size: int = 8,
    device: str | None = None,
    precision: str = "auto",
    overwrite: bool = False,
    channel_files: bool | None = None,
    channel_names: dict[str, str] | None = None,
    max_side: int = 2048,
    tile_size: int = 1024,
    keep_largest: list[int] | None = None,
) -> list[Path]:
    """Predict every input case and write the results to ``output``; returns the label map paths.

    ``precision``: "auto" (mixed on CUDA, fp32 on the CPU), "32", "bf16-mixed" or "16-mixed" (see Predictor).
    ``channel_files``: group nnU-Net channel files (``CASE_0000``, ``CASE_0001``, ...) into one case;
    None (default) does so only for a dataset's images folder (``imagesTs`` beside ``dataset.json``).
    ``channel_names``: the run's (dataset.json's); each input's channels are checked against them.
    ``max_side``, ``tile_size``: 2-D images with a side above ``max_side`` are predicted in tiles (see Predictor).
    ``keep_largest``: classes whose largest connected component alone is kept (the run's postprocessing).
    """
    inputs, output = Path(inputs), Path(output)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    device = check_device(device)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a folder; give a new or existing output folder")
    cases = find_inputs(inputs, channel_files)
    check_output_location(inputs, output)
    input_files = {p.resolve() for case in cases for p in case.files}
    predictor = Predictor(model, batch_size=batch_size, device=device, precision=precision, max_side=max_side,
                          tile_size=tile_size, keep_largest=keep_largest)
    # Results go to a staging folder and are published only once every case succeeded. A new OUT
    # appears with one rename (a kill leaves no OUT at all); into an existing OUT files are moved one
    # by one under an INCOMPLETE_MARKER that `evaluate` refuses until the move has finished.
    created = not output.exists()
    if created:
        output.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output.parent if created else output, f"{output.name}.predict")
    try:
        written: list[Path] = []
        pending: list[tuple[InputCase, LoadedImage, np.ndarray]] = []  # equal-size 2-D images, batched

        def finish(case: InputCase, reference: LoadedImage, image: np.ndarray, labels: np.ndarray, probs) -> None:
            destination = output_path(output, case, reference)
            try:
                write(case, reference, image, labels, probs, destination)
            except OSError as error:
                # Writers word a full disk differently (numpy: "N requested and M written"): say it plainly.
                reason = "disk full (no space left on device)" if disk_full(error, staging) else (error.strerror or str(error))
                raise DataError(
                    f"{destination}: could not be written: {reason}. Nothing was published to {output}; "
                    "free some space (or choose another output folder) and run predict again"
                ) from error

        def write(case: InputCase, reference: LoadedImage, image: np.ndarray, labels: np.ndarray, probs, destination: Path) -> None:
            write_like(staging / destination.name, labels, reference)
            written.append(destination)
            if probabilities and probs is not None:
                _write_probabilities(staging, case, reference, probs)
            if overlays:
                write_overlay(staging / "overlays" / f"{case.name}.png", image, None, labels, class_names)
            log.info("%s -> %s", case.files[0], destination)

        def flush() -> None:
            if pending:
                # one image is not copied into a batch: a huge image is predicted from its only array
                batch = pending[0][2][None] if len(pending) == 1 else np.stack([image for _, _, image in pending])
                labels, probs = predictor.predict_2d(batch, return_probabilities=probabilities)
                for index, (case, reference, image) in enumerate(pending):
                    finish(case, reference, image, predictor.finish(labels[index]), None if probs is None else probs[index])
                pending.clear()

        for case in cases:
            raw, reference = load_input(case, channel_names)
            destination = output_path(output, case, reference)
            if destination.resolve() in input_files:
                raise ConfigError(f"{destination}: would overwrite an input; choose another output folder")
            if destination.exists() and not overwrite:
                raise ConfigError(f"{destination}: already exists; pass --overwrite or choose another output folder")
            image = normalization_for(raw, normalization, case.files[0]).apply(raw)
            if reference.is_volume:  # slices are batched inside the predictor
                labels, probs = predictor.predict(image, return_probabilities=probabilities)
                finish(case, reference, image, labels, probs)
                continue
            if pending and (pending[0][2].shape != image.shape or len(pending) == batch_size):
                flush()
            pending.append((case, reference, image))
        flush()
        if created:
            publish_directory(staging, output)
            return written
        marker = output / INCOMPLETE_MARKER
        atomic_write_text(marker, "biosam2 predict is moving its results into this folder; if this file stays, "
                          "that run was killed: rerun it with --overwrite\n")
        for produced in sorted(staging.rglob("*")):
            if produced.is_file():
                target = output / produced.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(produced, target)
        marker.unlink()
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_probabilities(output: Path, case: InputCase, reference: LoadedImage, probabilities: np.ndarray) -> None:
    from biosam2.atomic_io import atomic_output

    if reference.is_volume and file_ending(reference.path) in NIFTI_ENDINGS:
        write_like(output / f"{case.name}_probabilities.nii.gz", np.moveaxis(probabilities, 0, -1).astype(np.float32), reference)
    else:
        with atomic_output(output / f"{case.name}_probabilities.npy", suffix=".npy") as temporary:
            np.save(temporary, probabilities.astype(np.float32, copy=False))


def predict_and_evaluate(run: Path, data: Path, out: Path, *, ensemble: list[Path] = (), tta: bool = False,
                         postprocess: str = "validated") -> dict:
    """``biosam2 predict RUN DATA/imagesTs OUT/test_predictions [--ensemble ...] [--tta] [--no-postprocess]``,
    then its evaluation against DATA/labelsTs into OUT/evaluation.json/.md; returns the headline metrics.
    ``postprocess``: the largest component of the classes the run chose on validation ("validated", as
    predict does), of none, or of every foreground class ("all", to measure what the choice is worth)."""
    from biosam2.data.dataset_format import load_dataset_spec
    from biosam2.evaluation import evaluate_into
    from biosam2.inference.averaging import load_for_prediction

    spec = load_dataset_spec(data)
    model, metadata = load_for_prediction(run, ensemble=ensemble, tta=tta)
    begin = time.perf_counter()
    written = predict_files(model, spec.root / "imagesTs", out / "test_predictions", overwrite=True,
                            normalization=Normalization.from_dict(metadata["normalization"]),
                            channel_names=metadata.get("channel_names"),
                            keep_largest={"validated": (metadata.get("postprocessing") or {}).get("largest_component"),
                                          "none": [], "all": sorted(set(spec.labels.values()) - {0})}[postprocess])
    seconds = time.perf_counter() - begin
    result = evaluate_into(out, out / "test_predictions", spec)
    return result.headline() | {"inference_seconds_mean": round(seconds / max(1, len(written)), 4)}
