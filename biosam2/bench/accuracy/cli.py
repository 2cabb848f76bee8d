"""The command line: ``biosam2 bench accuracy`` (also the ``--run-cell`` worker that ``--gpus`` starts,
as ``python -m biosam2.bench.accuracy``). Errors, Ctrl-C and logging are handled by :mod:`biosam2.cli`."""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from biosam2.atomic_io import atomic_write_text
from biosam2.bench.accuracy.cells import (
    CONFLICT,
    FAILED,
    FINISHED,
    NEW,
    NO_DATA,
    RESUMABLE,
    CellOutcome,
    SubprocessLauncher,
    _describe_outcome,
    _now,
    _read_json,
    cell_state,
    dataset_status,
    parse_gpus,
    prepare_dataset,
    run_cell,
    schedule,
)
from biosam2.bench.accuracy.grid import Cell, Grid, load_grid, shipped_grids
from biosam2.bench.accuracy.results import (
    RESULTS_MD,
    _cell_text,
    _cpu_seconds,
    _mean_of,
    _record_invocation,
    _sample_load,
    _table,
    aggregate,
    machine_description,
)
from biosam2.errors import ConfigError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``biosam2 bench accuracy`` (also ``python -m biosam2.bench.accuracy``)."""
    parser.description = (
        "Run a grid of methods x datasets x seeds through `biosam2 train` and aggregate mean ± std tables "
        "(mIoU, Dice, HD95, ablations). Re-running the same command continues an interrupted grid."
    )
    parser.add_argument("grid", help=f"grid YAML file, or a shipped grid's name ({', '.join(shipped_grids())})")
    parser.add_argument("--out", help="output folder (default: bench-accuracy-<grid name> in the current directory)")
    parser.add_argument("--data-root", dest="data_root",
                        help="where relative dataset sources point (replaces the grid's data_root, e.g. /data/shared/data)")
    parser.add_argument("--only", action="append", metavar="DATASET[/METHOD[/seedK]]",
                        help="run only matching cells (shell patterns, e.g. isbi2012/biosam2-* ; repeatable); tables still show the whole grid")
    parser.add_argument("--gpus", help="run cells in parallel, one worker process per listed GPU index (e.g. 0,1; 0,0,1,1 = two per GPU)")
    parser.add_argument("--dry-run", action="store_true", help="list the datasets and cells and their state; change nothing")
    parser.add_argument("--aggregate-only", action="store_true", help="only (re)write results.json/results.md from finished cells")
    parser.add_argument("--skip-missing-data", action="store_true",
                        help="leave out cells whose dataset source is absent instead of stopping")
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar for each cell")
    parser.add_argument("--run-cell", dest="run_cell", help=argparse.SUPPRESS)  # worker mode, used by --gpus


def cell_matches(cell: Cell, patterns: Sequence[str] | None) -> bool:
    """``DATASET``, ``DATASET/METHOD`` or ``DATASET/METHOD/seedK``, each part a shell pattern."""
    if not patterns:
        return True
    fields = (cell.dataset, cell.method, f"seed{cell.seed}")
    for pattern in patterns:
        parts = pattern.strip("/").split("/")
        if len(parts) > 3:
            raise ConfigError(f"--only {pattern}: expected DATASET[/METHOD[/seedK]]")
        if all(fnmatch.fnmatchcase(value, part) for value, part in zip(fields, parts, strict=False)):
            return True
    return False


def _visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _command_line(args: argparse.Namespace, out: Path) -> str:
    """The ``biosam2 bench accuracy`` command equivalent to ``args`` (what results.md records)."""
    command = ["biosam2", "bench", "accuracy", str(args.grid), "--out", str(out)]
    if args.data_root:
        command += ["--data-root", str(args.data_root)]
    for pattern in args.only or []:
        command += ["--only", pattern]
    if args.gpus:
        command += ["--gpus", args.gpus]
    for flag in ("dry_run", "aggregate_only", "skip_missing_data", "progress"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    return shlex.join(command)


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``biosam2 bench accuracy``: 0 when every selected cell finished, 1 when some failed.

    Errors in the grid file or the options raise :class:`~biosam2.errors.ConfigError` (the CLI prints
    them and exits 2); a Ctrl-C writes the results so far and raises KeyboardInterrupt.
    """
    grid = load_grid(args.grid, args.data_root)
    out = Path(args.out or f"bench-accuracy-{grid.name}").expanduser().resolve()
    if args.run_cell:
        return _worker(grid, out, args.run_cell, progress_bar=args.progress)
    if args.dry_run and args.aggregate_only:
        raise ConfigError("--dry-run and --aggregate-only: choose one")

    started = time.time()
    cells = [cell for cell in grid.cells() if cell_matches(cell, args.only)]
    if not cells:
        raise ConfigError(f"--only {' '.join(args.only or [])}: no cell of grid {grid.name} matches")
    invocation: dict[str, Any] = {
        "command": _command_line(args, out), "argv": list(sys.argv), "date": _now(),
        "machine": machine_description(),
    }
    _sample_load(invocation, "start")
    cpu_started = _cpu_seconds()
    if args.dry_run:
        print(dry_run_report(grid, out, cells))
        return 0
    if args.aggregate_only:
        if not (out / "runs").is_dir():
            raise ConfigError(f"{out}: holds no runs/ folder: nothing to aggregate (is --out the grid's output folder?)")
        # Not recorded in invocations.jsonl: that history is of the runs, whose times the results report.
        invocation.update({"wall_seconds": round(time.time() - started, 1), "cells_trained": 0, "aggregate_only": True})
        _sample_load(invocation, "end")
        results = aggregate(grid, out, invocation)
        _print_results(results, out)
        return 0

    slots = parse_gpus(args.gpus) if args.gpus else []
    if slots:
        visible = _visible_gpu_count()
        if visible == 0:
            raise ConfigError("--gpus: torch sees no CUDA device on this machine; leave --gpus out to run on the CPU")
        wrong = [s for s in slots if int(s) >= visible]
        if wrong:
            raise ConfigError(f"--gpus {args.gpus}: torch sees {visible} device(s), indices 0..{visible - 1}")

    states = {cell: cell_state(cell.run_dir(out), grid.config(cell).to_dict()) for cell in cells}
    to_run = [cell for cell in cells if states[cell].state in (NEW, RESUMABLE)]
    missing = {}
    for name in sorted({cell.dataset for cell in to_run}):
        usable, description = dataset_status(grid.datasets[name], out)
        if not usable:
            missing[name] = description
    outcomes: list[CellOutcome] = []
    if missing:
        listing = "; ".join(f"{name}: {why}" for name, why in missing.items())
        if not args.skip_missing_data:
            raise ConfigError(
                f"grid {grid.name}: data not found ({listing}). Data root {grid.data_root} (from the {grid.data_root_origin}); "
                "point --data-root at the folder holding the sources, leave those datasets out with --only, "
                "or pass --skip-missing-data"
            )
        print(f"skipping cells without data: {listing}")
        outcomes += [CellOutcome(cell, NO_DATA, error=missing[cell.dataset]) for cell in to_run if cell.dataset in missing]
        to_run = [cell for cell in to_run if cell.dataset not in missing]

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", grid.text)
    paths = {name: prepare_dataset(grid.datasets[name], out) for name in sorted({cell.dataset for cell in to_run})}
    outcomes += [CellOutcome(cell, "skipped") for cell in cells if states[cell].state == FINISHED]
    outcomes += [CellOutcome(cell, CONFLICT, error=states[cell].reason) for cell in cells if states[cell].state == CONFLICT]
    for outcome in outcomes:
        if outcome.status == CONFLICT:
            print(f"{outcome.cell.key}: conflict: {outcome.error}")
    print(
        f"grid {grid.name}: {len(cells)} cell(s) selected: {sum(s.state == FINISHED for s in states.values())} finished, "
        f"{sum(s.state == RESUMABLE for s in states.values())} to resume, {sum(s.state == NEW for s in states.values())} new, "
        f"{sum(s.state == CONFLICT for s in states.values())} conflict; output {out}",
        flush=True,
    )

    def finish(interrupted: bool) -> dict[str, Any]:
        invocation.update({
            "wall_seconds": round(time.time() - started, 1),
            "cells_trained": sum(o.status in (FINISHED, FAILED) for o in outcomes),
            "interrupted": interrupted,
            "cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
            "outcomes": {o.cell.key: {"status": o.status, "seconds": round(o.seconds, 1), "error": o.error, "slot": o.slot} for o in outcomes},
        })
        _sample_load(invocation, "end")
        _record_invocation(out, invocation)
        return aggregate(grid, out, invocation)

    refresh_lock = threading.Lock()

    def refresh(trained: int) -> None:
        """Tables after every cell, so that a grid killed outright still leaves up-to-date results."""
        with refresh_lock:
            _sample_load(invocation)
            aggregate(grid, out, {**invocation, "in_progress": True, "cells_trained": trained,
                                  "wall_seconds": round(time.time() - started, 1)})

    try:
        if slots:
            launcher = SubprocessLauncher(grid, out, progress_bar=args.progress)
            finished_lines = []

            def report(line: str) -> None:
                print(line, flush=True)
                if not line.endswith(": started"):
                    finished_lines.append(line)
                    refresh(len(finished_lines))

            outcomes += schedule(to_run, slots, launcher, report=report)
        else:
            for index, cell in enumerate(to_run, 1):
                resume = " (resuming)" if states[cell].state == RESUMABLE else ""
                print(f"[{index}/{len(to_run)}] {cell.key}: training{resume}", flush=True)
                outcome = run_cell(grid, cell, out, paths[cell.dataset], progress_bar=args.progress)
                outcomes.append(outcome)
                print(f"[{index}/{len(to_run)}] {cell.key}: {_describe_outcome(outcome)}{_headline(cell, out)}", flush=True)
                refresh(index)
    except KeyboardInterrupt:
        finish(interrupted=True)
        print(f"interrupted: results so far in {out / RESULTS_MD}; run the same command again to continue "
              "(finished cells are kept, the interrupted one resumes from its last checkpoint)", file=sys.stderr)
        raise
    results = finish(interrupted=False)
    _print_results(results, out)
    failed = [o for o in outcomes if o.status in (FAILED, CONFLICT)]
    for outcome in failed:
        print(f"FAILED {outcome.cell.key}: {outcome.error}", file=sys.stderr)
    return 1 if failed else 0


