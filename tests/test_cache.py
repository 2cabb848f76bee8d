"""The preprocessed cache: exact round trip, invalidation, a kill mid-way, training from it, bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from biosam2.cli import main
from biosam2.data.cache import CACHE_FOLDER, cached_cases, preprocess
from biosam2.data.cases import load_case, resolve_normalization
from biosam2.data.dataset_format import load_dataset_spec
from biosam2.data.image_io import write_volume
from biosam2.data.normalization import Normalization
from biosam2.data.splits import resolve_split
from biosam2.data.synthetic import write_synthetic_dataset, write_synthetic_volumes
from biosam2.data.training_data import SliceDataset
from biosam2.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def _cases(root: Path):
    spec = load_dataset_spec(root)
    split = resolve_split(spec, 0, 0)
    return spec, [*split.train, *split.val]


def _set_normalization(root: Path, normalization: dict) -> None:
    payload = json.loads((root / "dataset.json").read_text())
    payload["normalization"] = normalization
    (root / "dataset.json").write_text(json.dumps(payload))


@pytest.mark.parametrize("normalization", [None, {"scheme": "zscore"}, {"scheme": "percentile"}])
def test_cached_volumes_equal_the_normalised_originals(tmp_path, normalization):
    root = write_synthetic_volumes(tmp_path / "ct", train=2, val=1, shape=(48, 40, 7), normalization=normalization)
    spec, files = _cases(root)
    norm = resolve_normalization(spec, files[:2])
    assert norm.scheme == (normalization or {"scheme": "ct"})["scheme"]
    folder, written = preprocess(spec, files, norm.scheme, progress=False)
    assert folder == root / CACHE_FOLDER and written == 3
    for entry, case_files in zip(cached_cases(folder, spec, files, norm), files, strict=True):
        memory, cached = load_case(spec, case_files, norm), entry.load()
        assert cached.image.dtype == np.float32 and np.array_equal(cached.image, memory.image)
        assert np.array_equal(cached.label, memory.label) and cached.label.dtype == memory.label.dtype
        assert cached.is_volume and cached.spacing == memory.spacing and entry.num_slices == 7
        for z in range(7):  # each slice alone, normalised with the whole volume's statistics
            image, label = entry.sample(z)
            assert np.array_equal(image, memory.image[..., z]) and np.array_equal(label, memory.label[..., z])
    # Stored as the int16 source (2 bytes a voxel) and uint8 labels.
    assert np.load(folder / "cases" / "vol_0000.image.npy", mmap_mode="r").dtype == np.int16
    assert np.load(folder / "cases" / "vol_0000.label.npy", mmap_mode="r").shape == (7, 48, 40)  # slice-major
    marker = json.loads((folder / "cases" / "vol_0000.json").read_text())
    label = load_case(spec, files[0], norm).label
    assert marker["slice_classes"] == [sorted(set(np.unique(label[..., z]).tolist())) for z in range(7)]


def test_training_samples_from_the_cache_equal_those_from_memory(tmp_path):
    root = write_synthetic_dataset(tmp_path / "syn", train=3, val=1, test=0, max_side=90)
    spec, files = _cases(root)
    norm = Normalization("uint8")
    folder, _ = preprocess(spec, files, norm.scheme, progress=False)
    memory = SliceDataset([load_case(spec, f, norm) for f in files], patch_size=64, seed=3)
    cached = SliceDataset(cached_cases(folder, spec, files, norm), patch_size=64, seed=3)
    assert len(memory) == len(cached) == 4
    for key in [(0, 0), (1, 2), (5, 3)]:
        (a, b), (c, d) = memory[key], cached[key]
        assert a.equal(c) and b.equal(d)


def test_a_changed_source_or_normalisation_is_preprocessed_again(tmp_path):
    root = write_synthetic_volumes(tmp_path / "ct", train=2, val=1, shape=(32, 32, 5))
    spec, files = _cases(root)
    assert preprocess(spec, files, "ct", progress=False)[1] == 3
    assert preprocess(spec, files, "ct", progress=False)[1] == 0  # up to date
    # A source edited in place (another size and mtime): that case alone is redone, and reads the new data.
    source = files[1].images[0]
    write_volume(source, np.full((32, 32, 5), 900, dtype=np.int16), np.diag([0.8, 0.8, 2.5, 1.0]))
    assert preprocess(spec, files, "ct", progress=False)[1] == 1
    window = Normalization("ct", (-100.0, 1000.0))
    entry = cached_cases(root / CACHE_FOLDER, spec, files, window)[1]
    assert np.array_equal(entry.load().image, load_case(spec, files[1], window).image)
    # Another scheme: every case is redone (its statistics are stored). Another CT window is applied on read.
    _set_normalization(root, {"scheme": "zscore"})
    spec = load_dataset_spec(root)
    assert preprocess(spec, files, "zscore", progress=False)[1] == 3
    with pytest.raises(Exception, match="out of date in the cache"):
        cached_cases(root / CACHE_FOLDER, spec, files, window)  # ct entries are gone: never read as zscore's
    # The ignore label changes the stored labels: redone too.
    payload = json.loads((root / "dataset.json").read_text())
    payload["labels"] = {"background": 0, "organ": 1, "ignore": 2}  # class 2 becomes unannotated
    (root / "dataset.json").write_text(json.dumps(payload))
    assert preprocess(load_dataset_spec(root), files, "zscore", progress=False)[1] == 3


def test_a_killed_preprocess_is_completed_by_the_next_run(tmp_path):
    root = write_synthetic_volumes(tmp_path / "ct", train=39, val=1, shape=(128, 128, 40), normalization={"scheme": "zscore"})
    markers = root / CACHE_FOLDER / "cases"
    command = [sys.executable, "-m", "biosam2", "preprocess", str(root), "--no-progress"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(markers.glob("*.json"))) < 3:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    done = len(list(markers.glob("*.json")))
    assert process.returncode == -signal.SIGKILL and 3 <= done < 40, f"{done} markers at the kill"
    assert main(["preprocess", str(root), "--no-progress"]) == 0
    spec, files = _cases(root)
    norm = Normalization("zscore")
    entries = cached_cases(root / CACHE_FOLDER, spec, files, norm)  # every case complete and current
    assert len(entries) == 40 and not [p for p in markers.iterdir() if p.name.startswith(".")]  # no temporary left
    for index in (done - 1, done, 39):  # the last finished, the one being written at the kill, the last
        assert np.array_equal(entries[index].load().image, load_case(spec, files[index], norm).image)
    assert preprocess(spec, files, "zscore", progress=False)[1] == 0


QUICK = dict(weights="random", adapter="lw", epochs=2, batch_size=2, patch_size=32, lr=1e-3, num_workers=0, overlays=1)


def test_training_from_the_cache_gives_the_metrics_of_training_in_memory(tmp_path):
    root = write_synthetic_volumes(tmp_path / "ct", train=3, val=1, shape=(40, 40, 6), normalization={"scheme": "zscore"})
    config = TrainConfig(**QUICK, limit_train_batches=3, evaluate_test=False)
    cached = train(root, tmp_path / "cached", config, progress_bar=False, cache_dir=tmp_path / "cache")
    memory = train(root, tmp_path / "memory", config, progress_bar=False, cache=False)
    assert (tmp_path / "cache" / "cases" / "vol_0000.json").is_file() and not (root / CACHE_FOLDER).exists()
    assert cached["best_val_mIoU"] == memory["best_val_mIoU"] and cached["best_epoch"] == memory["best_epoch"]
    curves = [(tmp_path / run / "logs" / "version_0" / "metrics.csv").read_text() for run in ("cached", "memory")]
    assert "val/mIoU" in curves[0] and curves[0] == curves[1]  # every logged loss and IoU, step by step


MEASURE = """
import json, resource, sys
from biosam2.training import TrainConfig, train
config = TrainConfig(weights="random", adapter="lw", epochs=1, batch_size=2, patch_size=64, num_workers=0, overlays=0,
                     limit_train_batches=2, evaluate_test=False)
