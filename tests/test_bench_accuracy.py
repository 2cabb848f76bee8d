"""``biosam2 bench accuracy``: grid files, cell states, aggregation, GPU scheduling, a real tiny grid."""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA

from biosam2.bench import accuracy
from biosam2.bench.accuracy import (
    CONFLICT,
    FAILED,
    FINISHED,
    NEW,
    RESUMABLE,
    Cell,
    CellOutcome,
    SubprocessLauncher,
    cell_matches,
    cell_state,
    configure_parser,
    load_grid,
    physical_gpu,
    run_from_args,
    schedule,
    shipped_grids,
)
from biosam2.bench import describe_machine
from biosam2.data.splits import kfold_splits
from biosam2.errors import ConfigError
from biosam2.training.config import TrainConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args([str(a) for a in argv])


def write_grid(folder: Path, payload: dict, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


def minimal_grid(dataset_path: str = "/nowhere/data", **changes) -> dict:
    payload = {
        "name": "t",
        "seeds": [0, 1],
        "defaults": {"weights": "random", "epochs": 1},
        "datasets": {"syn": {"path": dataset_path}},
        "methods": {"vanilla-sam2": {}, "biosam2-lw": {}},
    }
    payload.update(changes)
    return payload


# ---- grid files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"bogus": 1}, "", "unknown key(s) bogus"),
        ({"seeds": []}, "seeds", "at least 1 item"),
        ({"seeds": [0, True]}, "seeds[1]", "valid integer (got True)"),
        ({"seeds": [1, 1]}, "seeds", "listed twice"),
        ({"defaults": {"epochz": 3}}, "defaults", "unknown option(s) epochz"),
        ({"defaults": {"seed": 3}}, "defaults.seed", "comes from `seeds:`"),
        ({"defaults": {"loss": "focal"}}, "defaults", "loss='focal'"),
        ({"datasets": {"syn": {"path": "x", "convert": {"name": "isbi2012", "src": "y"}}}}, "datasets.syn", "exactly one of"),
        ({"datasets": {"syn": {"convert": {"name": "mnist", "src": "y"}}}}, "datasets.syn.convert.name", "'mnist'"),
        (
            {"datasets": {"syn": {"convert": {"name": "isbi2012", "src": "y", "options": {"nope": 1}}}}},
            "datasets.syn.convert.options",
            "no option(s) nope",
        ),
        ({"datasets": {"syn": {"convert": {"name": "kvasir-seg", "src": "y", "limit": 0}}}}, "datasets.syn.convert.limit", "greater than or equal to 1 (got 0)"),
        ({"datasets": {"syn": {"path": "x", "train": {"patch_size": 0}}}}, "datasets.syn.train", "patch_size=0"),
        ({"datasets": {"bad name": {"path": "x"}}}, "datasets.bad name", "not a usable name"),
        ({"methods": {"vanilla-sam2": {"preset": "nope"}}}, "methods.vanilla-sam2.preset", "'nope'"),
        ({"methods": {"m": {"train": {"adapter": "xx"}}}}, "methods.m.train", "adapter='xx'"),
        ({"methods": {"m": {"datasets": ["other"]}}}, "methods.m.datasets", "unknown dataset(s) other"),
        ({"methods": {"m": {"train": {"adapter_blocks": [99]}}}}, "methods.m.train", "adapter_blocks"),
        ({"ablations": [{"title": "x", "methods": ["vanilla-sam2", "ghost"]}]}, "ablations[0].methods", "unknown method(s) ghost"),
        ({"ablations": [{"methods": ["vanilla-sam2", "biosam2-lw"]}]}, "ablations[0].title", "missing"),
        ({"methods": {"p": {"predict": {"base": "ghost"}}}}, "methods.p.predict", "unknown method(s) ghost"),
        ({"methods": {"n": {"nnunet": {}, "train": {"epochs": 2}}}}, "methods.n", "give one of"),
        ({"methods": {"n": {"nnunet": {}}, "p": {"predict": {"base": "n"}}}}, "methods.p.predict", "n: not a biosam2 method"),
        ({"methods": {"n": {"nnunet": {"epochs": 0}}}}, "methods.n.nnunet.epochs", "greater than or equal to 1"),
        ({"methods": {"n": {"nnunet": {"device": "tpu"}}}}, "methods.n.nnunet.device", "'auto', 'cpu' or 'cuda'"),
        ({"methods": {"p": {"predict": {"base": "m", "postprocess": "some"}}, "m": {}}}, "methods.p.predict.postprocess", "'validated', 'none' or 'all'"),
        ({"methods": {"m": {"published": {"other": {"miou": 1.0, "tolerance": 1.0, "source": "x"}}}}}, "methods.m.published", "unknown dataset(s) other"),
    ],
)
def test_grid_errors_name_the_file_and_the_key(tmp_path, change, key, message):
    path = write_grid(tmp_path, minimal_grid(**change))
    with pytest.raises(ConfigError) as raised:
        load_grid(path)
    text = str(raised.value)
    assert text.startswith(f"{path}: {key}" if key else f"{path}:"), text
    assert message in text, text


