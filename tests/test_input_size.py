"""A fixed ``input_size`` with crops (G-SAM's ISBI recipe): images resized, then cropped, and the crops
seen by the encoder at that scale, not squashed again to ``input_size``."""

from __future__ import annotations

import pytest
import torch

import biosam2
from biosam2.training.config import TrainConfig
from biosam2.training.module import SegmentationModule


@pytest.fixture(scope="module")
def model():
    return biosam2.build_model("tiny", weights="random", num_classes=2, adapter="none", input_size=64)


def encoder_input_sides(model, run) -> list[tuple[int, int]]:
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_already_resized_images_run_at_their_own_size(model):
    model.eval()
    crops = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert encoder_input_sides(model, lambda: model(crops)) == [(64, 64)]  # squashed: SAM2's own way
        assert encoder_input_sides(model, lambda: model(crops, already_resized=True)) == [(32, 32)]
        at_scale = model(crops, already_resized=True)
        model.config.input_size = None  # the same model at native resolution computes the same logits
        try:
            native = model(crops)
        finally:
            model.config.input_size = 64
    assert at_scale.shape == (2, 2, 32, 32) and torch.equal(at_scale, native)


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
@pytest.mark.parametrize("input_mode,side", [("crop", 32), ("resize", 64)])
def test_training_feeds_crops_at_the_input_size_scale(model, input_mode, side):
    """Crops come from images resized to input_size: a 32-px crop is 32 px at that scale. Whole images
    resized to patch_size (input_mode resize) are squashed to input_size, as at validation."""
    config = TrainConfig(weights="random", adapter="none", input_size=64, input_mode=input_mode, patch_size=32)
    module = SegmentationModule(model.train(), config, ["background", "a"])
    batch = (torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long))
    assert encoder_input_sides(model, lambda: module.training_step(batch, 0)) == [(side, side)]
