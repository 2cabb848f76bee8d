"""``biosam2 selfcheck``: does biosam2 work on this machine's accelerator? One line per check.

For whoever has a GPU: on ``--device cuda`` it trains a tiny model (random SAM2 weights, synthetic
data) for a few steps with mixed precision on the GPU, resumes it for a second epoch, loads the saved
artifact, predicts the test images on the GPU, compares those predictions with the CPU's fp32 ones of
the same artifact, and runs a minimal ``biosam2 bench efficiency`` on the GPU. ``--device cpu`` runs
the same checks on the CPU, comparing fp32 with bf16-mixed predictions instead.

Every check prints ``PASS|FAIL name: detail (seconds)``; a failed check does not stop the ones that do
not depend on it. The exit status is 0 only if every check passed. Everything is written under
``--out`` (default: a fresh temporary folder), named at the end.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

AGREEMENT_TARGET = 0.99  # fraction of equal pixels, device (mixed precision) vs CPU fp32
CHECKS = ("environment", "train", "resume", "artifact", "predict", "agreement", "efficiency")


class CheckFailed(Exception):
    """A check's own verdict: its message is the FAIL line's detail."""


@dataclass
class Plan:
    """Sizes of the run. ``quick`` is the cheapest that still exercises every step (the test uses it)."""

    train_cases: int
    val_cases: int
    test_cases: int
    max_side: int
    patch_size: int
    batch_size: int
    steps: int  # training steps per epoch: train_cases / batch_size, all of them
    bench_sizes: tuple[int, ...]
    bench_configs: tuple[str, ...]
    bench_vanilla_size: int
    bench_rounds: int
    bench_seconds: float  # torch.utils.benchmark's min_run_time per row


FULL = Plan(
    16, 2, 4, 224, 128, 4, 4, (256,), ("vanilla-sam2", "peg-only", "biosam2-lw", "biosam2-lw-fused", "biosam2-hp"), 1024, 3, 2.0
)
QUICK = Plan(4, 1, 2, 96, 64, 2, 2, (64,), ("biosam2-lw-fused", "biosam2-hp"), 64, 0, 0.0)


@dataclass
class SelfCheck:
    device: str  # "cuda" or "cpu"
    out: Path
    precision: str  # the mixed precision trained and predicted with on the device
    plan: Plan
    results: list[tuple[str, bool, str, float]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # what later checks need from earlier ones

    def run(self, name: str, check: Callable[[], str], needs: tuple[str, ...] = ()) -> bool:
        passed = {n for n, ok, _, _ in self.results if ok}
        missing = [n for n in needs if n not in passed]
        started = time.perf_counter()
        if missing:
            ok, detail = False, f"not run: needs {' and '.join(missing)} to pass"
        else:
            try:
                ok, detail = True, check()
            except CheckFailed as failure:
                ok, detail = False, str(failure)
            except Exception as error:  # noqa: BLE001 -- a self-check reports, it does not crash
                ok, detail = False, f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
        seconds = time.perf_counter() - started
        self.results.append((name, ok, detail, seconds))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail} ({seconds:.1f} s)", flush=True)
        return ok

    # ---- the checks -----------------------------------------------------------------------------
    def environment(self) -> str:
        from biosam2.inference.predictor import _autocast_works

        if self.device == "cuda":
            if not torch.cuda.is_available():
                built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
                raise CheckFailed(f"torch.cuda.is_available() is False (torch {torch.__version__}, {built}); "
                                  "no usable GPU here: run `biosam2 selfcheck --device cpu` instead")
            properties = torch.cuda.get_device_properties(0)
            bf16 = torch.cuda.is_bf16_supported()
            return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} "
                    f"({properties.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s)), "
                    f"bf16 {'supported' if bf16 else 'NOT supported'}; precision {self.precision}")
        bf16 = _autocast_works(torch.device("cpu"), torch.bfloat16)
        return (f"torch {torch.__version__}, CPU ({torch.get_num_threads()} threads, "
                f"{torch.backends.cpu.get_cpu_capability()}), bf16 autocast {'works' if bf16 else 'does NOT work'}; "
                f"precision {self.precision}")

    def _config(self, epochs: int):
        from biosam2.training import TrainConfig

        plan = self.plan
        return TrainConfig(
            size="tiny", weights="random", adapter="hp", epochs=epochs, batch_size=plan.batch_size, lr=1e-3, loss="dice_ce",
            patch_size=plan.patch_size, limit_train_batches=plan.steps, precision=self.precision,
            accelerator="gpu" if self.device == "cuda" else "cpu", devices=1, num_workers=0, overlays=0, evaluate_test=False,
        )

    def train(self) -> str:
        from biosam2.data.synthetic import write_synthetic_dataset
        from biosam2.training import train
        from biosam2.training.run import precision_for

        plan = self.plan
        data = write_synthetic_dataset(self.out / "data", train=plan.train_cases, val=plan.val_cases, test=plan.test_cases,
                                       max_side=plan.max_side, min_side=min(80, plan.max_side))
        run = self.out / "run"
        seen = _Where()
        train(data, run, self._config(epochs=1), progress_bar=False, callbacks=[seen])
        # Where and how it really trained, as Lightning saw it -- not what was asked for.
        expected_type = "cuda" if self.device == "cuda" else "cpu"
        if seen.device is None or seen.device.split(":")[0] != expected_type:
            raise CheckFailed(f"trained on {seen.device}, not on {expected_type}")
        wanted = precision_for(self._config(epochs=1))
        if seen.precision != wanted:
            raise CheckFailed(f"trained in precision {seen.precision}, not {wanted}")
        losses = _losses(run / "logs" / "version_0" / "metrics.csv")
        if len(losses) != plan.steps:
            raise CheckFailed(f"{len(losses)} logged training steps, expected {plan.steps}")
        if not all(math.isfinite(v) for v in losses):
            raise CheckFailed(f"non-finite training loss: {losses}")
        self.state.update(data=data, run=run)
        return (f"{plan.steps} steps on {seen.device} in {seen.precision} ({seen.gpu_memory}), "
                f"losses {' '.join(f'{v:.3f}' for v in losses)}, all finite")

    def resume(self) -> str:
        from biosam2.training import train

        run = self.state["run"]
        summary = train(self.state["data"], run, self._config(epochs=2), resume=True, progress_bar=False)
        if summary is None or summary.get("epochs_trained") != 2:
            raise CheckFailed(f"epochs_trained={None if summary is None else summary.get('epochs_trained')}, expected 2")
        losses = _losses(run / "logs" / "version_1" / "metrics.csv")  # the resumed attempt logs a new version
        if len(losses) != self.plan.steps or not all(math.isfinite(v) for v in losses):
            raise CheckFailed(f"resumed epoch logged losses {losses}; expected {self.plan.steps} finite ones")
        return f"epoch 2 continued from checkpoints/last.ckpt: epochs_trained=2, losses {' '.join(f'{v:.3f}' for v in losses)}"

    def artifact(self) -> str:
        import biosam2
        from biosam2.model.artifact import read_artifact_description

        path = self.state["run"] / "model"
        model = biosam2.load_model(path)
        tensors = [t for t in model.state_dict().values() if torch.is_floating_point(t)]
        bad = sum(int(not torch.isfinite(t).all()) for t in tensors)
        if bad:
            raise CheckFailed(f"{path}: {bad} tensor(s) hold NaN or inf")
        metadata = read_artifact_description(path).get("metadata", {})
        if "normalization" not in metadata:
            raise CheckFailed(f"{path}: the artifact does not record its normalisation")
        self.state["metadata"] = metadata
        return f"{path} loads: {model.num_classes} classes, {len(tensors)} floating tensors, all finite"

    def _predict(self, device: str, precision: str, folder: str) -> dict[str, np.ndarray]:
        import biosam2
        from biosam2.data.image_io import read_image, read_label
        from biosam2.data.normalization import Normalization
        from biosam2.inference.predict_files import predict_files

        metadata = self.state["metadata"]
        images = self.state["data"] / "imagesTs"
        model = biosam2.load_model(self.state["run"] / "model")  # a fresh copy per device: nothing shared
        normalization = Normalization.from_dict(metadata["normalization"])  # as trained, like `biosam2 predict`
        written = predict_files(model, images, self.out / folder, normalization=normalization,
                                batch_size=self.plan.batch_size, device=device, precision=precision)
        inputs = sorted(images.glob("*_0000.png"))
        if len(written) != len(inputs):
            raise CheckFailed(f"{len(written)} label maps written for {len(inputs)} test images")
        labels = {}
        for path, image in zip(sorted(written), inputs, strict=True):
            label = read_label(path).array
            if label.shape != read_image(image).array.shape[:2]:
                raise CheckFailed(f"{path}: label map {label.shape} for an image {read_image(image).array.shape}")
            if label.max() >= len(metadata["labels"]):
                raise CheckFailed(f"{path}: label {label.max()} but the model has {len(metadata['labels'])} classes")
            labels[path.name] = label
        return labels

    def predict(self) -> str:
        labels = self._predict(self.device, self.precision, f"predictions-{self.device}")
        self.state["device_labels"] = labels
        pixels = sum(v.size for v in labels.values())
        classes = sorted({int(c) for v in labels.values() for c in np.unique(v)})
        return (f"{len(labels)} label maps ({pixels} pixels, classes {classes}) on {self.device} in {self.precision} "
                f"-> {self.out / f'predictions-{self.device}'}")

    def agreement(self) -> str:
        reference = self._predict("cpu", "32", "predictions-cpu-fp32")
        labels = self.state["device_labels"]
        equal = sum(int((labels[name] == reference[name]).sum()) for name in reference)
        total = sum(v.size for v in reference.values())
        fraction = equal / total
        what = (f"{self.device} {self.precision} vs CPU fp32" if self.device == "cuda"
                else f"CPU {self.precision} vs CPU fp32 (no GPU: the mixed-precision path compared on the CPU)")
        detail = f"{what}: {fraction:.4f} of {total} pixels equal (target >= {AGREEMENT_TARGET})"
        if fraction < AGREEMENT_TARGET:
            raise CheckFailed(detail)
        return detail

    def efficiency(self) -> str:
        import argparse

        from biosam2.bench import efficiency

        plan = self.plan
        folder = self.out / "efficiency"
        argv = [
            "--device", self.device, "--dtype", "bf16" if self.precision == "bf16-mixed" else "fp32",
            "--sizes", *map(str, plan.bench_sizes), "--configs", *plan.bench_configs, "--vanilla-size", str(plan.bench_vanilla_size),
            "--interleaved-rounds", str(plan.bench_rounds), "--min-run-time", str(plan.bench_seconds),
            "--json", str(folder / "efficiency.json"), "--markdown", str(folder / "efficiency.md"),
        ]  # fmt: skip
        parser = argparse.ArgumentParser(prog="biosam2 bench efficiency")
        efficiency.configure_parser(parser)
        folder.mkdir(parents=True, exist_ok=True)
        # The benchmark prints its whole report and its progress; they go to a file, the headline here.
        with open(folder / "output.txt", "w") as sink, contextlib.redirect_stdout(sink), _stderr_to(sink):
            status = efficiency.run_from_args(parser.parse_args(argv))
        if status != 0:
            raise CheckFailed(f"bench efficiency exited {status}; see {folder / 'output.txt'}")
        payload = json.loads((folder / "efficiency.json").read_text())
        rows = payload["rows"]
        if {r["config"] for r in rows} != set(plan.bench_configs):
            raise CheckFailed(f"rows for {sorted(r['config'] for r in rows)}, expected {sorted(plan.bench_configs)}")
        bad = [r["config"] for r in rows if not r["latency"]["median_ms"] > 0 or not r["macs"] > 0]
        if bad:
            raise CheckFailed(f"no latency or MACs measured for {', '.join(bad)}")
        parts = []
        for row in rows:
            step = row.get("train_step")
            parts.append(f"{row['config']} {row['latency']['median_ms']:.1f} ms"
                         + (f" / train {step['median_ms']:.1f} ms" if step else ""))
        size = plan.bench_sizes[0]
        where = f"{size}px on {payload['machine']['device']} ({self.precision_name()})"
        return f"{where}: " + ", ".join(parts) + f"; table in {folder / 'efficiency.md'}"

    def precision_name(self) -> str:
        return "bf16 autocast" if self.precision == "bf16-mixed" else "fp32"


class _Where(L.Callback):
    """Records the device, precision and GPU memory the training really used."""

    device: str | None = None
    precision: str | None = None
    gpu_memory = "no GPU memory used"

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.device, self.precision = str(module.device), str(trainer.precision)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            self.gpu_memory = f"peak {torch.cuda.max_memory_allocated(module.device) / 2**20:.0f} MiB"


@contextlib.contextmanager
def _stderr_to(sink):
    """Python's and C++'s stderr (torch's profiler writes to file descriptor 2 directly) into ``sink``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(sink.fileno(), 2)
        with contextlib.redirect_stderr(sink):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _losses(metrics: Path) -> list[float]:
    if not metrics.exists():
        raise CheckFailed(f"{metrics}: missing")
    with metrics.open() as handle:
        return [float(row["train/loss_step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]


def default_precision(device: str) -> str:
    """Mixed precision as training would choose it on a GPU; bf16 autocast on the CPU."""
    if device == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "16-mixed"
    return "bf16-mixed"


def run_selfcheck(device: str = "cuda", out: str | Path | None = None, precision: str | None = None, quick: bool = False) -> int:
    """Run every check, printing one line each; 0 if all passed, 1 otherwise."""
    from biosam2.demo import fresh_folder

    started = time.perf_counter()
    precision = precision or default_precision(device)
    check = SelfCheck(device=device, out=Path("."), precision=precision, plan=QUICK if quick else FULL)
    if not check.run("environment", check.environment):
        print(f"selfcheck FAILED: no {device} device; nothing else was run", flush=True)
        return 1
    check.out = fresh_folder(Path(out)) if out else Path(tempfile.mkdtemp(prefix="biosam2-selfcheck-"))
    check.out.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("biosam2")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one line per check: no per-file or per-epoch logging
    try:
        with warnings.catch_warnings():
            # Random SAM2 weights are this check's deliberate choice, not something to warn the user about.
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            check.run("train", check.train)
            check.run("resume", check.resume, needs=("train",))
            check.run("artifact", check.artifact, needs=("train",))
            check.run("predict", check.predict, needs=("artifact",))
            check.run("agreement", check.agreement, needs=("predict",))
            check.run("efficiency", check.efficiency)
    finally:
        quiet.setLevel(level)
    failed = [name for name, ok, _, _ in check.results if not ok]
    seconds = time.perf_counter() - started
    verdict = "all passed" if not failed else f"FAILED: {', '.join(failed)}"
    print(f"selfcheck {verdict}: {len(check.results) - len(failed)}/{len(check.results)} checks passed on {device} "
          f"in {seconds:.1f} s; outputs in {check.out}", flush=True)
    return 0 if not failed else 1
