"""Getting SAM2 weights: transformers directories, Meta's official .pt files, and what is refused."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from conftest import official_keys, write_official_checkpoint
from transformers import Sam2Model, Sam2VideoConfig, Sam2VideoModel

import biosam2
from biosam2.errors import CheckpointError
from biosam2.model.official_checkpoint import VIDEO_ONLY_PREFIXES, convert_official_state_dict
from biosam2.model.sam2_sizes import get_size
from biosam2.model.sam2_weights import load_sam2


def assert_same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    different = [k for k in state if not torch.equal(state[k], reference[k])]
    assert not different, f"tensors differ from the checkpoint: {different[:5]}"


# ---- transformers format --------------------------------------------------------------------
def test_transformers_directory_loads_exactly(tmp_path):
    torch.manual_seed(7)
    saved = Sam2Model(get_size("tiny").transformers_config())
    saved.save_pretrained(tmp_path / "sam2-tiny")
    loaded, source = load_sam2("tiny", tmp_path / "sam2-tiny")
    assert source.kind == "directory"
    assert_same_weights(loaded, saved.state_dict())
    # and through the public factory: the model's frozen tensors are those weights
    model = biosam2.build_model("tiny", weights=tmp_path / "sam2-tiny", adapter="lw")
    torch.testing.assert_close(
        model.encoder.vision_encoder.backbone.patch_embed.projection.weight,
        saved.vision_encoder.backbone.patch_embed.projection.weight,
    )


def test_hub_style_video_checkpoint_directory_loads(tmp_path):
    """The hub's facebook/sam2.1-hiera-* repositories hold Sam2VideoModel checkpoints."""
    torch.manual_seed(8)
    video = Sam2VideoModel(Sam2VideoConfig())
    video.save_pretrained(tmp_path / "video")
    loaded, _ = load_sam2("tiny", tmp_path / "video")
    video_state = video.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, video_state[name]), name


def test_transformers_directory_of_another_size_is_refused_by_name(tmp_path):
    Sam2Model(get_size("small").transformers_config()).save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"SAM2 small checkpoint.*size='tiny' was requested"):
        load_sam2("tiny", tmp_path / "small")


def test_transformers_directory_with_missing_tensors_names_them(tmp_path):
    Sam2Model(get_size("tiny").transformers_config()).save_pretrained(tmp_path / "tiny")
    weights = tmp_path / "tiny" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    del tensors["mask_decoder.iou_token.weight"]
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys.*mask_decoder.iou_token.weight"):
        load_sam2("tiny", tmp_path / "tiny")


def test_nonexistent_sources_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_sam2("tiny", tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="hub id"):
        load_sam2("tiny", "not a hub id")


# ---- official Meta checkpoints --------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "small", "base-plus", "large"])
def test_official_checkpoint_of_every_size_loads_completely(tmp_path, size):
    path = tmp_path / f"sam2.1_hiera_{size}.pt"
    written = write_official_checkpoint(size, path)
    model, source = load_sam2(size, path)
    assert source.kind == "official"

    converted, set_aside = convert_official_state_dict(written)
    # Only the video memory is set aside, and all of it is.
    assert all(k.startswith(VIDEO_ONLY_PREFIXES) for k in set_aside)
    assert sorted(set_aside) == sorted(k for k, _, _ in official_keys(size) if k.startswith(VIDEO_ONLY_PREFIXES))
    # Every other tensor of the file is in the model, unchanged, and the model has nothing else.
    assert_same_weights(model, converted)
    assert torch.equal(
        model.vision_encoder.backbone.patch_embed.projection.weight,
        written["image_encoder.trunk.patch_embed.proj.weight"],
    )
    assert torch.equal(
        model.prompt_encoder.point_embed.weight[2], written["sam_prompt_encoder.point_embeddings.2.weight"][0]
    )


def test_official_checkpoint_feeds_build_model(tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    written = write_official_checkpoint("tiny", path)
    model = biosam2.build_model("tiny", weights=path, num_classes=3, adapter="hp")
    assert torch.equal(model.decoder.mask_decoder.mask_tokens.weight, written["sam_mask_decoder.mask_tokens.weight"])
    # class tokens start from the pretrained mask tokens
    assert torch.equal(model.decoder.class_tokens[1], written["sam_mask_decoder.mask_tokens.weight"][1])
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 40, 50)).shape == (1, 3, 40, 50)


def test_official_checkpoint_of_the_wrong_size_says_which_size_it_is(tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    write_official_checkpoint("tiny", path)
    with pytest.raises(CheckpointError, match=r"SAM2 tiny checkpoint, but size='small' was requested; pass size='tiny'"):
        biosam2.build_model("small", weights=path)


def test_official_checkpoint_with_missing_keys_lists_them(tmp_path):
    path = tmp_path / "broken.pt"
    write_official_checkpoint("tiny", path, drop=("sam_mask_decoder.conv_s0.weight", "image_encoder.trunk.pos_embed"))
    with pytest.raises(CheckpointError) as error:
        load_sam2("tiny", path)
    message = str(error.value)
    assert "2 missing keys" in message
    assert "mask_decoder.conv_s0.weight" in message and "vision_encoder.backbone.pos_embed" in message


def test_truncated_official_checkpoint_is_reported(tmp_path):
    path = tmp_path / "truncated.pt"
    write_official_checkpoint("tiny", path)
    path.write_bytes(path.read_bytes()[: 4096])
    with pytest.raises(CheckpointError, match="truncated"):
        load_sam2("tiny", path)
