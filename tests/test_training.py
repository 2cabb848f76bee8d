"""Training end to end on synthetic data: the run directory, resuming, predicting, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import biosam2
from biosam2.cli import main
from biosam2.data.image_io import read_image, read_label, write_volume
from biosam2.data.synthetic import write_synthetic_dataset
from biosam2.errors import ConfigError
from biosam2.training import TrainConfig, train

QUICK = dict(weights="random", adapter="lw", epochs=2, batch_size=2, patch_size=64, lr=1e-3, num_workers=0, overlays=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train=4, val=2, test=2, max_side=96)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    summary = train(dataset, run, TrainConfig(**QUICK), progress_bar=False)
    return run, summary


def test_run_directory_holds_everything_promised(trained):
    run, summary = trained
    for name in ["config.yaml", "run.json", "metrics.json", "curves.png", "evaluation.json", "evaluation.md",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt", "model/biosam2.json", "model/biosam2.safetensors",
                 "logs/version_0/metrics.csv", "val_evaluation.json", "report.html"]:
        assert (run / name).is_file(), name
    assert len(list((run / "overlays").glob("*.png"))) == 2
    assert len(list((run / "test_predictions").glob("*.png"))) == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["adapter"] == "lw" and saved["epochs"] == 2 and saved["lr"] == 1e-3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["epochs_trained"] == 2
    # the postprocessing chosen on the validation cases is in the summary and in the artifact, for predict
    chosen = metrics["postprocessing"]["largest_component"]
    assert all(dice["with"] > dice["without"] for c, dice in metrics["postprocessing"]["validation_dice"].items() if int(c) in chosen)
    description = json.loads((run / "model" / "biosam2.json").read_text())
    assert description["metadata"]["postprocessing"] == {"largest_component": chosen}
    # the summary reports what the run measured: the best epoch of the logged curve, the written evaluation
    from biosam2.visualization import epoch_series

    curve = epoch_series(sorted((run / "logs").glob("version_*/metrics.csv")), "val/mIoU")
    assert [epoch for epoch, _ in curve] == [0, 1]
    best_epoch, best_value = max(curve, key=lambda point: point[1])  # the first of equal maxima, as kept
    assert metrics["best_val_mIoU"] == pytest.approx(best_value, abs=1e-6) and metrics["best_epoch"] == best_epoch
    assert metrics["test"]["miou"] == json.loads((run / "evaluation.json").read_text())["miou"]
    # the artifact is the fused LW model and knows how to normalise and name its outputs
    description = json.loads((run / "model" / "biosam2.json").read_text())
    assert description["model"]["reparameterized"] is True
    assert description["metadata"]["normalization"] == {"scheme": "uint8"}
    assert description["metadata"]["labels"] == {"background": 0, "cell": 1, "nucleus": 2, "fibre": 3}


class StartingPoint(biosam2.training.run.Callback):
    """Validation mIoU of the model as training starts, computed by the run's own validation code."""

    def on_train_start(self, trainer, module):
        import torch

        from biosam2.evaluation.metrics import iou_from_confusion

        with torch.no_grad():
            for index, batch in enumerate(trainer.datamodule.val_dataloader()):
                module.validation_step(batch, index)
        self.iou = iou_from_confusion(module.val_confusion.compute())
        module.val_confusion.reset()
        cases = trainer.datamodule.val_set.cases
        labels = np.concatenate([case.load().label.ravel() for case in cases])
        self.all_background_miou = float(np.mean(labels == 0) / len(np.unique(labels)))  # predicting 0 everywhere


def test_a_short_seeded_run_learns_the_synthetic_task(tmp_path):
    """16 steps of batch 8 (64-px crops) on the demo's data and model (random tiny SAM2 + LW adapters, Dice+CE).

    Measured on 2 cores with seed 0: validation mIoU 0.06 at the start -> 0.35 (cell IoU 0.49); with seeds 1
    and 2, 0.04 -> 0.29 and 0.06 -> 0.28 (cell 0.28, 0.22). Predicting background everywhere scores ~0.2.
    About 10 s on 2 idle cores. Broken training (no optimiser step) stays at the start and fails here.
    """
    from biosam2.visualization import epoch_series

    data = write_synthetic_dataset(tmp_path / "syn", train=16, val=2, test=0, max_side=96)
    config = TrainConfig(
        weights="random", adapter="lw", loss="dice_ce", lr=3e-3, epochs=8, batch_size=8, patch_size=64,
        val_every=8, num_workers=0, overlays=0, evaluate_test=False,
    )
    start = StartingPoint()
    summary = train(data, tmp_path / "run", config, progress_bar=False, callbacks=[start])
    start_miou = float(np.nanmean(start.iou.numpy()))
    logs = sorted((tmp_path / "run" / "logs").glob("version_*/metrics.csv"))
    cell = epoch_series(logs, "val/IoU_cell")[-1][1]
    print(f"\nval mIoU {start_miou:.3f} -> {summary['best_val_mIoU']:.3f}; cell IoU {start.iou[1]:.3f} -> {cell:.3f}; "
          f"all background {start.all_background_miou:.3f}")
    assert summary["best_val_mIoU"] >= start_miou + 0.2
    assert summary["best_val_mIoU"] >= start.all_background_miou + 0.1
    assert cell >= 0.3  # a foreground class is segmented, not only the background