def test_values_are_checked_in_each_cells_merged_options(tmp_path):
    # adapter_blocks [20] is wrong for tiny (12 blocks) but right for large (48): judged together
    grid = minimal_grid(defaults={"weights": "random", "size": "large"}, methods={"m": {"train": {"adapter_blocks": [20]}}})
    load_grid(write_grid(tmp_path, grid))
    grid["methods"]["m"]["train"]["adapter_blocks"] = [60]
    with pytest.raises(ConfigError, match=r"grid.yaml: methods\.m\.train: .*adapter_blocks=\[60\]"):
        load_grid(write_grid(tmp_path, grid))
    grid["methods"]["m"]["train"]["adapter_blocks"] = [20]
    grid["datasets"]["syn"]["train"] = {"size": "tiny"}  # fine alone, wrong with the method's blocks
    with pytest.raises(ConfigError, match=r"grid.yaml: methods\.m on datasets\.syn: .*adapter_blocks"):
        load_grid(write_grid(tmp_path, grid))


def test_options_merge_in_the_documented_order(tmp_path):
    grid = load_grid(write_grid(tmp_path, minimal_grid(
        defaults={"weights": "random", "epochs": 5, "lr": 0.1, "patch_size": 96},
        datasets={"syn": {"path": "/d", "train": {"epochs": 7, "patch_size": 64}}},
        methods={"hp-r": {"preset": "biosam2-hp", "train": {"adapter_ratio": 0.5, "epochs": 9}}},
    )))
    config = grid.config(Cell("syn", "hp-r", 1))
    assert (config.epochs, config.lr, config.patch_size, config.adapter, config.adapter_ratio, config.seed) == (9, 0.1, 64, "hp", 0.5, 1)
    assert grid.methods["hp-r"].preset == "biosam2-hp"
    assert load_grid(write_grid(tmp_path, minimal_grid())).methods["vanilla-sam2"].preset == "vanilla-sam2"  # name = preset


def test_relative_paths_resolve_against_data_root_and_data_root_against_the_current_directory(tmp_path, monkeypatch):
    payload = minimal_grid(
        data_root="shared",
        datasets={"a": {"convert": {"name": "isbi2012", "src": "isbi"}}, "b": {"path": "/abs/b"}},
    )
    (tmp_path / "elsewhere").mkdir()
    path = write_grid(tmp_path / "elsewhere", payload)  # not relative to the YAML's folder
    monkeypatch.chdir(tmp_path)
    grid = load_grid(path)
    assert grid.data_root == tmp_path / "shared"
    assert grid.datasets["a"].convert.src == tmp_path / "shared" / "isbi"
    assert grid.datasets["b"].path == Path("/abs/b")
    moved = load_grid(path, data_root=tmp_path / "other")
    assert moved.datasets["a"].convert.src == tmp_path / "other" / "isbi" and moved.data_root_origin == "--data-root"


def test_shipped_grids_load_by_name_and_hold_the_promised_protocol():
    assert {"paper", "cpu-smoke"} <= set(shipped_grids())
    paper = load_grid("paper")
    assert list(paper.datasets) == ["isbi2012", "kvasir-seg", "synapse", "acdc"]
    assert paper.seeds == (0, 1, 2)
    config = paper.config(Cell("kvasir-seg", "biosam2-hp", 0))
    assert (config.epochs, config.batch_size, config.lr, config.loss, config.weights) == (200, 8, 1e-4, "ce", "meta")
    assert config.input_size == 224 and paper.config(Cell("isbi2012", "vanilla-sam2", 0)).input_size == 256
    isbi = paper.config(Cell("isbi2012", "biosam2-hp", 0))  # G-SAM: resized to 256, then 128-px random crops
    assert (isbi.input_size, isbi.input_mode, isbi.patch_size) == (256, "crop", 128)
    for method in ["vanilla-sam2", "biosam2-hp", "biosam2-lw", "adaptformer", "lora", "full-finetune"]:
        assert method in paper.methods
    ratios = {paper.config(Cell("isbi2012", m, 0)).adapter_ratio for m in paper.ablations[2].methods}
    assert ratios == {0.125, 0.25, 0.5}
    assert paper.datasets["synapse"].convert.src.name == "Synapse"
    assert not paper.uses_random_weights()

    smoke = load_grid("cpu-smoke")
    assert len(smoke.seeds) == 2 and smoke.uses_random_weights()
    assert {smoke.config(cell).num_workers for cell in smoke.cells()} == {0}
    assert all(smoke.config(cell).limit_train_batches for cell in smoke.cells())
    assert all(len(table.methods) >= 2 for table in smoke.ablations) and len(smoke.ablations) >= 2


