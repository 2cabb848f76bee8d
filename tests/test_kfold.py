"""k-fold cross-validation: nnU-Net's folds written by `biosam2 splits`, and `train --fold all`."""

from __future__ import annotations

import json

import pytest

from biosam2.cli import main
from biosam2.data.splits import kfold_splits
from biosam2.data.synthetic import write_synthetic_dataset


@pytest.mark.parametrize("count", [10, 13, 28])
def test_folds_are_nnunets_own(count):
    """nnU-Net v2's generate_crossval_split is scikit-learn's KFold(5, shuffle=True, random_state=12345)
    over the sorted case ids; ours must give the very same folds."""
    sklearn = pytest.importorskip("sklearn.model_selection", reason="scikit-learn (the test extra) gives the reference folds")
    ids = [f"case_{i:03d}" for i in range(count)]
    expected = [{"train": sorted(ids[i] for i in train), "val": sorted(ids[i] for i in val)}
                for train, val in sklearn.KFold(n_splits=5, shuffle=True, random_state=12345).split(ids)]
    assert kfold_splits(list(reversed(ids))) == expected
    folds = kfold_splits(ids)
    assert sorted(case for fold in folds for case in fold["val"]) == ids  # every case validated exactly once
    assert all(set(fold["train"]).isdisjoint(fold["val"]) for fold in folds)


def test_splits_command_writes_folds_and_train_fold_all_trains_each_into_one_parent(tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "syn", train=4, val=2, test=2, max_side=64, min_side=48)
    assert main(["splits", str(data), "--folds", "3"]) == 2  # the dataset already has a splits_final.json
    assert "--overwrite" in capsys.readouterr().err
    assert main(["splits", str(data), "--folds", "3", "--overwrite"]) == 0
    folds = json.loads((data / "splits_final.json").read_text())
    assert [len(fold["val"]) for fold in folds] == [2, 2, 2]
    out = tmp_path / "cv"
    options = ["--weights", "random", "--adapter", "lw", "--epochs", "1", "--batch-size", "2", "--patch-size", "48",
               "--num-workers", "0", "--no-test", "--no-progress"]
    assert main(["train", str(data), "--out", str(out), "--fold", "all", *options]) == 0
    for fold in range(3):
        run = json.loads((out / f"fold_{fold}" / "run.json").read_text())
        assert sorted(run["split"]["val"]) == folds[fold]["val"] and f"fold {fold}" in run["split"]["note"]
    summary = json.loads((out / "folds.json").read_text())
    values = [summary["folds"][str(k)]["best_val_mIoU"] for k in range(3)]
    assert summary["best_val_mIoU"]["n"] == 3 and summary["best_val_mIoU"]["mean"] == pytest.approx(sum(values) / 3)
    # again with --resume: finished folds are not trained again
    stamp = (out / "fold_0" / "metrics.json").stat().st_mtime_ns
    assert main(["train", str(data), "--out", str(out), "--fold", "all", "--resume", *options]) == 0
    assert (out / "fold_0" / "metrics.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):
        main(["train", str(data), "--out", str(tmp_path / "x"), "--fold", "some"])
    assert "'some': a fold number, or all" in capsys.readouterr().err
