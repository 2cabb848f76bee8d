"""Running cells: their states on disk, their datasets, training one, and one cell per GPU at a time."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from biosam2.atomic_io import atomic_write_json, atomic_write_text
from biosam2.bench.accuracy.grid import Cell, DatasetEntry, Grid
from biosam2.errors import ConfigError

# Options that choose where and how a cell runs, not what it computes: a run whose saved config differs
# from the grid only in these is still the same cell (started on one GPU, finished with --gpus, ...).
RUNTIME_OPTIONS = frozenset({"accelerator", "devices", "strategy", "num_nodes", "num_workers", "overlays"})

FINISHED, RESUMABLE, NEW, CONFLICT, FAILED = "finished", "resumable", "new", "conflict", "failed"


class CellState(NamedTuple):
    state: str  # FINISHED, RESUMABLE, NEW or CONFLICT
    reason: str = ""


def cell_state(run_dir: Path, wanted: dict[str, Any] | None = None) -> CellState:
    """Finished (metrics.json), resumable (checkpoints/last.ckpt), new (absent or empty), or conflict:
    anything else, or a run whose ``config.yaml`` asks for other options than ``wanted`` (the cell's)."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return CellState(NEW)
    if not run_dir.is_dir():
        return CellState(CONFLICT, f"{run_dir} is a file, not a run directory; move it away")
    finished = (run_dir / "metrics.json").is_file()
    # nnU-Net cells continue from nnU-Net's own checkpoint, `predict:` cells start again: both resume
    restartable = (wanted or {}).get("method") in ("nnunet", "predict") and (run_dir / "config.yaml").is_file()
    if not finished and not restartable and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        contents = ", ".join(sorted(p.name for p in run_dir.iterdir())[:6])
        return CellState(CONFLICT, f"{run_dir} holds {contents} but neither metrics.json (finished) nor "
                         "checkpoints/last.ckpt (resumable); move it away to run the cell from the start")
    if wanted is not None:
        saved = _read(run_dir / "config.yaml", yaml.safe_load)
        if not isinstance(saved, dict):
            return CellState(CONFLICT, f"{run_dir / 'config.yaml'}: missing or unreadable, so the run cannot be matched to the grid")
        differences = [
            f"{name}: run has {saved.get(name, '<absent>')!r}, grid asks {wanted.get(name, '<absent>')!r}"
            for name in sorted((set(saved) | set(wanted)) - RUNTIME_OPTIONS)
            if saved.get(name, "<absent>") != wanted.get(name, "<absent>")
        ]
        if differences:
            return CellState(CONFLICT, f"{run_dir}: a {'finished' if finished else 'started'} run with another "
                             f"configuration ({'; '.join(differences[:4])}); move it away, or restore the grid it was made with")
    return CellState(FINISHED if finished else RESUMABLE)


# ---- datasets -----------------------------------------------------------------------------------
def dataset_status(entry: DatasetEntry, out: Path) -> tuple[bool, str]:
    """(usable, description), changing nothing: for --dry-run and the missing-data check."""
    target, source = entry.location(out), entry.convert and entry.convert.src
    if (target / "dataset.json").is_file() and (not source or _marker(out, entry.name).is_file()):
        return True, f"dataset {target}"
    if not source:
        return False, f"{target} holds no dataset.json"
    return source.is_dir(), f"to convert ({entry.convert.name}) from {source} into {target}" if source.is_dir() else f"source {source} not found"


def _marker(out: Path, name: str) -> Path:
    return out / "data" / f"{name}.convert.json"


def prepare_dataset(entry: DatasetEntry, out: Path, *, convert: bool = True) -> Path:
    """The dataset's folder, converted first if needed, once. The marker is written after the converter
    returned, so an interrupted conversion is redone (``overwrite=True``), never trusted."""
    from biosam2.data.convert import convert_dataset

    if not entry.convert:
        if not (entry.path / "dataset.json").is_file():
            raise ConfigError(f"datasets.{entry.name}: {entry.path} holds no dataset.json (a dataset in biosam2's format)")
        return entry.path
    target, marker, wanted = entry.location(out), _marker(out, entry.name), entry.convert.identity()
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("identity")
        if recorded != wanted:
            raise ConfigError(f"{target}: converted with {recorded}, but the grid now asks for {wanted}; delete {target} "
                              f"and {marker} to convert it again (and the runs made on it)")
        if (target / "dataset.json").is_file():
            return target
    if not convert:
        raise ConfigError(f"datasets.{entry.name}: {target} is not converted yet (the grid's main process converts it)")
    if not entry.convert.src.is_dir():
        raise ConfigError(f"datasets.{entry.name}: source {entry.convert.src} not found")
    print(f"converting {entry.name} from {entry.convert.src} into {target}", flush=True)
    with _quiet():  # the converters log every case written
        summary = convert_dataset(entry.convert.name, entry.convert.src, target, seed=entry.convert.seed,
                                  limit=entry.convert.limit, overwrite=True, **entry.convert.options)
    print(summary, flush=True)
    if entry.convert.folds:
        from biosam2.data.dataset_format import load_dataset_spec, write_splits
        from biosam2.data.splits import kfold_splits

        cases = [case.case_id for case in load_dataset_spec(target).list_cases("train")]
        write_splits(target, kfold_splits(cases, entry.convert.folds))
    atomic_write_json(marker, {"identity": wanted, "src": str(entry.convert.src), "summary": str(summary), "date": now()})
    return target


@contextlib.contextmanager
def _quiet():
    """biosam2's per-file log lines (converted, predicted) off: a grid prints one line per cell."""
    logger = logging.getLogger("biosam2")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- running cells ------------------------------------------------------------------------------
class CellOutcome(NamedTuple):
    cell: Cell
    status: str  # FINISHED (trained now), "skipped" (finished before), FAILED, CONFLICT
    seconds: float = 0.0
    error: str | None = None

    def describe(self) -> str:
        return {FINISHED: f"finished in {self.seconds:.0f} s", "skipped": "already finished"}.get(self.status, f"{self.status}: {self.error}")


def _call_train(data: Path, run: Path, config: Any, *, resume: bool, progress_bar: bool) -> dict[str, Any]:
    """The one place a cell trains (tests replace it to count or forbid training)."""
    from biosam2.training.run import train

    return train(data, run, config, resume=resume, progress_bar=progress_bar)


def _call_other(grid: Grid, cell: Cell, out: Path, data: Path) -> None:
    """An nnU-Net cell, or a `predict:` cell (the test split predicted by the same seed's finished runs,
    as `biosam2 predict` would); config.yaml first (it marks the run), metrics.json last (finished)."""
    entry, run = grid.methods[cell.method], cell.run_dir(out)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(grid.wanted(cell), sort_keys=False))
    started = time.time()
    if entry.nnunet:
        from biosam2.baselines.nnunet import run_baseline

        metrics = run_baseline(data, run, seed=cell.seed, **entry.nnunet.model_dump())
    else:
        from biosam2.inference.predict_files import predict_and_evaluate

        runs = [Cell(cell.dataset, m, cell.seed).run_dir(out) for m in [entry.predict.base, *entry.predict.ensemble]]
        if unfinished := [str(r) for r in runs if not (r / "metrics.json").is_file()]:
            raise ConfigError(f"{cell.key} predicts with {', '.join(unfinished)}, which has not finished: run those cells first")
        members = [read_json(r / "metrics.json") or {} for r in runs]
        with _quiet():
            test = predict_and_evaluate(runs[0], data, run, ensemble=runs[1:], tta=entry.predict.tta,
                                        postprocess=entry.predict.postprocess)
        metrics = {"predict": entry.predict.model_dump(mode="json"), "runs": [str(r) for r in runs],
                   "parameters": {"trainable": sum((m.get("parameters") or {}).get("trainable") or 0 for m in members)},
                   "test": test}
    atomic_write_json(run / "metrics.json", metrics | {"seconds": round(time.time() - started, 1)})


