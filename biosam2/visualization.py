"""Pictures (PNG): learning curves of a run, and image | ground truth | prediction overlays.

Used by training (the run directory) and by prediction (``--overlays``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from biosam2.atomic_io import atomic_output
from biosam2.data.dataset_format import IGNORE_INDEX

# Distinct colours for up to 12 classes (background transparent), then cycled.
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
    dtype=np.uint8,
)


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


def colour_overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    colours = PALETTE[1:][(labels.astype(np.int64) - 1) % (len(PALETTE) - 1)]
    mixed = rgb.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    return np.where(_foreground(labels)[..., None], mixed, rgb).astype(np.uint8)


def write_overlay(destination: Path, image: np.ndarray, ground_truth: np.ndarray | None, prediction: np.ndarray) -> None:
    """Image | ground truth | prediction, side by side (for volumes: the slice with most foreground)."""
    from biosam2.data.image_io import write_image_png

    if image.ndim == 4:  # (C, X, Y, Z): show the most informative slice
        reference = ground_truth if ground_truth is not None else prediction
        z = int(np.argmax(_foreground(reference).reshape(-1, reference.shape[-1]).sum(0)))
        image, prediction = image[..., z], prediction[..., z]
        ground_truth = ground_truth[..., z] if ground_truth is not None else None
    rgb = to_display(image)
    panels = [rgb] + ([colour_overlay(rgb, ground_truth)] if ground_truth is not None else []) + [colour_overlay(rgb, prediction)]
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    row = panels[0]
    for panel in panels[1:]:
        row = np.concatenate([row, gap, panel], axis=1)
    write_image_png(destination, row)
