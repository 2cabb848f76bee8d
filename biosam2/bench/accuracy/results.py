"""The tables: finished cells read back, mean ± std over seeds, ``results.json`` and ``results.md``."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from biosam2 import __version__
from biosam2.atomic_io import atomic_write_json, atomic_write_text
from biosam2.bench.accuracy.cells import CONFLICT, FAILED, FINISHED, RESUMABLE, RUNTIME_OPTIONS, cell_state, now, read_json
from biosam2.bench.accuracy.grid import Cell, Grid

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
METRICS = {"miou": (100.0, "mIoU (%), as the paper reports it"), "dice": (100.0, "Mean foreground Dice (%)"),
           "hd95": (1.0, "Mean foreground HD95"), "transunet_dice": (100.0, "Dice (%), TransUNet's protocol (Synapse)"),
           "image_mdice": (100.0, "mDice (%) per image (the polyp literature's)")}  # record key -> (scale, title)
CAVEAT_RANDOM = (
    "**Caveat: random weights.** These cells start from a randomly initialised SAM2 (weights: random), not from "
    "Meta's pretrained SAM2.1, and train for a tiny budget. Random weights on CPU say nothing about the paper's "
    "accuracy with pretrained weights: the numbers show that the harness runs end to end and how the methods rank "
    "under equal (small) budgets from the same random backbone, nothing more."
)


def mean_of(block: Any) -> float | None:
    if isinstance(block, dict):
        block = block.get("mean")
    return float(block) if isinstance(block, (int, float)) and math.isfinite(block) else None


def collect(grid: Grid, out: Path) -> list[dict[str, Any]]:
    """One record per cell of the grid, from its run directory (and failure record); values are fractions."""
    records = []
    for cell in grid.cells():
        state, reason = cell_state(cell.run_dir(out), grid.wanted(cell))
        record: dict[str, Any] = {"dataset": cell.dataset, "method": cell.method, "seed": cell.seed, "state": state,
                                  "reason": reason or None}
        records.append(record)
        failure = read_json(cell.failure_file(out))
        if state != FINISHED:
            if failure and state != CONFLICT:
                record.update(state=FAILED, reason=failure.get("error"))
            continue
        run = cell.run_dir(out)
        metrics = read_json(run / "metrics.json") or {}
        evaluation = read_json(run / "evaluation.json") or metrics.get("test") or {}
        split = (read_json(run / "run.json") or {}).get("split") or {}
        record.update(
            miou=mean_of(evaluation.get("miou")), dice=mean_of(evaluation.get("mean_foreground_dice")),
            hd95=mean_of(evaluation.get("mean_foreground_hd95")), hd95_unit=evaluation.get("hd95_unit"),
            best_val_miou=mean_of(metrics.get("best_val_mIoU")), seconds=metrics.get("seconds"),
            transunet_dice=(evaluation.get("protocols") or {}).get("transunet", {}).get("mean_dice"),
            image_mdice=(evaluation.get("protocols") or {}).get("per_image", {}).get("mdice"),
            trainable_parameters=(metrics.get("parameters") or {}).get("trainable"),
            budget=_budget(grid, cell, metrics),
            cases={name: len(split.get(name) or []) for name in ("train", "val", "test")} if split else None,
        )
        if not evaluation:
            record["reason"] = "finished without a test evaluation (evaluate_test: false or no labelled test cases)"
    return records


def _budget(grid: Grid, cell: Cell, metrics: dict[str, Any]) -> str:
    """How the cell trained: optimiser steps x batch size, and the patch (or whole image resized) it saw."""
    entry = grid.methods[cell.method]
    if entry.predict:
        return "no training: " + " + ".join([entry.predict.base, *entry.predict.ensemble]) + "'s run(s)"
    if "budget" in metrics:  # nnU-Net
        budget = metrics["budget"]
        return f"{budget['optimizer_steps']} x {budget['batch_size']}, patch {'x'.join(map(str, budget['patch_size']))}"
    config = grid.config(cell)
    steps = metrics.get("optimizer_steps", "?")  # "?": a run made before metrics.json recorded it
    return (f"{steps} x {config.batch_size}, "
            f"{config.input_mode} {config.patch_size}" + (f", model input {config.input_size}" if config.input_size else ""))


def summary(values: list[float], expected: int, states: dict[str, int], scale: float = 1.0) -> dict[str, Any]:
    """mean ± sample standard deviation (n-1) over the seeds that gave a value, and how it reads in a table."""
    values = [v * scale for v in values]
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else None
    if values:
        text = f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        text += f" (n={len(values)})" if len(values) == expected else f" (n={len(values)}/{expected})"
    else:
        missing = {FAILED: "failed", CONFLICT: "conflict", RESUMABLE: "unfinished"}
        text = next((t for s, t in missing.items() if states.get(s)), "no value" if states.get(FINISHED) else "not run")
    return {"mean": mean, "std": std, "n": len(values), "expected": expected, "values": values, "states": states, "text": text}


def summarize(records: list[dict[str, Any]], dataset: str, method: str, metric: str) -> dict[str, Any] | None:
    """The seeds of one (dataset, method) pair; None when the method does not run on the dataset."""
    chosen = [r for r in records if (r["dataset"], r["method"]) == (dataset, method)]
    states = dict(Counter(r["state"] for r in chosen))
    values = [r[metric] for r in chosen if r["state"] == FINISHED and r.get(metric) is not None]
    return summary(values, len(chosen), states, METRICS[metric][0]) if chosen else None


def _varying_options(grid: Grid, methods: list[str], dataset: str) -> dict[str, str]:
    """Per method, what an ablation varies: the training options that differ among its biosam2 methods
    on ``dataset``; for the other kinds, their own block."""
    options = {m: grid.wanted(Cell(dataset, m, grid.seeds[0])) for m in methods}
    trained = [m for m in methods if grid.methods[m].kind == "train"]
    names = sorted({k for m in trained for k in options[m]} - {"seed"} - RUNTIME_OPTIONS)
    varying = [k for k in names if len({json.dumps(options[m].get(k), sort_keys=True) for m in trained}) > 1]
    settings = {m: ", ".join(f"{k}={options[m].get(k)}" for k in varying) or "(same options)" for m in trained}
    return settings | {m: ", ".join(f"{k}={v}" for k, v in options[m].items() if k not in ("method", "seed"))
                       for m in methods if m not in trained}


def build_results(grid: Grid, records: list[dict[str, Any]], invocation: dict[str, Any]) -> dict[str, Any]:
    """The document of results.json; results.md is rendered from it alone."""
    tables = {metric: {"title": title, "rows": {m: {d: summarize(records, d, m, metric) for d in grid.datasets}
                                                for m in grid.methods}} for metric, (_, title) in METRICS.items()}
    ablations = []
    for entry in grid.ablations:
        settings = _varying_options(grid, entry.methods, entry.datasets[0])
        rows = [{"method": m, "label": grid.methods[m].label, "setting": settings[m],
                 "trainable_parameters": next((r["trainable_parameters"] for r in records if (r["method"], r["dataset"])
                                               == (m, entry.datasets[0]) and r.get("trainable_parameters")), None),
                 "miou": {d: summarize(records, d, m, "miou") for d in entry.datasets}} for m in entry.methods]
        ablations.append({"title": entry.title, "note": entry.note, "datasets": entry.datasets, "rows": rows})
    budgets = {m: {d: next((r["budget"] for r in records if (r["method"], r["dataset"]) == (m, d) and r.get("budget")), None)
                   for d in grid.datasets} for m in grid.methods}
    return {
        "grid": {"name": grid.name, "file": str(grid.file), "sha256": grid.sha256(), "description": grid.description},
        **invocation,
        "biosam2_version": __version__,
        "random_weights": grid.uses_random_weights(),
        "data_root": str(grid.data_root),
        "seeds": list(grid.seeds),
        "datasets": {name: {
            "label": e.label, "train": e.train, "note": e.note,
            "source": {"path": str(e.path)} if e.path else e.convert.model_dump(mode="json"),
            "cases": next((r["cases"] for r in records if r["dataset"] == name and r.get("cases")), None),
        } for name, e in grid.datasets.items()},
        # 2-D images and volumes without a physical spacing are evaluated in pixels or voxels
        "hd95_units": {name: {"unit": " / ".join(sorted({r["hd95_unit"] for r in records if r["dataset"] == name
                                                          and r.get("hd95_unit")})) or None} for name in grid.datasets},
        "method_labels": {name: e.label for name, e in grid.methods.items()},
        "cell_counts": dict(Counter(r["state"] for r in records)),
        "cell_seconds_total": round(sum(r.get("seconds") or 0.0 for r in records if r["state"] == FINISHED), 1),
        "tables": tables,
        "budgets": budgets,
        "reproduction": reproduction(grid, tables["miou"]["rows"], grid.uses_random_weights()),
        "ablations": ablations,
        "cells": records,
    }


def reproduction(grid: Grid, miou: dict[str, dict[str, Any]], random_weights: bool) -> dict[str, Any] | None:
    """Published figures against this grid's mean mIoU, per dataset: "reproduced" when every published
    row is within its tolerance, "not reproduced" when one is not, "not run" until each has a value;
    a grid on random weights compares nothing. None when no method of the grid has a published figure."""
    if not any(entry.published for entry in grid.methods.values()):
        return None
    rows, verdicts = [], {}
    for dataset in grid.datasets:
        states = []
        for method, entry in grid.methods.items():
            if not grid.method_runs_on(method, dataset):
                continue
            figure, measured = entry.published.get(dataset), (miou[method][dataset] or {}).get("mean")
            if figure is None:
                state = "no published figure"
            elif random_weights:
                state = "not comparable (random weights)"
            elif measured is None:
                state = "not run"
            else:
                state = "reproduced" if abs(measured - figure.miou) <= figure.tolerance else "not reproduced"
            if figure:
                states.append(state)
            rows.append({"dataset": dataset, "method": method, "published": figure and figure.model_dump(),
                         "measured": miou[method][dataset]["text"] if miou[method][dataset] else "n/a", "verdict": state})
        verdicts[dataset] = ("no published figure" if not states else next(
            (v for v in ("not comparable (random weights)", "not reproduced", "not run") if v in states), "reproduced"))
    return {"verdicts": verdicts, "rows": rows}


def table(headers: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(headers) - 1)
    return ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: the tables, and what is needed to read them without the code."""
    grid, datasets, labels, machine = results["grid"], results["datasets"], results["method_labels"], results["machine"]
    lines = [f"# Accuracy grid `{grid['name']}`", ""] + ([grid["description"].strip(), ""] if grid["description"] else [])
    lines += [
        f"- **Command**: `{results['command']}` ({results['date']})",
        f"- **Machine**: {machine['cpu']} ({machine['cpu_count']} cores), {', '.join(machine['gpus']) or 'no GPU'}; "
        f"{machine['platform']}; torch {machine['torch']}; biosam2 {results['biosam2_version']}",
        f"- **Grid file**: `{grid['file']}` (sha256 {grid['sha256'][:12]}; a copy in the output folder); data root "
        f"`{results['data_root']}`; seeds {', '.join(map(str, results['seeds']))}",
        f"- **Cells**: {sum(results['cell_counts'].values())} in the grid: "
        + ", ".join(f"{n} {s}" for s, n in sorted(results["cell_counts"].items())),
        f"- **Time**: {'in progress: ' * bool(results.get('in_progress'))}{results['wall_seconds'] / 60:.1f} min wall for "
        f"{results['cells_trained']} cell(s) trained by this command; the finished cells' own train+evaluate times "
        f"add up to {results['cell_seconds_total'] / 60:.1f} min",
    ]
    lines += ["", "> " + CAVEAT_RANDOM] if results["random_weights"] else []
    lines += ["", "Every cell is one ordinary `biosam2 train` run (`runs/<dataset>/<method>/seed<k>/`), evaluated on the "
              "dataset's test split. Entries are mean ± sample standard deviation (n-1) over seeds, n the seeds that gave "
              "a value (`n=1/2`: a seed is missing); `not run`, `failed`, `unfinished`, `conflict` mark cells without a "
              "result, `n/a` a method the grid does not run on that dataset. mIoU is the hard IoU of one confusion matrix "
              "over the whole test set, background included, averaged over classes; Dice and HD95 (MONAI) are per case "
              "over the foreground classes, then over cases; HD95 in mm where the data has a spacing, else pixels or voxels."]
    for metric, block in results["tables"].items():
        unit = {d: f" [{results['hd95_units'][d]['unit'] or '?'}]" if metric == "hd95" else "" for d in datasets}
        lines += ["", f"## {block['title']}", ""] + table(
            ["method"] + [datasets[d]["label"] + unit[d] for d in datasets],
            [[labels[m]] + [(block["rows"][m][d] or {"text": "n/a"})["text"] for d in datasets] for m in labels])
    lines += ["", "## Training budget (optimiser steps x batch size, what each step saw)", ""] + table(
        ["method"] + [datasets[d]["label"] for d in datasets],
        [[labels[m]] + [results["budgets"][m][d] or "—" for d in datasets] for m in labels], ["---"] * (1 + len(datasets)))
    if results.get("reproduction"):
        block = results["reproduction"]
        lines += ["", "## Reproduction of the published figures", "",
                  "Per dataset: " + "; ".join(f"{datasets[d]['label']}: **{v}**" for d, v in block["verdicts"].items()), ""]
        lines += table(["dataset", "method", "published mIoU (%)", "tolerance", "this grid", "verdict", "source and protocol"],
                       [[datasets[r["dataset"]]["label"], labels[r["method"]],
                         f"{r['published']['miou']:.2f}" if r["published"] else "—",
                         f"± {r['published']['tolerance']:.1f}" if r["published"] else "—", r["measured"], r["verdict"],
                         r["published"]["source"] if r["published"] else ""] for r in block["rows"]], ["---"] * 7)
    for ablation in results["ablations"]:
        lines += ["", f"## Ablation: {ablation['title']}", ""] + ([ablation["note"].strip(), ""] if ablation["note"] else [])
        lines += table(["method", "setting", "trainable params (saved model)"]
                       + [f"{datasets[d]['label']} mIoU (%)" for d in ablation["datasets"]],
                       [[r["label"], r["setting"], f"{r['trainable_parameters']:,}" if r["trainable_parameters"] else "?"]
                        + [r["miou"][d]["text"] for d in ablation["datasets"]] for r in ablation["rows"]],
                       ["---", "---", "---:"] + ["---:"] * len(ablation["datasets"]))
    rows = [[info["label"], f"`{info['source'].get('path') or info['source']['src']}`" + (
                f" (convert {info['source']['name']}, limit {info['source']['limit']}, split seed {info['source']['seed']})"
                if "name" in info["source"] else ""),
             "/".join(str(info["cases"][k]) for k in ("train", "val", "test")) if info["cases"] else "?",
             ", ".join(f"{k}={v}" for k, v in info["train"].items()) or "—", info["note"] or ""] for info in datasets.values()]
    lines += ["", "## Datasets", ""] + table(["dataset", "source", "train/val/test cases", "training options", "note"], rows, ["---"] * 5)
    value = lambda v, scale=100: "—" if v is None else f"{scale * v:.2f}"  # noqa: E731
    rows = [[c["dataset"], c["method"], str(c["seed"]), c["state"], value(c.get("miou")), value(c.get("dice")),
             value(c.get("hd95"), 1), value(c.get("best_val_miou")), value(c.get("seconds"), 1),
             (c["reason"] or "").replace("|", "/")[:160]] for c in results["cells"]]
    lines += ["", "## Cells (method options: the grid file)", ""] + table(
        ["dataset", "method", "seed", "state", "test mIoU %", "Dice %", "HD95", "best val mIoU %", "seconds", "note"],
        rows, ["---"] * 4 + ["---:"] * 5 + ["---"])
    return "\n".join(lines) + "\n"


def aggregate(grid: Grid, out: Path, invocation: dict[str, Any]) -> dict[str, Any]:
    """Read every cell; write OUT/results.json and OUT/results.md; return the results."""
    results = build_results(grid, collect(grid, out), {"date": now(), **invocation})
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, render_markdown(results))
    return results
