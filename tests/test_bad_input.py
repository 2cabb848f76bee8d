"""Bad input, command by command: exit code != 0, one message naming the file and the problem, no
traceback, and no partial output that could pass for a complete one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_official_checkpoint
from PIL import Image

import biosam2
from biosam2.cli import main
from biosam2.data.image_io import write_image_png, write_label_png, write_volume
from biosam2.data.synthetic import write_synthetic_dataset


# ---- builders ------------------------------------------------------------------------------------
def dataset_2d(root: Path) -> Path:
    return write_synthetic_dataset(root / "data", train=3, val=1, test=1, max_side=64, min_side=40)


def dataset_3d(root: Path, *, label_affine: np.ndarray | None = None, nan: bool = False) -> Path:
    data = root / "vol"
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    cases = {"train": ["ct_0", "ct_1"], "test": ["ct_2"]}
    for split, folders in {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}.items():
        for case in cases[split]:
            image = rng.normal(0, 100, (32, 32, 4)).astype(np.float32)
            label = (image > 50).astype(np.uint8)
            if nan and case == "ct_1":
                image[3, 4, 1] = np.nan
            write_volume(data / folders[0] / f"{case}_0000.nii.gz", image, affine)
            wrong = label_affine is not None and case == "ct_1"
            write_volume(data / folders[1] / f"{case}.nii.gz", label, label_affine if wrong else affine)
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz", "numTraining": 2,
        "normalization": {"scheme": "ct", "window": [-200, 200]},
    }))
    (data / "splits_final.json").write_text(json.dumps([{"train": ["ct_0"], "val": ["ct_1"]}]))
    return data


def run_directory(root: Path, num_classes: int = 4, channel_names: dict[str, str] | None = None) -> Path:
    """A run as `predict` needs it: the model artifact with its metadata (no training needed)."""
    model = biosam2.build_model("tiny", weights="random", num_classes=num_classes, adapter="lw")
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, num_classes)}}
    metadata = {"normalization": {"scheme": "uint8"}, "labels": labels}
    if channel_names is not None:
        metadata["channel_names"] = channel_names
    model.save_pretrained(root / "run" / "model", metadata=metadata)
    return root / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def png_input(root: Path, name: str = "scan.png", size=(40, 60)) -> Path:
    folder = root / "inputs"
    write_image_png(folder / name, (np.random.default_rng(1).random(size) * 255).astype(np.uint8))
    return folder / name


def first(folder: Path, pattern: str) -> Path:
    return sorted(folder.glob(pattern))[0]


# ---- the table -------------------------------------------------------------------------------------
@dataclass
class Scenario:
    """``setup(tmp)`` makes the bad input and returns the command line; the error must contain
    every string in ``expect``; ``absent`` are paths (relative to tmp) that must not exist after."""

    setup: Callable[[Path], list[str]]
    expect: tuple[str, ...]
    absent: tuple[str, ...] = ()
    exit_code: int = 2


def _dataset_case(mutate: Callable[[Path], None], command: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        data = dataset_2d(tmp)
        mutate(data)
        if command == "check-data":
            return ["check-data", str(data)]
        return ["train", str(data), "--out", str(tmp / "run"), "--weights", "random", "--epochs", "1", "--no-progress"]
    return setup


def _resize_label(data: Path) -> None:
    write_label_png(data / "labelsTr" / "syn_001.png", np.zeros((7, 9), np.uint8))


def _undeclared_label(data: Path) -> None:
    shape = np.asarray(Image.open(data / "imagesTr" / "syn_002_0000.png")).shape
    write_label_png(data / "labelsTr" / "syn_002.png", np.full(shape, 9, np.uint8))


def _rgb_image(data: Path) -> None:
    shape = np.asarray(Image.open(data / "imagesTr" / "syn_001_0000.png")).shape
    write_image_png(data / "imagesTr" / "syn_001_0000.png", np.zeros((*shape, 3), np.uint8))


def _sixteen_bit(data: Path) -> None:
    shape = np.asarray(Image.open(data / "imagesTr" / "syn_001_0000.png")).shape
    Image.fromarray(np.full(shape, 40000, np.uint16)).save(data / "imagesTr" / "syn_001_0000.png")


def _missing_keys(data: Path) -> None:
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "cell": 1}}))


def _tiff_z_stack(data: Path) -> None:
    """The dataset as TIFFs, one image a 3-page grey stack (once read as an RGB image)."""
    import tifffile

    for path in sorted(data.glob("*/*.png")):
        tifffile.imwrite(path.with_suffix(".tif"), np.asarray(Image.open(path)))
        path.unlink()
    spec = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**spec, "file_ending": ".tif"}))
    page = tifffile.imread(data / "imagesTr" / "syn_001_0000.tif")
    tifffile.imwrite(data / "imagesTr" / "syn_001_0000.tif", np.stack([page] * 3), photometric="minisblack")


def _jpeg_dataset(data: Path) -> None:
    """The whole dataset as JPEG, label maps included."""
    for path in sorted(data.glob("*/*.png")):
        Image.open(path).save(path.with_suffix(".jpg"), quality=95)
        path.unlink()
    spec = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**spec, "file_ending": ".jpg"}))


def _set(**keys):
    def mutate(data: Path) -> None:
        spec = json.loads((data / "dataset.json").read_text())
        (data / "dataset.json").write_text(json.dumps({**spec, **keys}))
    return mutate


def _labels(**extra):
    def mutate(data: Path) -> None:
        spec = json.loads((data / "dataset.json").read_text())
        spec["labels"].update(extra)
        (data / "dataset.json").write_text(json.dumps(spec))
    return mutate


DATASET_DEFECTS = {
    "region labels": (_labels(whole_cell=[1, 2]), ("dataset.json", "'whole_cell'", "region-based training is not supported")),
    "ignore label not the highest id": (_labels(ignore=3), ("dataset.json", "\"ignore\": 3 must be the highest label id", "set \"ignore\": 4")),
    "JPEG label maps": (_jpeg_dataset, ("labelsTr", ".jpg: JPEG label maps are not supported", "PNG")),
    "multi-page TIFF in a 2-D dataset": (_tiff_z_stack, ("syn_001_0000.tif", "3-page TIFF z-stack in a 2-D dataset")),
    "truncated PNG": (lambda d: truncate(d / "imagesTr" / "syn_000_0000.png"), ("syn_000_0000.png", "truncated")),
    "not an image": (lambda d: (d / "imagesTr" / "syn_000_0000.png").write_text("hello"), ("syn_000_0000.png", "cannot be read")),
    "zero-size file": (lambda d: (d / "imagesTr" / "syn_000_0000.png").write_bytes(b""), ("syn_000_0000.png", "cannot be read")),
    "image/label size mismatch": (_resize_label, ("syn_001.png", "does not match its image")),
    "undeclared label values": (_undeclared_label, ("syn_002.png", "not declared in dataset.json")),
    "mixed grey/RGB": (_rgb_image, ("syn_001_0000.png", "3 channel(s)", "declares 1")),
    "16-bit image in an 8-bit dataset": (_sixteen_bit, ("syn_001_0000.png", "uint16", "8-bit")),
    "missing dataset.json": (lambda d: (d / "dataset.json").unlink(), ("dataset.json: missing",)),
    "dataset.json missing keys": (_missing_keys, ("dataset.json", "missing key(s) channel_names, file_ending")),
    "four input channels (BraTS-style)": (
        _set(channel_names={"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}),
        ("dataset.json", "lists 4 (T1, T1ce, T2, FLAIR)", "Keep 1 or 3 of them"),
    ),
    "case id with a space": (
        lambda d: [(d / sub / f"syn_003{end}").rename(d / sub / f"syn 003{end}") for sub, end in (("imagesTr", "_0000.png"), ("labelsTr", ".png"))],
        ("syn 003_0000.png", "'syn 003' is not a plain file name"),
    ),
    "path escaping the dataset": (
        lambda d: (d / "splits_final.json").write_text('[{"train": ["../../etc/passwd"], "val": ["syn_003"]}]'),
        ("splits_final.json", "'../../etc/passwd' is not a plain file name"),
    ),
}

SCENARIOS: dict[str, Scenario] = {}
for name, (mutate, expect) in DATASET_DEFECTS.items():
    SCENARIOS[f"check-data: {name}"] = Scenario(_dataset_case(mutate, "check-data"), expect, exit_code=1)
    SCENARIOS[f"train: {name}"] = Scenario(_dataset_case(mutate, "train"), expect, absent=("run",))


def _volume_case(command: str, **options) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        data = dataset_3d(tmp, **{k: v for k, v in options.items() if k != "truncate"})
        if options.get("truncate"):
            truncate(data / "labelsTr" / "ct_1.nii.gz")
        if command == "check-data":
            return ["check-data", str(data)]
        return ["train", str(data), "--out", str(tmp / "run"), "--weights", "random", "--epochs", "1", "--no-progress"]
    return setup


shifted = np.diag([0.8, 0.8, 3.0, 1.0])
shifted[:3, 3] = [5, 0, 0]
rescaled = np.diag([0.8, 0.8, 2.0, 1.0])
for command, code in (("check-data", 1), ("train", 2)):
    absent = ("run",) if command == "train" else ()
    SCENARIOS[f"{command}: truncated .nii.gz"] = Scenario(_volume_case(command, truncate=True), ("ct_1.nii.gz", "truncated"), absent, code)
    SCENARIOS[f"{command}: 3-D affine mismatch"] = Scenario(_volume_case(command, label_affine=shifted), ("ct_1.nii.gz", "affine"), absent, code)
    SCENARIOS[f"{command}: 3-D spacing mismatch"] = Scenario(_volume_case(command, label_affine=rescaled), ("ct_1.nii.gz", "spacing"), absent, code)
    SCENARIOS[f"{command}: NaN voxels"] = Scenario(_volume_case(command, nan=True), ("ct_1_0000.nii.gz", "NaN or infinite"), absent, code)
SCENARIOS["check-data: empty folder"] = Scenario(lambda tmp: ["check-data", str(Path(tempfile.mkdtemp(dir=tmp)))], ("dataset.json: missing",), exit_code=1)
SCENARIOS["train: empty folder"] = Scenario(
    lambda tmp: ["train", str(Path(tempfile.mkdtemp(dir=tmp))), "--out", str(tmp / "run"), "--weights", "random"], ("dataset.json: missing",), ("run",)
)


def _train_with_checkpoint_of_size(tmp: Path) -> list[str]:
    data = dataset_2d(tmp)
    write_official_checkpoint("tiny", tmp / "sam2.1_hiera_tiny.pt")
    return ["train", str(data), "--out", str(tmp / "run"), "--size", "small", "--weights", str(tmp / "sam2.1_hiera_tiny.pt")]


SCENARIOS["train: checkpoint for another SAM2 size"] = Scenario(
    _train_with_checkpoint_of_size, ("sam2.1_hiera_tiny.pt", "SAM2 tiny checkpoint", "size='small'"), ("run",)
)


# predict
def _predict(make_input: Callable[[Path], Path], run: Callable[[Path], Path] = run_directory) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        return ["predict", str(run(tmp)), str(make_input(tmp)), str(tmp / "predictions")]
    return setup


def _truncated_png(tmp: Path) -> Path:
    path = png_input(tmp, size=(200, 300))
    truncate(path)
    return path.parent


def _truncated_jpeg(tmp: Path) -> Path:
    path = tmp / "inputs" / "scan.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray((np.random.default_rng(2).random((200, 300, 3)) * 255).astype(np.uint8)).save(path, quality=90)
    truncate(path)
    return path


def _truncated_nifti(tmp: Path) -> Path:
    path = tmp / "inputs" / "scan.nii.gz"
    write_volume(path, np.random.default_rng(3).normal(size=(64, 64, 16)).astype(np.float32), np.eye(4))
    truncate(path)
    return path


def _nan_volume(tmp: Path) -> Path:
    volume = np.zeros((16, 16, 3), np.float32)
    volume[1, 2, 0] = np.inf
    write_volume(tmp / "inputs" / "scan.nii.gz", volume, np.eye(4))
    return tmp / "inputs" / "scan.nii.gz"


def _mixed_with_good(tmp: Path) -> Path:
    """A good image and a broken one: nothing at all may be written (no partial set of results)."""
    png_input(tmp, "a_good.png")
    (tmp / "inputs" / "b_broken.png").write_text("not an image")
    return tmp / "inputs"


def _two_class_run_with_four_class_weights(tmp: Path) -> Path:
    two, four = run_directory(tmp / "two", 2), run_directory(tmp / "four", 4)
    shutil.copy(four / "model" / "biosam2.safetensors", two / "model" / "biosam2.safetensors")
    return two


def _artifact_wrong_base(tmp: Path) -> list[str]:
    write_official_checkpoint("tiny", tmp / "sam2.1_hiera_tiny.pt")
    return ["predict", str(run_directory(tmp)), str(png_input(tmp)), str(tmp / "predictions"), "--weights", str(tmp / "sam2.1_hiera_tiny.pt")]


def _rgb_input(tmp: Path) -> Path:
    path = tmp / "inputs" / "photo.png"
    write_image_png(path, (np.random.default_rng(4).random((40, 60, 3)) * 255).astype(np.uint8))
    return path


def _predict_with(*options: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        return ["predict", str(run_directory(tmp)), str(png_input(tmp)), str(tmp / "predictions"), *options]
    return setup


def _predict_into_a_file(tmp: Path) -> list[str]:
    taken = tmp / "predictions.txt"
    taken.write_text("not a folder")
    return ["predict", str(run_directory(tmp)), str(png_input(tmp)), str(taken)]


# "cuda" where there is no GPU (the case reported); a GPU index beyond the machine's elsewhere.
MISSING_GPU = "cuda:99" if torch.cuda.is_available() else "cuda"
MRI = {"0": "T1", "1": "T2", "2": "FLAIR"}
SCENARIOS.update({
    "predict: --batch-size 0": Scenario(_predict_with("--batch-size", "0"), ("--batch-size 0: must be at least 1",), ("predictions",)),
    "predict: --batch-size -3": Scenario(_predict_with("--batch-size", "-3"), ("--batch-size -3: must be at least 1",), ("predictions",)),
    "predict: --device of a GPU the machine lacks": Scenario(
        _predict_with("--device", MISSING_GPU), (f"--device {MISSING_GPU}:", "GPU"), ("predictions",)
    ),
    "predict: --device not a device": Scenario(_predict_with("--device", "gpu"), ("--device gpu: not a device name",), ("predictions",)),
    "predict: OUT is an existing file": Scenario(_predict_into_a_file, ("predictions.txt: exists and is not a folder",)),
    "predict: T1 only into a T1/T2/FLAIR model": Scenario(
        _predict(lambda tmp: png_input(tmp, "brain_0000.png"), lambda tmp: run_directory(tmp, channel_names=MRI)),
        ("brain_0000.png", "1 channel(s) (grey)", "trained on 3 (T1, T2, FLAIR)", "--channel-files"),
        ("predictions",),
    ),
    "predict: RGB into a grey model": Scenario(
        _predict(_rgb_input, lambda tmp: run_directory(tmp, channel_names={"0": "EM"})),
        ("photo.png", "3 channel(s) (colour (RGB))", "trained on 1 (EM)", "convert it to grey"),
        ("predictions",),
    ),
    "predict: truncated PNG": Scenario(_predict(_truncated_png), ("scan.png", "truncated"), ("predictions",)),
    "predict: truncated JPEG": Scenario(_predict(_truncated_jpeg), ("scan.jpg", "truncated"), ("predictions",)),
    "predict: truncated .nii.gz": Scenario(_predict(_truncated_nifti), ("scan.nii.gz", "truncated"), ("predictions",)),
    "predict: NaN/Inf voxels": Scenario(_predict(_nan_volume), ("scan.nii.gz", "NaN or infinite"), ("predictions",)),
    "predict: zero-size file": Scenario(
        _predict(lambda tmp: (png_input(tmp).write_bytes(b""), tmp / "inputs" / "scan.png")[1]), ("scan.png", "cannot be read"), ("predictions",)
    ),
    "predict: one bad file among good ones": Scenario(_predict(_mixed_with_good), ("b_broken.png", "cannot be read"), ("predictions",)),
    "predict: empty folder": Scenario(
        _predict(lambda tmp: Path(tempfile.mkdtemp(dir=tmp))), ("no images or volumes to predict",), ("predictions",)
    ),
    "predict: artifact for another number of classes": Scenario(
        _predict(png_input, _two_class_run_with_four_class_weights), ("biosam2.safetensors", "class_tokens (4, 256) vs model (2, 256)"), ("predictions",)
    ),
    "predict: base weights of another training": Scenario(_artifact_wrong_base, ("not the ones this artifact was trained on",), ("predictions",)),
})


# evaluate
def _evaluate(mutate: Callable[[Path, Path], None], volumes: bool = False) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        data = dataset_3d(tmp) if volumes else dataset_2d(tmp)
        predictions = tmp / "pred"
        shutil.copytree(data / "labelsTs", predictions)
        mutate(predictions, data / "labelsTs")
        return ["evaluate", str(predictions), str(data / "labelsTs"), "--out", str(tmp / "evaluation")]
    return setup


SCENARIOS.update({
    "evaluate: size mismatch": Scenario(
        _evaluate(lambda p, g: write_label_png(first(p, "*.png"), np.zeros((5, 5), np.uint8))), ("syn_004.png", "size"), ("evaluation",)
    ),
    "evaluate: 3-D affine mismatch": Scenario(
        _evaluate(lambda p, g: write_volume(p / "ct_2.nii.gz", np.zeros((32, 32, 4), np.uint8), shifted), volumes=True),
        ("ct_2.nii.gz", "affine"),
        ("evaluation",),
    ),
    "evaluate: undeclared prediction values": Scenario(
        _evaluate(lambda p, g: write_label_png(first(p, "*.png"), np.full(np.asarray(Image.open(first(g, "*.png"))).shape, 7, np.uint8))),
        ("syn_004.png", "7"),
        ("evaluation",),
    ),
    "evaluate: truncated ground truth .nii.gz": Scenario(
        _evaluate(lambda p, g: truncate(g / "ct_2.nii.gz"), volumes=True), ("ct_2.nii.gz", "truncated"), ("evaluation",)
    ),
    "evaluate: missing predictions": Scenario(
        _evaluate(lambda p, g: first(p, "*.png").unlink()), ("no prediction",), ("evaluation",)
    ),
})


# convert
def _isbi_source(tmp: Path) -> Path:
    source = tmp / "isbi-src"
    for i in range(30):
        image = (np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8)
        write_image_png(source / "images" / f"{i}.png", image)
        write_label_png(source / "labels" / f"{i}.png", np.where(image > 128, 255, 0).astype(np.uint8))
    return source


def _convert_isbi(mutate: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        source = _isbi_source(tmp)
        mutate(source)
        return ["convert", "isbi2012", str(source), str(tmp / "converted")]
    return setup


def _kvasir_with_truncated_jpeg(tmp: Path) -> list[str]:
    source = tmp / "kvasir-src"
    for folder in ("images", "masks"):
        (source / folder).mkdir(parents=True)
    for i in range(10):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(source / "images" / f"c{i}.jpg")
        Image.fromarray(np.zeros((40, 50), np.uint8)).save(source / "masks" / f"c{i}.jpg")
    truncate(source / "images" / "c3.jpg")
    return ["convert", "kvasir-seg", str(source), str(tmp / "converted")]


SCENARIOS.update({
    "convert: truncated PNG": Scenario(_convert_isbi(lambda s: truncate(s / "images" / "7.png")), ("7.png", "truncated"), ("converted",)),
    "convert: not an image": Scenario(
        _convert_isbi(lambda s: (s / "labels" / "9.png").write_text("hello")), ("9.png", "cannot be read"), ("converted",)
    ),
    "convert: undeclared label values": Scenario(
        _convert_isbi(lambda s: write_label_png(s / "labels" / "4.png", np.full((32, 32), 128, np.uint8))), ("4.png", "128"), ("converted",)
    ),
    "convert: truncated JPEG": Scenario(_kvasir_with_truncated_jpeg, ("c3.jpg", "truncated"), ("converted",)),
    "convert: empty folder": Scenario(
        lambda tmp: ["convert", "isbi2012", str(Path(tempfile.mkdtemp(dir=tmp))), str(tmp / "converted")], ("expected",), ("converted",)
    ),
})


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bad_input_gets_one_clear_message_and_leaves_nothing_half_done(name, tmp_path, capsys):
    scenario = SCENARIOS[name]
    argv = scenario.setup(tmp_path)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    output = captured.err + captured.out
    assert code == scenario.exit_code, output
    assert "Traceback" not in output
    if scenario.exit_code == 2:
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, captured.err
        message = errors[0]
    else:  # check-data: a report listing every problem
        message = captured.out
    for expected in scenario.expect:
        assert expected in message, f"{expected!r} not in {message!r}"
    for path in scenario.absent:
        assert not (tmp_path / path).exists(), f"{path} left behind"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(biosam2.DataError):
        main(["--debug", "train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--weights", "random"])


def test_unreadable_file_is_reported_as_a_permission_problem(tmp_path):
    """Permissions do not stop root: the command then runs as user 'nobody'."""
    shared = Path(tempfile.mkdtemp(dir="/tmp", prefix="biosam2-perm-"))
    try:
        os.chmod(shared, 0o755)
        data = dataset_2d(shared)
        for path in shared.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        secret = data / "imagesTr" / "syn_001_0000.png"
        os.chmod(secret, 0)
        command = [sys.executable, "-m", "biosam2.cli", "check-data", str(data)]
        environment = {**os.environ, "HOME": str(shared), "MPLCONFIGDIR": str(shared), "HF_HOME": str(shared)}
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot make a file unreadable")
            command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode == 1, result.stderr
        assert "syn_001_0000.png: permission denied" in result.stdout
        assert "Traceback" not in result.stdout + result.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("dtype,channels", [("uint16", 1), ("float32", 1), ("uint8", 3)])
def test_sixteen_bit_float_and_tiny_images_are_predicted_not_refused(dtype, channels, tmp_path):
    import tifffile

    run = run_directory(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    shape = (37, 53) if channels == 1 else (37, 53, 3)
    tifffile.imwrite(inputs / "big.tif", (rng.random(shape) * 1000).astype(dtype))
    write_image_png(inputs / "one_pixel.png", np.full((1, 1), 200, np.uint8))
    with pytest.warns(UserWarning, match="scaling by percentiles") if dtype != "uint8" else _nothing():
        assert main(["predict", str(run), str(inputs), str(tmp_path / "out")]) == 0
    assert np.asarray(Image.open(tmp_path / "out" / "big.png")).shape == (37, 53)
    assert np.asarray(Image.open(tmp_path / "out" / "one_pixel.png")).shape == (1, 1)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False



