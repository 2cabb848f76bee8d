"""The tables: finished cells read back, mean ± std over seeds, results.json and results.md.

Also what the tables say about how they were made: the machine, the times and load, and the history
of invocations into the output folder (``OUT/invocations.jsonl``).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biosam2 import __version__
from biosam2.atomic_io import atomic_write_json, atomic_write_text
from biosam2.bench.accuracy.cells import (
    CONFLICT,
    FAILED,
    FINISHED,
    RESUMABLE,
    RUNTIME_OPTIONS,
    _now,
    _read_json,
    cell_state,
)
from biosam2.bench.accuracy.grid import Cell, Grid
from biosam2.bench.measure import cpu_model_name, load_average

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


# ---- collecting finished cells ------------------------------------------------------------------
@dataclass
class CellRecord:
    """What one cell contributes to the tables (values are fractions; HD95 in ``hd95_unit``)."""

    cell: Cell
    state: str  # FINISHED, RESUMABLE, NEW, CONFLICT, FAILED
    reason: str | None = None
    miou: float | None = None
    dice: float | None = None
    hd95: float | None = None
    hd95_unit: str | None = None
    best_val_miou: float | None = None
    epochs_trained: int | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    seconds: float | None = None
    cases: dict[str, int] | None = None
    config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.cell.dataset, "method": self.cell.method, "seed": self.cell.seed, "state": self.state,
            "reason": self.reason, "miou": self.miou, "mean_foreground_dice": self.dice,
            "mean_foreground_hd95": self.hd95, "hd95_unit": self.hd95_unit, "best_val_miou": self.best_val_miou,
            "epochs_trained": self.epochs_trained, "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters, "seconds": self.seconds, "cases": self.cases,
        }


def _mean_of(block: Any) -> float | None:
    if isinstance(block, dict):
        block = block.get("mean")
    return float(block) if isinstance(block, (int, float)) and math.isfinite(block) else None


def collect(grid: Grid, out: Path) -> list[CellRecord]:
    """One record per cell of the grid, read from its run directory (and failure record)."""
    records = []
    for cell in grid.cells():
        config = grid.config(cell).to_dict()
        run_dir = cell.run_dir(out)
        state = cell_state(run_dir, config)
        record = CellRecord(cell, state.state, state.reason or None, config=config)
        failure = _read_json(cell.failure_file(out))
        if state.state != FINISHED:
            if failure and state.state != CONFLICT:
                record.state, record.reason = FAILED, failure.get("error")
            records.append(record)
            continue
        metrics = _read_json(run_dir / "metrics.json") or {}
        evaluation = _read_json(run_dir / "evaluation.json") or metrics.get("test") or {}
        record.miou = _mean_of(evaluation.get("miou"))
        record.dice = _mean_of(evaluation.get("mean_foreground_dice"))
        record.hd95 = _mean_of(evaluation.get("mean_foreground_hd95"))
        record.hd95_unit = evaluation.get("hd95_unit")
        record.best_val_miou = _mean_of(metrics.get("best_val_mIoU"))
        record.epochs_trained = metrics.get("epochs_trained")
        record.trainable_parameters = (metrics.get("parameters") or {}).get("trainable")
        record.total_parameters = (metrics.get("parameters") or {}).get("total")
        record.seconds = metrics.get("seconds")
        split = (_read_json(run_dir / "run.json") or {}).get("split") or {}
        if split:
            record.cases = {name: len(split.get(name) or []) for name in ("train", "val", "test")}
        if not evaluation:
            record.reason = "finished without a test evaluation (evaluate_test: false or no labelled test cases)"
        records.append(record)
    return records


# ---- statistics ---------------------------------------------------------------------------------
@dataclass
class Summary:
    """mean ± sample standard deviation (n-1) over the seeds that gave a value."""

    values: list[float]
    expected: int
    states: dict[str, int]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))  # type: ignore[operator]

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        scaled = lambda v: None if v is None else v * scale  # noqa: E731
        return {
            "mean": scaled(self.mean), "std": scaled(self.std), "n": self.n, "expected": self.expected,
            "values": [v * scale for v in self.values], "states": self.states,
        }

    def format(self, scale: float = 1.0) -> str:
        if not self.values:
            for state in (FAILED, CONFLICT, RESUMABLE):
                if self.states.get(state):
                    return {FAILED: "failed", CONFLICT: "conflict", RESUMABLE: "unfinished"}[state]
            return "no value" if self.states.get(FINISHED) else "not run"
        text = f"{self.mean * scale:.2f}"  # type: ignore[operator]
        if self.std is not None:
            text += f" ± {self.std * scale:.2f}"
        text += f" (n={self.n})" if self.n == self.expected else f" (n={self.n}/{self.expected})"
        return text


METRICS = {  # key -> (CellRecord attribute, scale for display, title)
    "miou": ("miou", 100.0, "mIoU (%)"),
    "dice": ("dice", 100.0, "mean foreground Dice (%)"),
    "hd95": ("hd95", 1.0, "mean foreground HD95"),
}


def summarize(records: Sequence[CellRecord], dataset: str, method: str, metric: str) -> Summary | None:
    """The seeds of one (dataset, method) pair; None when the method does not run on the dataset."""
    chosen = [r for r in records if r.cell.dataset == dataset and r.cell.method == method]
    if not chosen:
        return None
    attribute = METRICS[metric][0]
    states: dict[str, int] = {}
    for record in chosen:
        states[record.state] = states.get(record.state, 0) + 1
    values = [getattr(r, attribute) for r in chosen if r.state == FINISHED and getattr(r, attribute) is not None]
    return Summary(values, len(chosen), states)


# ---- results.json -------------------------------------------------------------------------------
def hd95_units(grid: Grid, records: Sequence[CellRecord]) -> dict[str, dict[str, Any]]:
    """Per dataset: the HD95 unit its evaluations report, and a note where that unit is not physical.

    The evaluations say "mm" only where the data has a real voxel spacing: 2-D images, and volumes whose
    dataset.json says ``"spacing": "unknown"`` (ACDC, Synapse), are measured in pixels or voxels.
    """
    units = {}
    for name in grid.datasets:
        seen = sorted({r.hd95_unit for r in records if r.cell.dataset == name and r.hd95_unit})
        unit = seen[0] if len(seen) == 1 else (" / ".join(seen) if seen else None)
        note = "no physical spacing: distances in image grid units" if unit in ("pixels", "voxels") else None
        units[name] = {"unit": unit, "note": note}
    return units


def machine_description() -> dict[str, Any]:
    """Enough about the machine to read timings and to know whether GPUs were used."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(), "gpus": gpus, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    gpus = ", ".join(info["gpus"]) if info.get("gpus") else "no GPU"
    return f"{info['cpu']} ({info['cpu_count']} logical cores), {gpus}; {info['platform']}; torch {info.get('torch', '?')}"


