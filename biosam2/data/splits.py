"""Which cases a run trains, validates and tests on, for a dataset in biosam2's (nnU-Net) format.

Train/val come from ``splits_final.json`` (nnU-Net's folds), or, without one, from a seeded 80/20 split
of ``imagesTr`` (said so in the split's note); test is every labelled case of ``imagesTs``.
:func:`kfold_splits` writes nnU-Net's own k folds (``biosam2 splits DATA``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biosam2.data.dataset_format import CaseFiles, DatasetSpec
from biosam2.errors import ConfigError, DataError


NNUNET_SPLIT_SEED = 12345  # nnU-Net v2's generate_crossval_split


def kfold_splits(case_ids: list[str], folds: int = 5, seed: int = NNUNET_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """The k train/val folds nnU-Net v2 makes: scikit-learn's ``KFold(folds, shuffle=True,
    random_state=seed)`` over the sorted case ids (reproduced with numpy, so scikit-learn is not needed:
    the same permutation, the first ``n % k`` folds one case larger)."""
    ids = sorted(case_ids)
    if not 2 <= folds <= len(ids):
        raise ConfigError(f"--folds {folds}: needs 2..{len(ids)} folds for {len(ids)} training cases")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = [len(ids) // folds + (1 if index < len(ids) % folds else 0) for index in range(folds)]
    starts = np.cumsum([0, *sizes])
    splits = []
    for index in range(folds):
        val = set(order[starts[index] : starts[index + 1]].tolist())
        splits.append({"train": [ids[i] for i in range(len(ids)) if i not in val], "val": sorted(ids[i] for i in val)})
    return splits


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
