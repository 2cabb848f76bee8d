"""nnU-Net v2 as a baseline, run by its own package on a biosam2 dataset (which is nnU-Net's raw format):
plan and preprocess, train one configuration with nnU-Net's trainer for a stated budget, predict with
nnU-Net's default predictor (sliding window, Gaussian weighting, mirroring), and score the predictions
with biosam2's evaluation, so that its numbers sit in the same tables as biosam2's.

Nothing of nnU-Net is reimplemented: the only class of ours is :class:`nnUNetTrainerBudget`, which sets
the number of epochs and iterations. Everything nnU-Net writes goes to one workspace folder; nnU-Net's
environment variables point there only while it runs (:func:`nnunet_environment`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from biosam2.atomic_io import atomic_write_json
from biosam2.data.dataset_format import DatasetSpec, load_dataset_spec
from biosam2.errors import ConfigError

TRAINERS_FOLDER = Path(__file__).resolve().parent / "nnunet_trainers"
TRAINER = "nnUNetTrainerBudget"
PLANS = "nnUNetPlans"
DATASET_ID = 1  # each workspace holds one dataset
NNUNET_KEYS = ("name", "description", "channel_names", "labels", "numTraining", "file_ending")


def require_nnunet() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise ConfigError("the nnU-Net baseline needs nnU-Net v2: pip install 'biosam2[nnunet]' "
                          "(or pip install 'nnunetv2>=2.8,<2.9')") from None


@contextlib.contextmanager
def nnunet_environment(workspace: Path, budget: dict[str, int] | None = None,
                       augmentation_processes: int | None = None) -> Iterator[None]:
    """nnU-Net's folders (raw, preprocessed, results) inside ``workspace``, our trainer findable by name
    with ``budget`` (nnU-Net's trainer attributes, e.g. num_epochs), and optionally nnU-Net's
    number of augmentation processes (0: augment in this process, seeded with it)."""
    values: dict[str, Any] = {"nnUNet_raw": workspace / "raw", "nnUNet_preprocessed": workspace / "preprocessed",
                              "nnUNet_results": workspace / "results", "nnUNet_extTrainer": TRAINERS_FOLDER}
    from biosam2.baselines.nnunet_trainers.budget import BUDGET_VARIABLES

    values |= {BUDGET_VARIABLES[attribute]: value for attribute, value in (budget or {}).items()}
    if augmentation_processes is not None:
        values["nnUNet_n_proc_DA"] = augmentation_processes
    before = {name: os.environ.get(name) for name in values}
    os.environ.update({name: str(value) for name, value in values.items()})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dataset_name(spec: DatasetSpec) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in spec.name or spec.root.name) or "data"
    return f"Dataset{DATASET_ID:03d}_{safe}"


def write_raw_dataset(spec: DatasetSpec, workspace: Path) -> Path:
    """nnU-Net's raw folder for ``spec``: links to its imagesTr/labelsTr and the keys of dataset.json that
    nnU-Net reads (biosam2's own keys, e.g. its intensity normalisation, are not nnU-Net's)."""
    raw = workspace / "raw" / dataset_name(spec)
    raw.mkdir(parents=True, exist_ok=True)
    for folder in ("imagesTr", "labelsTr"):
        link = raw / folder
        if not link.is_symlink():
            link.symlink_to((spec.root / folder).resolve(), target_is_directory=True)
    dataset_json = json.loads((spec.root / "dataset.json").read_text())
    atomic_write_json(raw / "dataset.json", {k: dataset_json[k] for k in NNUNET_KEYS if k in dataset_json})
    return raw


def plan_and_preprocess(data: Path, workspace: Path, configuration: str = "2d") -> dict[str, Any]:
    """nnU-Net's fingerprint, plans and preprocessing of ``configuration`` for the dataset at ``data``,
    with biosam2's folds (splits_final.json) as nnU-Net's; returns the plans."""
    require_nnunet()
    spec = load_dataset_spec(data)
    write_raw_dataset(spec, workspace)
    with nnunet_environment(workspace):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )

        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False, show_progress_bar=False)
        plan_experiments([DATASET_ID])
        plans = json.loads((workspace / "preprocessed" / dataset_name(spec) / f"{PLANS}.json").read_text())
        if configuration not in plans["configurations"]:
            raise ConfigError(f"nnU-Net planned {', '.join(plans['configurations'])} for {data}, not {configuration!r}")
        preprocess([DATASET_ID], PLANS, configurations=(configuration,), num_processes=(1,), verbose=False, show_progress_bar=False)
    folds = spec.load_splits()
    if folds:  # else nnU-Net makes its own 5 folds, as `biosam2 splits` would
        atomic_write_json(workspace / "preprocessed" / dataset_name(spec) / "splits_final.json", folds)
    return plans


def planned_network(plans: dict[str, Any], data: Path, configuration: str = "2d"):
    """The network nnU-Net builds for ``configuration`` of ``plans`` (deep supervision off, as for
    inference), through nnU-Net's own builder and ``dynamic_network_architectures``."""
    require_nnunet()
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((Path(data) / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    return nnUNetTrainer.build_network_architecture(
        manager, config, determine_num_input_channels(manager, config, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)


def train(workspace: Path, data: Path, *, configuration: str, fold: int, device: str, seed: int) -> Path:
    """nnU-Net's own ``run_training`` (as ``nnUNetv2_train``) with :data:`TRAINER`, continuing from its
    last checkpoint if an earlier call was interrupted; returns the model folder (``fold_K``'s parent).
    It ends with nnU-Net's own validation of the fold, as nnUNetv2_train does."""
    import numpy as np
    import torch
    from nnunetv2.run.run_training import run_training

    model = workspace / "results" / dataset_name(load_dataset_spec(data)) / f"{TRAINER}__{PLANS}__{configuration}"
    started = (model / f"fold_{fold}" / "checkpoint_latest.pth").is_file()
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    run_training(str(DATASET_ID), configuration, fold, TRAINER, PLANS, continue_training=started, device=torch.device(device))
    return model


def predict(model: Path, images: list[list[Path]], output: Path, *, fold: int, device: str) -> None:
    """nnU-Net's default inference (``nnUNetv2_predict``'s settings) in this process."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(fold,), checkpoint_name="checkpoint_final.pth")
    output.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential([[str(p) for p in channels] for channels in images],
                                            str(output), save_probabilities=False, overwrite=True)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("nnU-Net device cuda: torch sees no CUDA device here; use device: cpu (or auto)")
    return device


def run_baseline(data: Path, run: Path, *, configuration: str = "2d", fold: int = 0, epochs: int = 1000,
                 iterations_per_epoch: int = 250, val_iterations_per_epoch: int = 50, device: str = "auto",
                 augmentation_processes: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Plan, preprocess, train, predict the test split (imagesTs) and evaluate it with biosam2's
    evaluation into ``run`` (evaluation.json/.md, test_predictions/); returns what goes in metrics.json,
    which the caller writes last (it marks the run finished)."""
    from biosam2.data.splits import resolve_split
    from biosam2.evaluation import evaluate_into

    require_nnunet()
    device = resolve_device(device)
    spec = load_dataset_spec(data)
    split = resolve_split(spec, fold, seed)
    if not split.test:
        raise ConfigError(f"{data}: no labelled test cases (imagesTs + labelsTs) to evaluate the nnU-Net baseline on")
    started, workspace = time.time(), run / "nnunet"
    budget = {"num_epochs": epochs, "num_iterations_per_epoch": iterations_per_epoch,
              "num_val_iterations_per_epoch": val_iterations_per_epoch}
    workspace.mkdir(parents=True, exist_ok=True)
    # nnU-Net prints its plans and every epoch: into the run's log, not over the grid's own output
    with open(workspace / "console.log", "a") as log, contextlib.redirect_stdout(log):
        plans = plan_and_preprocess(data, workspace, configuration)
        with nnunet_environment(workspace, budget, augmentation_processes):
            model = train(workspace, data, configuration=configuration, fold=fold, device=device, seed=seed)
            begin = time.perf_counter()
            predict(model, [case.images for case in split.test], run / "test_predictions", fold=fold, device=device)
            predict_seconds = time.perf_counter() - begin
    result = evaluate_into(run, run / "test_predictions", spec)
    planned = plans["configurations"][configuration]
    network = planned_network(plans, data, configuration)
    parameters = sum(p.numel() for p in network.parameters())
    return {
        "method": "nnU-Net v2 (its own package)",
        "nnunet": {"version": _version(), "configuration": configuration, "plans": PLANS, "trainer": TRAINER,
                   "model_folder": str(model.relative_to(run)), "predictor": "sliding window 0.5, Gaussian, mirroring"},
        "budget": {"optimizer_steps": epochs * iterations_per_epoch, "epochs": epochs,
                   "iterations_per_epoch": iterations_per_epoch, "batch_size": planned["batch_size"],
                   "patch_size": planned["patch_size"]},
        "parameters": {"total": parameters, "trainable": parameters},
        "split": split.note,
        "test": result.headline() | {"inference_seconds_mean": round(predict_seconds / len(split.test), 4)},
        "seconds": round(time.time() - started, 1),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")
