"""Which cases a run trains, validates and tests on, for a dataset in biosam2's (nnU-Net) format.

Train/val come from ``splits_final.json`` (nnU-Net's folds), or, without one, from a seeded 80/20 split
of ``imagesTr`` (said so in the split's note); test is every labelled case of ``imagesTs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biosam2.data.dataset_format import CaseFiles, DatasetSpec
from biosam2.errors import ConfigError, DataError


@dataclass
class Split:
    train: list[CaseFiles]
    val: list[CaseFiles]
    test: list[CaseFiles]
    note: str


def resolve_split(spec: DatasetSpec, fold: int, seed: int) -> Split:
    """Train/val from splits_final.json (or a seeded 80/20 split, said so), test from imagesTs."""
    cases = {c.case_id: c for c in spec.list_cases("train")}
    if not cases:
        raise DataError(f"{spec.root / 'imagesTr'}: no training cases (expected CASE_0000{spec.file_ending} files)")
    folds = spec.load_splits()
    if folds:
        if not 0 <= fold < len(folds):
            raise ConfigError(f"fold={fold}: {spec.root / 'splits_final.json'} has folds 0..{len(folds) - 1}")
        chosen = folds[fold]
        unknown = sorted(set(chosen["train"] + chosen["val"]) - set(cases))
        if unknown:
            raise DataError(f"{spec.root / 'splits_final.json'}: cases not in imagesTr: {', '.join(unknown[:8])}")
        overlap = sorted(set(chosen["train"]) & set(chosen["val"]))
        if overlap:
            raise DataError(f"{spec.root / 'splits_final.json'}: cases in both train and val: {', '.join(overlap[:8])}")
        train_ids, val_ids, note = chosen["train"], chosen["val"], f"fold {fold} of splits_final.json"
    else:
        ids = sorted(cases)
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = max(1, round(0.2 * len(ids)))
        val_ids = sorted(ids[i] for i in order[:n_val])
        train_ids = sorted(ids[i] for i in order[n_val:])
        note = f"no splits_final.json: seeded (seed {seed}) random 80/20 train/val split of imagesTr"
    if not train_ids or not val_ids:
        raise DataError(f"{spec.root}: the split leaves no {'training' if not train_ids else 'validation'} cases")
    test = [c for c in spec.list_cases("test") if c.label is not None]
    return Split([cases[i] for i in train_ids], [cases[i] for i in val_ids], test, note)
