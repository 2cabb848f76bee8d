"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Files are paired by case id: the file name without its ending (``CASE.png``, ``CASE.nii.gz``).
Every ground-truth case must have a prediction — a missing one is an error, never silently skipped,
because skipping it would improve the score. Predictions without ground truth are listed in the
result as ignored. Each pair must lie on the same grid (size, and for volumes spacing and
orientation); HD95 is in mm for volumes (the ground truth's voxel spacing) and in pixels for 2-D
images. Classes come from ``labels``, else from ``dataset``'s dataset.json, else from a
dataset.json in the ground-truth folder's parent (the nnU-Net layout ``DATASET/labelsTs``), else
they are inferred as 0..the largest label present in either folder. Where the labels declare
nnU-Net's ``"ignore"`` label, ground-truth pixels with it are left out of every metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biosam2.atomic_io import INCOMPLETE_MARKER
from biosam2.data.dataset_format import DATASET_JSON, DatasetSpec, load_dataset_spec, split_labels
from biosam2.data.image_io import IMAGE_2D_ENDINGS, VOLUME_ENDINGS, LoadedImage, file_ending, read_label, same_geometry
from biosam2.errors import ConfigError, DataError
from biosam2.evaluation.metrics import Evaluator
from biosam2.evaluation.report import EvaluationResult

_LABEL_ENDINGS = IMAGE_2D_ENDINGS + VOLUME_ENDINGS
_LISTED = 10  # case ids named in an error message before "and N more"


def _list_label_files(folder: Path, what: str) -> dict[str, Path]:
    """Case id -> file for every image/volume file of ``folder`` (hidden files, e.g. partial writes, skipped)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        ending = file_ending(path)
        if ending not in _LABEL_ENDINGS:
            continue
        case_id = path.name[: -len(ending)]
        if case_id in files:
            raise DataError(f"{folder}: case {case_id} has two files, {files[case_id].name} and {path.name}")
        files[case_id] = path
    return files


def _names(case_ids: list[str]) -> str:
    shown = ", ".join(case_ids[:_LISTED])
    return shown + (f" and {len(case_ids) - _LISTED} more" if len(case_ids) > _LISTED else "")


def _dataset_spec(dataset: Path | None, ground_truth: Path) -> DatasetSpec | None:
    """The dataset given, or the one the ground-truth folder sits in (DATA/labelsTs), if any."""
    if dataset is not None:
        return load_dataset_spec(dataset)
    if (ground_truth.parent / DATASET_JSON).is_file():
        return load_dataset_spec(ground_truth.parent)
    return None


def _check_values(loaded: LoadedImage, num_classes: int, source: str, ignore_label: int | None = None) -> None:
    high = int(loaded.array.max())
    if high >= num_classes:
        outside = np.unique(loaded.array[loaded.array >= num_classes])
        outside = outside[outside != ignore_label] if ignore_label is not None else outside
        if not outside.size:
            return
        shown = ", ".join(str(int(v)) for v in outside[:_LISTED])
        raise DataError(
            f"{loaded.path}: {source} has label value(s) {shown} outside the {num_classes} classes 0..{num_classes - 1}"
            + (f" (and the ignore label {ignore_label} in the ground truth)" if ignore_label is not None else "")
        )


def evaluate_folders(
    predictions: str | Path,
    ground_truth: str | Path,
    *,
    labels: dict[str, int] | None = None,
    dataset: str | Path | None = None,
    spacing_known: bool | None = None,
    case_ids: list[str] | None = None,
) -> EvaluationResult:
    """Score every ground-truth case against the prediction of the same case id.

    ``labels`` (name -> id, as in dataset.json, "ignore" included) or ``dataset`` (a folder with
    dataset.json) name the classes and the ignore label; see the module docstring for the fallbacks.
    HD95 is in mm for volumes unless ``spacing_known`` is False, the dataset.json says
    ``"spacing": "unknown"`` or the ground-truth file itself does (a converted volume with a stand-in
    1 mm spacing, :data:`~biosam2.data.image_io.UNKNOWN_SPACING`): then in voxels.
    ``case_ids`` restricts the evaluation to these ground-truth cases (e.g. the validation cases among
    labelsTr); each must have a ground truth. Raises :class:`DataError` naming the file(s) on a missing prediction, a geometry mismatch, or a
    label value outside the classes.
    """
    predictions, ground_truth = Path(predictions), Path(ground_truth)
    gt_files = _list_label_files(ground_truth, "ground-truth")
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(gt_files))
        if unknown:
            raise DataError(f"{ground_truth}: no ground truth for {_names(unknown)}")
        gt_files = {case_id: gt_files[case_id] for case_id in case_ids}
    if (predictions / INCOMPLETE_MARKER).exists():
        raise DataError(
            f"{predictions}: a `biosam2 predict` run was killed while moving its results in ({INCOMPLETE_MARKER}); "
            "rerun it with --overwrite"
        )
    pred_files = _list_label_files(predictions, "predictions")
    if not gt_files:
        raise DataError(f"{ground_truth}: no label files ({', '.join(_LABEL_ENDINGS)}) to evaluate against")
    missing = sorted(set(gt_files) - set(pred_files))
    if missing:
        raise DataError(
            f"{predictions}: no prediction for {len(missing)} of {len(gt_files)} ground-truth case(s) in "
            f"{ground_truth}: {_names(missing)}; every case must be predicted (a skipped case would "
            "improve the score)"
        )
    ignored = sorted(set(pred_files) - set(gt_files))

    spec = _dataset_spec(Path(dataset) if dataset is not None else None, ground_truth)
    ignore_label = None
    if labels is not None:
        classes, ignore_label = split_labels(labels, f"labels {labels}", error=ConfigError)
        class_names = [name for name, _ in sorted(classes.items(), key=lambda item: item[1])]
    elif spec is not None:
        class_names, ignore_label = spec.class_names, spec.ignore_label
    else:
        class_names = None
    if spacing_known is None:
        spacing_known = spec.spacing_known if spec else True
    if class_names is None:
        # inferred: one extra pass over the files, to know the number of classes before counting
        paths = [path for case_id in gt_files for path in (gt_files[case_id], pred_files[case_id])]
        highest = max(int(read_label(path).array.max()) for path in paths)
        class_names = ["background"] + [f"class_{i}" for i in range(1, max(highest, 1) + 1)]

    evaluator = Evaluator(len(class_names), class_names, ignore_label=ignore_label)
    for case_id in sorted(gt_files):
        truth, prediction = read_label(gt_files[case_id]), read_label(pred_files[case_id])
        difference = same_geometry(prediction, truth)
        if difference is not None:
            raise DataError(
                f"{prediction.path} and {truth.path}: different geometry ({difference}); a prediction "
                "must be on the grid of its ground truth"
            )
        _check_values(truth, len(class_names), "ground truth", ignore_label)
        _check_values(prediction, len(class_names), "prediction")  # a model never predicts the ignore label
        try:
            evaluator.add_case(
                case_id, prediction.array, truth.array, spacing=truth.spacing if truth.is_volume and spacing_known and truth.spacing_known else None
            )
        except ValueError as error:
            raise DataError(f"{prediction.path} and {truth.path}: {error}") from None
    result = evaluator.result()
    result.ignored_predictions = [pred_files[case_id].name for case_id in ignored]
    return result


def evaluate_into(out: Path, predictions: str | Path, spec: DatasetSpec, *, case_ids: list[str] | None = None,
                  stem: str = "") -> EvaluationResult:
    """A dataset's predictions scored with its classes and spacing, written to ``OUT/{stem}evaluation.json``
    and ``.md`` (a run's evaluation): against labelsTs, or with ``case_ids`` (validation cases) labelsTr."""
    result = evaluate_folders(predictions, spec.root / ("labelsTs" if case_ids is None else "labelsTr"),
                              labels=spec.declared_labels, spacing_known=spec.spacing_known, case_ids=case_ids)
    result.write_json(Path(out) / f"{stem}evaluation.json")
    result.write_markdown(Path(out) / f"{stem}evaluation.md")
    return result