def test_checkpoints_hold_only_trained_tensors(trained):
    import torch

    run, _ = trained
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and not any(".attn.qkv." in k for k in keys)
    assert any(".mlp.adapter." in k for k in keys)


def test_an_existing_run_is_never_overwritten(dataset, trained):
    run, _ = trained
    with pytest.raises(ConfigError, match="already holds a run; use --resume"):
        train(dataset, run, TrainConfig(**QUICK), progress_bar=False)


def test_resume_continues_from_the_last_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"
    train(dataset, run, TrainConfig(**{**QUICK, "epochs": 1}), progress_bar=False)
    # the same run, now asked for 2 epochs: the CLI refuses a changed option (only --epochs may be
    # raised), the API continues it
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--lr", "0.01", "--no-progress"]) == 2
    (run / "config.yaml").write_text(TrainConfig(**QUICK).to_yaml())
    summary = train(dataset, run, TrainConfig(**QUICK), resume=True, progress_bar=False)
    assert summary["epochs_trained"] == 2
    # each attempt keeps its own log; together they cover both epochs
    from biosam2.visualization import epoch_series

    logs = sorted((run / "logs").glob("version_*/metrics.csv"))
    assert len(logs) == 2
    assert [epoch for epoch, _ in epoch_series(logs, "val/mIoU")] == [0, 1]


def test_nothing_to_resume_is_explained(dataset, tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(dataset, tmp_path / "new", TrainConfig(**QUICK), resume=True)


def test_predict_cli_writes_label_maps_of_the_input_size(dataset, trained, tmp_path):
    run, _ = trained
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(dataset / "imagesTs"), str(out), "--probabilities", "--overlays"]) == 0
    for image_path in sorted((dataset / "imagesTs").glob("*_0000.png")):
        case = image_path.name.removesuffix("_0000.png")
        label = read_label(out / f"{case}.png").array
        assert label.shape == read_image(image_path).array.shape[:2]
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        probabilities = np.load(out / f"{case}_probabilities.npy")
        assert probabilities.shape == (4, *label.shape)
        np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-4)
        assert (out / "overlays" / f"{case}.png").exists()



def test_batched_prediction_equals_one_image_at_a_time(trained, tmp_path):
    from biosam2.data.image_io import write_image_png

    run, _ = trained
    rng = np.random.default_rng(5)
    for i in range(3):  # equal sizes, so they are batched together
        write_image_png(tmp_path / "in" / f"tile{i}.png", (rng.random((70, 90)) * 255).astype(np.uint8))
    assert main(["predict", str(run), str(tmp_path / "in"), str(tmp_path / "batched"), "--batch-size", "8"]) == 0
    assert main(["predict", str(run), str(tmp_path / "in"), str(tmp_path / "single"), "--batch-size", "1"]) == 0
    for i in range(3):
        batched, single = (read_label(tmp_path / f / f"tile{i}.png").array for f in ("batched", "single"))
        assert np.array_equal(batched, single)


def test_predict_never_writes_into_or_over_its_inputs(dataset, trained, capsys):
    run, _ = trained
    before = sorted(p.name for p in (dataset / "imagesTs").iterdir())
    assert main(["predict", str(run), str(dataset / "imagesTs"), str(dataset / "imagesTs" / "out")]) == 2
    assert "must not be (inside) the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == before


def test_predicted_volume_keeps_the_inputs_geometry(trained, tmp_path):
    run, _ = trained
    affine = np.array([[0.7, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.5, 40], [0, 0, 0, 1]])
    volume = (np.random.default_rng(0).random((40, 50, 6)) * 255).astype(np.uint8)
    write_volume(tmp_path / "scan.nii.gz", volume, affine)
    assert main(["predict", str(run), str(tmp_path / "scan.nii.gz"), str(tmp_path / "out")]) == 0
    written = read_label(tmp_path / "out" / "scan.nii.gz")
    assert written.array.shape == (40, 50, 6)
    np.testing.assert_allclose(written.affine, affine)
    assert written.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_model_from_the_run_loads_through_the_public_api(trained):
    run, _ = trained
    model = biosam2.load_model(run / "model")
    assert model.num_classes == 4 and model.config.reparameterized


