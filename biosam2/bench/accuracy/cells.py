"""Running cells: their states on disk, their datasets, training one, and scheduling many on GPUs."""

from __future__ import annotations

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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from biosam2.atomic_io import atomic_write_json
from biosam2.bench.accuracy.grid import Cell, DatasetEntry, Grid
from biosam2.errors import ConfigError

log = logging.getLogger("biosam2")

# Options that choose where and how a cell runs, not what it computes: a finished or resumable run
# whose saved config differs from the grid only in these is still the same cell (a grid started on
# one GPU and finished with --gpus sets devices=1, for instance).
RUNTIME_OPTIONS = frozenset({"accelerator", "devices", "strategy", "num_nodes", "num_workers", "overlays"})

FINISHED, RESUMABLE, NEW, CONFLICT, FAILED, NO_DATA = "finished", "resumable", "new", "conflict", "failed", "no-data"


# ---- cell states --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellState:
    state: str  # FINISHED, RESUMABLE, NEW or CONFLICT
    reason: str = ""


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``name: run has X, grid asks Y`` for every option that changes what a cell computes."""
    differences = []
    for name in sorted(set(saved) | set(wanted)):
        if name in RUNTIME_OPTIONS:
            continue
        old, new = saved.get(name, "<absent>"), wanted.get(name, "<absent>")
        if old != new:
            differences.append(f"{name}: run has {old!r}, grid asks {new!r}")
    return differences


def cell_state(run_dir: Path, wanted: dict[str, Any] | None = None) -> CellState:
    """Finished (metrics.json), resumable (checkpoints/last.ckpt), new (absent or empty), or conflict.

    ``wanted`` is the cell's configuration (``TrainConfig.to_dict()``); when given, a run whose saved
    ``config.yaml`` asks for something else is a conflict: its results are not this cell's.
    """
    if not run_dir.exists():
        return CellState(NEW)
    if not run_dir.is_dir():
        return CellState(CONFLICT, f"{run_dir} is a file, not a run directory; move it away")
    if not any(run_dir.iterdir()):
        return CellState(NEW)
    finished = (run_dir / "metrics.json").is_file()
    resumable = (run_dir / "checkpoints" / "last.ckpt").is_file()
    if not finished and not resumable:
        contents = ", ".join(sorted(p.name for p in run_dir.iterdir())[:6])
        return CellState(
            CONFLICT,
            f"{run_dir} holds {contents} but neither metrics.json (finished) nor checkpoints/last.ckpt (resumable); "
            "it cannot be continued: move it away to run the cell from the start",
        )
    if wanted is not None:
        config_file = run_dir / "config.yaml"
        try:
            saved = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
        except yaml.YAMLError:
            saved = None
        if not isinstance(saved, dict):
            return CellState(CONFLICT, f"{config_file}: missing or unreadable, so the run cannot be matched to the grid")
        differences = config_differences(saved, wanted)
        if differences:
            what = "finished run" if finished else "started run"
            return CellState(
                CONFLICT,
                f"{run_dir}: a {what} with another configuration ({'; '.join(differences[:4])}); "
                "move it away, or restore the grid it was made with",
            )
    return CellState(FINISHED) if finished else CellState(RESUMABLE)



# ---- datasets -----------------------------------------------------------------------------------
def dataset_status(entry: DatasetEntry, out: Path) -> tuple[bool, str]:
    """(usable, description) without changing anything: for --dry-run and for the missing-data check."""
    if entry.convert:
        target, marker = entry.location(out), _marker(out, entry.name)
        if marker.is_file() and (target / "dataset.json").is_file():
            return True, f"converted in {target}"
        if not entry.convert.src.is_dir():
            return False, f"source {entry.convert.src} not found"
        return True, f"to convert ({entry.convert.name}, limit {entry.convert.limit}) from {entry.convert.src} into {target}"
    if not (entry.path / "dataset.json").is_file():  # type: ignore[operator]
        return False, f"{entry.path} holds no dataset.json"
    return True, f"dataset {entry.path}"


def _marker(out: Path, name: str) -> Path:
    return out / "data" / f"{name}.convert.json"


def prepare_dataset(entry: DatasetEntry, out: Path, *, convert: bool = True) -> Path:
    """The dataset's folder, converting it first if needed (once: later calls reuse it).

    The marker file is written only after the converter returned, so an interrupted conversion is
    redone (``overwrite=True`` clears the half-written folder) rather than trusted.
    """
    from biosam2.data.convert import convert_dataset

    if not entry.convert:
        if not (entry.path / "dataset.json").is_file():  # type: ignore[operator]
            raise ConfigError(f"datasets.{entry.name}: {entry.path} holds no dataset.json (a dataset in biosam2's format)")
        return entry.path  # type: ignore[return-value]
    target, marker = entry.location(out), _marker(out, entry.name)
    wanted = entry.convert.identity()
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("identity") != wanted:
            raise ConfigError(
                f"{target}: converted with {recorded.get('identity')}, but the grid now asks for {wanted}; "
                f"delete {target} and {marker} to convert it again (and the runs made on it)"
            )
        if (target / "dataset.json").is_file():
            return target
    if not convert:
        raise ConfigError(f"datasets.{entry.name}: {target} is not converted yet (the grid's main process converts it)")
    if not entry.convert.src.is_dir():
        raise ConfigError(f"datasets.{entry.name}: source {entry.convert.src} not found")
    print(f"converting {entry.name} from {entry.convert.src} into {target}", flush=True)
    level = log.level
    log.setLevel(logging.WARNING)  # the converters log every case written
    try:
        summary = convert_dataset(
            entry.convert.name, entry.convert.src, target,
            seed=entry.convert.seed, limit=entry.convert.limit, overwrite=True, **entry.convert.options,
        )
    finally:
        log.setLevel(level)
    print(summary, flush=True)
    atomic_write_json(marker, {"identity": wanted, "src": str(entry.convert.src), "summary": str(summary), "date": _now()})
    return target



# ---- running cells ------------------------------------------------------------------------------
@dataclass
class CellOutcome:
    cell: Cell
    status: str  # FINISHED (trained now), "skipped" (finished before), FAILED, CONFLICT, NO_DATA
    seconds: float = 0.0
    error: str | None = None
    slot: str | None = None


def _call_train(data: Path, run: Path, config: Any, *, resume: bool, progress_bar: bool) -> dict[str, Any]:
    """The one place a cell trains (tests replace it to count or forbid training)."""
    from biosam2.training.run import train

    return train(data, run, config, resume=resume, progress_bar=progress_bar)


def run_cell(grid: Grid, cell: Cell, out: Path, data: Path, *, runtime: dict[str, Any] | None = None, progress_bar: bool = False) -> CellOutcome:
    """Train (or resume) one cell in this process; a failure is recorded, never raised (Ctrl-C is)."""
    from biosam2.model.sam2_weights import RandomWeightsWarning

    config = grid.config(cell, runtime)
    run_dir = cell.run_dir(out)
    state = cell_state(run_dir, config.to_dict())
    if state.state == FINISHED:
        return CellOutcome(cell, "skipped")
    if state.state == CONFLICT:
        return CellOutcome(cell, CONFLICT, error=state.reason)
    started = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)  # said once, in the results' caveat
            _call_train(data, run_dir, config, resume=state.state == RESUMABLE, progress_bar=progress_bar)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one failed cell must not stop the grid
        seconds = time.time() - started
        message = f"{type(error).__name__}: {error}"
        atomic_write_json(cell.failure_file(out), {
            "cell": cell.key,
            "error": message,
            "traceback": traceback.format_exc().splitlines()[-40:],
            "resumed": state.state == RESUMABLE,
            "seconds": round(seconds, 1),
            "date": _now(),
        })
        return CellOutcome(cell, FAILED, seconds, message)
    cell.failure_file(out).unlink(missing_ok=True)
    return CellOutcome(cell, FINISHED, time.time() - started)


def physical_gpu(slot: str, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES value for a worker given ``--gpus`` entry ``slot``.

    ``--gpus`` counts devices as torch in this process sees them; if this process already runs under
    ``CUDA_VISIBLE_DEVICES`` (e.g. ``4,5`` from a scheduler), index 1 is device ``5``, not ``1``.
    """
    if visible is None or not visible.strip():
        return slot
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    index = int(slot)
    if not 0 <= index < len(entries):
        raise ConfigError(f"--gpus {slot}: CUDA_VISIBLE_DEVICES={visible} makes only {len(entries)} device(s) visible")
    return entries[index]