def test_unknown_grid_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="not the name of a shipped grid .*paper"):
        load_grid("no-such-grid")


def test_only_filters_by_dataset_method_and_seed():
    cell = Cell("isbi2012", "biosam2-hp", 1)
    assert cell_matches(cell, None)
    assert cell_matches(cell, ["isbi2012"]) and cell_matches(cell, ["isbi2012/biosam2-*"])
    assert cell_matches(cell, ["kvasir-seg", "*/biosam2-hp/seed1"])
    assert not cell_matches(cell, ["isbi2012/biosam2-hp/seed0"]) and not cell_matches(cell, ["acdc"])


# ---- cell states --------------------------------------------------------------------------------
def _fake_run(run: Path, config: TrainConfig, *, finished: bool, checkpoint: bool = True) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config.to_yaml())
    if checkpoint:
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if finished:
        (run / "metrics.json").write_text("{}")


def test_cell_states(tmp_path):
    config = TrainConfig(weights="random", epochs=3)
    wanted = config.to_dict()
    assert cell_state(tmp_path / "absent", wanted).state == NEW
    (tmp_path / "empty").mkdir()
    assert cell_state(tmp_path / "empty", wanted).state == NEW

    _fake_run(tmp_path / "done", config, finished=True)
    assert cell_state(tmp_path / "done", wanted).state == FINISHED
    _fake_run(tmp_path / "half", config, finished=False)
    assert cell_state(tmp_path / "half", wanted).state == RESUMABLE

    # the run belongs to another configuration: its results are not this cell's
    other = cell_state(tmp_path / "done", TrainConfig(weights="random", epochs=5).to_dict())
    assert other.state == CONFLICT and "epochs: run has 3, grid asks 5" in other.reason
    # where it ran is not what it computed
    moved = TrainConfig(weights="random", epochs=3, devices=1, num_workers=7, accelerator="gpu").to_dict()
    assert cell_state(tmp_path / "done", moved).state == FINISHED

    _fake_run(tmp_path / "no-ckpt", config, finished=False, checkpoint=False)
    stuck = cell_state(tmp_path / "no-ckpt", wanted)
    assert stuck.state == CONFLICT and "neither metrics.json" in stuck.reason and "config.yaml" in stuck.reason
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    assert cell_state(tmp_path / "junk", wanted).state == CONFLICT
    (tmp_path / "file").write_text("x")
    assert cell_state(tmp_path / "file", wanted).state == CONFLICT


# ---- aggregation ----------------------------------------------------------------------------------
def _fabricate(out: Path, grid, cell: Cell, miou: float, dice: float | None, hd95: float | None, unit: str = "pixels") -> None:
    run = cell.run_dir(out)
    _fake_run(run, grid.config(cell), finished=True)
    evaluation = {
        "miou": miou, "hd95_unit": unit, "num_cases": 3,
        "mean_foreground_dice": {"mean": dice, "std": 0.0, "count": 3},
        "mean_foreground_hd95": {"mean": hd95, "std": 0.0, "count": 3},
        "protocols": {"transunet": {"mean_dice": miou / 2}, "per_image": {"mdice": dice}},
    }
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    (run / "metrics.json").write_text(json.dumps({
        "best_val_mIoU": miou, "epochs_trained": 1, "seconds": 10.0,
        "parameters": {"total": 1000, "trainable": 100 if cell.method == "a" else 10}, "test": evaluation,
    }))
    (run / "run.json").write_text(json.dumps({"split": {"train": ["x"] * 4, "val": ["y"], "test": ["z"] * 3}}))


def _aggregate(grid, out: Path) -> None:
    """The tables of fabricated runs, without training the cells that are still new."""
    invocation = {"command": "biosam2 bench accuracy grid.yaml", "machine": describe_machine(), "cells_trained": 0,
                  "wall_seconds": 1.0}
    accuracy.aggregate(grid, out, invocation)