@pytest.mark.parametrize(
    "command", [["demo"], ["convert"], ["check-data"], ["train"], ["predict"], ["evaluate"], ["bench"], ["bench", "efficiency"], ["bench", "accuracy"], ["selfcheck"]]
)
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "-h"])
    assert exit_.value.code == 0
    assert "usage: biosam2" in capsys.readouterr().out


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "nowhere")]) == 1
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--weights", "random"]) == 2
    err = capsys.readouterr().err
    assert "dataset folder not found" in err and "Traceback" not in err


def test_epoch_seeded_sampler_shards_one_permutation_across_processes():
    from biosam2.data.training_data import EpochSeededSampler, ShardSampler

    samplers = [EpochSeededSampler(10, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        assert all(len(shard) == 4 for shard in shards)  # 10 samples padded to 12
        indices = [i for shard in shards for _, i in shard]
        assert set(indices) == set(range(10)) and all(e == epoch for shard in shards for e, _ in shard)
    first, second = EpochSeededSampler(10, seed=3), EpochSeededSampler(10, seed=3)
    second.set_epoch(1)
    assert [i for _, i in first] != [i for _, i in second]  # a new order every epoch
    assert [list(ShardSampler(5, 2, r)) for r in range(2)] == [[0, 2, 4], [1, 3]]


def test_a_fixed_input_size_model_trains_on_images_resized_to_that_size():
    """G-SAM's ISBI recipe: resize 512 -> 256, then 128-px crops: crops must show the resized scale."""
    from biosam2.data.cases import Case
    from biosam2.data.image_io import LoadedImage
    from biosam2.data.training_data import SliceDataset

    label = np.zeros((512, 512), np.int64)
    label[:, 256:] = 1  # left half background, right half class 1
    reference = LoadedImage(np.zeros((512, 512), np.uint8), Path("c.png"), (1.0, 1.0))
    case = Case("c", np.zeros((1, 512, 512), np.float32), label, reference)
    native = SliceDataset([case], patch_size=128, augment=False)
    resized = SliceDataset([case], patch_size=128, augment=False, resize_to=256)

    def straddling(dataset) -> int:  # crops that contain both classes, over 40 epochs' random crops
        return sum(len(np.unique(dataset[(epoch, 0)][1].numpy())) == 2 for epoch in range(40))

    assert resized[(0, 0)][0].shape == (1, 128, 128)
    # a 128-px crop of the 256-px image almost always straddles the middle; of the 512-px one, a third do
    assert straddling(resized) >= 36 and straddling(native) <= 24


def test_demo_runs_the_whole_workflow_and_never_reuses_a_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()  # an existing folder: the demo must write beside it, not into it
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    made = tmp_path / "demo-2"
    assert not any(out.iterdir())
    evaluation = json.loads((made / "evaluation.json").read_text())
    assert evaluation["num_cases"] == 6
    # the demo's predict + evaluate of the saved artifact repeats the run's own test evaluation
    run_test = json.loads((made / "run" / "metrics.json").read_text())["test"]
    assert evaluation["miou"] == pytest.approx(run_test["miou"], abs=1e-9) and run_test["num_cases"] == 6
    written = sorted(p.name for p in (made / "predictions").glob("*.png") if "overlay" not in p.name)
    expected = sorted(p.name.replace("_0000", "") for p in (made / "data" / "imagesTs").iterdir())
    assert written == expected
    assert (made / "run" / "model" / "biosam2.safetensors").is_file()
    assert "everything is in" in capsys.readouterr().out


def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_nan_model(dataset, tmp_path, capsys):
    """--lr 1e4 sends the loss to 1e24 and then NaN: the run must fail, not end with a NaN artifact."""
    import torch

    run = tmp_path / "run"
    options = ["--weights", "random", "--adapter", "lw", "--epochs", "3", "--batch-size", "2", "--patch-size", "64",
               "--num-workers", "0", "--no-progress", "--lr", "1e4"]
    assert main(["train", str(dataset), "--out", str(run), *options]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "--lr" in errors[0], errors
    assert not (run / "model").exists() and not (run / "metrics.json").exists()
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), checkpoint


def test_load_model_refuses_nan_weights(tmp_path):
    import safetensors.torch

    from biosam2.model.artifact import WEIGHTS_FILE

    biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw").save_pretrained(tmp_path / "artifact")
    tensors = safetensors.torch.load_file(tmp_path / "artifact" / WEIGHTS_FILE)
    tensors["decoder.class_tokens"][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, tmp_path / "artifact" / WEIGHTS_FILE)
    with pytest.raises(biosam2.CheckpointError, match="NaN or Inf.*decoder.class_tokens"):
        biosam2.load_model(tmp_path / "artifact")


def test_two_dimensional_nifti_cases_train_predict_and_evaluate(tmp_path):
    """(X, Y) NIfTI files are one-slice volumes: the final evaluation used to crash on their 2 zooms."""
    import nibabel as nib

    root = tmp_path / "nifti2d"
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    for index in range(7):
        split = "Tr" if index < 5 else "Ts"
        image = rng.normal(size=(48, 40)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.diag([0.7, 0.7, 1, 1])), root / f"images{split}" / f"c{index}_0000.nii.gz")
        nib.save(nib.Nifti1Image((image > 0.5).astype(np.uint8), np.diag([0.7, 0.7, 1, 1])), root / f"labels{split}" / f"c{index}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "fg": 1}, "file_ending": ".nii.gz", "numTraining": 5}
    ))
    run = tmp_path / "run"
    summary = train(root, run, TrainConfig(**{**QUICK, "epochs": 1, "patch_size": 32, "overlays": 0}), progress_bar=False)
    assert summary["test"]["num_cases"] == 2
    prediction = nib.load(run / "test_predictions" / "c5.nii.gz")
    assert prediction.shape == (48, 40) and prediction.header.get_zooms() == (0.7, 0.7)