def run_cell(grid: Grid, cell: Cell, out: Path, data: Path, *, runtime: dict | None = None, progress_bar: bool = False) -> CellOutcome:
    """Train (or resume) one cell in this process; a failure is recorded, never raised (Ctrl-C is)."""
    from biosam2.model.sam2_weights import RandomWeightsWarning

    state = cell_state(cell.run_dir(out), grid.wanted(cell))
    if state.state in (FINISHED, CONFLICT):
        return CellOutcome(cell, "skipped" if state.state == FINISHED else CONFLICT, error=state.reason or None)
    started = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)  # said once, in the results' caveat
            if grid.methods[cell.method].kind != "train":
                _call_other(grid, cell, out, data)
            else:
                _call_train(data, cell.run_dir(out), grid.config(cell, runtime), resume=state.state == RESUMABLE,
                            progress_bar=progress_bar)
    except Exception as error:  # noqa: BLE001 - one failed cell must not stop the grid
        message = f"{type(error).__name__}: {error}"
        atomic_write_json(cell.failure_file(out), {
            "cell": cell.key, "error": message, "traceback": traceback.format_exc().splitlines()[-40:],
            "resumed": state.state == RESUMABLE, "seconds": round(time.time() - started, 1), "date": now(),
        })
        return CellOutcome(cell, FAILED, time.time() - started, message)
    cell.failure_file(out).unlink(missing_ok=True)
    return CellOutcome(cell, FINISHED, time.time() - started)


def parse_gpus(text: str) -> list[str]:
    slots = [s.strip() for s in text.split(",") if s.strip()]
    if not slots or not all(s.isdigit() for s in slots):
        raise ConfigError(f"--gpus {text!r}: expected device indices such as 0,1 (repeat an index for several workers per GPU)")
    return slots


