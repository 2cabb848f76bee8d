"""The results of an evaluation, and how they are written: JSON for programs, Markdown for people.

Both outputs carry everything needed to read the numbers without this code: the unit of HD95, the
number of cases every mean is taken over, and the convention text of
:data:`biosam2.evaluation.metrics.CONVENTION` (how absent classes are scored). Undefined values
(NaN) are written as ``null`` in JSON, because NaN is not valid JSON, and as ``—`` in Markdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from biosam2.atomic_io import atomic_write_json, atomic_write_text

NOT_DEFINED = "—"


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined value is written as null so that every JSON parser reads the file."""
    return None if value is None or math.isnan(value) else float(value)


def _number(value: float) -> str:
    return NOT_DEFINED if value is None or math.isnan(value) else f"{value:.4f}"


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return NOT_DEFINED
    return f"{mean:.4f} ± {std:.4f}"


@dataclass
class CaseResult:
    """Scores of one case (one 2-D image or one 3-D volume).

    ``dice``/``hd95``/``iou`` map class name to score; NaN where the class is absent from both the
    prediction and the ground truth of this case (see :data:`~biosam2.evaluation.metrics.CONVENTION`).
    ``hd95`` of the background is always NaN: it is not computed.
    """

    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    iou: dict[str, float]
    dice: dict[str, float]
    hd95: dict[str, float]
    absent: list[str]  # classes in neither prediction nor ground truth: excluded from the means
    penalised: list[str]  # classes in exactly one of them: Dice 0, HD95 = diagonal_extent
    diagonal_extent: float  # the HD95 penalty, in the case's HD95 unit
    ignored_pixels: int = 0  # ground-truth pixels/voxels of the ignore label, left out of every score

    def foreground_mean(self, metric: str, foreground: list[str]) -> float:
        """This case's mean of ``metric`` ("dice" or "hd95") over its defined foreground classes (NaN if none)."""
        values = [getattr(self, metric)[name] for name in foreground]
        defined = [v for v in values if not math.isnan(v)]
        return float(np.mean(defined)) if defined else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "shape": list(self.shape),
            "spacing": None if self.spacing is None else list(self.spacing),
            "iou": {k: _finite_or_none(v) for k, v in self.iou.items()},
            "dice": {k: _finite_or_none(v) for k, v in self.dice.items()},
            "hd95": {k: _finite_or_none(v) for k, v in self.hd95.items()},
            "absent": list(self.absent),
            "penalised": list(self.penalised),
            "diagonal_extent": self.diagonal_extent,
            "ignored_pixels": self.ignored_pixels,
        }