# ---- --resume safety (issue 10, item 6) ---------------------------------------------------------
RESUME_CLI = ["--weights", "random", "--adapter", "lw", "--batch-size", "2", "--patch-size", "64", "--lr", "1e-3", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def one_epoch(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "one"
    train(dataset, run, TrainConfig(**{**QUICK, "epochs": 1}), progress_bar=False)
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_resume_refuses_given_options_even_when_they_equal_the_defaults(dataset, one_epoch, tmp_path, capsys):
    run = _copy(one_epoch, tmp_path / "run")
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--adapter", "hp", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "adapter='hp' (run has 'lw')" in err and "Traceback" not in err
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--epochs", "0", "--no-progress"]) == 2
    assert main(["train", str(dataset), "--out", str(run), *RESUME_CLI, "--epochs", "1", "--resume"]) == 0  # the same options are fine


def test_resume_refuses_another_dataset_naming_what_changed(dataset, one_epoch, tmp_path, capsys):
    import shutil

    run = _copy(one_epoch, tmp_path / "run")
    other = tmp_path / "other"
    shutil.copytree(dataset, other)  # a copy (new mtimes) is the same data ...
    label = sorted((other / "labelsTr").iterdir())[0]
    case = label.name.removesuffix(".png")
    array = read_label(label).array.copy()
    array[0, 0] = (array[0, 0] + 1) % 4
    import PIL.Image

    PIL.Image.fromarray(array.astype(np.uint8)).save(label)  # ... but an edited label is not
    assert main(["train", str(other), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resume with another dataset" in err and case in err and "Traceback" not in err


def test_a_moved_run_resumes_and_keeps_its_best_score(dataset, one_epoch, tmp_path):
    import torch

    run = _copy(one_epoch, tmp_path / "moved")  # a different path from the one it was trained in
    before = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    best_score = next(v["best_model_score"] for k, v in before["callbacks"].items() if "val/mIoU" in k)

    seen = {}

    class Spy(biosam2.training.run.Callback):
        def on_train_start(self, trainer, module):
            seen["best"] = trainer.checkpoint_callback.best_model_score
            seen["path"] = trainer.checkpoint_callback.best_model_path

    summary = train(dataset, run, TrainConfig(**QUICK), resume=True, progress_bar=False, callbacks=[Spy()])
    assert seen["best"] == best_score and seen["path"] == str(run / "checkpoints" / "best.ckpt")
    assert summary["best_val_mIoU"] >= float(best_score)


def test_lost_last_checkpoint_gives_one_way_out(dataset, one_epoch, tmp_path, capsys):
    run = _copy(one_epoch, tmp_path / "run")
    (run / "checkpoints" / "last.ckpt").unlink()
    for extra in ([], ["--resume"]):
        assert main(["train", str(dataset), "--out", str(run), *RESUME_CLI, "--epochs", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert "last.ckpt is missing" in err and "copy" in err and "best.ckpt" in err
    import shutil

    shutil.copy(run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt")
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--no-progress"]) == 0


def test_a_finished_run_is_extended_by_more_epochs_on_a_stretched_cosine(dataset, one_epoch, tmp_path):
    import torch

    run = _copy(one_epoch, tmp_path / "run")
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    assert json.loads((run / "metrics.json").read_text())["epochs_trained"] == 2
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    schedule = state["lr_schedulers"][0]
    steps = state["global_step"]
    assert schedule["T_max"] == steps  # the cosine of the new length, ending at 0 at its end
    lr = state["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.0, abs=1e-12)
