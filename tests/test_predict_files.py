"""`predict` on real files: which files form one case, channel checks against the run, TIFF pages
and samples, EXIF orientation, and publishing the results all at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import biosam2
from biosam2.cli import main

GREY = {"0": "microscopy"}
RGB = {"0": "R", "1": "G", "2": "B"}
MRI = {"0": "T1", "1": "T2", "2": "FLAIR"}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """One random-weight artifact; runs with different metadata are copies of it."""
    folder = tmp_path_factory.mktemp("model") / "model"
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter="lw")
    model.save_pretrained(folder, metadata={})
    return folder


def make_run(model_folder: Path, where: Path, channel_names: dict[str, str] | None) -> Path:
    run = where / "run"
    shutil.copytree(model_folder, run / "model")
    description = json.loads((run / "model" / "biosam2.json").read_text())
    description["metadata"] = {"normalization": {"scheme": "uint8"}, "labels": {"background": 0, "a": 1, "b": 2}}
    if channel_names is not None:
        description["metadata"]["channel_names"] = channel_names
    (run / "model" / "biosam2.json").write_text(json.dumps(description))
    return run


def grey(path: Path, shape=(24, 40), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def predict(run: Path, inputs: Path, out: Path, *options: str) -> int:
    return main(["predict", str(run), str(inputs), str(out), "--device", "cpu", *options])


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- 1. which files form one case -------------------------------------------------------------------
@pytest.mark.parametrize("indices", [(0, 1, 2), (1, 2, 3, 4, 5)])
def test_plain_folder_every_file_is_its_own_image(indices, model_folder, tmp_path):
    """frame_0000..0002 are three frames, not one RGB case; frame_0001..0005 are not refused."""
    run = make_run(model_folder, tmp_path, GREY)
    for i in indices:
        grey(tmp_path / "in" / f"frame_{i:04d}.png", seed=i)
    assert predict(run, tmp_path / "in", tmp_path / "out") == 0
    assert names(tmp_path / "out") == [f"frame_{i:04d}.png" for i in indices]
    for i in indices:
        assert np.asarray(Image.open(tmp_path / "out" / f"frame_{i:04d}.png")).shape == (24, 40)


def test_channel_files_option_groups_nnunet_cases(model_folder, tmp_path):
    run = make_run(model_folder, tmp_path, MRI)
    for i in range(3):
        grey(tmp_path / "in" / f"brain_{i:04d}.png", seed=i)
    assert predict(run, tmp_path / "in", tmp_path / "out", "--channel-files") == 0
    assert names(tmp_path / "out") == ["brain.png"]


def test_dataset_images_folder_groups_channel_files(model_folder, tmp_path):
    run = make_run(model_folder, tmp_path, GREY)
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"channel_names": GREY, "labels": {"background": 0, "a": 1}, "file_ending": ".png"}))
    for case in ("c1", "c2"):
        grey(data / "imagesTs" / f"{case}_0000.png")
    assert predict(run, data / "imagesTs", tmp_path / "out") == 0
    assert names(tmp_path / "out") == ["c1.png", "c2.png"]  # named like labelsTs, for `evaluate`


def test_channel_files_option_refuses_files_without_the_suffix(model_folder, tmp_path, capsys):
    run = make_run(model_folder, tmp_path, GREY)
    grey(tmp_path / "in" / "scan.png")
    assert predict(run, tmp_path / "in", tmp_path / "out", "--channel-files") == 2
    assert "scan.png: not named like an nnU-Net channel file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- 2. the input's channels against the run's ----------------------------------------------------
def test_grey_image_into_colour_model_is_predicted_as_grey_colour_with_a_warning(model_folder, tmp_path):
    run = make_run(model_folder, tmp_path, RGB)
    grey(tmp_path / "in" / "scan.png")
    with pytest.warns(UserWarning, match=r"scan.png: grey image into a colour \(RGB\) model"):
        assert predict(run, tmp_path / "in", tmp_path / "out") == 0
    assert np.asarray(Image.open(tmp_path / "out" / "scan.png")).shape == (24, 40)


def test_channel_files_of_a_case_missing_one_are_refused(model_folder, tmp_path, capsys):
    run = make_run(model_folder, tmp_path, MRI)
    for i in range(2):
        grey(tmp_path / "in" / f"brain_{i:04d}.png", seed=i)
    assert predict(run, tmp_path / "in", tmp_path / "out", "--channel-files") == 2
    assert "brain_0000.png: has 2 channel(s) but the model was trained on 3 (T1, T2, FLAIR)" in capsys.readouterr().err


# ---- 3. TIFF pages are not samples ------------------------------------------------------------------
def write_stack(path: Path, pages: int, *, separate_series: bool = False) -> np.ndarray:
    import tifffile

    stack = np.random.default_rng(pages).integers(0, 256, (pages, 24, 40), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if separate_series:  # one series per page, as tifffile writes non-contiguous pages
        with tifffile.TiffWriter(path) as writer:
            for page in stack:
                writer.write(page, photometric="minisblack", contiguous=False)
    else:
        tifffile.imwrite(path, stack, photometric="minisblack")
    return stack


@pytest.mark.parametrize("pages,separate_series", [(3, False), (4, False), (3, True)])
def test_grey_z_stack_is_a_volume_predicted_page_by_page(pages, separate_series, model_folder, tmp_path):
    import tifffile

    from biosam2.data.image_io import read_image

    stack = write_stack(tmp_path / "in" / "stack.tif", pages, separate_series=separate_series)
    loaded = read_image(tmp_path / "in" / "stack.tif")
    assert loaded.is_volume and loaded.array.shape == (24, 40, pages)
    np.testing.assert_array_equal(np.moveaxis(loaded.array, -1, 0), stack)
    run = make_run(model_folder, tmp_path, GREY)
    assert predict(run, tmp_path / "in", tmp_path / "out") == 0
    assert names(tmp_path / "out") == ["stack.tif"]
    with tifffile.TiffFile(tmp_path / "out" / "stack.tif") as result:
        assert len(result.pages) == pages and result.series[0].shape == (pages, 24, 40)


@pytest.mark.parametrize("ending,data_file", [(".mhd", "case.zraw"), (".nhdr", "case.raw.gz")])
def test_header_and_data_file_results_are_written_under_their_final_names(ending, data_file, model_folder, tmp_path):
    """A .mhd/.nhdr header names its data file: the pair is written as case.mhd + case.zraw (never a
    hidden temporary data name), --overwrite leaves no orphan, and a plain copy of OUT reads."""
    import SimpleITK as sitk

    from biosam2.data.image_io import read_label

    volume = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 256, (3, 24, 40), dtype=np.uint8))
    volume.SetSpacing((0.8, 0.8, 2.5))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(volume, str(tmp_path / "in" / f"case{ending}"))
    run = make_run(model_folder, tmp_path, GREY)
    out = tmp_path / "out"
    assert predict(run, tmp_path / "in", out) == 0
    assert predict(run, tmp_path / "in", out, "--overwrite") == 0
    assert names(out) == sorted([f"case{ending}", data_file])
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        shutil.copy(file, copy / file.name)
    result = read_label(copy / f"case{ending}")
    assert result.array.shape == (40, 24, 3) and result.spacing == pytest.approx((0.8, 0.8, 2.5))


@pytest.mark.parametrize("planar", [False, True])
def test_rgb_tiff_is_still_one_colour_image(planar, tmp_path):
    import tifffile

    from biosam2.data.image_io import read_image

    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    if planar:
        tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    loaded = read_image(tmp_path / "rgb.tif")
    assert not loaded.is_volume
    np.testing.assert_array_equal(loaded.array, rgb)


# ---- 4. EXIF orientation ----------------------------------------------------------------------------
def shown(path: Path) -> np.ndarray:
    from PIL import ImageOps

    return np.asarray(ImageOps.exif_transpose(Image.open(path)))


@pytest.mark.parametrize("ending", [".jpg", ".png", ".tif"])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_orientation_tag_is_applied_to_images_and_masks(orientation, ending, tmp_path):
    from biosam2.data.image_io import read_image, read_label

    pixels = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20) % 7  # asymmetric, and valid as a label map
    image = Image.fromarray(pixels)
    path = tmp_path / f"photo{ending}"
    if ending == ".tif":
        image.save(path, tiffinfo={274: orientation})
    else:
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(path, exif=exif)
    expected = shown(path) if ending != ".tif" else shown(_png_twin(tmp_path, pixels, orientation))
    np.testing.assert_array_equal(read_image(path).array, expected)  # a JPEG's expected pixels are PIL's decoding of it
    if ending != ".jpg":
        np.testing.assert_array_equal(read_label(path).array, expected)


def _png_twin(tmp_path: Path, pixels: np.ndarray, orientation: int) -> Path:
    """The same pixels and orientation as PNG, whose displayed form PIL's exif_transpose defines."""
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "twin.png", exif=exif)
    return tmp_path / "twin.png"