def test_aggregation_means_stds_counts_and_missing_cells(tmp_path):
    path = write_grid(tmp_path, {
        "seeds": [0, 1, 2],
        "defaults": {"weights": "random", "epochs": 1},
        "datasets": {"d1": {"path": "/d1"}, "d2": {"path": "/d2"}},
        "methods": {"a": {"preset": "biosam2-lw"}, "b": {"preset": "vanilla-sam2"}, "c": {"preset": "peg-only", "datasets": ["d1"]}},
        "ablations": [{"title": "A vs B", "methods": ["a", "b"]}],
    })
    grid = load_grid(path)
    out = tmp_path / "out"
    for seed, miou in enumerate([0.50, 0.60, 0.70]):
        _fabricate(out, grid, Cell("d1", "a", seed), miou, dice=0.8, hd95=2.0 + seed)
    _fabricate(out, grid, Cell("d1", "b", 0), 0.40, dice=None, hd95=None)
    _fabricate(out, grid, Cell("d2", "a", 0), 0.90, dice=0.5, hd95=1.0, unit="mm")
    failure = Cell("d2", "b", 0).failure_file(out)
    failure.parent.mkdir(parents=True)
    failure.write_text(json.dumps({"error": "RuntimeError: boom"}))

    _aggregate(grid, out)
    results = json.loads((out / "results.json").read_text())
    cell = results["tables"]["miou"]["rows"]["a"]["d1"]
    assert cell["n"] == 3 and cell["expected"] == 3
    assert cell["mean"] == pytest.approx(60.0) and cell["std"] == pytest.approx(10.0)  # sample std (n-1)
    assert cell["text"] == "60.00 ± 10.00 (n=3)"
    assert results["tables"]["hd95"]["rows"]["a"]["d1"]["mean"] == pytest.approx(3.0)
    assert results["tables"]["transunet_dice"]["rows"]["a"]["d1"]["text"] == "30.00 ± 5.00 (n=3)"
    assert results["tables"]["image_mdice"]["rows"]["b"]["d1"]["text"] == "no value"
    assert results["tables"]["miou"]["rows"]["b"]["d1"]["text"] == "40.00 (n=1/3)"
    assert results["tables"]["dice"]["rows"]["b"]["d1"]["text"] == "no value"
    assert results["tables"]["miou"]["rows"]["b"]["d2"]["text"] == "failed"
    assert results["tables"]["miou"]["rows"]["c"]["d2"] is None  # not run on d2 by design
    assert results["tables"]["miou"]["rows"]["c"]["d1"]["text"] == "not run"
    assert results["hd95_units"]["d1"]["unit"] == "pixels" and results["hd95_units"]["d2"]["unit"] == "mm"
    assert results["random_weights"] is True
    table = results["ablations"][0]
    assert table["datasets"] == ["d1", "d2"] and [r["method"] for r in table["rows"]] == ["a", "b"]
    assert "adapter=lw" in table["rows"][0]["setting"] and "pos_encoding=sam2" in table["rows"][1]["setting"]
    assert table["rows"][0]["trainable_parameters"] == 100

    markdown = (out / "results.md").read_text()
    assert "| a | 60.00 ± 10.00 (n=3) | 90.00 (n=1/3) |" in markdown
    assert "failed" in markdown and "not run" in markdown and "n/a" in markdown
    assert "random weights on cpu say nothing about the paper's accuracy with pretrained weights" in markdown.lower()
    assert "biosam2 bench accuracy" in markdown and results["biosam2_version"] in markdown
    assert "d2 [mm]" in markdown and "d1 [pixels]" in markdown
    assert "RuntimeError: boom" in markdown


def test_published_figures_are_reproduced_within_their_tolerance_or_say_why_not(tmp_path):
    figure = {"tolerance": 5.0, "source": "a paper, its protocol"}
    payload = {
        "seeds": [0, 1], "defaults": {"weights": "meta", "epochs": 1},
        "datasets": {"d1": {"path": "/d1"}, "d2": {"path": "/d2"}, "d3": {"path": "/d3"}},
        "methods": {"a": {"preset": "biosam2-hp", "published": {"d1": {"miou": 60.0, **figure}, "d2": {"miou": 50.0, **figure},
                                                               "d3": {"miou": 70.0, **figure}}},
                    "b": {"preset": "vanilla-sam2"}},
    }
    grid = load_grid(write_grid(tmp_path, payload))
    out = tmp_path / "out"
    for seed, miou in enumerate([0.55, 0.60]):  # mean 57.5: 2.5 points from 60
        _fabricate(out, grid, Cell("d1", "a", seed), miou, dice=0.8, hd95=1.0)
    _fabricate(out, grid, Cell("d2", "a", 0), 0.40, dice=0.8, hd95=1.0)  # 10 points from 50
    _fabricate(out, grid, Cell("d1", "b", 0), 0.99, dice=0.8, hd95=1.0)
    _aggregate(grid, out)
    block = json.loads((out / "results.json").read_text())["reproduction"]
    assert block["verdicts"] == {"d1": "reproduced", "d2": "not reproduced", "d3": "not run"}
    verdict = {(r["dataset"], r["method"]): r["verdict"] for r in block["rows"]}
    assert verdict[("d1", "b")] == "no published figure" and verdict[("d2", "a")] == "not reproduced"
    markdown = (out / "results.md").read_text()
    assert "| d1 | a | 60.00 | ± 5.0 | 57.50 ± 3.54 (n=2) | reproduced | a paper, its protocol |" in markdown

    # random weights reproduce nothing, whatever the numbers
    payload["defaults"]["weights"] = "random"
    grid = load_grid(write_grid(tmp_path, payload, "random.yaml"))
    _aggregate(grid, tmp_path / "random")
    verdicts = json.loads((tmp_path / "random" / "results.json").read_text())["reproduction"]["verdicts"]
    assert set(verdicts.values()) == {"not comparable (random weights)"}


