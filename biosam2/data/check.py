"""``check-data``: validate a whole dataset and report every problem at once.

Problems (the dataset cannot be used as it is): unreadable or truncated files, images and labels
whose size or 3-D geometry differ, label values not declared in dataset.json, images whose channel
count contradicts dataset.json, NaN/Inf intensities, cases missing their label, an empty training or
validation split, split files naming unknown cases or unsafe paths.
Warnings (usable, but worth knowing): no test split, files that match no case, a numTraining that
disagrees with the files, mixed pixel types, a split whose label maps are all ignore label.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biosam2.data.cases import read_case_image, read_case_label
from biosam2.data.dataset_format import IGNORE_INDEX, IGNORE_KEY, SPLIT_FOLDERS, DatasetSpec, load_dataset_spec
from biosam2.errors import DataError


@dataclass
class DataReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"Dataset {self.root}"]
        lines += [f"  {fact}" for fact in self.facts]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {i}. {p}" for i, p in enumerate(self.problems, 1)]
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning(s):")
            lines += [f"  - {w}" for w in self.warnings]
        lines.append("OK: the dataset can be used." if self.ok else "NOT OK: fix the problems above.")
        return "\n".join(lines)


def check_dataset(root: str | Path) -> DataReport:
    report = DataReport(Path(root))
    try:
        spec = load_dataset_spec(root)
    except DataError as error:
        report.problems.append(str(error))
        return report
    report.facts.append(
        f"{spec.name}: {spec.num_classes} classes ({', '.join(spec.class_names)}), channels "
        f"{', '.join(spec.channel_names.values())}, files *{spec.file_ending}"
    )
    if spec.ignore_label is not None:
        report.facts.append(
            f"ignore label {spec.ignore_label} (\"{IGNORE_KEY}\"): unannotated pixels, left out of the loss and of every metric"
        )
    cases = {}
    for split in ("train", "test"):
        try:
            cases[split] = spec.list_cases(split)
        except DataError as error:
            report.problems.append(str(error))
            cases[split] = []
        _check_cases(spec, split, cases[split], report)
        _stray_files(spec, split, cases[split], report)
    if not cases["train"]:
        report.problems.append(f"{spec.root / 'imagesTr'}: no training cases (expected CASE_0000{spec.file_ending})")
    if not cases["test"]:
        report.warnings.append(f"{spec.root / 'imagesTs'}: no test cases with labels; training will report no test metrics")
    _check_splits(spec, {c.case_id for c in cases["train"]}, {c.case_id for c in cases["test"]}, report)
    if spec.num_training is not None and spec.num_training != len(cases["train"]):
        report.warnings.append(f"dataset.json says numTraining={spec.num_training}, imagesTr holds {len(cases['train'])} cases")
    return report


def _check_cases(spec: DatasetSpec, split: str, cases, report: DataReport) -> None:
    shapes, dtypes, spacings = [], Counter(), []
    ignored = labelled = 0
    stated = (spec.normalization or {}).get("scheme")
    for files in cases:
        try:
            image, reference = read_case_image(spec, files)
            dtypes[str(image.dtype)] += 1
            if stated == "uint8" and image.dtype != np.uint8:
                report.problems.append(
                    f"{reference.path}: {image.dtype} pixels but dataset.json states 8-bit normalisation; convert it "
                    "to 8 bits or state \"normalization\": {\"scheme\": \"percentile\"}"
                )
            shapes.append(reference.spatial_shape)
            spacings.append(reference.spacing)
        except DataError as error:
            report.problems.append(str(error))
            continue
        try:
            label = read_case_label(spec, files, reference)
            ignored += int(np.count_nonzero(label == IGNORE_INDEX))
            labelled += label.size
        except DataError as error:
            if files.label is None and split == "test":
                report.warnings.append(f"test case {files.case_id} has no label map; it will not be evaluated")
            else:
                report.problems.append(str(error))
    if shapes:
        sizes = np.array(shapes)
        low_spacing, high_spacing = np.min(spacings, 0), np.max(spacings, 0)
        report.facts.append(
            f"{split}: {len(cases)} cases, sizes {_tuple(sizes.min(0))} to {_tuple(sizes.max(0))}, "
            f"spacing {_tuple(low_spacing)} to {_tuple(high_spacing)}"
        )
    if spec.ignore_label is not None and labelled:
        report.facts.append(f"{split}: {ignored / labelled:.1%} of the label pixels are ignore label ({ignored} of {labelled})")
        if ignored == labelled:
            report.warnings.append(f"{split}: every label pixel is the ignore label; these cases teach and score nothing")
    if len(dtypes) > 1:
        report.warnings.append(f"{split}: mixed pixel types {dict(dtypes)}; intensities are normalised per scheme")


def _tuple(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _stray_files(spec: DatasetSpec, split: str, cases, report: DataReport) -> None:
    image_folder, label_folder = (spec.root / f for f in SPLIT_FOLDERS[split])
    known_images = {p for c in cases for p in c.images}
    known_labels = {c.label for c in cases if c.label is not None}
    for folder, known in ((image_folder, known_images), (label_folder, known_labels)):
        if folder.is_dir():
            stray = sorted(p.name for p in folder.iterdir() if p.is_file() and p not in known and not p.name.startswith("."))
            if stray:
                report.warnings.append(f"{folder}: {len(stray)} file(s) match no case and are ignored: {', '.join(stray[:5])}")


def _check_splits(spec: DatasetSpec, train_ids: set[str], test_ids: set[str], report: DataReport) -> None:
    try:
        folds = spec.load_splits()
    except DataError as error:
        report.problems.append(str(error))
        return
    path = spec.root / "splits_final.json"
    if not folds:
        report.warnings.append(f"{path}: missing; training will make a seeded 80/20 train/validation split")
        return
    for index, fold in enumerate(folds):
        where = f"{path} fold {index}"
        for key in ("train", "val"):
            if not fold[key]:
                report.problems.append(f"{where}: empty {key} split")
            unknown = sorted(set(fold[key]) - train_ids)
            if unknown:
                in_test = [c for c in unknown if c in test_ids]
                detail = f" ({len(in_test)} of them are test cases: the test set must never be used for validation)" if in_test else ""
                report.problems.append(f"{where}: {key} names cases not in imagesTr: {', '.join(unknown[:6])}{detail}")
        overlap = sorted(set(fold["train"]) & set(fold["val"]))
        if overlap:
            report.problems.append(f"{where}: cases in both train and val: {', '.join(overlap[:6])}")
    first = folds[0]
    report.facts.append(f"splits: {len(folds)} fold(s); fold 0 has {len(first['train'])} train / {len(first['val'])} val cases")