def test_prediction_of_an_exif_rotated_photo_is_in_the_shown_orientation(model_folder, tmp_path):
    run = make_run(model_folder, tmp_path, RGB)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored 40 wide, shown 24 wide (rotated 90 degrees clockwise)
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "photo.jpg", exif=exif)
    assert predict(run, tmp_path / "in", tmp_path / "out") == 0
    assert np.asarray(Image.open(tmp_path / "out" / "photo.png")).shape == shown(tmp_path / "in" / "photo.jpg").shape[:2] == (40, 24)


# ---- 6. nothing half-written, nothing left behind ------------------------------------------------------
def staging_folders(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if "biosam2-staging" in p.name]


def test_predict_killed_with_sigkill_leaves_no_out_and_the_next_run_cleans_up(model_folder, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = make_run(model_folder, tmp_path, GREY)
    count = 60
    for i in range(count):
        grey(tmp_path / "in" / f"img{i:03d}.png", shape=(64, 64), seed=i)
    out = tmp_path / "results" / "out"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "biosam2", "predict", str(run), str(tmp_path / "in"), str(out), "--device", "cpu", "--batch-size", "1"]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(f.is_file() for d in staging_folders(tmp_path / "results") for f in d.rglob("*.png")):
            assert process.poll() is None and time.monotonic() < deadline, "predict ended before writing any result"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)  # mid-run: some maps written to staging, OUT not published
    finally:
        process.wait()
    assert staging_folders(tmp_path / "results"), "the kill should have left a staging folder"
    assert not out.exists(), "a killed run left an OUT that could pass for complete"

    assert predict(run, tmp_path / "in", out) == 0
    assert len(list(out.glob("*.png"))) == count
    assert staging_folders(tmp_path / "results") == []  # the killed run's staging folder was removed