def test_the_paper_grid_states_the_published_figures_and_says_not_run_until_run(tmp_path):
    grid = load_grid("paper", data_root=tmp_path)
    _aggregate(grid, tmp_path / "out")
    block = json.loads((tmp_path / "out" / "results.json").read_text())["reproduction"]
    assert block["verdicts"] == {"isbi2012": "not run", "kvasir-seg": "not run", "synapse": "not run", "acdc": "not run"}
    published = {(r["dataset"], r["method"]): r["published"]["miou"] for r in block["rows"] if r["published"]}
    # HP as published; vanilla SAM2 as HP minus the published gain (METHOD.md)
    assert published == {("isbi2012", "biosam2-hp"): 77.51, ("isbi2012", "vanilla-sam2"): 57.85,
                         ("kvasir-seg", "biosam2-hp"): 85.84, ("kvasir-seg", "vanilla-sam2"): 82.99,
                         ("synapse", "biosam2-hp"): 66.62, ("synapse", "vanilla-sam2"): 61.11,
                         ("acdc", "biosam2-hp"): 85.20, ("acdc", "vanilla-sam2"): 81.14}
    others = {r["verdict"] for r in block["rows"] if not r["published"]}
    assert others == {"no published figure"}
    assert grid.methods["nnunet-2d"].nnunet.epochs == 1000  # nnU-Net's default budget, for a GPU machine


def test_hd95_is_reported_in_the_unit_the_evaluations_give(tmp_path):
    # volumes without a physical spacing (dataset.json "spacing": "unknown") are evaluated in voxels
    path = write_grid(tmp_path, minimal_grid(datasets={"vol": {"path": "/vol"}, "ct": {"path": "/ct"}}))
    grid = load_grid(path)
    out = tmp_path / "out"
    _fabricate(out, grid, Cell("vol", "vanilla-sam2", 0), 0.5, dice=0.6, hd95=4.0, unit="voxels")
    _fabricate(out, grid, Cell("ct", "vanilla-sam2", 0), 0.5, dice=0.6, hd95=2.5, unit="mm")
    _aggregate(grid, out)
    results = json.loads((out / "results.json").read_text())
    assert results["hd95_units"] == {"vol": {"unit": "voxels"}, "ct": {"unit": "mm"}}
    assert "| method | vol [voxels] | ct [mm] |" in (out / "results.md").read_text()


