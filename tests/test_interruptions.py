"""Interrupted training loses at most one epoch: SIGKILL, Ctrl-C, a full disk; runs repeat exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from biosam2.cli import main
from biosam2.data.synthetic import write_synthetic_dataset
from biosam2.training import TrainConfig, train

OPTIONS = ["--weights", "random", "--adapter", "lw", "--epochs", "3", "--batch-size", "2", "--patch-size", "64", "--lr", "1e-3", "--num-workers", "0", "--no-progress"]
CONFIG = TrainConfig(weights="random", adapter="lw", epochs=3, batch_size=2, patch_size=64, lr=1e-3, num_workers=0)
STEPS_PER_EPOCH = 4  # 8 training images, batch 2


def comparable(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("seconds")  # wall-clock times differ from run to run; everything else must not
    metrics.pop("val_inference_seconds")
    metrics["test"].pop("inference_seconds")
    return metrics


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train=8, val=2, test=2, max_side=80)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "straight"
    train(dataset, run, CONFIG, progress_bar=False)
    return run


def cli_with_signal_at_step(dataset: Path, run: Path, step: int, signal_name: str) -> subprocess.CompletedProcess:
    """``biosam2 train`` in a child process that sends itself a signal in the middle of an epoch."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, even under nohup
        import lightning as L
        import biosam2.training.run as run_module
        from biosam2.cli import main

        class SignalAtStep(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == {step}:
                    os.kill(os.getpid(), signal.{signal_name})

        original = run_module.train
        run_module.train = lambda *a, **k: original(*a, callbacks=[SignalAtStep()], **k)
        sys.exit(main({["train", str(dataset), "--out", str(run), *OPTIONS]!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def test_same_seed_gives_identical_metrics(dataset, uninterrupted, tmp_path):
    again = tmp_path / "again"
    train(dataset, again, CONFIG, progress_bar=False)
    assert comparable(again) == comparable(uninterrupted)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(dataset, uninterrupted, tmp_path):
    run = tmp_path / "killed"
    killed = cli_with_signal_at_step(dataset, run, STEPS_PER_EPOCH + 2, "SIGKILL")  # in the middle of epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS_PER_EPOCH  # the end of epoch 1: at most one epoch lost
    assert not (run / "metrics.json").exists()

    assert main(["train", str(dataset), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert comparable(run) == comparable(uninterrupted)


def test_ctrl_c_stops_cleanly_with_a_resumable_checkpoint(dataset, uninterrupted, tmp_path):
    run = tmp_path / "interrupted"
    interrupted = cli_with_signal_at_step(dataset, run, 2, "SIGINT")  # during the very first epoch
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "continue with --resume" in interrupted.stderr
    assert "after 0 finished epoch(s)" in interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 0  # the resume point written before the first epoch
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert comparable(run) == comparable(uninterrupted)


def test_a_full_disk_leaves_the_previous_checkpoint_intact_and_says_so(dataset, tmp_path, monkeypatch, capsys):
    run = tmp_path / "full-disk"
    train(dataset, run, TrainConfig(**{**CONFIG.to_dict(), "epochs": 1}), progress_bar=False)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    (run / "config.yaml").write_text(CONFIG.to_yaml())  # continue to 3 epochs

    def no_space_left(obj, destination, *args, **kwargs):
        with open(destination, "wb") as stream:
            stream.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space_left)
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "last.ckpt: could not be written (No space left on device)" in err
    assert "previous checkpoint, if any, is intact" in err and "Traceback" not in err
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_ctrl_c_in_the_second_epoch_says_one_epoch_is_saved(dataset, tmp_path):
    interrupted = cli_with_signal_at_step(dataset, tmp_path / "run", STEPS_PER_EPOCH + 1, "SIGINT")
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "after 1 finished epoch(s)" in interrupted.stderr, interrupted.stderr[-2000:]


def _lock_holder(run: Path) -> subprocess.Popen:
    """A child process that takes the run's lock the way `train` does, then sleeps."""
    script = textwrap.dedent(f"""
        import sys, time
        from biosam2.atomic_io import directory_lock
        with directory_lock({str(run)!r}):
            print("locked", flush=True)
            time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_training_into_a_locked_run_refuses_naming_the_first(dataset, tmp_path, capsys):
    run = tmp_path / "busy"
    run.mkdir()
    holder = _lock_holder(run)
    try:
        for extra in ([], ["--resume"]):
            assert main(["train", str(dataset), "--out", str(run), *OPTIONS, *extra]) == 2
            err = capsys.readouterr().err
            assert "another training is running into this run directory" in err and f"pid {holder.pid}" in err, err
            assert "Traceback" not in err
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_sigkilled_training_does_not_block_resume(dataset, uninterrupted, tmp_path):
    run = tmp_path / "killed-holder"
    killed = cli_with_signal_at_step(dataset, run, STEPS_PER_EPOCH + 1, "SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    assert (run / ".lock").exists()  # the lock file stays; the OS released the lock with the process
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert comparable(run) == comparable(uninterrupted)


def test_ranks_after_the_first_do_not_take_the_lock(dataset, tmp_path, monkeypatch):
    from biosam2.training.distributed import is_first_process

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_first_process()
    run = tmp_path / "rank1"
    run.mkdir()
    holder = _lock_holder(run)  # as rank 0 holds it during a DDP run
    try:
        with pytest.raises(Exception) as raised:  # rank 1 gets past the lock and on to its own checks
            train(dataset, run, CONFIG, resume=True, progress_bar=False)
        assert "nothing to resume" in str(raised.value)
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A real 128 MB file system (tmpfs; a run with its checkpoints takes ~40 MB), so that writers fail the way they do on a full disk."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}); the full-disk test needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    from biosam2.atomic_io import free_bytes

    with open(disk / "filler", "wb") as stream:
        stream.write(b"\0" * max(0, free_bytes(disk) - leave))


def test_a_real_full_disk_stops_training_with_the_message_and_keeps_the_checkpoint(dataset, small_disk, capsys):
    run = small_disk / "run"
    train(dataset, run, TrainConfig(**{**CONFIG.to_dict(), "epochs": 1, "evaluate_test": False, "overlays": 0}), progress_bar=False)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    fill(small_disk, len(before) // 2)  # room for half a checkpoint: torch.save raises RuntimeError here
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not be written (No space left on device)" in err and "previous checkpoint, if any, is intact" in err, err[-2000:]
    assert "Traceback" not in err
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]


def test_predict_into_a_full_disk_says_disk_full_naming_the_file(dataset, uninterrupted, small_disk, capsys):
    fill(small_disk, 20_000)
    out = small_disk / "pred"
    assert main(["predict", str(uninterrupted), str(dataset / "imagesTs"), str(out), "--probabilities"]) == 2
    err = capsys.readouterr().err
    assert "disk full (no space left on device)" in err and str(out) in err and "Traceback" not in err, err[-2000:]
    assert not out.exists()  # nothing published
