"""``biosam2 bench accuracy`` (and the ``--run-cell`` worker that ``--gpus`` starts). Errors, Ctrl-C and
logging are handled by :mod:`biosam2.cli`."""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from biosam2.atomic_io import atomic_write_text
from biosam2.bench.accuracy.cells import (
    CONFLICT, FAILED, FINISHED, NEW, RESUMABLE, CellOutcome, SubprocessLauncher, cell_state, dataset_status,
    parse_gpus, prepare_dataset, read_json, run_cell, schedule,
)
from biosam2.bench.accuracy.grid import Cell, Grid, load_grid, shipped_grids
from biosam2.bench import describe_machine
from biosam2.bench.accuracy.results import RESULTS_MD, aggregate, mean_of, table
from biosam2.errors import ConfigError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run a grid of methods x datasets x seeds through `biosam2 train` and aggregate mean ± std "
                          "tables (mIoU, Dice, HD95, ablations). Re-running the same command continues an interrupted grid.")
    add = parser.add_argument
    add("grid", help=f"grid YAML file, or a shipped grid's name ({', '.join(shipped_grids())})")
    add("--out", help="output folder (default: bench-accuracy-<grid name> in the current directory)")
    add("--data-root", help="where relative dataset sources point (replaces the grid's data_root)")
    add("--only", action="append", metavar="DATASET[/METHOD[/seedK]]",
        help="run only matching cells (shell patterns, e.g. isbi2012/biosam2-*; repeatable); tables still show the whole grid")
    add("--gpus", help="run cells in parallel, one worker process per listed GPU index (0,1; 0,0,1,1 = two per GPU)")
    add("--dry-run", action="store_true", help="list the datasets and cells and their state; change nothing")
    add("--progress", action="store_true", help="show Lightning's progress bar for each cell")
    add("--run-cell", help=argparse.SUPPRESS)  # worker mode, used by --gpus


def cell_matches(cell: Cell, patterns: list[str] | None) -> bool:
    """``DATASET``, ``DATASET/METHOD`` or ``DATASET/METHOD/seedK``, each part a shell pattern."""
    fields = (cell.dataset, cell.method, f"seed{cell.seed}")
    for pattern in patterns or []:
        parts = pattern.strip("/").split("/")
        if len(parts) > 3:
            raise ConfigError(f"--only {pattern}: expected DATASET[/METHOD[/seedK]]")
        if all(fnmatch.fnmatchcase(value, part) for value, part in zip(fields, parts, strict=False)):
            return True
    return not patterns


def _visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _command_line(args: argparse.Namespace, out: Path) -> str:
    """The ``biosam2 bench accuracy`` command equivalent to ``args`` (what results.md records)."""
    command = ["biosam2", "bench", "accuracy", str(args.grid), "--out", str(out)]
    command += ["--data-root", str(args.data_root)] * bool(args.data_root) + ["--gpus", args.gpus] * bool(args.gpus)
    command += [part for pattern in args.only or [] for part in ("--only", pattern)]
    command += ["--" + f.replace("_", "-") for f in ("dry_run", "progress") if getattr(args, f)]
    return shlex.join(command)