def parse_gpus(text: str) -> list[str]:
    slots = [s.strip() for s in text.split(",") if s.strip()]
    if not slots or not all(s.isdigit() for s in slots):
        raise ConfigError(f"--gpus {text!r}: expected device indices such as 0,1 (repeat an index for several workers per GPU)")
    return slots


@dataclass
class SubprocessLauncher:
    """Runs one cell in a fresh Python process pinned to one GPU (what ``--gpus`` uses)."""

    grid: Grid
    out: Path
    progress_bar: bool = False
    python: str = sys.executable
    parent_visible_devices: str | None = field(default_factory=lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    _running: set[subprocess.Popen] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def command(self, cell: Cell) -> list[str]:
        # Absolute grid file and data root: the worker resolves exactly the paths this process did.
        command = [
            self.python, "-m", "biosam2.bench.accuracy", str(self.grid.file),
            "--out", str(self.out.resolve()), "--data-root", str(self.grid.data_root), "--run-cell", cell.key,
        ]
        return command + (["--progress"] if self.progress_bar else [])

    def environment(self, slot: str) -> dict[str, str]:
        return {**os.environ, "CUDA_VISIBLE_DEVICES": physical_gpu(slot, self.parent_visible_devices), "PYTHONUNBUFFERED": "1"}

    def __call__(self, cell: Cell, slot: str) -> CellOutcome:
        started = time.time()
        log_file = cell.log_file(self.out)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as stream:
            stream.write(f"\n==== {_now()} {cell.key} on GPU slot {slot}: {shlex.join(self.command(cell))}\n")
            stream.flush()
            # Its own session: a Ctrl-C in the terminal reaches this process only, which then forwards
            # exactly one SIGINT to each worker (stop()); two would cut Lightning's graceful shutdown short.
            process = subprocess.Popen(
                self.command(cell), env=self.environment(slot), stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
            )
            with self._lock:
                self._running.add(process)
            try:
                returncode = process.wait()
            finally:
                with self._lock:
                    self._running.discard(process)
        seconds = time.time() - started
        if returncode == 0 and (cell.run_dir(self.out) / "metrics.json").is_file():
            return CellOutcome(cell, FINISHED, seconds, slot=slot)
        failure = cell.failure_file(self.out)
        recorded = _read_json(failure) if failure.is_file() and failure.stat().st_mtime >= started else None
        if recorded and recorded.get("error"):
            return CellOutcome(cell, FAILED, seconds, recorded["error"], slot)
        # The worker died without saying why (killed, out of memory, a crash in native code): say it here.
        error = f"worker exited with status {returncode} without a result; see {log_file}"
        atomic_write_json(failure, {"cell": cell.key, "error": error, "traceback": [], "seconds": round(seconds, 1), "date": _now()})
        return CellOutcome(cell, FAILED, seconds, error, slot)

    def stop(self, grace_seconds: float = 60.0) -> None:
        """Ctrl-C: ask every running worker to stop as ``biosam2 train`` does (SIGINT: it keeps its last
        checkpoint, so the cell resumes next time), then terminate those that do not within the grace time."""
        with self._lock:
            running = list(self._running)
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.time() + grace_seconds
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.terminate()


def schedule(
    cells: Sequence[Cell],
    slots: Sequence[str],
    launch: Callable[[Cell, str], CellOutcome],
    report: Callable[[str], None] = print,
) -> list[CellOutcome]:
    """Run ``cells`` on parallel workers, one per slot, each taking the next cell when it is free.

    A slot never runs two cells at once; a launcher that raises fails that cell only. Outcomes are
    returned in the order of ``cells``.
    """
    pending: queue.Queue[Cell] = queue.Queue()
    for cell in cells:
        pending.put(cell)
    outcomes: dict[Cell, CellOutcome] = {}
    lock = threading.Lock()
    total = len(cells)

    def worker(slot: str) -> None:
        while True:
            try:
                cell = pending.get_nowait()
            except queue.Empty:
                return
            report(f"[gpu {slot}] {cell.key}: started")
            try:
                outcome = launch(cell, slot)
            except Exception as error:  # noqa: BLE001 - the launcher's own failure fails this cell only
                outcome = CellOutcome(cell, FAILED, error=f"{type(error).__name__}: {error}", slot=slot)
            outcome.slot = slot
            with lock:
                outcomes[cell] = outcome
                done = len(outcomes)
            report(f"[gpu {slot}] {cell.key}: {_describe_outcome(outcome)} ({done}/{total} done)")

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True, name=f"gpu-{slot}-{i}") for i, slot in enumerate(slots)]
    for thread in threads:
        thread.start()
    # SIGTERM (a scheduler, or `kill` of a grid started with nohup, where Ctrl-C cannot reach it) stops
    # the workers the way Ctrl-C does: one SIGINT each, so that every cell keeps its last checkpoint.
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        while any(thread.is_alive() for thread in threads):  # short joins keep Ctrl-C responsive
            for thread in threads:
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        while not pending.empty():  # no worker starts another cell
            pending.get_nowait()
        stop = getattr(launch, "stop", None)
        if stop is not None:
            stop()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [outcomes[cell] for cell in cells]


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _describe_outcome(outcome: CellOutcome) -> str:
    if outcome.status == FINISHED:
        return f"finished in {outcome.seconds:.0f} s"
    if outcome.status == "skipped":
        return "already finished"
    return f"{outcome.status}: {outcome.error}"



# ---- helpers shared with results and cli --------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