def test_predict_into_an_existing_out_marks_it_incomplete_until_done(model_folder, tmp_path, monkeypatch, capsys):
    """Into an existing OUT, results move in one by one; a run killed then leaves a marker that
    `evaluate` refuses (simulated: the move stops after the first file, as a kill would)."""
    import os as os_module

    from biosam2.inference import predict_files as module

    run = make_run(model_folder, tmp_path, GREY)
    for i in range(3):
        grey(tmp_path / "in" / f"img{i}.png", seed=i)
    (tmp_path / "out").mkdir()
    moved = []

    real_replace = os_module.replace

    def replace_then_die(source, target):
        if Path(target).parent == tmp_path / "out" and not Path(target).name.startswith("."):  # a result moving in
            if moved:
                raise KeyboardInterrupt  # stands in for the kill: nothing after this point runs
            moved.append(target)
        real_replace(source, target)

    monkeypatch.setattr(os_module, "replace", replace_then_die)
    assert predict(run, tmp_path / "in", tmp_path / "out") == 130
    monkeypatch.undo()
    assert len(moved) == 1 and (tmp_path / "out" / module.INCOMPLETE_MARKER).exists()
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "out")]) == 2
    assert "was killed while moving its results in" in capsys.readouterr().err
    assert predict(run, tmp_path / "in", tmp_path / "out", "--overwrite") == 0
    assert names(tmp_path / "out") == ["img0.png", "img1.png", "img2.png"]
    assert staging_folders(tmp_path / "out") == []


def test_convert_removes_staging_folders_of_killed_runs_only(tmp_path):
    import os
    import subprocess

    from biosam2.atomic_io import _HOST

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: a killed run's
    stale = tmp_path / f".converted.biosam2-staging.{_HOST}.{dead.pid}.abc123"
    live = tmp_path / f".converted.biosam2-staging.{_HOST}.{os.getpid()}.def456"
    for folder in (stale, live):
        (folder / "imagesTr").mkdir(parents=True)
    source = tmp_path / "isbi-src"
    for i in range(30):
        image = (np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8)
        Image.fromarray(image).save(grey(source / "images" / f"{i}.png"))
        Image.fromarray(np.where(image > 128, 255, 0).astype(np.uint8)).save(grey(source / "labels" / f"{i}.png"))
    assert main(["convert", "isbi2012", str(source), str(tmp_path / "converted")]) == 0
    assert not stale.exists() and live.exists()