def test_missing_data_stops_clearly_before_anything_runs(tmp_path):
    path = write_grid(tmp_path, minimal_grid(dataset_path=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match=r"data not found \(syn: .*absent holds no dataset.json\).*--data-root.*--only"):
        run_from_args(parse(path, "--out", tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_dry_run_lists_datasets_and_cell_states_and_changes_nothing(tmp_path, capsys):
    path = write_grid(tmp_path, minimal_grid())
    grid = load_grid(path)
    out = tmp_path / "out"
    _fake_run(Cell("syn", "biosam2-lw", 0).run_dir(out), grid.config(Cell("syn", "biosam2-lw", 0)), finished=False)
    before = sorted(p for p in out.rglob("*"))
    assert run_from_args(parse(path, "--out", out, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "syn/vanilla-sam2/seed0" in printed and "MISSING" in printed
    assert "syn/biosam2-lw/seed0                             resumable" in printed
    assert sorted(p for p in out.rglob("*")) == before


# ---- GPU scheduling -------------------------------------------------------------------------------
def test_schedule_runs_every_cell_once_never_two_at_a_time_on_a_gpu_and_survives_failures():
    cells = [Cell("d", f"m{i}", 0) for i in range(7)]
    running: dict[str, int] = {}
    seen: list[tuple[str, str]] = []
    overlap = []
    lock = threading.Lock()

    def fake_launch(cell: Cell, slot: str) -> CellOutcome:
        with lock:
            running[slot] = running.get(slot, 0) + 1
            if running[slot] > 1:
                overlap.append(slot)
            seen.append((cell.key, slot))
        time.sleep(0.02 * (1 + int(cell.method[1:]) % 3))
        with lock:
            running[slot] -= 1
        if cell.method == "m3":
            raise RuntimeError("CUDA out of memory")
        return CellOutcome(cell, FINISHED if cell.method != "m5" else FAILED, 0.1, None if cell.method != "m5" else "exit 1")

    lines: list[str] = []
    outcomes = schedule(cells, ["0", "1", "1"], fake_launch, report=lines.append)
    assert [o.cell for o in outcomes] == cells
    assert sorted(key for key, _ in seen) == sorted(c.key for c in cells)  # each once
    assert not overlap or set(overlap) <= {"1"}  # slot "1" appears twice: two workers share GPU 1 on purpose
    assert {slot for _, slot in seen} == {"0", "1"}
    assert outcomes[3].status == FAILED and "CUDA out of memory" in outcomes[3].error
    assert outcomes[5].status == FAILED and all(o.status == FINISHED for i, o in enumerate(outcomes) if i not in (3, 5))
    assert any("[gpu 0]" in line for line in lines)


def test_workers_are_pinned_to_their_gpu_by_environment(tmp_path):
    grid = load_grid(write_grid(tmp_path, minimal_grid()))
    launcher = SubprocessLauncher(grid, tmp_path / "out", parent_visible_devices=None)
    command = launcher.command(Cell("syn", "biosam2-lw", 1))
    assert command[1:5] == ["-m", "biosam2", "bench", "accuracy"] and command[command.index("--run-cell") + 1] == "syn/biosam2-lw/seed1"
    assert command[5] == str(grid.file) and Path(command[command.index("--data-root") + 1]).is_absolute()
    assert launcher.environment("1")["CUDA_VISIBLE_DEVICES"] == "1"
    # under a scheduler that already restricts devices, index 1 is the second visible one
    assert physical_gpu("1", "4,5") == "5" and physical_gpu("0", "") == "0"
    with pytest.raises(ConfigError, match="only 2 device"):
        physical_gpu("2", "4,5")
    with pytest.raises(ConfigError, match="--gpus"):
        accuracy.parse_gpus("a,b")


def test_stopping_workers_interrupts_them_like_ctrl_c(tmp_path):
    import subprocess
    import sys

    grid = load_grid(write_grid(tmp_path, minimal_grid()))
    launcher = SubprocessLauncher(grid, tmp_path / "out")
    # A stand-in worker; like the real one (python -m biosam2 bench accuracy --run-cell) it takes SIGINT as Ctrl-C
    # even when the suite runs with SIGINT ignored (nohup ... &).
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    raise SystemExit(42)")
    process = subprocess.Popen([sys.executable, "-c", code])
    launcher._running.add(process)
    time.sleep(0.5)  # let it reach the sleep
    launcher.stop(grace_seconds=20)
    assert process.wait(timeout=5) == 42  # SIGINT: a training worker would keep its last checkpoint


def test_a_worker_that_dies_silently_fails_its_cell_with_a_record(tmp_path):
    grid = load_grid(write_grid(tmp_path, minimal_grid()))
    out = tmp_path / "out"
    launcher = SubprocessLauncher(grid, out, python="false")  # exits 1 at once, writes nothing
    cell = Cell("syn", "biosam2-lw", 0)
    outcome = launcher(cell, "0")
    assert outcome.status == FAILED and "exited with status 1" in outcome.error
    assert json.loads(cell.failure_file(out).read_text())["error"] == outcome.error
    assert "on GPU slot 0" in cell.log_file(out).read_text()


def test_gpus_are_checked_against_what_torch_sees(tmp_path, monkeypatch):
    path = write_grid(tmp_path, minimal_grid())
    monkeypatch.setattr(accuracy.cli, "_visible_gpu_count", lambda: 0)
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_from_args(parse(path, "--out", tmp_path / "out", "--gpus", "0"))
    monkeypatch.setattr(accuracy.cli, "_visible_gpu_count", lambda: 2)
    with pytest.raises(ConfigError, match="indices 0..1"):
        run_from_args(parse(path, "--out", tmp_path / "out", "--gpus", "0,2"))


# ---- a real grid, end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    from biosam2.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("bench")
    data = write_synthetic_dataset(root / "syn", train=4, val=2, test=2, max_side=80, min_side=64)
    path = write_grid(root, {
        "name": "tiny",
        "description": "two methods, one seed, one epoch",
        "seeds": [0],
        "defaults": {"weights": "random", "epochs": 1, "batch_size": 2, "patch_size": 64, "lr": 1e-3, "num_workers": 0,
                     "overlays": 0, "limit_train_batches": 2},
        "datasets": {"syn": {"label": "Synthetic", "path": str(data)}},
        # predict: cells listed first, to show that they still run after the runs they use
        "methods": {"lw-twice": {"predict": {"base": "biosam2-lw", "ensemble": ["biosam2-lw"]}},
                    "lw-tta": {"predict": {"base": "biosam2-lw", "tta": True, "postprocess": "none"}},
                    "vanilla-sam2": {}, "biosam2-lw": {"label": "LW"}},
        "ablations": [{"title": "LW vs decoder-only", "methods": ["biosam2-lw", "vanilla-sam2"]}],
    })
    return path, root / "out"


def test_a_tiny_grid_runs_resumes_skips_and_aggregates(tiny_grid, monkeypatch):
    path, out = tiny_grid
    calls: list[tuple[str, bool]] = []
    real = accuracy.cells._call_train

    def counting(data, run, config, *, resume, progress_bar):
        calls.append((str(run.relative_to(out)), resume))
        return real(data, run, config, resume=resume, progress_bar=progress_bar)

    monkeypatch.setattr(accuracy.cells, "_call_train", counting)
    assert run_from_args(parse(path, "--out", out)) == 0
    assert calls == [("runs/syn/vanilla-sam2/seed0", False), ("runs/syn/biosam2-lw/seed0", False)]
    results = json.loads((out / "results.json").read_text())
    assert results["cell_counts"] == {"finished": 4}
    for method in ("vanilla-sam2", "biosam2-lw"):
        entry = results["tables"]["miou"]["rows"][method]["syn"]
        assert entry["n"] == 1 and 0 <= entry["mean"] <= 100
    # a run ensembled with itself predicts what it predicts alone, through its own prediction and evaluation
    miou = {c["method"]: c["miou"] for c in results["cells"]}
    assert miou["lw-twice"] == pytest.approx(miou["biosam2-lw"], abs=1e-9)
    twice = out / "runs/syn/lw-twice/seed0"
    assert sorted(p.name for p in (twice / "test_predictions").iterdir()) == sorted(
        p.name for p in (out / "runs/syn/biosam2-lw/seed0/test_predictions").iterdir())
    assert json.loads((out / "runs/syn/lw-tta/seed0/evaluation.json").read_text())["num_cases"] == 2
    budgets = results["budgets"]
    assert budgets["biosam2-lw"]["syn"].startswith("2 x 2, crop 64") and budgets["lw-tta"]["syn"] == "no training: biosam2-lw's run(s)"
    assert results["hd95_units"]["syn"]["unit"] == "pixels"
    assert (out / "grid.yaml").read_text() == path.read_text()
    markdown = (out / "results.md").read_text()
    assert "## Ablation: LW vs decoder-only" in markdown and "| LW |" in markdown

    # again: nothing is trained, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/metrics.json")}
    calls.clear()
    assert run_from_args(parse(path, "--out", out)) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/metrics.json")} == stamps

    # an interrupted cell (checkpoint, no metrics.json) is resumed, not restarted
    (out / "runs/syn/biosam2-lw/seed0/metrics.json").unlink()
    assert run_from_args(parse(path, "--out", out, "--only", "syn/biosam2-*")) == 0
    assert calls == [("runs/syn/biosam2-lw/seed0", True)]
    results = json.loads((out / "results.json").read_text())
    assert results["cells_trained"] == 1 and results["interrupted"] is False
    assert results["command"].endswith("--only 'syn/biosam2-*'")


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(tiny_grid, monkeypatch, tmp_path):
    path, _ = tiny_grid
    out = tmp_path / "out"

    def flaky(data, run, config, *, resume, progress_bar):
        if config.adapter == "lw":
            raise RuntimeError("simulated crash")
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(config.to_yaml())
        (run / "metrics.json").write_text(json.dumps({"test": {"miou": 0.5, "hd95_unit": "pixels"}}))
        return {}

    monkeypatch.setattr(accuracy.cells, "_call_train", flaky)
    assert run_from_args(parse(path, "--out", out)) == 1
    record = json.loads(Cell("syn", "biosam2-lw", 0).failure_file(out).read_text())
    assert "simulated crash" in record["error"] and record["traceback"]
    results = json.loads((out / "results.json").read_text())
    assert results["tables"]["miou"]["rows"]["biosam2-lw"]["syn"]["text"] == "failed"
    assert results["tables"]["miou"]["rows"]["vanilla-sam2"]["syn"]["text"] == "50.00 (n=1)"


@pytest.mark.slow  # two fresh Python processes: ~12 s on 2 idle cores, much more on a busy machine
def test_gpu_workers_run_cells_in_separate_processes(tiny_grid, monkeypatch, tmp_path):
    """--gpus end to end: worker processes with CUDA_VISIBLE_DEVICES set (on this CPU machine they
    see no GPU and train on the CPU, which is exactly what a pinned worker without that GPU would do)."""
    path, _ = tiny_grid
    out = tmp_path / "out"
    monkeypatch.setattr(accuracy.cli, "_visible_gpu_count", lambda: 2)
    assert run_from_args(parse(path, "--out", out, "--gpus", "0,1")) == 0
    for method in ("vanilla-sam2", "biosam2-lw"):
        log = Cell("syn", method, 0).log_file(out).read_text()
        assert "--run-cell syn/" + method in log and "finished" in log
    assert json.loads((out / "results.json").read_text())["cells_trained"] == 2


def test_a_converted_dataset_is_made_once_and_reused(tmp_path, monkeypatch):
    source = SHARED_DATA / "isbi2012"
    if not source.exists():
        pytest.skip(f"{source} is not available (real data lives in ../shared beside the repository)")
    payload = minimal_grid(datasets={"isbi": {"convert": {"name": "isbi2012", "src": str(source)}}})
    grid = load_grid(write_grid(tmp_path, payload))
    out = tmp_path / "out"
    first = accuracy.prepare_dataset(grid.datasets["isbi"], out)
    assert first == out / "data" / "isbi" and (first / "dataset.json").is_file()
    stamp = (first / "dataset.json").stat().st_mtime_ns
    assert accuracy.prepare_dataset(grid.datasets["isbi"], out) == first
    assert (first / "dataset.json").stat().st_mtime_ns == stamp
    # k folds (nnU-Net's, over train+val) replace the converter's single fold, in another copy
    folded = load_grid(write_grid(tmp_path, minimal_grid(datasets={"isbi": {"convert": {"name": "isbi2012", "src": str(source),
                                                                                          "folds": 3}}}), "folded.yaml"))
    made = accuracy.prepare_dataset(folded.datasets["isbi"], tmp_path / "folded")
    cases = sorted(p.name.removesuffix("_0000.png") for p in (made / "imagesTr").glob("*_0000.png"))
    assert json.loads((made / "splits_final.json").read_text()) == kfold_splits(cases, 3)
    # the grid now asks for other data: refused, never silently mixed with runs made on the old copy
    payload["datasets"]["isbi"]["convert"]["limit"] = 2
    changed = load_grid(write_grid(tmp_path, payload))
    with pytest.raises(ConfigError, match="converted with .*delete"):
        accuracy.prepare_dataset(changed.datasets["isbi"], out)
    # ... and so is a copy made by a converter that has changed since
    import biosam2.data.convert

    monkeypatch.setattr(biosam2.data.convert, "CONVERTER_FORMAT_VERSION", biosam2.data.convert.CONVERTER_FORMAT_VERSION + 1)
    with pytest.raises(ConfigError, match="format_version.*delete"):
        accuracy.prepare_dataset(grid.datasets["isbi"], out)


def test_cpu_smoke_grid_lists_its_cells_on_the_shared_data(tmp_path, capsys):
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not available (real data lives in ../shared beside the repository)")
    assert run_from_args(parse("cpu-smoke", "--out", tmp_path / "out", "--data-root", SHARED_DATA, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "MISSING" not in printed and "isbi2012/biosam2-hp/seed1" in printed


def test_math_of_summary_with_one_value_has_no_std():
    one = accuracy.summary([0.5], expected=2, states={FINISHED: 1, NEW: 1}, scale=100)
    assert one["std"] is None and one["text"] == "50.00 (n=1/2)"
    assert math.isclose(accuracy.summary([0.1, 0.3], 2, {})["std"], math.sqrt(0.02))


def test_a_worker_started_with_sigint_ignored_still_stops_on_one_sigint(tmp_path):
    """A grid run with `nohup ... &` ignores SIGINT and its workers inherit that: they must restore it,
    since the launcher stops them with exactly one SIGINT each."""
    import signal
    import subprocess

    from biosam2.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "syn", train=4, val=2, test=2, max_side=80, min_side=64)
    grid = load_grid(write_grid(tmp_path, minimal_grid(str(data), seeds=[0], defaults={
        "weights": "random", "epochs": 500, "batch_size": 2, "patch_size": 64, "num_workers": 0, "overlays": 0,
    })))
    command = SubprocessLauncher(grid, tmp_path / "out").command(Cell("syn", "biosam2-lw", 0))
    worker = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what nohup ... & leaves
    )
    try:
        deadline = time.time() + 120
        checkpoint = tmp_path / "out" / "runs" / "syn" / "biosam2-lw" / "seed0" / "checkpoints" / "last.ckpt"
        while not checkpoint.exists() and worker.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # training has started: the resume point is written before the first epoch
        assert checkpoint.exists(), worker.communicate(timeout=5)[0][-3000:] if worker.poll() is not None else "not started"
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 130  # stopped like Ctrl-C, 500 epochs not trained
    finally:
        if worker.poll() is None:
            worker.kill()


def test_sigterm_to_the_scheduler_stops_the_workers_like_ctrl_c():
    """`kill PID` of a grid started with nohup: one SIGINT per worker, as for Ctrl-C."""
    import os
    import signal
    import threading

    from biosam2.bench.accuracy.cells import schedule

    started, stopped = threading.Event(), threading.Event()

    def launch(cell, slot):  # a cell that runs until it is stopped
        started.set()
        stopped.wait(timeout=30)
        return CellOutcome(cell, "failed", error="stopped")

    launch.stop = stopped.set
    threading.Timer(0.5, lambda: started.wait(10) and os.kill(os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(KeyboardInterrupt):
        schedule([Cell("syn", "biosam2-lw", 0)], ["0"], launch, report=lambda message: None)
    assert stopped.is_set()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
