"""The model's contract: prompt-free, multi-class logits at the input's own size, for any size."""

from __future__ import annotations

import pytest
import torch

import biosam2
from biosam2.errors import ConfigError


@pytest.fixture(scope="module")
def hp_model():
    return biosam2.build_model("tiny", weights="random", num_classes=4, adapter="hp").eval()


SIZES = [(33, 47), (97, 211), (256, 256), (512, 384), (1000, 120), (32, 32), (8, 13), (2048, 64), (61, 733)]


@pytest.mark.parametrize("height,width", SIZES)
def test_logits_have_input_size_for_any_size_and_aspect_ratio(hp_model, height, width):
    with torch.no_grad():
        logits = hp_model(torch.rand(1, 3, height, width))
    assert logits.shape == (1, 4, height, width)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("adapter,pos_encoding", [("lw", "peg"), ("none", "sam2"), ("lora", "peg"), ("adaptformer", "sam2")])
def test_every_variant_handles_odd_sizes(adapter, pos_encoding):
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter=adapter, pos_encoding=pos_encoding).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 97, 211))
    assert logits.shape == (2, 3, 97, 211)


def test_grey_scale_input_equals_the_same_image_repeated_on_three_channels(hp_model):
    grey = torch.rand(1, 1, 64, 80)
    with torch.no_grad():
        assert torch.equal(hp_model(grey), hp_model(grey.repeat(1, 3, 1, 1)))


def test_an_image_gives_the_same_logits_alone_or_in_a_batch(hp_model):
    images = torch.rand(3, 3, 70, 90)
    with torch.no_grad():
        together = hp_model(images)
        alone = hp_model(images[1:2])
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=1e-4)


def test_resize_mode_reproduces_sam2s_fixed_square_input():
    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="none", pos_encoding="sam2", input_size=256).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 100, 300))
    assert logits.shape == (1, 2, 100, 300)


def test_positional_encoding_is_really_replaced_by_the_peg():
    peg = biosam2.build_model("tiny", weights="random", adapter="none", pos_encoding="peg")
    sam2 = biosam2.build_model("tiny", weights="random", adapter="none", pos_encoding="sam2")
    assert any("positional_encoding.proj" in n for n, p in peg.named_parameters() if p.requires_grad)
    assert not any("positional_encoding" in n for n, _ in sam2.named_parameters())


@pytest.mark.parametrize("bad", [torch.rand(3, 64, 64), torch.rand(1, 2, 64, 64), torch.randint(0, 255, (1, 3, 64, 64))])
def test_bad_input_tensors_are_refused_clearly(hp_model, bad):
    with pytest.raises(ConfigError, match="expected"):
        hp_model(bad)


def test_random_weights_warn_that_results_are_not_representative():
    from biosam2.model.sam2_weights import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match="not representative"):
        biosam2.build_model("tiny", weights="random", adapter="none")


@pytest.mark.parametrize(
    "options,message",
    [
        ({"adapter": "dora"}, "adapter='dora'"),
        ({"size": "huge"}, "unknown SAM2 size"),
        ({"pos_encoding": "rope"}, "pos_encoding"),
        ({"num_classes": 0}, "num_classes"),
        ({"adapter_blocks": [12]}, "blocks 0..11"),
    ],
)
def test_invalid_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        biosam2.build_model(weights="random", **options)
