"""``train``: from a dataset folder to a trained, evaluated model in a run directory.

Run directory::

    RUN/
      config.yaml            every option of the run (re-run with --config RUN/config.yaml)
      run.json               dataset path, classes, ignore label, fold, split and normalisation actually used
      checkpoints/last.ckpt  end of the last finished epoch (resume point); best.ckpt: best val mIoU
      logs/version_N/metrics.csv   per-step and per-epoch metrics, one folder per attempt (resumes add one);
                             TensorBoard events in tensorboard/ if it is installed
      curves.png             learning curves
      overlays/*.png         image | ground truth | prediction for a few validation cases
      model/                 the small artifact (best epoch; LW fused): biosam2 predict RUN ...
      test_predictions/      label maps predicted for the test split
      evaluation.json/.md    test metrics (mIoU as the paper reports it, Dice, HD95)
      val_predictions/, val_evaluation.json/.md   the same for the validation cases (before postprocessing)
      metrics.json           summary: best validation mIoU and epoch, test metrics, parameters, time
      report.html            the visual quality-control report (biosam2 report RUN rebuilds it)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from biosam2.atomic_io import (
    LOCK_FILE,
    DirectoryLocked,
    atomic_output,
    atomic_write_json,
    atomic_write_text,
    directory_lock,
    disk_full,
)
from biosam2.data.cache import cached_cases, preprocess, wait_for_cache
from biosam2.data.cases import Case, load_case, resolve_normalization
from biosam2.data.dataset_format import CaseFiles, DatasetSpec, load_dataset_spec
from biosam2.data.image_io import IMAGE_2D_ENDINGS, write_like
from biosam2.data.normalization import Normalization
from biosam2.data.splits import Split, resolve_split
from biosam2.errors import CheckpointError, ConfigError, TrainingDiverged
from biosam2.inference.predictor import Predictor
from biosam2.model.factory import build_model, count_parameters
from biosam2.model.sam2_weights import prepare_weights
from biosam2.training.config import TrainConfig
from biosam2.training.data_module import SegmentationData
from biosam2.training.distributed import is_first_process
from biosam2.training.module import SegmentationModule, check_checkpoint
from biosam2.evaluation.html_report import report_for_run
from biosam2.inference.postprocess import choose_classes
from biosam2.visualization import plot_learning_curves, write_overlay

log = logging.getLogger("biosam2")

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: never a half-written .ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        try:
            with atomic_output(path, suffix=".ckpt") as temporary:
                try:
                    torch.save(checkpoint, temporary)
                except (OSError, RuntimeError) as error:
                    # torch.save reports a full disk as RuntimeError("... unexpected pos ..."); tell it
                    # apart while the partial file still fills the disk.
                    if disk_full(error, temporary.parent):
                        raise OSError(errno.ENOSPC, "No space left on device") from error
                    raise OSError(errno.EIO, f"write failed: {error}") from error
        except OSError as error:
            raise CheckpointError(
                f"{path}: could not be written ({error.strerror or error}); the previous checkpoint, if any, "
                "is intact: free some space and continue with --resume"
            ) from error


class RunCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that keeps its best-score record when the run directory has moved.

    Lightning drops ``best_model_score`` when the saved ``dirpath`` differs from the current one, so
    a moved run would let a worse epoch replace best.ckpt. Our checkpoints always live in
    RUN/checkpoints and are only resumed from there, so a different saved dirpath means the run moved
    (or was reached by another path): the saved paths are rebased onto the current folder.
    """

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"ModelCheckpoint{kwargs!r}"  # the key runs saved before this class existed carry

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and saved != self.dirpath:
            def moved(path):
                return str(Path(self.dirpath) / Path(path).name) if path else path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)


