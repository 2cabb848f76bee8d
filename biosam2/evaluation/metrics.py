"""Segmentation metrics: mIoU as the paper reports it, plus per-case Dice and HD95.

Conventions (quoted in the README and written into every report):

- **IoU / mIoU.** One confusion matrix is accumulated over every pixel/voxel of every case of the
  test set (torchmetrics ``MulticlassConfusionMatrix``); ``IoU_c = TP / (TP + FP + FN)`` and
  ``mIoU`` is the mean over all classes, **background included**. This is the paper's definition;
  it is *not* the mean of per-case IoUs, which weights a small case like a large one. A class that
  appears in neither the predictions nor the ground truth of the whole set has no IoU (NaN) and is
  left out of the mean.
- **Dice and HD95** (MONAI ``compute_dice`` and ``compute_hausdorff_distance(percentile=95)``, i.e.
  the larger of the two directed 95th percentiles of boundary-to-boundary distances) are computed
  per case — one 3-D volume or one 2-D image as a whole, never per slice — and per class, then
  reported as mean and population standard deviation over cases. HD95 is in **millimetres** when
  the case has a spacing (3-D volumes read from files always do), otherwise in **pixels** (2-D) or
  **voxels** (3-D); all cases of one evaluation must share the unit. HD95 is not computed for the
  background (class 0), whose boundary only repeats the foreground boundaries.
- **Absent classes.** A class absent from both the prediction and the ground truth of a case has
  undefined Dice and HD95 (NaN) for that case and is excluded from that class's mean; each mean is
  reported with the number of cases it is taken over. A class present in exactly one of them (missed
  or hallucinated) gets Dice 0 and HD95 = the diagonal of the case's extent,
  ``sqrt(sum((size_i * spacing_i)^2))``, which is larger than any distance measurable inside the
  case: the worst possible score, so that the error is penalised and the means stay finite.
- **Foreground means.** Mean foreground Dice/HD95 is the mean of the per-class means over classes
  1..C-1; its standard deviation is taken over cases, of each case's mean over its defined
  foreground classes.
- **Ignore label** (nnU-Net v2's ``"ignore"``, optional). Pixels/voxels whose ground truth is the
  ignore label are unannotated: they are removed from both the prediction and the ground truth
  before any metric (confusion matrix, Dice, HD95 boundaries), as nnU-Net's evaluation does. The
  report records the label and how many pixels/voxels it removed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torchmetrics.classification import MulticlassConfusionMatrix

from biosam2.evaluation.report import CaseResult, EvaluationResult

CONVENTION = (
    "IoU: one confusion matrix accumulated over all pixels/voxels of all cases; IoU = TP/(TP+FP+FN); "
    "mIoU = mean over all classes, background included (a class absent from the whole set in both "
    "predictions and ground truth has no IoU and is left out). "
    "Dice and HD95 (MONAI; HD95 = symmetric 95th-percentile Hausdorff distance between boundaries) are "
    "computed per case (a whole 3-D volume or 2-D image) and per class, then given as mean ± population "
    "standard deviation over cases; HD95 is in mm where the case has a spacing, else in pixels (2-D) or "
    "voxels (3-D), and is not computed for the background. "
    "A class absent from both the prediction and the ground truth of a case has undefined Dice/HD95 for "
    "that case and is excluded from that class's mean (n = the number of cases the mean is taken over). "
    "A class present in exactly one of them gets Dice 0 and HD95 = the diagonal of the case's extent "
    "(sqrt(sum((size_i * spacing_i)^2)), larger than any distance inside the case). "
    "Foreground mean = mean of the per-class means over classes 1..C-1; its std is over cases, of each "
    "case's mean over its defined foreground classes."
)
IGNORE_CONVENTION = (
    " Pixels/voxels whose ground truth is the ignore label ({label}) are unannotated: they are removed from "
    "prediction and ground truth before every metric (confusion matrix, Dice, HD95 boundaries)."
)

# Pixels/voxels passed to the confusion matrix at once: bounds the int64 temporaries
# (3 x 8 bytes per voxel) to a few hundred MB for large CT volumes.
_CHUNK = 1 << 24


def _as_label_tensor(array: np.ndarray | torch.Tensor, what: str, case_id: str) -> torch.Tensor:
    """An integer label map as a tensor whose comparisons torch supports (uint16/32/64 are widened)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
        if tensor.dtype == torch.bool:
            tensor = tensor.to(torch.uint8)
        elif tensor.is_floating_point():
            if not torch.equal(tensor, torch.round(tensor)):
                raise ValueError(f"case {case_id}: {what} has non-integer values; pass class ids (argmax), not scores")
            tensor = tensor.to(torch.int64)
        elif tensor.dtype in (torch.uint16, torch.uint32, torch.uint64):
            tensor = tensor.to(torch.int64)
        elif tensor.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            raise ValueError(f"case {case_id}: {what} has unsupported dtype {tensor.dtype}")
        return tensor
    array = np.asarray(array)
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"case {case_id}: {what} has non-integer values; pass class ids (argmax), not scores")
        array = array.astype(np.int64)
    elif array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise ValueError(f"case {case_id}: {what} has unsupported dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _crop_to_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both masks cut to the bounding box of their union plus one voxel of margin.

    Distances are translation-invariant and the margin keeps every boundary voxel's neighbourhood,
    so HD95 is unchanged; MONAI would otherwise convert the whole volume to float per class.
    """
    union = a | b
    slices = []
    for axis in range(union.ndim):
        others = tuple(d for d in range(union.ndim) if d != axis)
        occupied = torch.nonzero(union.any(dim=others) if others else union).flatten()
        start = max(int(occupied[0]) - 1, 0)
        stop = min(int(occupied[-1]) + 2, union.shape[axis])
        slices.append(slice(start, stop))
    return a[tuple(slices)], b[tuple(slices)]


class Evaluator:
    """Accumulates cases one at a time; :meth:`result` gives the whole-set scores.

    Used by training (validation) and by ``biosam2 evaluate`` (through :func:`evaluate_folders`), so
    that both report exactly the same numbers. Class 0 is the background.
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None, *, ignore_label: int | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
        if class_names is None:
            class_names = ["background"] + [f"class_{i}" for i in range(1, num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes: {class_names}")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class names must be unique, got {class_names}")
        if ignore_label is not None:
            if isinstance(ignore_label, bool) or not isinstance(ignore_label, (int, np.integer)) or ignore_label < num_classes:
                raise ValueError(f"ignore_label {ignore_label!r} must be an id above the classes 0..{num_classes - 1}")
            ignore_label = int(ignore_label)
        self.num_classes = num_classes
        self.class_names = [str(name) for name in class_names]
        self.ignore_label = ignore_label
        # The evaluator sees every case itself: never sum with other processes (in a multi-GPU run,
        # rank 0 evaluates alone after training, when the others have already left). Ground-truth
        # pixels of the ignore label are dropped by torchmetrics before counting.
        self._confusion = MulticlassConfusionMatrix(
            num_classes=num_classes, ignore_index=ignore_label, validate_args=False, sync_on_compute=False
        )
        self._cases: list[CaseResult] = []
        self._unit: str | None = None

    def reset(self) -> None:
        """Forget all cases (e.g. between validation epochs)."""
        self._confusion.reset()
        self._cases = []
        self._unit = None

    @property
    def num_cases(self) -> int:
        return len(self._cases)

    def add_case(
        self,
        case_id: str,
        prediction: np.ndarray | torch.Tensor,
        ground_truth: np.ndarray | torch.Tensor,
        spacing: Sequence[float] | None = None,
    ) -> CaseResult:
        """Score one case and add it to the whole-set confusion matrix.

        ``prediction`` and ``ground_truth`` are integer label maps of equal shape, 2-D ``(H, W)`` or
        3-D (a whole volume); the ground truth may hold the ignore label, the prediction may not.
        ``spacing`` is the pixel/voxel size in mm per axis, in the arrays' axis order; None means
        distances in pixels/voxels. Raises ValueError on inconsistent input.
        """
        case_id = str(case_id)
        if any(case.case_id == case_id for case in self._cases):
            raise ValueError(f"case {case_id} was already added; every case may be counted only once")
        pred = _as_label_tensor(prediction, "prediction", case_id)
        gt = _as_label_tensor(ground_truth, "ground truth", case_id)
        if pred.shape != gt.shape:
            raise ValueError(f"case {case_id}: prediction shape {tuple(pred.shape)} != ground truth {tuple(gt.shape)}")
        if pred.ndim not in (2, 3):
            raise ValueError(f"case {case_id}: expected a 2-D image or 3-D volume, got shape {tuple(pred.shape)}")
        if pred.numel() == 0:
            raise ValueError(f"case {case_id}: empty label map of shape {tuple(pred.shape)}")
        gt = gt.to(pred.device)
        ignored = gt == self.ignore_label if self.ignore_label is not None else None
        ignored_count = int(ignored.sum()) if ignored is not None else 0
        for what, tensor in (("prediction", pred), ("ground truth", gt if not ignored_count else gt[~ignored])):
            if tensor.numel() == 0:
                continue  # a ground truth that is all ignore label
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"case {case_id}: {what} has label values {low}..{high}, outside the "
                    f"{self.num_classes} classes 0..{self.num_classes - 1}"
                    + (f" (and the ignore label {self.ignore_label} in the ground truth)" if self.ignore_label is not None else "")
                )
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != pred.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise ValueError(f"case {case_id}: spacing {spacing} must be {pred.ndim} positive numbers")
        unit = "mm" if spacing is not None else ("pixels" if pred.ndim == 2 else "voxels")
        if self._unit is not None and unit != self._unit:
            raise ValueError(
                f"case {case_id}: its HD95 would be in {unit} but earlier cases are in {self._unit}; "
                "give every case a spacing, or none, and do not mix 2-D images with 3-D volumes"
            )

        confusion = self._accumulate_confusion(pred, gt)  # without the ignored pixels
        gt_count, pred_count, tp = confusion.sum(dim=1), confusion.sum(dim=0), confusion.diagonal()
        union = gt_count + pred_count - tp
        extent = torch.tensor(pred.shape, dtype=torch.float64) * torch.tensor(spacing or (1.0,) * pred.ndim)
        diagonal = float(torch.linalg.vector_norm(extent))

        if ignored_count:
            # Ignored pixels become one extra class in both maps, which no class's Dice or mask sees.
            extra = torch.tensor(self.num_classes, dtype=torch.int64, device=pred.device)
            pred, gt = torch.where(ignored, extra, pred.to(torch.int64)), torch.where(ignored, extra, gt.to(torch.int64))
        dice_all = compute_dice(
            pred[None, None], gt[None, None], include_background=True, ignore_empty=False,
            num_classes=self.num_classes + (1 if ignored_count else 0),
        )[0]
        iou: dict[str, float] = {}
        dice: dict[str, float] = {}
        hd95: dict[str, float] = {}
        absent: list[str] = []
        penalised: list[str] = []
        missed: list[str] = []
        for index, name in enumerate(self.class_names):
            in_gt, in_pred = bool(gt_count[index] > 0), bool(pred_count[index] > 0)
            if not in_gt and not in_pred:
                absent.append(name)
                iou[name] = dice[name] = hd95[name] = math.nan
                continue
            iou[name] = float(tp[index]) / float(union[index])
            if in_gt != in_pred:
                # decided here, not by MONAI: its empty-mask handling depends on flags and warns
                penalised.append(name)
                if in_gt:
                    missed.append(name)
                dice[name] = 0.0
                hd95[name] = math.nan if index == 0 else diagonal
                continue
            dice[name] = float(dice_all[index])
            hd95[name] = math.nan if index == 0 else self._hd95(pred == index, gt == index, spacing)
        result = CaseResult(
            case_id=case_id,
            shape=tuple(int(s) for s in pred.shape),
            spacing=spacing,
            iou=iou,
            dice=dice,
            hd95=hd95,
            absent=absent,
            penalised=penalised,
            diagonal_extent=diagonal,
            ignored_pixels=ignored_count,
            missed=missed,
        )
        self._cases.append(result)
        self._unit = unit
        return result

    def _accumulate_confusion(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Add the case to the whole-set matrix; return the case's own matrix (rows: ground truth).

        ``forward`` both accumulates into the metric's state and returns the batch's matrix, so each
        voxel is counted once; chunking bounds the memory of torchmetrics' int64 temporaries.
        """
        if self._confusion.device != pred.device:
            self._confusion = self._confusion.to(pred.device)
        flat_pred, flat_gt = pred.reshape(-1), gt.reshape(-1)
        case = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=pred.device)
        for start in range(0, flat_pred.numel(), _CHUNK):
            case += self._confusion(flat_pred[start : start + _CHUNK], flat_gt[start : start + _CHUNK])
        return case.cpu()

    @staticmethod
    def _hd95(pred_mask: torch.Tensor, gt_mask: torch.Tensor, spacing: tuple[float, ...] | None) -> float:
        """MONAI's symmetric HD95 of two non-empty masks, in mm if ``spacing`` else in pixels/voxels."""
        # cropped masks are small: on the CPU MONAI uses a KD-tree and needs no cuCIM for CUDA inputs
        pred_mask, gt_mask = (mask.cpu() for mask in _crop_to_union(pred_mask, gt_mask))
        with warnings.catch_warnings():
            # MONAI 1.5/1.6 passes its own deprecated argument internally on every call: not ours to fix
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            distance = compute_hausdorff_distance(
                pred_mask[None, None],
                gt_mask[None, None],
                include_background=True,
                percentile=95,
                spacing=list(spacing) if spacing is not None else None,
            )
        return float(distance[0, 0])

    def result(self) -> EvaluationResult:
        """Whole-set scores of the cases added so far (see the module docstring for the conventions)."""
        if not self._cases:
            raise ValueError("no cases were added; nothing to evaluate")
        iou_values = iou_from_confusion(self._confusion.compute().cpu()).tolist()
        defined_iou = [v for v in iou_values if not math.isnan(v)]
        miou = float(np.mean(defined_iou)) if defined_iou else math.nan

        dice_stats = {name: _mean_std_count([case.dice[name] for case in self._cases]) for name in self.class_names}
        hd95_stats = {name: _mean_std_count([case.hd95[name] for case in self._cases]) for name in self.class_names}
        foreground = self.class_names[1:]
        fg_dice_means = [dice_stats[name][0] for name in foreground if dice_stats[name][2]]
        fg_hd95_means = [hd95_stats[name][0] for name in foreground if hd95_stats[name][2]]
        _, fg_dice_std, fg_count = _mean_std_count([c.foreground_mean("dice", foreground) for c in self._cases])
        _, fg_hd95_std, _ = _mean_std_count([c.foreground_mean("hd95", foreground) for c in self._cases])
        return EvaluationResult(
            class_names=list(self.class_names),
            miou=miou,
            per_class_iou=dict(zip(self.class_names, iou_values, strict=True)),
            dice_mean={name: dice_stats[name][0] for name in self.class_names},
            dice_std={name: dice_stats[name][1] for name in self.class_names},
            dice_count={name: dice_stats[name][2] for name in self.class_names},
            hd95_mean={name: hd95_stats[name][0] for name in self.class_names},
            hd95_std={name: hd95_stats[name][1] for name in self.class_names},
            hd95_count={name: hd95_stats[name][2] for name in self.class_names},
            mean_foreground_dice=float(np.mean(fg_dice_means)) if fg_dice_means else math.nan,
            std_foreground_dice=fg_dice_std,
            mean_foreground_hd95=float(np.mean(fg_hd95_means)) if fg_hd95_means else math.nan,
            std_foreground_hd95=fg_hd95_std,
            foreground_case_count=fg_count,
            hd95_unit=self._unit or "pixels",
            confusion_matrix=self._confusion.compute().cpu().numpy().astype(np.int64),
            cases=list(self._cases),
            convention=CONVENTION if self.ignore_label is None else CONVENTION + IGNORE_CONVENTION.format(label=self.ignore_label),
            ignore_label=self.ignore_label,
            ignored_pixels=sum(case.ignored_pixels for case in self._cases),
        )


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN) from a confusion matrix; NaN for a class seen nowhere."""
    confusion = confusion.to(torch.float64)
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))


def _mean_std_count(values: list[float]) -> tuple[float, float, int]:
    """Mean, population std and count of the defined (non-NaN) values; NaN, NaN, 0 if there are none."""
    defined = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if defined.size == 0:
        return math.nan, math.nan, 0
    return float(defined.mean()), float(defined.std()), int(defined.size)
