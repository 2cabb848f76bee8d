"""Pictures: learning curves of a run, and image | ground truth | prediction (| error) panels with a
title row and a class legend.

Used by training (the run directory), prediction (``--overlays``) and the HTML report.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from biosam2.atomic_io import atomic_output
from biosam2.data.dataset_format import IGNORE_INDEX

# A fixed colour per class (background transparent), then cycled. The first ones are cold or bright
# (cyan, yellow, lime, blue, magenta) so that they stand out on the red and pink of endoscopy, fundus and
# H&E images as well as on grey; red comes late.
PALETTE = np.array(
    [[0, 0, 0], [0, 230, 255], [255, 225, 25], [120, 255, 60], [40, 90, 255], [255, 60, 230], [255, 140, 30],
     [150, 60, 255], [0, 160, 130], [230, 25, 75], [250, 190, 212], [170, 110, 40], [128, 128, 0]],
    dtype=np.uint8,
)
# The error map: false positive (predicted foreground on ground-truth background), false negative
# (ground-truth foreground predicted as background), and foreground given the wrong class.
ERROR_COLOURS = {"false positive": (255, 40, 40), "false negative": (40, 120, 255), "wrong class": (255, 255, 255)}


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as stream:
        for row in csv.DictReader(stream):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def epoch_series(csv_files: list[Path], key: str) -> list[tuple[float, float]]:
    """(epoch, value) for one metric across the attempts of a run; a later attempt wins an epoch."""
    by_epoch: dict[float, float] = {}
    for path in csv_files:
        for row in read_metrics_csv(path):
            if key in row:
                by_epoch[row["epoch"]] = row[key]
    return sorted(by_epoch.items())


def plot_learning_curves(csv_files: list[Path], destination: Path) -> bool:
    """Training loss per epoch and validation mIoU per validated epoch; False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = epoch_series(csv_files, "train/loss_epoch")
    miou = epoch_series(csv_files, "val/mIoU")
    if not loss and not miou:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if loss:
        left.plot(*zip(*loss), marker="o")
    left.set(title="training loss", xlabel="epoch", ylabel="loss")
    if miou:
        right.plot(*zip(*miou), marker="o", color="tab:green")
    right.set(title="validation mIoU (hard, background included)", xlabel="epoch", ylabel="mIoU", ylim=(0, 1))
    figure.tight_layout()
    with atomic_output(destination, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    return True


def to_display(image: np.ndarray) -> np.ndarray:
    """A channels-first normalised image (or slice) as 8-bit RGB for display."""
    rgb = image if image.shape[0] == 3 else np.repeat(image[:1], 3, axis=0)
    rgb = np.moveaxis(rgb, 0, -1).astype(np.float32)
    low, high = np.percentile(rgb, [1, 99])
    return (np.clip((rgb - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def _foreground(labels: np.ndarray) -> np.ndarray:
    return (labels > 0) & (labels != IGNORE_INDEX)  # unannotated ground-truth pixels are shown uncoloured


def class_colour(class_id: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in PALETTE[1:][(class_id - 1) % (len(PALETTE) - 1)])


def colour_overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    colours = PALETTE[1:][(labels.astype(np.int64) - 1) % (len(PALETTE) - 1)]
    mixed = rgb.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    return np.where(_foreground(labels)[..., None], mixed, rgb).astype(np.uint8)


def error_map(rgb: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The image dimmed, with false positives, false negatives and wrong classes in ERROR_COLOURS."""
    annotated = ground_truth != IGNORE_INDEX
    kinds = [
        annotated & (ground_truth == 0) & (prediction > 0),
        annotated & (ground_truth > 0) & (prediction == 0),
        annotated & (ground_truth > 0) & (prediction > 0) & (ground_truth != prediction),
    ]
    out = (rgb.astype(np.float32) * 0.5).astype(np.uint8)
    for mask, colour in zip(kinds, ERROR_COLOURS.values(), strict=True):
        out[mask] = colour
    return out


def panels(image: np.ndarray | None, ground_truth: np.ndarray | None, prediction: np.ndarray,
           class_names: list[str] | None = None, title: str | None = None) -> np.ndarray:
    """One 2-D case (or slice) as an RGB strip: image | ground truth | prediction (| errors, with ground
    truth), under a title row, above a legend naming every class colour (and the error colours).
    ``image`` is channels-first (any intensities) or None (the labels on grey)."""
    rgb = to_display(image) if image is not None else np.full((*prediction.shape, 3), 96, np.uint8)
    columns = [("image", rgb)] if image is not None else []
    if ground_truth is not None:
        columns.append(("ground truth", colour_overlay(rgb, ground_truth)))
    columns.append(("prediction", colour_overlay(rgb, prediction)))
    if ground_truth is not None:
        columns.append(("errors", error_map(rgb, ground_truth, prediction)))
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    strip = np.concatenate([part for _, panel in columns for part in (gap, panel)][1:], axis=1)
    present = sorted({int(v) for v in np.unique(prediction)} | ({int(v) for v in np.unique(ground_truth)} if ground_truth is not None else set()))
    names = class_names or [f"class {i}" for i in range(max(present, default=0) + 1)]
    legend = [(name, class_colour(i)) for i, name in enumerate(names) if i > 0 and i != IGNORE_INDEX]
    legend += list(ERROR_COLOURS.items()) if ground_truth is not None else []
    return _with_text(strip, [name for name, _ in columns], rgb.shape[1] + 4, legend, title)


def _with_text(strip: np.ndarray, headings: list[str], step: int, legend: list[tuple[str, tuple]], title: str | None) -> np.ndarray:
    """A white title row (the title, then each column's heading above it) and a wrapped legend row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = max(strip.shape[1], 360)
    rows, x, line = [[]], 0, 16
    for name, colour in legend:  # wrap the legend entries to the strip's width
        need = 18 + int(font.getlength(name)) + 14
        if x + need > width and rows[-1]:
            rows.append([])
            x = 0
        rows[-1].append((x, name, colour))
        x += need
    top = line * (2 if title else 1) + 4
    canvas = Image.new("RGB", (width, top + strip.shape[0] + 6 + line * len(rows)), "white")
    canvas.paste(Image.fromarray(strip), (0, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill="black", font=font)
    for index, heading in enumerate(headings):
        draw.text((index * step + 2, top - line), heading, fill="black", font=font)
    for row_index, row in enumerate(rows):
        y = top + strip.shape[0] + 4 + row_index * line
        for x, name, colour in row:
            draw.rectangle([x + 2, y + 2, x + 13, y + 12], fill=tuple(colour), outline="black")
            draw.text((x + 17, y + 1), name, fill="black", font=font)
    return np.asarray(canvas)


def write_overlay(destination: Path, image: np.ndarray, ground_truth: np.ndarray | None, prediction: np.ndarray,
                  class_names: list[str] | None = None) -> None:
    """Image | ground truth | prediction (| errors), titled, with the class legend (for volumes: the slice
    with most foreground)."""
    from biosam2.data.image_io import write_image_png

    title = destination.stem
    if image.ndim == 4:  # (C, X, Y, Z): show the most informative slice
        reference = ground_truth if ground_truth is not None else prediction
        z = int(np.argmax(_foreground(reference).reshape(-1, reference.shape[-1]).sum(0)))
        image, prediction = image[..., z], prediction[..., z]
        ground_truth = ground_truth[..., z] if ground_truth is not None else None
        title += f", slice {z}"
    write_image_png(destination, panels(image, ground_truth, prediction, class_names, title))