class StretchedSchedule(Callback):
    """A resumed run asked for more epochs continues on the cosine of its new length.

    The restored scheduler state carries the old total (T_max); left alone, the cosine would pass its
    end and climb back up. Here T_max becomes the new total and the learning rate the cosine's value
    at the current step, as if the new number of epochs had been asked for from the start. A resume
    with the same length changes nothing (T_max already matches), so it stays bit-for-bit exact.
    """

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        total = max(1, int(trainer.estimated_stepping_batches))
        for entry in trainer.lr_scheduler_configs:
            schedule = entry.scheduler
            if not isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR) or schedule.T_max == total:
                continue
            log.info("learning-rate schedule: cosine over %d steps (was %d), now at step %d", total, schedule.T_max, schedule.last_epoch)
            schedule.T_max = total
            step = min(schedule.last_epoch, total)
            rates = [schedule.eta_min + (base - schedule.eta_min) * (1 + math.cos(math.pi * step / total)) / 2 for base in schedule.base_lrs]
            for group, rate in zip(schedule.optimizer.param_groups, rates):
                group["lr"] = rate
            schedule._last_lr = rates


class ResumePoint(Callback):
    """A resumable checkpoint exists from the first step on, and Ctrl-C says where to resume from.

    ``last.ckpt`` is written before the first epoch and at the end of every epoch, so an
    interruption (Ctrl-C, a kill, a crash) loses at most the epoch in progress.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Every process must take part in save_checkpoint (it ends at a barrier), so rank 0's view of
        # the file decides for all: another rank could look after rank 0 has written it.
        if not trainer.strategy.broadcast(self.path.exists(), src=0):
            trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            finished = 0
            if self.path.exists():  # "epoch" is the 0-based epoch it was saved at the end of, or 0 before any step
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
                finished = saved.get("epoch", 0) + 1 if saved.get("global_step", 0) > 0 else 0
            log.warning("interrupted: %s holds the state after %d finished epoch(s); continue with --resume", self.path, finished)


def precision_for(config: TrainConfig) -> str:
    if config.precision != "auto":
        return config.precision if config.precision != "32" else "32-true"
    if torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def prediction_path(folder: Path, case_id: str, spec: DatasetSpec) -> Path:
    ending = ".png" if spec.file_ending in IMAGE_2D_ENDINGS else spec.file_ending
    return folder / f"{case_id}{ending}"


def _loggers(run: Path) -> list:
    # A new version_N folder per attempt: resuming must not erase the history of earlier attempts.
    loggers: list = [CSVLogger(save_dir=str(run), name="logs")]
    try:
        import tensorboard  # noqa: F401  (optional)
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run), name="tensorboard"))
    except ImportError:
        pass
    return loggers


def train(
    data: str | Path,
    run: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress_bar: bool = True,
    callbacks: list[Callback] | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any] | None:
    """Train, select the best epoch on validation, save the artifact, evaluate on the test split.

    ``callbacks`` are extra Lightning callbacks (early stopping, custom logging, ...).

    The training and validation cases are read from the preprocessed cache (``cache_dir``, by default
    inside the dataset: see biosam2.data.cache), which is brought up to date first; ``cache=False``
    loads them all into memory instead (small datasets, no spare disk).

    With several processes (``devices``/``num_nodes`` > 1, or started by torchrun/SLURM), every process
    trains on its own shard and validation sums one confusion matrix over all of them; only global
    rank 0 creates and writes the run directory, the artifact, the test predictions and the reports.
    The summary is returned there; the other processes return None once training has ended.
    """
    run = Path(run)
    if not is_first_process():  # DDP's other ranks: rank 0 holds the run's lock for all of them
        return _train(data, run, config, resume=resume, progress_bar=progress_bar, callbacks=callbacks, cache=cache, cache_dir=cache_dir)
    created = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
        with directory_lock(run):
            return _train(data, run, config, resume=resume, progress_bar=progress_bar, callbacks=callbacks, cache=cache, cache_dir=cache_dir)
    except DirectoryLocked as locked:
        raise ConfigError(
            f"{run}: another training is running into this run directory ({locked.holder}); "
            "wait for it to end (or stop it), or use another --out"
        ) from None
    finally:
        # A run refused before it began (bad data, bad options) leaves no run directory behind.
        if created and run.is_dir() and [p.name for p in run.iterdir()] == [LOCK_FILE]:
            (run / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run.rmdir()


def _train(data, run: Path, config: TrainConfig, *, resume: bool, progress_bar: bool, callbacks, cache: bool, cache_dir) -> dict[str, Any] | None:
    started = time.time()
    data = Path(data)
    last = run / "checkpoints" / "last.ckpt"
    first = is_first_process()
    best_ckpt = run / "checkpoints" / "best.ckpt"
    # last.ckpt gone but the run there: one way out for both commands (not "use the other command").
    lost = (
        f"{run}: checkpoints/last.ckpt is missing, so the run cannot continue where it stopped; "
        + (f"to continue from its best epoch, copy {best_ckpt} to {last} and use --resume; " if best_ckpt.exists() else "")
        + "or start a new run (another --out)"
    )
    if resume:
        if not last.exists():
            if (run / CONFIG_FILE).exists():
                raise ConfigError(lost)
            raise ConfigError(f"{run}: nothing to resume (no checkpoints/last.ckpt); start the run without --resume")
    elif first and (run / CONFIG_FILE).exists() and not last.exists():
        raise ConfigError(lost)
    elif first and ((run / CONFIG_FILE).exists() or last.exists()):
        # Only the first process may judge: DDP's re-launched ranks see the run that rank 0 just began.
        raise ConfigError(f"{run}: already holds a run; use --resume to continue it, or another --out")

    # Everything that can fail on bad input happens before the run's files are written (a refused new
    # run leaves no directory: see train()); the SAM2 weights first, so that a missing download is
    # reported before any data is read.
    source = prepare_weights(config.size, config.weights)
    if source.kind in ("directory", "official") and not source.reference.startswith("hf://"):
        config = replace(config, weights=source.reference)  # saved as an absolute path: resumable from anywhere
    spec = load_dataset_spec(data)
    split = resolve_split(spec, config.fold, config.seed)
    normalization = resolve_normalization(spec, split.train)
    L.seed_everything(config.seed, workers=True, verbose=False)
    if cache:  # preprocessed once, then read a slice at a time: memory does not grow with the dataset
        needed = [*split.train, *split.val]
        if first:  # rank 0 builds; the other ranks wait for it (and never write)
            folder, _ = preprocess(spec, needed, normalization.scheme, cache_dir, workers=config.num_workers, progress=progress_bar)
        else:
            folder = wait_for_cache(spec, needed, normalization.scheme, cache_dir)
        train_cases, val_cases = (cached_cases(folder, spec, files, normalization) for files in (split.train, split.val))
    else:
        train_cases = [load_case(spec, files, normalization) for files in split.train]
        val_cases = [load_case(spec, files, normalization) for files in split.val]
    model = build_model(num_classes=spec.num_classes, seed=config.seed, **config.model_options(), weights=config.weights)
    fingerprint = dataset_fingerprint(spec, split)
    if resume:
        check_same_run(run, data, config, fingerprint)
        check_resumable(last, model)
    run_info = {
        "dataset": str(data.resolve()),
        "dataset_name": spec.name,
        "labels": spec.labels,  # the model's classes
        "ignore_label": spec.ignore_label,  # nnU-Net's "ignore" id: no output channel, never predicted
        "channel_names": spec.channel_names,
        "file_ending": spec.file_ending,
        "normalization": normalization.to_dict(),
        "split": {"note": split.note, "train": [c.case_id for c in split.train], "val": [c.case_id for c in split.val], "test": [c.case_id for c in split.test]},
        "fingerprint": fingerprint,
    }
    if first:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / CONFIG_FILE, config.to_yaml())
        atomic_write_json(run / RUN_FILE, run_info)
        log.info("dataset %s: %d train / %d val / %d test cases (%s)", spec.name, len(split.train), len(split.val), len(split.test), split.note)

    model.set_gradient_checkpointing(config.gradient_checkpointing)
    module = SegmentationModule(model, config, spec.class_names)

    data_module = SegmentationData(train_cases, val_cases, config)

    best = RunCheckpoint(dirpath=run / "checkpoints", filename="best", monitor="val/mIoU", mode="max", save_top_k=1, enable_version_counter=False)
    latest = RunCheckpoint(dirpath=run / "checkpoints", filename="last", save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        precision=precision_for(config),
        logger=_loggers(run),
        callbacks=[best, latest, ResumePoint(last), StretchedSchedule(), *(callbacks or [])]
        + ([TQDMProgressBar(refresh_rate=1)] if progress_bar else []),
        plugins=[AtomicCheckpointIO()],
        check_val_every_n_epoch=config.val_every,
        use_distributed_sampler=False,  # our samplers shard across processes themselves
        limit_train_batches=config.limit_train_batches,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Frozen SAM2 stays in eval mode on purpose; a resumed run reuses its checkpoint folder.
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
        try:
            trainer.fit(module, datamodule=data_module, ckpt_path=str(last) if resume else None, weights_only=True)
        except TrainingDiverged as error:
            raise TrainingDiverged(
                f"{run}: {error}. Nothing was saved from the diverged step: {last.relative_to(run)} holds the last "
                "finished epoch; start a new run (another --out) with a lower --lr"
            ) from None
        except SystemExit:  # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1)
            if trainer.interrupted:
                raise KeyboardInterrupt from None
            raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    if not trainer.is_global_zero:  # rank 0 alone writes the artifact, predictions and reports
        return None

    # The best epoch's weights, in inference form, as the run's artifact.
    best_path = Path(best.best_model_path) if best.best_model_path else last
    if best_path.exists():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state, strict=False)
    model = module.model.cpu().eval()
    if model.config.adapter == "lw":
        model.reparameterize()
    predictor = Predictor(model, batch_size=config.batch_size, precision=config.precision)  # as trained
    # The validation cases, predicted whole, decide the postprocessing (and make the report of runs
    # without a test evaluation); the artifact records it, for predict.
    validation = evaluate_split(predictor, spec, split.val, normalization, run, stem="val_")
    postprocessing = choose_classes(run / "val_predictions", spec.root / "labelsTr", [c.case_id for c in split.val], spec.num_classes)
    predictor.keep_largest = postprocessing["classes"]
    model.save_pretrained(run / "model", metadata={**run_info, "postprocessing": {"largest_component": postprocessing["classes"]}})

    summary: dict[str, Any] = {
        "best_val_mIoU": float(best.best_model_score) if best.best_model_score is not None else None,
        "best_epoch": _epoch_of(best_path),
        "epochs_trained": trainer.current_epoch,
        "optimizer_steps": trainer.global_step,
        "parameters": count_parameters(model)._asdict(),
        "split": split.note,
        "normalization": normalization.to_dict(),
        "ignore_label": spec.ignore_label,
        "val_inference_seconds": validation.pop("inference_seconds"),
        "postprocessing": {"largest_component": postprocessing["classes"], "validation_dice": postprocessing["validation_dice"]},
    }
    plot_learning_curves(sorted((run / "logs").glob("version_*/metrics.csv"), key=_version_number), run / "curves.png")
    for case in (entry.load() for entry in val_cases[: config.overlays]):
        prediction, _ = predictor.predict(case.image)
        write_overlay(run / "overlays" / f"{case.case_id}.png", case.image, case.label, prediction, spec.class_names)
    if config.evaluate_test and split.test:
        summary["test"] = evaluate_split(predictor, spec, split.test, normalization, run)
    summary["seconds"] = round(time.time() - started, 1)
    atomic_write_json(run / "metrics.json", summary)
    try:
        report_for_run(run)
    except Exception as error:  # noqa: BLE001 - the run itself is complete; say why its report is missing
        log.warning("%s: the HTML report could not be written (%s: %s); `biosam2 report %s` retries", run, type(error).__name__, error, run)
    return summary


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(spec: DatasetSpec, split: Split) -> dict[str, Any]:
    """What a resumed run must find unchanged: dataset.json, the split file and every train/val file.

    Content hashes, not (size, mtime): a dataset copied elsewhere (new mtimes) is the same data and
    resumes, while a file edited in place is caught. Training has just read every one of these files
    anyway, so hashing them costs little next to training. One hash per case names what changed.
    """
    files = {name: (_sha256(spec.root / name) if (spec.root / name).is_file() else None) for name in ("dataset.json", "splits_final.json")}
    cases = {}
    for case in [*split.train, *split.val]:
        parts = [*case.images, *([case.label] if case.label is not None else [])]
        cases[case.case_id] = "/".join(_sha256(part)[:16] for part in parts)
    return {"files": files, "train": [c.case_id for c in split.train], "val": [c.case_id for c in split.val], "cases": cases}


def check_same_run(run: Path, data: Path, config: TrainConfig, fingerprint: dict[str, Any]) -> None:
    """--resume must continue the same training: the same data and the same model options."""
    try:
        saved_run = json.loads((run / RUN_FILE).read_text())
        saved_config = TrainConfig.from_yaml(run / CONFIG_FILE)
    except (OSError, ValueError):
        return  # an older or partial run directory: check_resumable still checks the checkpoint itself
    changed = {k: (v, getattr(saved_config, k)) for k, v in config.model_options().items() if getattr(saved_config, k) != v}
    if changed:
        raise ConfigError(
            f"{run}: --resume must keep the run's model options; these differ: "
            + ", ".join(f"{k}={new!r} (run has {old!r})" for k, (new, old) in changed.items())
            + "; resume with the run's own options, or start a new run (another --out)"
        )
    before = saved_run.get("fingerprint")
    if not before:
        log.warning("%s: the run records no dataset fingerprint (made by an older biosam2): the dataset is not checked", run)
        return
    problems = [f"{name} changed" for name in ("dataset.json", "splits_final.json") if before["files"].get(name) != fingerprint["files"].get(name)]
    for part in ("train", "val"):
        if before[part] != fingerprint[part]:
            problems.append(f"the {part} split changed")
    old, new = before["cases"], fingerprint["cases"]
    differ = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if differ:
        problems.append(f"files of {len(differ)} case(s) changed ({', '.join(differ[:5])})")
    if problems:
        raise ConfigError(
            f"{run}: --resume with another dataset: {data} is not the data this run was trained on "
            f"({saved_run.get('dataset')}): {'; '.join(problems)}. Resume with the original dataset, or start a new run (another --out)"
        )


def check_resumable(path: Path, model) -> None:
    """The resume checkpoint must be a plain, complete checkpoint of this very model."""
    import pickle

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: it contains Python objects other than tensors, which could run code") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({error}); delete it to resume from best.ckpt's run, or restart") from None
    check_checkpoint(checkpoint, model, str(path))


def _version_number(path: Path) -> int:
    return int(path.parent.name.removeprefix("version_"))


def _epoch_of(checkpoint: Path) -> int | None:
    if not checkpoint.exists():
        return None
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True).get("epoch", -1))


def evaluate_split(predictor: Predictor, spec: DatasetSpec, cases: list[CaseFiles], normalization: Normalization, run: Path,
                   stem: str = "") -> dict[str, Any]:
    """Predict every case (test, or with ``stem="val_"`` validation) at native resolution, write the label
    maps, evaluate them; the headline metrics, and each case's prediction time, for metrics.json."""
    from biosam2.evaluation import evaluate_into

    folder, seconds = run / f"{stem or 'test_'}predictions", {}
    for files in cases:
        case: Case = load_case(spec, files, normalization, with_label=False)
        begin = time.perf_counter()
        labels, _ = predictor.predict(case.image)
        seconds[case.case_id] = round(time.perf_counter() - begin, 4)
        write_like(prediction_path(folder, case.case_id, spec), labels, case.reference)
    result = evaluate_into(run, folder, spec, case_ids=[files.case_id for files in cases] if stem else None, stem=stem)
    return result.headline() | {"inference_seconds": seconds}
