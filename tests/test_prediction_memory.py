"""Prediction of images larger than the model's window: blended like MONAI's sliding window, in memory
that grows by a few bytes per pixel (measured in a real child process through the user's path)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import biosam2
from biosam2.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
# Whole-image arrays kept while a large RGB image is predicted: uint8 pixels (3), the normalised
# float32 image (12), the float16 blended logits of 4 classes (8), the label map (1), PIL's decoding
# (4 + 3): about 34 measured. Before this bound existed (int64 argmax, float32 logits, weights and
# softmax of the whole image, a batch copy, two normalisation temporaries) it was 72.7.
BYTES_PER_PIXEL_BOUND = 45


@pytest.fixture(scope="module")
def model():
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    return biosam2.build_model("tiny", weights="random", num_classes=4, adapter="lw").eval().reparameterize()


@pytest.mark.parametrize("shape", [(150, 200), (64, 300), (97, 211)])
def test_tiles_are_blended_as_monai_sliding_window_inference(model, shape):
    """The tile loop places windows and weights them as MONAI's sliding window does; only its float16
    accumulation differs, which can flip the label only where two classes are within a hair."""
    from monai.inferers import sliding_window_inference

    image = np.random.default_rng(1).random((3, *shape), dtype=np.float32)
    labels, probabilities = Predictor(model, device="cpu", max_side=64, tile_size=64).predict(image, return_probabilities=True)
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(image)[None], (64, 64), 1, model, overlap=0.25, mode="gaussian")
    expected = torch.softmax(logits, 1)[0].numpy()
    assert labels.shape == shape and labels.dtype == np.uint8
    assert np.abs(probabilities - expected).max() < 1e-6  # written probabilities: float32 sums
    assert np.array_equal(labels, probabilities.argmax(0))
    # Without probabilities the sums are float16: the labels agree wherever float16 rounding cannot
    # swap the two most likely classes (a random model's probabilities are close to uniform, so this
    # is a real share of the pixels, not all of them).
    fast, _ = Predictor(model, device="cpu", max_side=64, tile_size=64).predict(image)
    top_two = np.sort(expected, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-4
    assert clear.mean() > 0.8 and np.array_equal(fast[clear], expected.argmax(0)[clear])
    # and it really is tiled: the whole image in one pass gives other numbers at the tile seams
    whole, _ = Predictor(model, device="cpu").predict(image, return_probabilities=True)
    assert not np.array_equal(whole, labels)


def test_whole_image_labels_are_the_argmax_of_the_logits(model):
    image = np.random.default_rng(2).random((3, 90, 130), dtype=np.float32)
    labels, probabilities = Predictor(model, device="cpu").predict(image, return_probabilities=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(image)[None])[0]
    assert labels.dtype == np.uint8 and np.array_equal(labels, logits.argmax(0).numpy())
    assert np.allclose(probabilities, torch.softmax(logits, 0).numpy(), atol=1e-6)
    assert Predictor(model, device="cpu").predict(image)[1] is None  # probabilities only when asked for


def test_memory_grows_by_a_bounded_number_of_bytes_per_pixel():
    """Peak RSS of `predict` (PNG in, PNG out) at two image sizes, each in a fresh process: the slope
    is what each extra pixel costs, independent of the model's fixed activations."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "inference_memory.py"), "--size", "1200x900", "2400x1800", "--tile", "256", "--max-side", "256"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    small, large = (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))
    pixels = 2400 * 1800 - 1200 * 900
    slope = (large["above_model_mib"] - small["above_model_mib"]) * 2**20 / pixels
    assert 0 < slope < BYTES_PER_PIXEL_BOUND, (small, large)