@dataclass
class EvaluationResult:
    """Whole-set scores: IoU from one confusion matrix, Dice/HD95 as mean ± std over cases.

    Per-class dictionaries are keyed by class name, in class-id order. ``confusion_matrix[g, p]``
    counts pixels/voxels of ground-truth class ``g`` predicted as ``p``, over all cases.
    """

    class_names: list[str]
    miou: float
    per_class_iou: dict[str, float]
    dice_mean: dict[str, float]
    dice_std: dict[str, float]
    dice_count: dict[str, int]
    hd95_mean: dict[str, float]
    hd95_std: dict[str, float]
    hd95_count: dict[str, int]
    mean_foreground_dice: float
    std_foreground_dice: float
    mean_foreground_hd95: float
    std_foreground_hd95: float
    foreground_case_count: int  # cases with at least one defined foreground class
    hd95_unit: str  # "mm", "pixels" or "voxels"
    confusion_matrix: np.ndarray
    cases: list[CaseResult]
    convention: str
    ignored_predictions: list[str] = field(default_factory=list)
    ignore_label: int | None = None  # nnU-Net's "ignore" label id, whose pixels were left out
    ignored_pixels: int = 0  # over all cases

    @property
    def num_cases(self) -> int:
        return len(self.cases)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (NaN -> None), the same numbers as the Markdown table."""
        classes = {}
        for index, name in enumerate(self.class_names):
            classes[name] = {
                "id": index,
                "iou": _finite_or_none(self.per_class_iou[name]),
                "dice": {
                    "mean": _finite_or_none(self.dice_mean[name]),
                    "std": _finite_or_none(self.dice_std[name]),
                    "count": self.dice_count[name],
                },
                "hd95": {
                    "mean": _finite_or_none(self.hd95_mean[name]),
                    "std": _finite_or_none(self.hd95_std[name]),
                    "count": self.hd95_count[name],
                },
            }
        return {
            "num_cases": self.num_cases,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "hd95_unit": self.hd95_unit,
            "miou": _finite_or_none(self.miou),
            "per_class_iou": {name: _finite_or_none(self.per_class_iou[name]) for name in self.class_names},
            "mean_foreground_dice": {
                "mean": _finite_or_none(self.mean_foreground_dice),
                "std": _finite_or_none(self.std_foreground_dice),
                "count": self.foreground_case_count,
            },
            "mean_foreground_hd95": {
                "mean": _finite_or_none(self.mean_foreground_hd95),
                "std": _finite_or_none(self.std_foreground_hd95),
                "count": self.foreground_case_count,
            },
            "classes": classes,
            "confusion_matrix": {
                "rows": "ground truth",
                "columns": "prediction",
                "counts": np.asarray(self.confusion_matrix).astype(np.int64).tolist(),
            },
            "ignored_predictions": list(self.ignored_predictions),
            "ignore_label": self.ignore_label,
            "ignored_pixels": self.ignored_pixels,
            "convention": self.convention,
            "cases": [case.to_dict() for case in self.cases],
        }

    def to_markdown(self) -> str:
        unit, miou = self.hd95_unit, _number(self.miou)
        lines = [
            "# Evaluation",
            "",
            f"| Class | IoU | Dice (mean ± std) | Dice n | HD95 [{unit}] (mean ± std) | HD95 n |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for index, name in enumerate(self.class_names):
            hd95 = "not computed" if index == 0 else _mean_std(self.hd95_mean[name], self.hd95_std[name])
            lines.append(
                f"| {name} ({index}) | {_number(self.per_class_iou[name])} "
                f"| {_mean_std(self.dice_mean[name], self.dice_std[name])} | {self.dice_count[name]} "
                f"| {hd95} | {self.hd95_count[name]} |"
            )
        lines.append(
            f"| **foreground mean** | {NOT_DEFINED} "
            f"| {_mean_std(self.mean_foreground_dice, self.std_foreground_dice)} | {self.foreground_case_count} "
            f"| {_mean_std(self.mean_foreground_hd95, self.std_foreground_hd95)} | {self.foreground_case_count} |"
        )
        lines += [
            "",
            f"- **mIoU** (one confusion matrix over all {self.num_cases} cases, background included): {miou}",
            f"- **Mean foreground Dice**: {_mean_std(self.mean_foreground_dice, self.std_foreground_dice)}",
            f"- **Mean foreground HD95**: {_mean_std(self.mean_foreground_hd95, self.std_foreground_hd95)}"
            + ("" if math.isnan(self.mean_foreground_hd95) else f" {unit}"),
            f"- **Cases**: {self.num_cases}",
            f"- **HD95 unit**: {unit}",
        ]
        if self.ignore_label is not None:
            lines.append(
                f"- **Ignore label** {self.ignore_label}: {self.ignored_pixels} unannotated ground-truth pixels/voxels "
                "left out of every metric"
            )
        if self.ignored_predictions:
            lines.append(
                f"- **Ignored predictions** (no ground truth): {len(self.ignored_predictions)}: "
                + ", ".join(self.ignored_predictions)
            )
        lines += ["", "## Conventions", "", self.convention, ""]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def write_json(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def write_markdown(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_markdown())