def _varying_options(grid: Grid, methods: Sequence[str], dataset: str) -> dict[str, str]:
    """Per method, the options that differ among ``methods`` on ``dataset``: what an ablation varies."""
    options = {m: grid.config(Cell(dataset, m, grid.seeds[0])).to_dict() for m in methods}
    names = sorted({k for o in options.values() for k in o} - {"seed"} - RUNTIME_OPTIONS)
    varying = [k for k in names if len({json.dumps(o.get(k), sort_keys=True) for o in options.values()}) > 1]
    return {m: ", ".join(f"{k}={options[m].get(k)}" for k in varying) or "(same options)" for m in methods}


def build_results(grid: Grid, out: Path, records: Sequence[CellRecord], invocation: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of results.json; results.md is rendered from it alone."""
    tables: dict[str, Any] = {}
    for metric, (_, scale, title) in METRICS.items():
        rows = {}
        for method in grid.methods:
            rows[method] = {}
            for dataset in grid.datasets:
                summary = summarize(records, dataset, method, metric)
                rows[method][dataset] = None if summary is None else {**summary.to_dict(scale), "text": summary.format(scale)}
        tables[metric] = {"title": title, "rows": rows}
    ablations = []
    for entry in grid.ablations:
        rows = []
        for method in entry.methods:
            trainable = next(
                (r.trainable_parameters for r in records
                 if r.cell.method == method and r.cell.dataset == entry.datasets[0] and r.trainable_parameters), None,
            )
            cells = {}
            for dataset in entry.datasets:
                summary = summarize(records, dataset, method, "miou")
                cells[dataset] = {**summary.to_dict(100.0), "text": summary.format(100.0)}  # type: ignore[union-attr]
            rows.append({
                "method": method, "label": grid.methods[method].label,
                "setting": _varying_options(grid, entry.methods, entry.datasets[0])[method],
                "trainable_parameters": trainable, "miou": cells,
            })
        ablations.append({"title": entry.title, "note": entry.note, "datasets": list(entry.datasets), "rows": rows})
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    cell_seconds = sum(r.seconds or 0.0 for r in records if r.state == FINISHED)
    return {
        "grid": {"name": grid.name, "file": str(grid.file), "sha256": grid.sha256(), "description": grid.description},
        "command": invocation.get("command"),
        "argv": invocation.get("argv"),
        "date": invocation.get("date") or _now(),
        "machine": invocation.get("machine") or machine_description(),
        "biosam2_version": __version__,
        "invocation": invocation,
        "invocations": _read_invocations(out),
        "random_weights": grid.uses_random_weights(),
        "data_root": str(grid.data_root),
        "seeds": list(grid.seeds),
        "defaults": grid.defaults,
        "datasets": {
            name: {
                "label": entry.label,
                "source": (
                    {"convert": entry.convert.name, "src": str(entry.convert.src), "limit": entry.convert.limit, "split_seed": entry.convert.seed}
                    if entry.convert else {"path": str(entry.path)}
                ),
                "train": entry.train,
                "note": entry.note,
                "cases": next((r.cases for r in records if r.cell.dataset == name and r.cases), None),
            }
            for name, entry in grid.datasets.items()
        },
        "hd95_units": hd95_units(grid, records),
        "methods": {
            name: {
                "label": entry.label, "preset": entry.preset, "train": entry.train,
                "datasets": list(entry.datasets) if entry.datasets else None, "note": entry.note,
            }
            for name, entry in grid.methods.items()
        },
        "cell_counts": counts,
        "cell_seconds_total": round(cell_seconds, 1),
        "tables": tables,
        "ablations": ablations,
        "cells": [r.to_dict() for r in records],
    }


# ---- results.md ---------------------------------------------------------------------------------
CAVEAT_RANDOM = (
    "**Caveat: random weights.** These cells start from a randomly initialised SAM2 (weights: random), "
    "not from Meta's pretrained SAM2.1, and train for a tiny budget. Random weights on CPU say nothing "
    "about the paper's accuracy with pretrained weights: the numbers show that the harness runs end to "
    "end and how the methods rank under equal (small) budgets from the same random backbone, nothing more."
)


def _table(headers: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cell_text(block: dict[str, Any] | None) -> str:
    return "n/a" if block is None else block["text"]


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: the tables, and everything needed to read them without the code."""
    grid = results["grid"]
    invocation = results["invocation"]
    datasets, methods = results["datasets"], results["methods"]
    counts = results["cell_counts"]
    total = sum(counts.values())
    lines = [f"# Accuracy grid `{grid['name']}`", ""]
    if grid["description"]:
        lines += [grid["description"].strip(), ""]
    machine = results["machine"]
    runs = [entry for entry in results.get("invocations") or [] if not entry.get("aggregate_only")]
    if invocation.get("aggregate_only") and runs:
        command = (f"`{runs[-1].get('command')}` (the last run that trained cells); these tables were rewritten "
                   f"from its run directories by `{results['command']}`")
        date = f"{runs[-1].get('date')} (run), {results['date']} (aggregation)"
    else:
        command, date = f"`{results['command']}`", results["date"]
    lines += [
        f"- **Command**: {command}",
        f"- **Date**: {date}",
        f"- **Machine**: {describe_machine(machine)}",
        f"- **biosam2**: {results['biosam2_version']}",
        f"- **Grid file**: `{grid['file']}` (sha256 {grid['sha256'][:12]})",
        f"- **Data root**: `{results['data_root']}`",
        f"- **Seeds**: {', '.join(str(s) for s in results['seeds'])}",
        f"- **Cells**: {total} in the grid: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())),
        f"- **Time**: {_time_text(invocation, results['cell_seconds_total'], results.get('invocations') or [])}",
    ]
    if results["random_weights"]:
        lines += ["", "> " + CAVEAT_RANDOM]
    lines += [
        "",
        "Every cell is one ordinary `biosam2 train` run (`runs/<dataset>/<method>/seed<k>/`), evaluated on the "
        "dataset's test split. Each table entry is mean ± sample standard deviation (n-1) over seeds, with n the "
        "seeds that gave a value (`n=1/2`: a seed is missing); `not run`, `failed`, `unfinished`, `conflict` mark "
        "cells without a result, `n/a` a method the grid does not run on that dataset.",
    ]

    def main_table(metric: str, title: str, unit_row: bool = False) -> None:
        table = results["tables"][metric]
        headers = ["method"] + [
            datasets[d]["label"] + (f" [{results['hd95_units'][d]['unit'] or '?'}]" if unit_row else "") for d in datasets
        ]
        rows = [[methods[m]["label"]] + [_cell_text(table["rows"][m][d]) for d in datasets] for m in methods]
        lines.extend(["", f"## {title}", ""] + _table(headers, rows))

    main_table("miou", "mIoU (%), as the paper reports it")
    lines += [
        "",
        "mIoU: hard IoU from one confusion matrix over every pixel/voxel of the test set, background included, "
        "averaged over classes (not G-SAM's soft per-batch IoU).",
    ]
    main_table("dice", "Mean foreground Dice (%)")
    lines += ["", "Per test case, the mean Dice over its foreground classes; then the mean over cases (see each run's evaluation.md)."]
    main_table("hd95", "Mean foreground HD95", unit_row=True)
    notes = [f"{datasets[d]['label']}: {info['note']}" for d, info in results["hd95_units"].items() if info.get("note")]
    lines += ["", "HD95 (MONAI, 95th percentile symmetric surface distance), per case over foreground classes, then over "
              "cases; mm where the data has a voxel spacing, else pixels (2-D) or voxels (3-D)."]
    lines += [f"- {note}" for note in notes]

    if results["ablations"]:
        lines += ["", "## Ablations"]
        for table in results["ablations"]:
            lines += ["", f"### {table['title']}", ""]
            if table.get("note"):
                lines += [table["note"].strip(), ""]
            headers = ["method", "setting", "trainable params (saved model)"] + [f"{datasets[d]['label']} mIoU (%)" for d in table["datasets"]]
            rows = [
                [row["label"], row["setting"], f"{row['trainable_parameters']:,}" if row["trainable_parameters"] else "?"]
                + [row["miou"][d]["text"] for d in table["datasets"]]
                for row in table["rows"]
            ]
            lines += _table(headers, rows, ["---", "---", "---:"] + ["---:"] * len(table["datasets"]))

    lines += ["", "## Datasets", ""]
    rows = []
    for info in datasets.values():
        source = info["source"]
        where = (f"convert {source['convert']} from `{source['src']}` (limit {source['limit']}, split seed {source['split_seed']})"
                 if "convert" in source else f"`{source['path']}`")
        cases = info["cases"]
        rows.append([info["label"], where, f"{cases['train']}/{cases['val']}/{cases['test']}" if cases else "?",
                     _options_text(info["train"]), info.get("note") or ""])
    lines += _table(["dataset", "source", "train/val/test cases", "training options", "note"], rows, ["---"] * 5)
    lines += ["", "## Methods", "", f"Shared options (`defaults`): {_options_text(results['defaults'])}.", ""]
    rows = [[info["label"], info["preset"] or "", _options_text(info["train"]),
             ", ".join(info["datasets"]) if info["datasets"] else "all", info.get("note") or ""]
            for info in methods.values()]
    lines += _table(["method", "preset (biosam2.model.factory.METHODS)", "options", "datasets", "note"], rows, ["---"] * 5)

    history = results.get("invocations") or []
    if history:
        lines += ["", "## Runs of this grid into this folder", ""]
        rows = []
        for entry in history:
            load = entry.get("load_average") or {}
            loads = "/".join("?" if load.get(k) is None else f"{load[k]:.2f}" for k in ("start", "max", "end"))
            what = "interrupted" if entry.get("interrupted") else "completed"
            rows.append([entry.get("date", "?"), f"`{entry.get('command', '?')}`", what,
                         _duration(entry.get("wall_seconds")), _duration(entry.get("cpu_seconds")),
                         str(entry.get("cells_trained", 0)), loads])
        lines += _table(["date", "command", "kind", "wall", "CPU time", "cells trained", "load avg start/max/end"], rows,
                        ["---", "---", "---", "---:", "---:", "---:", "---:"])

    lines += ["", "## Cells", ""]
    rows = []
    for record in results["cells"]:
        rows.append([
            record["dataset"], record["method"], str(record["seed"]), record["state"],
            _percent(record["miou"]), _percent(record["mean_foreground_dice"]),
            "—" if record["mean_foreground_hd95"] is None else f"{record['mean_foreground_hd95']:.2f}",
            _percent(record["best_val_miou"]), "—" if record["seconds"] is None else f"{record['seconds']:.0f}",
            (record["reason"] or "").replace("|", "/")[:160],
        ])
    lines += _table(["dataset", "method", "seed", "state", "test mIoU %", "Dice %", "HD95", "best val mIoU %", "seconds", "note"],
                    rows, ["---"] * 4 + ["---:"] * 5 + ["---"])
    lines.append("")
    return "\n".join(lines)


def _time_text(invocation: dict[str, Any], cell_seconds: float, history: Sequence[dict[str, Any]] = ()) -> str:
    """How long the grid took, how much CPU it used, and how busy the machine was meanwhile."""
    run = invocation
    prefix = ""
    if invocation.get("in_progress"):
        prefix = "run in progress: so far "
    elif invocation.get("aggregate_only"):
        runs = [entry for entry in history if not entry.get("aggregate_only")]
        if not runs:
            return f"this invocation only aggregated; the finished cells' own times add up to {_duration(cell_seconds)}"
        run = runs[-1]
        prefix = f"this invocation only aggregated; the last run ({run.get('date', '?')}) took "
    text = prefix + f"{_duration(run.get('wall_seconds'))} wall for {run.get('cells_trained', 0)} cell(s) trained"
    if run.get("cpu_seconds"):
        text += f", {_duration(run['cpu_seconds'])} of CPU time"
    text += f"; the finished cells' own train+evaluate times add up to {_duration(cell_seconds)}"
    load = run.get("load_average") or {}
    if load.get("start") is not None and load.get("end") is not None:
        text += f"; 1-min load average {load['start']:.2f} at start"
        if load.get("max") is not None:
            text += f", {load['max']:.2f} at most after a cell"
        text += f", {load['end']:.2f} at end"
        cores = os.cpu_count() or 1
        busiest = max(v for v in (load.get("start"), load.get("max"), load.get("end")) if v is not None)
        # The grid itself keeps about `cores` threads busy: a load well above that is other work.
        if busiest > cores + 0.5:
            text += f" (well above the {cores} cores: other work shared the CPU and inflated these times)"
        elif load.get("max") is None:
            text += " (sampled at start and end only: contention in between would not show here)"
        else:
            text += f" (sampled between cells; never well above the {cores} cores the grid itself keeps busy)"
    return text


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "—"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


# ---- invocation history -------------------------------------------------------------------------
def _read_invocations(out: Path) -> list[dict[str, Any]]:
    """Every recorded invocation of this output folder (one JSON object a line), oldest first."""
    path = out / "invocations.jsonl"
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the others still count
            if isinstance(entry, dict) and not entry.get("aggregate_only"):
                entries.append(entry)
    return entries


def _record_invocation(out: Path, invocation: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "invocations.jsonl", "a") as stream:
        stream.write(json.dumps({k: v for k, v in invocation.items() if k not in ("machine", "outcomes")}) + "\n")


def _sample_load(invocation: dict[str, Any], key: str | None = None) -> None:
    """Record the 1-min load average (under ``key``, and into the running maximum): a load above the
    core count while cells ran means other work shared the CPU, and the cells' times are inflated."""
    value = load_average()
    load = invocation.setdefault("load_average", {})
    if key:
        load[key] = value
    if value is not None:
        load["max"] = max(value, load.get("max") or value)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (the --gpus workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def aggregate(grid: Grid, out: Path, invocation: dict[str, Any]) -> dict[str, Any]:
    """Read every cell, write OUT/results.json and OUT/results.md, return the results."""
    records = collect(grid, out)
    results = build_results(grid, out, records, invocation)
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, render_markdown(results))
    return results