def physical_gpu(slot: str, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for ``--gpus`` entry ``slot``, counted as torch sees devices in this process
    (under ``CUDA_VISIBLE_DEVICES=4,5`` from a scheduler, index 1 is device 5)."""
    entries = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if entries and int(slot) >= len(entries):
        raise ConfigError(f"--gpus {slot}: CUDA_VISIBLE_DEVICES={visible} makes only {len(entries)} device(s) visible")
    return entries[int(slot)] if entries else slot


@dataclass
class SubprocessLauncher:
    """Runs one cell in a fresh ``python -m biosam2 bench accuracy --run-cell`` process that sees only its
    GPU (``CUDA_VISIBLE_DEVICES`` set before torch starts), so a crash or an OOM ends that cell only."""

    grid: Grid
    out: Path
    progress_bar: bool = False
    python: str = sys.executable
    parent_visible_devices: str | None = field(default_factory=lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    _running: set[subprocess.Popen] = field(default_factory=set, repr=False)

    def command(self, cell: Cell) -> list[str]:
        # Absolute grid file and data root: the worker resolves exactly the paths this process did.
        return [self.python, "-m", "biosam2", "bench", "accuracy", str(self.grid.file), "--out", str(self.out.resolve()),
                "--data-root", str(self.grid.data_root), "--run-cell", cell.key] + ["--progress"] * self.progress_bar

    def environment(self, slot: str) -> dict[str, str]:
        return os.environ | {"CUDA_VISIBLE_DEVICES": physical_gpu(slot, self.parent_visible_devices), "PYTHONUNBUFFERED": "1"}

    def __call__(self, cell: Cell, slot: str) -> CellOutcome:
        started, log_file = time.time(), cell.log_file(self.out)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as stream:
            print(f"\n==== {now()} {cell.key} on GPU slot {slot}: {shlex.join(self.command(cell))}", file=stream, flush=True)
            # Its own session: Ctrl-C reaches this process only, which sends each worker exactly one
            # SIGINT (stop()); a second one would cut Lightning's graceful shutdown short.
            process = subprocess.Popen(self.command(cell), env=self.environment(slot), stdout=stream,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            self._running.add(process)
            returncode = process.wait()
            self._running.discard(process)
        seconds, failure = time.time() - started, cell.failure_file(self.out)
        if returncode == 0 and (cell.run_dir(self.out) / "metrics.json").is_file():
            return CellOutcome(cell, FINISHED, seconds)
        recorded = read_json(failure) if failure.is_file() and failure.stat().st_mtime >= started else None
        if recorded and recorded.get("error"):
            return CellOutcome(cell, FAILED, seconds, recorded["error"])
        # Killed, out of memory, a crash in native code: the worker could not say why; say it here.
        error = f"worker exited with status {returncode} without a result; see {log_file}"
        atomic_write_json(failure, {"cell": cell.key, "error": error, "traceback": [], "seconds": round(seconds, 1), "date": now()})
        return CellOutcome(cell, FAILED, seconds, error)

    def stop(self, grace_seconds: float = 60.0) -> None:
        """Ctrl-C: one SIGINT to each worker (as Ctrl-C to ``biosam2 train``: it keeps its last checkpoint,
        so the cell resumes next time); those still running after the grace time are terminated."""
        running = [p for p in list(self._running) if p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGINT)
        deadline = time.time() + grace_seconds
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.terminate()


def schedule(cells: Sequence[Cell], slots: Sequence[str], launch: Callable[[Cell, str], CellOutcome],
             report: Callable[[str], None] = print) -> list[CellOutcome]:
    """Run ``cells`` with one worker per slot, a slot never running two cells at once; a launcher that
    raises fails that cell only. Outcomes come back in the order of ``cells``. Ctrl-C, or SIGTERM (``kill``
    of a grid started with nohup, where Ctrl-C cannot reach it), cancels what has not started and calls
    ``launch.stop()``."""
    free: queue.Queue[str] = queue.Queue()
    for slot in slots:
        free.put(slot)

    def work(cell: Cell) -> CellOutcome:
        slot = free.get()
        report(f"[gpu {slot}] {cell.key}: started")
        try:
            outcome = launch(cell, slot)
        except Exception as error:  # noqa: BLE001 - the launcher's own failure fails this cell only
            outcome = CellOutcome(cell, FAILED, error=f"{type(error).__name__}: {error}")
        finally:
            free.put(slot)
        report(f"[gpu {slot}] {cell.key}: {outcome.describe()}")
        return outcome

    main = threading.current_thread() is threading.main_thread()  # SIGTERM acts as Ctrl-C:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    pool = ThreadPoolExecutor(len(slots))
    try:
        futures = [pool.submit(work, cell) for cell in cells]
        while not all(f.done() for f in futures):  # short waits keep Ctrl-C responsive
            time.sleep(0.1)
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        if hasattr(launch, "stop"):
            launch.stop()
        raise
    finally:
        pool.shutdown(wait=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _read(path: Path, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def read_json(path: Path) -> dict[str, Any] | None:
    payload = _read(path, json.loads)
    return payload if isinstance(payload, dict) else None


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
