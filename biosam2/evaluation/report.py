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
# How each community's figure is computed here (every evaluation reports them next to the paper's mIoU).
PROTOCOLS = {
    "transunet": (
        "TransUNet's protocol (Synapse; its calculate_metric_percase): Dice and HD95 per case and class, "
        "averaged over every case: a class in neither map counts Dice 0 and HD95 0, a class missed counts "
        "Dice 0 and HD95 0, a class predicted where the ground truth has none Dice 1 and HD95 0; then the "
        "mean over the foreground classes. HD95 in this evaluation's unit (TransUNet's own code passes no "
        "spacing, so its figures are in voxels). biosam2's own columns keep biosam2's convention."
    ),
    "per_image": (
        "Per-image mDice / mIoU (the polyp literature, e.g. Kvasir-SEG): each case's mean over its defined "
        "foreground classes, then the mean over cases; not the paper's whole-set mIoU."
    ),
    "per_structure_dice": "ACDC's per-structure Dice (RV, Myo, LV) per 3-D volume: the per-class Dice of this evaluation.",
}


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
    missed: list[str] = field(default_factory=list)  # the penalised classes that are in the ground truth only

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
            "missed": list(self.missed),
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

    def protocols(self) -> dict[str, Any]:
        """The figures other communities report, from the same per-case scores (see PROTOCOLS)."""
        foreground = self.class_names[1:]
        transunet = {}
        for name in foreground:  # TransUNet's calculate_metric_percase, every case counted
            pairs = [
                (0.0, 0.0) if name in case.absent or name in case.missed
                else (1.0, 0.0) if name in case.penalised  # predicted where the ground truth has none
                else (case.dice[name], case.hd95[name])
                for case in self.cases
            ]
            transunet[name] = {"dice": float(np.mean([d for d, _ in pairs])), "hd95": float(np.mean([h for _, h in pairs]))}
        per_image = [(case.foreground_mean("dice", foreground), case.foreground_mean("iou", foreground)) for case in self.cases]
        defined = [pair for pair in per_image if not math.isnan(pair[0])]
        return {
            "transunet": {
                "per_class": transunet,
                "mean_dice": float(np.mean([v["dice"] for v in transunet.values()])),
                "mean_hd95": float(np.mean([v["hd95"] for v in transunet.values()])),
                "hd95_unit": self.hd95_unit,
                "convention": PROTOCOLS["transunet"],
            },
            "per_image": {
                "mdice": float(np.mean([d for d, _ in defined])) if defined else None,
                "miou": float(np.mean([i for _, i in defined])) if defined else None,
                "cases": len(defined),
                "convention": PROTOCOLS["per_image"],
            },
            "per_structure_dice": {"convention": PROTOCOLS["per_structure_dice"]},
        }

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def headline(self) -> dict[str, Any]:
        """What a run's metrics.json keeps of the evaluation (the whole one is evaluation.json), as JSON values."""
        import json

        payload = self.to_dict()
        keep = ("miou", "per_class_iou", "mean_foreground_dice", "mean_foreground_hd95", "hd95_unit", "num_cases",
                "ignore_label", "ignored_pixels")
        return json.loads(json.dumps({k: payload[k] for k in keep if k in payload}))

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
            "protocols": self.protocols(),
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
        protocols = self.protocols()
        transunet, per_image = protocols["transunet"], protocols["per_image"]
        lines += [
            "", "## As other communities report it", "",
            f"- **TransUNet's protocol** (Synapse; cases missing a class count Dice 0, HD95 0): mean Dice "
            f"{_number(transunet['mean_dice'])}, mean HD95 {_number(transunet['mean_hd95'])} {unit}; per class: "
            + ", ".join(f"{name} {_number(v['dice'])} / {_number(v['hd95'])}" for name, v in transunet["per_class"].items()),
            f"- **Per image** (the polyp literature's mDice / mIoU over {per_image['cases']} cases): "
            f"{_number(per_image['mdice'] if per_image['mdice'] is not None else math.nan)} / "
            f"{_number(per_image['miou'] if per_image['miou'] is not None else math.nan)}",
            "- **Per structure** (ACDC: Dice of RV, Myo, LV per 3-D volume): the Dice column above",
            "", "## Conventions", "", self.convention, "",
            *[f"- {name}: {text}" for name, text in PROTOCOLS.items()], "",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def write_json(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def write_markdown(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_markdown())
