"""Fuzzing `predict`: any size from 8 to 1500 px per side, aspect ratios up to 1:12, grey or colour,
8-bit, 16-bit or float pixels -> a label map of the input's size with declared class ids, no NaN."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

import biosam2
from biosam2.data.normalization import Normalization
from biosam2.inference.predict_files import predict_files

NUM_CASES = 100
NUM_CLASSES = 3


def random_case(rng: np.random.Generator) -> tuple[tuple[int, int], int, str]:
    long_side = int(np.exp(rng.uniform(np.log(8), np.log(1500))))
    aspect = np.exp(rng.uniform(0, np.log(12)))
    short_side = max(8, int(round(long_side / aspect)))
    size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    return size, int(rng.choice([1, 3])), str(rng.choice(["uint8", "uint16", "float32"]))


def write_case(stem: Path, size: tuple[int, int], channels: int, dtype: str, rng: np.random.Generator) -> None:
    """8-bit images as PNG; 16-bit and float ones as TIFF (PNG has no 16-bit RGB or float)."""
    shape = size if channels == 1 else (*size, 3)
    if dtype == "uint8":
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(stem.with_suffix(".png"))
    elif dtype == "uint16":
        tifffile.imwrite(stem.with_suffix(".tif"), rng.integers(0, 65536, shape, dtype=np.uint16))
    else:
        tifffile.imwrite(stem.with_suffix(".tif"), rng.normal(0, 1000, shape).astype(np.float32))


def test_predict_handles_any_size_aspect_channels_and_pixel_type(tmp_path):
    rng = np.random.default_rng(2026)
    model = biosam2.build_model("tiny", weights="random", num_classes=NUM_CLASSES, adapter="lw").eval()
    cases = [random_case(rng) for _ in range(NUM_CASES)]
    assert min(min(s) for s, _, _ in cases) <= 16 and max(max(s) for s, _, _ in cases) >= 1000
    assert max(max(s) / min(s) for s, _, _ in cases) > 8

    for start in range(0, NUM_CASES, 20):  # in batches, to keep the probability files' disk use small
        inputs, outputs = tmp_path / "in", tmp_path / "out"
        inputs.mkdir()
        expected = {}
        for index in range(start, min(start + 20, NUM_CASES)):
            size, channels, dtype = cases[index]
            write_case(inputs / f"case{index:03d}", size, channels, dtype, rng)
            expected[f"case{index:03d}"] = size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the 8-bit model's percentile fallback for 16-bit/float
            predict_files(model, inputs, outputs, normalization=Normalization("uint8"), probabilities=True)
        for name, size in expected.items():
            label = np.asarray(Image.open(outputs / f"{name}.png"))
            assert label.shape == size, name
            assert set(np.unique(label).tolist()) <= set(range(NUM_CLASSES)), name
            probabilities = np.load(outputs / f"{name}_probabilities.npy")
            assert probabilities.shape == (NUM_CLASSES, *size) and np.isfinite(probabilities).all(), name
            np.testing.assert_array_equal(probabilities.argmax(0), label)
        shutil.rmtree(inputs)
        shutil.rmtree(outputs)