def dry_run_report(grid: Grid, out: Path, cells: Sequence[Cell]) -> str:
    lines = [
        f"grid {grid.name} ({grid.file}): {len(grid.datasets)} dataset(s) x {len(grid.methods)} method(s) x "
        f"{len(grid.seeds)} seed(s) = {len(grid.cells())} cell(s); {len(cells)} selected",
        f"data root: {grid.data_root} (from the {grid.data_root_origin})",
        f"output: {out}",
        "datasets:",
    ]
    for name, entry in grid.datasets.items():
        usable, description = dataset_status(entry, out)
        lines.append(f"  {name:<16} {'ok' if usable else 'MISSING':<8} {description}")
    lines.append("cells:")
    counts: dict[str, int] = {}
    for cell in cells:
        state = cell_state(cell.run_dir(out), grid.config(cell).to_dict())
        failure = _read_json(cell.failure_file(out))
        label = state.state + (" (last attempt failed)" if failure and state.state != FINISHED else "")
        counts[state.state] = counts.get(state.state, 0) + 1
        lines.append(f"  {cell.key:<48} {label}" + (f": {state.reason}" if state.reason else ""))
    lines.append("summary: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)


def _headline(cell: Cell, out: Path) -> str:
    metrics = _read_json(cell.run_dir(out) / "metrics.json") or {}
    test = metrics.get("test") or {}
    if test.get("miou") is None:
        return ""
    dice = _mean_of(test.get("mean_foreground_dice"))
    return f": test mIoU {100 * test['miou']:.2f}%" + ("" if dice is None else f", Dice {100 * dice:.2f}%")


def _print_results(results: dict[str, Any], out: Path) -> None:
    datasets, methods = results["datasets"], results["methods"]
    table = results["tables"]["miou"]["rows"]
    print(f"\nmIoU (%), mean ± std over seeds ({out / RESULTS_MD}):")
    for line in _table(["method"] + [datasets[d]["label"] for d in datasets],
                       [[methods[m]["label"]] + [_cell_text(table[m][d]) for d in datasets] for m in methods]):
        print(line)


def _worker(grid: Grid, out: Path, key: str, *, progress_bar: bool) -> int:
    """One cell in this process (``--run-cell``, started by ``--gpus``): exit 0 finished, 1 failed."""
    matches = [cell for cell in grid.cells() if cell.key == key]
    if not matches:
        raise ConfigError(f"--run-cell {key}: not a cell of grid {grid.name}")
    cell = matches[0]
    data = prepare_dataset(grid.datasets[cell.dataset], out, convert=False)
    # One GPU per worker: CUDA_VISIBLE_DEVICES shows only it, so one device and no DDP.
    outcome = run_cell(grid, cell, out, data, runtime={"devices": 1, "strategy": "auto", "num_nodes": 1}, progress_bar=progress_bar)
    print(f"{cell.key}: {_describe_outcome(outcome)}{_headline(cell, out)}", flush=True)
    return 0 if outcome.status in (FINISHED, "skipped") else 1
