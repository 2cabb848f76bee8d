"""The model's contract: prompt-free, multi-class logits at the input's own size, for any size."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_every_tensor

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


SAM2_TOLERANCE = 1e-5  # of each class's largest |logit|; measured: 7e-7 (see below)


def test_resize_mode_reproduces_sam2s_fixed_square_input(tmp_path):
    """input_size=1024 with SAM2's positional tables is SAM2 itself: on the square input it makes of the image,
    classes 1..3 of the prompt-free decoder are transformers' Sam2Model's three multimask logits.

    Same perturbed random weights on both sides (no tensor at its init value). The FPN features are
    bit-identical; the decoder's logits differ by at most 6e-8 (7e-7 of the largest |logit|, tiny, 2 cores)
    because its inputs reach the two-way transformer in another memory layout (channels-last strides from
    the FPN), which changes the last bits of the matmuls, not the computation. About 5 s on 2 idle cores.
    """
    from transformers import Sam2ImageProcessor, Sam2Model

    from biosam2.model.sam2_sizes import get_size

    sam2 = perturb_every_tensor(Sam2Model(get_size("tiny").transformers_config()).eval())
    sam2.save_pretrained(tmp_path / "sam2")
    model = biosam2.build_model(
        "tiny", weights=tmp_path / "sam2", num_classes=4, adapter="none", pos_encoding="sam2", input_size=1024
    ).eval()
    seen = {}
    model.encoder.register_forward_pre_hook(lambda module, args: seen.update(pixels=args[0]))
    model.decoder.register_forward_hook(lambda module, args, output: seen.update(logits=output))

    image = torch.randint(0, 256, (100, 300, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        output = model(image.permute(2, 0, 1)[None].float() / 255)
        expected = sam2(pixel_values=seen["pixels"], multimask_output=True).pred_masks[:, 0]  # (1, 3, 256, 256)
    assert output.shape == (1, 4, 100, 300)

    # The square input is SAM2's: its own processor's 1024 x 1024, ImageNet-normalised pixels, up to resampling.
    processed = Sam2ImageProcessor()(images=image.numpy(), return_tensors="pt")["pixel_values"]
    assert seen["pixels"].shape == processed.shape == (1, 3, 1024, 1024)
    assert (seen["pixels"] - processed).abs().max() < 0.05 * processed.std()

    ours = seen["logits"][:, 1:]
    assert ours.shape == expected.shape
    scale = expected.abs().amax(dim=(0, 2, 3))
    difference = (ours - expected).abs().amax(dim=(0, 2, 3))
    print(f"\nlargest |difference| per class {difference.tolist()}, relative {(difference / scale).tolist()}")
    assert (difference <= SAM2_TOLERANCE * scale).all()
    for c in range(3):  # the three masks are distinct: a class wired to the wrong mask token could not pass
        for other in range(c + 1, 3):
            assert (expected[:, c] - expected[:, other]).abs().max() > 100 * SAM2_TOLERANCE * scale.max()


def test_the_peg_replaces_sam2s_absolute_positional_tables():
    """With the PEG, SAM2's absolute tables are never read (NaN in them changes nothing), and the PEG's own
    weights decide the output; with SAM2's encoding the same NaN reaches every logit."""
    peg = biosam2.build_model("tiny", weights="random", adapter="none", pos_encoding="peg").eval()
    sam2 = biosam2.build_model("tiny", weights="random", adapter="none", pos_encoding="sam2").eval()
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = peg(images)
        for model in (peg, sam2):
            backbone = model.encoder.vision_encoder.backbone
            backbone.pos_embed.fill_(float("nan"))
            backbone.pos_embed_window.fill_(float("nan"))
        assert torch.equal(peg(images), before)
        assert torch.isnan(sam2(images)).all()

        weight = peg.encoder.positional_encoding.proj.weight
        weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)))
        assert (peg(images) - before).abs().max() > 1e-2 * before.abs().max()


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
