"""Images with a side above ``max_side`` are predicted in tiles: same shape, same answer, really tiled.

Written against the public ``Predictor(model, max_side=..., tile_size=...).predict(image)`` only, so that
it holds for any way of running and accumulating the tiles. ``max_side=64, tile_size=64`` keeps it cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import biosam2
from biosam2.inference.predictor import Predictor

TILE = 64


class PixelwiseModel(nn.Module):
    """Logits at a pixel from that pixel alone (class 0 below 0.3, 1 up to 0.7, 2 above), so that tiling
    cannot change them: a tiled prediction that differs from the whole-image one put a tile in the wrong
    place, lost one, or blended them wrongly. Records the shape of every input it is given."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 3, kernel_size=1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([0.0, 10.0, 20.0]).reshape(3, 1, 1, 1))
            self.head.bias.copy_(torch.tensor([0.0, -3.0, -10.0]))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(images.shape))
        return self.head(images)


def grey_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise at 8-bit levels: regions of all three classes, nowhere a tie."""
    rng = np.random.default_rng(seed)
    height, width = shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = 0.5 + 0.35 * np.sin(xs / 9.0 + rng.uniform(0, 6)) * np.cos(ys / 13.0 + rng.uniform(0, 6))
    noise = rng.normal(0, 0.08, shape)
    levels = np.round(np.clip(smooth.reshape(height, width, *([1] * (len(shape) - 2))) + noise, 0, 1) * 255)
    return (levels / 255).astype(np.float32)[None]  # channels first


def _pixels_seen(seen: list[tuple[int, ...]]) -> int:
    return sum(int(np.prod([shape[0], *shape[-2:]])) for shape in seen)


@pytest.mark.parametrize("shape", [(150, 230), (40, 150), (97, 70, 3)], ids=["2-D", "2-D one side below a tile", "3-D"])
def test_tiled_prediction_equals_whole_image_prediction_for_a_pixelwise_model(shape):
    image = grey_image(shape)
    model = PixelwiseModel()
    tiled = Predictor(model, max_side=TILE, tile_size=TILE, batch_size=2)
    tiled_labels, tiled_probabilities = tiled.predict(image, return_probabilities=True)
    tiles = list(model.seen)
    model.seen.clear()
    whole_labels, whole_probabilities = Predictor(model, max_side=4096).predict(image, return_probabilities=True)

    assert tiled_labels.shape == whole_labels.shape == shape
    assert tiled_probabilities.shape == whole_probabilities.shape == (3, *shape)
    assert set(np.unique(whole_labels)) == {0, 1, 2}  # the comparison covers every class
    assert np.array_equal(tiled_labels, whole_labels)
    np.testing.assert_allclose(tiled_probabilities, whole_probabilities, atol=1e-5)
    # Tiling really happened: the model never saw more than a tile, and the tiles cover the image.
    assert all(max(seen[-2:]) <= TILE for seen in tiles), tiles
    slices = shape[2] if len(shape) == 3 else 1
    assert _pixels_seen(tiles) >= shape[0] * shape[1] * slices
    assert len(tiles) > 1 and all(max(seen[-2:]) > TILE for seen in model.seen)


def test_tiled_prediction_with_sam2_keeps_the_input_shape_and_sees_only_tiles():
    """The real model (random tiny SAM2) through the tiled path: odd sizes in, a full-size answer out."""
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter="lw").eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    image = np.repeat(grey_image((97, 150)), 3, axis=0)
    labels, probabilities = Predictor(model, max_side=TILE, tile_size=TILE).predict(image, return_probabilities=True)

    assert labels.shape == (97, 150) and probabilities.shape == (3, 97, 150)
    assert labels.max() < 3 and np.array_equal(labels, probabilities.argmax(0))
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert len(seen) > 1 and all(max(shape[-2:]) <= TILE for shape in seen), seen
    assert _pixels_seen(seen) >= 97 * 150