def run_from_args(args: argparse.Namespace) -> int:
    """0 when every selected cell finished, 1 when some failed; grid errors raise ConfigError; a Ctrl-C
    writes the results so far and raises KeyboardInterrupt."""
    grid = load_grid(args.grid, args.data_root)
    out = Path(args.out or f"bench-accuracy-{grid.name}").expanduser().resolve()
    if args.run_cell:
        return _worker(grid, out, args.run_cell, progress_bar=args.progress)
    started = time.time()
    cells = [cell for cell in grid.cells() if cell_matches(cell, args.only)]
    if not cells:
        raise ConfigError(f"--only {' '.join(args.only or [])}: no cell of grid {grid.name} matches")
    slots = parse_gpus(args.gpus) if args.gpus else []
    if slots and (visible := _visible_gpu_count()) == 0:
        raise ConfigError("--gpus: torch sees no CUDA device on this machine; leave --gpus out to run on the CPU")
    if slots and max(int(s) for s in slots) >= visible:
        raise ConfigError(f"--gpus {args.gpus}: torch sees {visible} device(s), indices 0..{visible - 1}")
    states = {cell: cell_state(cell.run_dir(out), grid.wanted(cell)) for cell in cells}
    to_run = [cell for cell in cells if states[cell].state in (NEW, RESUMABLE)]
    data = {name: dataset_status(entry, out) for name, entry in grid.datasets.items()}
    counts = {s: sum(v.state == s for v in states.values()) for s in (FINISHED, RESUMABLE, NEW, CONFLICT)}
    print(f"grid {grid.name}: {len(cells)} of {len(grid.cells())} cell(s) selected: "
          + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; data root {grid.data_root}; output {out}", flush=True)
    if args.dry_run:  # what exists and what would run; nothing is written
        print("\n".join([f"  {n:<16} {'ok' if ok else 'MISSING':<8} {why}" for n, (ok, why) in data.items()] + [
            f"  {c.key:<48} {states[c].state}" + " (last attempt failed)" * (c.failure_file(out).is_file()
                                                                            and states[c].state != FINISHED)
            + (f": {states[c].reason}" if states[c].reason else "") for c in cells]))
        return 0
    missing = {name: data[name][1] for name in sorted({c.dataset for c in to_run}) if not data[name][0]}
    if missing:
        raise ConfigError(f"grid {grid.name}: data not found ({'; '.join(f'{n}: {why}' for n, why in missing.items())}). "
                          f"Data root {grid.data_root} (from the {grid.data_root_origin}); point --data-root at the folder "
                          "holding the sources, or leave those datasets out with --only")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", grid.text)
    paths = {name: prepare_dataset(grid.datasets[name], out) for name in sorted({c.dataset for c in to_run})}
    outcomes = [CellOutcome(c, "skipped") for c in cells if states[c].state == FINISHED]
    outcomes += [CellOutcome(c, CONFLICT, error=states[c].reason) for c in cells if states[c].state == CONFLICT]
    for outcome in outcomes[counts[FINISHED]:]:
        print(f"{outcome.cell.key}: conflict: {outcome.error}")
    lock, trained = threading.Lock(), []
    invocation = {"command": _command_line(args, out), "machine": describe_machine()}

    def refresh(outcome: CellOutcome | None = None, interrupted: bool | None = None) -> dict[str, Any]:
        """Tables after every cell, so that a grid killed outright still leaves up-to-date results."""
        with lock:
            trained.extend([outcome] if outcome else [])
            status = {"in_progress": True} if interrupted is None else {"interrupted": interrupted}
            return aggregate(grid, out, invocation | status | {"cells_trained": len(trained), "wall_seconds": time.time() - started})

    try:
        if slots:
            launcher = SubprocessLauncher(grid, out, progress_bar=args.progress)

            def launch(cell: Cell, slot: str) -> CellOutcome:
                outcome = launcher(cell, slot)
                refresh(outcome)
                return outcome

            launch.stop = launcher.stop
            outcomes += schedule(to_run, slots, launch, report=lambda line: print(line, flush=True))
        for index, cell in enumerate(to_run if not slots else [], 1):
            print(f"[{index}/{len(to_run)}] {cell.key}: training" + " (resuming)" * (states[cell].state == RESUMABLE), flush=True)
            outcomes.append(run_cell(grid, cell, out, paths[cell.dataset], progress_bar=args.progress))
            print(f"[{index}/{len(to_run)}] {cell.key}: {outcomes[-1].describe()}{_headline(cell, out)}", flush=True)
            refresh(outcomes[-1])
    except KeyboardInterrupt:
        refresh(interrupted=True)
        print(f"interrupted: results so far in {out / RESULTS_MD}; run the same command again to continue "
              "(finished cells are kept, the interrupted one resumes from its last checkpoint)", file=sys.stderr)
        raise
    _print_results(refresh(interrupted=False), out)
    failed = [o for o in outcomes if o.status in (FAILED, CONFLICT)]
    for outcome in failed:
        print(f"FAILED {outcome.cell.key}: {outcome.error}", file=sys.stderr)
    return 1 if failed else 0


def _headline(cell: Cell, out: Path) -> str:
    test = (read_json(cell.run_dir(out) / "metrics.json") or {}).get("test") or {}
    if test.get("miou") is None:
        return ""
    dice = mean_of(test.get("mean_foreground_dice"))
    return f": test mIoU {100 * test['miou']:.2f}%" + ("" if dice is None else f", Dice {100 * dice:.2f}%")


def _print_results(results: dict[str, Any], out: Path) -> None:
    datasets, labels, rows = results["datasets"], results["method_labels"], results["tables"]["miou"]["rows"]
    print(f"\nmIoU (%), mean ± std over seeds ({out / RESULTS_MD}):")
    print("\n".join(table(["method"] + [datasets[d]["label"] for d in datasets],
                          [[labels[m]] + [(rows[m][d] or {"text": "n/a"})["text"] for d in datasets] for m in labels])))


def _worker(grid: Grid, out: Path, key: str, *, progress_bar: bool) -> int:
    """One cell in this process (``--run-cell``, started by ``--gpus``): exit 0 finished, 1 failed."""
    # A grid started with `nohup ... &` ignores SIGINT, and so would this worker; the launcher stops it
    # with one SIGINT, which must act as Ctrl-C does: Lightning keeps the last checkpoint.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cell = next((c for c in grid.cells() if c.key == key), None)
    if cell is None:
        raise ConfigError(f"--run-cell {key}: not a cell of grid {grid.name}")
    data = prepare_dataset(grid.datasets[cell.dataset], out, convert=False)
    # CUDA_VISIBLE_DEVICES shows this worker one GPU: one device, no DDP.
    outcome = run_cell(grid, cell, out, data, runtime={"devices": 1, "strategy": "auto", "num_nodes": 1}, progress_bar=progress_bar)
    print(f"{cell.key}: {outcome.describe()}{_headline(cell, out)}", flush=True)
    return 0 if outcome.status in (FINISHED, "skipped") else 1
