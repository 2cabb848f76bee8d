"""Small artifacts: only what was trained is saved, and restoring gives identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from test_adapters import make_adapters_matter, randomise_batch_norms
from transformers import Sam2Model

import biosam2
from biosam2.errors import CheckpointError
from biosam2.model.artifact import CONFIG_FILE, WEIGHTS_FILE
from biosam2.model.sam2_sizes import get_size


def perturb_trainable(model: torch.nn.Module) -> None:
    """Stand-in for training: every trainable tensor and BN statistic moves away from its init."""
    generator = torch.Generator().manual_seed(5)
    randomise_batch_norms(model, generator)
    make_adapters_matter(model, generator)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)


@pytest.mark.parametrize("adapter", ["hp", "lw", "lora", "none"])
def test_round_trip_gives_identical_logits(tmp_path, adapter):
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter=adapter)
    perturb_trainable(model)
    model.eval()
    model.save_pretrained(tmp_path / "artifact", metadata={"classes": ["bg", "a", "b"]})
    restored = biosam2.load_model(tmp_path / "artifact").eval()
    images = torch.rand(2, 3, 77, 131)
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))
    description = json.loads((tmp_path / "artifact" / CONFIG_FILE).read_text())
    assert description["metadata"] == {"classes": ["bg", "a", "b"]}
    assert description["model"]["adapter"] == adapter


def test_fused_lw_model_saves_and_reloads_fused_and_is_a_few_megabytes(tmp_path):
    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw")
    perturb_trainable(model)
    model.eval().reparameterize()
    model.save_pretrained(tmp_path / "fused")
    restored = biosam2.load_model(tmp_path / "fused").eval()
    assert restored.config.reparameterized
    images = torch.rand(1, 3, 64, 100)
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))
    size_mb = (tmp_path / "fused" / WEIGHTS_FILE).stat().st_size / 2**20
    base_mb = sum(t.numel() * 4 for t in model.frozen_base_state_dict().values()) / 2**20
    assert size_mb < 15 and size_mb < base_mb / 8, (size_mb, base_mb)


def test_a_fused_lw_artifact_of_format_1_still_loads(tmp_path):
    """Format 1 kept the fused conv inside the multi-branch block (``spatial.fused.weight``)."""
    import safetensors.torch

    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw")
    perturb_trainable(model)
    model.eval().reparameterize()
    model.save_pretrained(tmp_path / "old")
    weights, config = tmp_path / "old" / WEIGHTS_FILE, tmp_path / "old" / CONFIG_FILE
    tensors = safetensors.torch.load_file(weights)
    old_names = {name.replace(".spatial.", ".spatial.fused."): t for name, t in tensors.items()}
    assert sum(".spatial.fused." in name for name in old_names) == 24  # 12 blocks: weight and bias
    safetensors.torch.save_file(old_names, weights, metadata={"format": "biosam2-artifact"})
    description = json.loads(config.read_text())
    assert description["format_version"] == 2
    config.write_text(json.dumps({**description, "format_version": 1}))
    restored = biosam2.load_model(tmp_path / "old").eval()
    images = torch.rand(1, 3, 64, 100)
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))
    config.write_text(json.dumps(description))  # the same names under format 2 are not this model's
    with pytest.raises(CheckpointError, match="unexpected 24"):
        biosam2.load_model(tmp_path / "old")


def test_artifact_holds_only_trained_tensors(tmp_path):
    import safetensors.torch

    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="hp")
    model.save_pretrained(tmp_path / "hp")
    saved = safetensors.torch.load_file(tmp_path / "hp" / WEIGHTS_FILE)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(saved)
    assert not any(name.startswith("encoder.vision_encoder.backbone.blocks.0.attn") for name in saved)


def test_artifact_finds_its_base_weights_again_from_the_recorded_reference(tmp_path):
    torch.manual_seed(3)
    Sam2Model(get_size("tiny").transformers_config()).save_pretrained(tmp_path / "base")
    model = biosam2.build_model("tiny", weights=tmp_path / "base", adapter="lw").eval()
    model.save_pretrained(tmp_path / "artifact")
    restored = biosam2.load_model(tmp_path / "artifact").eval()
    assert restored.weights_source.reference == str((tmp_path / "base").resolve())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))


def test_restoring_on_other_base_weights_is_an_error(tmp_path):
    torch.manual_seed(4)
    Sam2Model(get_size("tiny").transformers_config()).save_pretrained(tmp_path / "other")
    biosam2.build_model("tiny", weights="random", adapter="lw").save_pretrained(tmp_path / "artifact")
    with pytest.raises(CheckpointError, match="not the ones this artifact was trained on"):
        biosam2.load_model(tmp_path / "artifact", base_weights=tmp_path / "other")


def test_damaged_artifacts_are_reported_by_file(tmp_path):
    model = biosam2.build_model("tiny", weights="random", adapter="lw")
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="biosam2.json is missing"):
        biosam2.load_model(tmp_path)
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        biosam2.load_model(tmp_path / "a")


def test_weights_for_another_number_of_classes_are_refused(tmp_path):
    biosam2.build_model("tiny", weights="random", num_classes=2, adapter="none").save_pretrained(tmp_path / "two")
    biosam2.build_model("tiny", weights="random", num_classes=4, adapter="none").save_pretrained(tmp_path / "four")
    (tmp_path / "two" / WEIGHTS_FILE).write_bytes((tmp_path / "four" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=r"wrong shape 1: decoder.class_tokens \(4, 256\) vs model \(2, 256\)"):
        biosam2.load_model(tmp_path / "two")


def test_saving_over_an_existing_artifact_replaces_it_whole(tmp_path):
    biosam2.build_model("tiny", weights="random", num_classes=2, adapter="none").save_pretrained(tmp_path / "a")
    biosam2.build_model("tiny", weights="random", num_classes=5, adapter="none").save_pretrained(tmp_path / "a")
    assert biosam2.load_model(tmp_path / "a").num_classes == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folders left behind