train(sys.argv[1], sys.argv[2], config, progress_bar=False)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_peak_memory_does_not_grow_with_the_number_of_volumes(tmp_path):
    """Up to and through an epoch (two steps, validation of one volume): 32 volumes cost what 8 do.
    Holding them all in memory (as before the cache) costs 19.7 MB more per 160x160x64 volume: 470 MB."""
    peaks = {}
    for count in (8, 32):
        root = write_synthetic_volumes(tmp_path / f"ct{count}", train=count, val=1, shape=(160, 160, 64))
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, str(root), str(tmp_path / f"run{count}")],
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[count] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    assert peaks[32] - peaks[8] < 200, peaks


def test_the_cache_moves_to_the_user_cache_when_the_dataset_folder_cannot_hold_it(tmp_path, monkeypatch):
    root = write_synthetic_volumes(tmp_path / "ct", train=1, val=1, shape=(16, 16, 3))
    (root / CACHE_FOLDER).write_text("not a folder")  # stands in for a read-only dataset (root ignores permissions)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    spec, files = _cases(root)
    folder, written = preprocess(spec, files, "ct", progress=False)
    assert folder.parent == tmp_path / "user" / "biosam2" and folder.name.startswith("ct-") and written == 2


def test_a_bad_case_in_a_worker_process_is_reported_naming_its_file(tmp_path, capsys):
    root = write_synthetic_volumes(tmp_path / "ct", train=3, val=1, shape=(16, 16, 3), normalization={"scheme": "uint8"})
    assert main(["preprocess", str(root), "--workers", "2", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "int16 pixels in a dataset normalised as 8-bit images" in error and "vol_000" in error and "Traceback" not in error


def test_the_other_ranks_wait_for_rank_0s_cache(tmp_path):
    import threading

    from biosam2.data.cache import wait_for_cache

    root = write_synthetic_volumes(tmp_path / "ct", train=2, val=1, shape=(16, 16, 3))
    spec, files = _cases(root)
    waited = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("folder", wait_for_cache(spec, files, "ct", poll=0.05)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not (root / CACHE_FOLDER / "cases").exists()  # nothing is written by a waiting rank
    folder, _ = preprocess(spec, files, "ct", progress=False)
    waiter.join(10)
    assert waited["folder"] == folder


def test_foreground_share_centres_crops_on_foreground(tmp_path):
    from biosam2.errors import ConfigError

    root = write_synthetic_volumes(tmp_path / "ct", train=2, val=1, shape=(128, 128, 8), normalization={"scheme": "zscore"})
    spec, files = _cases(root)
    norm = Normalization("zscore")
    folder, _ = preprocess(spec, files, norm.scheme, progress=False)
    cases = cached_cases(folder, spec, files, norm)
    with_foreground = [(i, z) for i, case in enumerate(cases) for z in range(8) if (case.sample(z)[1] > 0).any()]

    def crops_with_foreground(share: float) -> int:
        samples = SliceDataset(cases, patch_size=24, augment=False, seed=0, foreground_share=share)
        return sum(bool((samples[(0, index)][1] > 0).any()) for index in range(len(samples)))

    # At share 1 every sample comes from a slice with foreground (the stored per-slice index) and is
    # centred on it, as nnU-Net oversamples; uniform slices and crops miss it often.
    total = len(SliceDataset(cases, patch_size=24))
    assert len(with_foreground) < total and crops_with_foreground(1.0) == total > crops_with_foreground(0.0)
    # the index stored in the cache is the one computed from the labels in memory
    assert [c.foreground_slices for c in cases] == [load_case(spec, f, norm).foreground_slices for f in files]
    assert sorted((i, z) for i, c in enumerate(cases) for z in c.foreground_slices) == with_foreground
    with pytest.raises(ConfigError, match="needs input_mode crop"):
        TrainConfig(foreground_share=0.5, input_mode="resize")


def test_crops_of_large_images_read_one_region_only(tmp_path):
    """A 2-D image more than 4 crops wide is read one (2 x crop)-square region per sample, from the
    cache as from memory (the same samples); smaller images are still read whole."""
    root = write_synthetic_dataset(tmp_path / "big", train=1, val=1, test=0, min_side=300, max_side=320)
    spec, files = _cases(root)
    norm = Normalization("uint8")
    folder, _ = preprocess(spec, files, norm.scheme, progress=False)
    entries = cached_cases(folder, spec, files, norm)
    read: list[tuple[int, int]] = []

    class Spy:  # the cached case, recording the size of what each sample reads
        def __init__(self, entry):
            self.entry, self.plane_shape, self.is_volume, self.num_slices = entry, entry.plane_shape, False, None

        def sample(self, z, region=None):
            image, label = self.entry.sample(z, region)
            read.append(label.shape)
            return image, label

    spied = SliceDataset([Spy(e) for e in entries], patch_size=64, seed=1)
    memory = SliceDataset([load_case(spec, f, norm) for f in files], patch_size=64, seed=1)
    for key in [(0, 0), (1, 1), (2, 0)]:
        (a, b), (c, d) = spied[key], memory[key]
        assert a.equal(c) and b.equal(d) and a.shape[-2:] == (64, 64)
    assert read == [(128, 128)] * 3  # never the whole 300-px image
    whole = SliceDataset([Spy(e) for e in entries], patch_size=80, seed=1)  # 300 px is not > 4 x 80
    read.clear()
    whole[(0, 0)]
    assert read == [entries[0].plane_shape]
