"""Largest-connected-component postprocessing, per class, kept only where it helps (nnU-Net's rule).

At the end of training the validation predictions are scored with and without keeping each class's
largest connected component (``scipy.ndimage.label``, full connectivity, as nnU-Net's; the removed
pixels become background, as in nnU-Net: MONAI's ``KeepLargestConnectedComponent`` would need
scikit-image, which biosam2 does not otherwise need); a class keeps the postprocessing only if its mean validation
Dice rises. The artifact records the chosen classes, and ``predict`` applies them (``--no-postprocess``:
not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def keep_largest_component(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """``labels`` (2-D image or 3-D volume of class ids) with only the largest component of each of ``classes``."""
    if not classes:
        return labels
    from scipy import ndimage

    kept = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)  # diagonal neighbours connect too
    for c in classes:
        components, count = ndimage.label(labels == c, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            kept[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return kept


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    total = int(prediction.sum()) + int(truth.sum())
    return None if total == 0 else 2 * int((prediction & truth).sum()) / total


def choose_classes(predictions: Path, ground_truth: Path, case_ids: list[str], num_classes: int) -> dict[str, object]:
    """The classes whose mean validation Dice (over cases where the class is in either map) rises with
    the largest component kept, and both Dice values of every class."""
    from biosam2.data.image_io import read_label

    scores: dict[int, list[tuple[float, float]]] = {c: [] for c in range(1, num_classes)}
    for case_id in case_ids:
        prediction = read_label(next(predictions.glob(f"{case_id}.*"))).array
        truth = read_label(next(ground_truth.glob(f"{case_id}.*"))).array
        kept = keep_largest_component(prediction, list(scores))
        for c, values in scores.items():
            before, after = _dice(prediction == c, truth == c), _dice(kept == c, truth == c)
            if before is not None:
                values.append((before, after))
    dice = {c: (float(np.mean([b for b, _ in v])), float(np.mean([a for _, a in v]))) for c, v in scores.items() if v}
    return {"classes": [c for c, (before, after) in dice.items() if after > before],
            "validation_dice": {str(c): {"without": b, "with": a} for c, (b, a) in dice.items()}}
