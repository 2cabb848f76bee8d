"""Which tensors are SAM2's is known by name, whatever happens to the model's tensor objects.

``Module.to(device)`` and every dtype change replace buffer objects (a GPU run moves the model there
and back), ``copy.deepcopy`` and ``load_state_dict`` make new ones, ``torch.compile`` wraps the model.
None of them may change what an artifact or a checkpoint holds, or its base fingerprint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch

import biosam2
from biosam2.cli import main
from biosam2.data.synthetic import write_synthetic_dataset
from biosam2.model.artifact import CONFIG_FILE, WEIGHTS_FILE
from biosam2.model.sam2_weights import fingerprint
from biosam2.training import TrainConfig, train

FOURIER_BUFFER = "decoder.fourier_embedding.positional_embedding"
IMAGES = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


def perturbed(adapter: str) -> biosam2.BioSAM2:
    """A model whose trained tensors are not at their initial values (an untrained one could hide a mix-up)."""
    model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter=adapter).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.trained_state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    return model


def double_then_float(model):
    return model.double().float()


def bfloat16_then_float(model):
    return model.bfloat16().float()


def move_like_a_device_round_trip(model):
    # Module.to() on the CPU with a copy forces new tensor objects, as a GPU round trip does.
    return model._apply(lambda t: t.clone())


def deep_copy(model):
    return copy.deepcopy(model)


def state_dict_round_trip(model):
    fresh = biosam2.build_model("tiny", weights="random", num_classes=3, adapter=model.config.adapter).eval()
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    return fresh


CHANGES = [double_then_float, bfloat16_then_float, move_like_a_device_round_trip, deep_copy, state_dict_round_trip]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("adapter", ["lw", "lora", "full"])
def test_trained_names_survive_device_dtype_copy_and_reload(adapter, change, tmp_path):
    model = perturbed(adapter)
    trained, frozen = set(model.trained_state_dict()), set(model.frozen_base_state_dict())
    fingerprint_before = model.base_fingerprint()
    with torch.no_grad():
        expected = model(IMAGES)

    changed = change(model)
    assert set(changed.trained_state_dict()) == trained and set(changed.frozen_base_state_dict()) == frozen
    assert FOURIER_BUFFER in frozen
    changed.save_pretrained(tmp_path / "artifact")
    description = json.loads((tmp_path / "artifact" / CONFIG_FILE).read_text())
    assert description["base_fingerprint"] == fingerprint_before
    assert set(safetensors.torch.load_file(tmp_path / "artifact" / WEIGHTS_FILE)) == trained

    restored = biosam2.load_model(tmp_path / "artifact").eval()
    with torch.no_grad():
        logits = restored(IMAGES)
    if change is bfloat16_then_float:  # the trained tensors were rounded to bf16 on the way
        assert torch.allclose(logits, expected, atol=0.05, rtol=0.05)
    else:
        assert torch.equal(logits, expected)


def test_lora_base_weights_are_frozen_under_peft_names():
    model = biosam2.build_model("tiny", weights="random", adapter="lora")
    frozen, trained = set(model.frozen_base_state_dict()), set(model.trained_state_dict())
    assert "encoder.vision_encoder.backbone.blocks.0.attn.qkv.base_layer.weight" in frozen
    assert "encoder.vision_encoder.backbone.blocks.0.attn.qkv.lora_A.default.weight" in trained
    assert not any("base_layer" in name for name in trained)


def test_compiled_model_saves_what_it_wraps(tmp_path):
    model = perturbed("lw")
    compiled = torch.compile(model)
    compiled.save_pretrained(tmp_path / "artifact")
    assert set(safetensors.torch.load_file(tmp_path / "artifact" / WEIGHTS_FILE)) == set(model.trained_state_dict())
    with torch.no_grad():
        assert torch.equal(biosam2.load_model(tmp_path / "artifact").eval()(IMAGES), model(IMAGES))


def write_legacy_artifact(model, directory: Path) -> None:
    """An artifact as biosam2 wrote it before trained tensors were known by name, after a GPU round trip:
    the Fourier buffer among the trained tensors and left out of the base fingerprint."""
    model.save_pretrained(directory)
    tensors = safetensors.torch.load_file(directory / WEIGHTS_FILE)
    frozen = model.frozen_base_state_dict()
    tensors[FOURIER_BUFFER] = frozen.pop(FOURIER_BUFFER).clone()
    safetensors.torch.save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "biosam2-artifact"})
    description = json.loads((directory / CONFIG_FILE).read_text())
    description["base_fingerprint"] = fingerprint(frozen)
    (directory / CONFIG_FILE).write_text(json.dumps(description))


def test_artifacts_written_before_the_fix_still_load(tmp_path):
    model = perturbed("lw")
    write_legacy_artifact(model, tmp_path / "legacy")
    restored = biosam2.load_model(tmp_path / "legacy").eval()
    with torch.no_grad():
        assert torch.equal(restored(IMAGES), model(IMAGES))


def test_a_really_different_base_is_still_refused(tmp_path):
    perturbed("lw").save_pretrained(tmp_path / "artifact")
    description = json.loads((tmp_path / "artifact" / CONFIG_FILE).read_text())
    description["base_weights"]["seed"] = 5  # the artifact now names another random SAM2
    (tmp_path / "artifact" / CONFIG_FILE).write_text(json.dumps(description))
    with pytest.raises(biosam2.CheckpointError, match="not the ones this artifact was trained on"):
        biosam2.load_model(tmp_path / "artifact")


# ---- the training path: Lightning moves the model, run.py moves it back --------------------------
class RoundTripTheModel(L.Callback):
    """What a GPU run does to the module's tensor objects (to the device and, at the end, back)."""

    def on_fit_start(self, trainer, module):
        module.model.double().float()

    def on_fit_end(self, trainer, module):
        module.model._apply(lambda t: t.clone())


CONFIG = dict(weights="random", adapter="lw", batch_size=2, patch_size=64, lr=1e-3, num_workers=0, overlays=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train=4, val=2, test=2, max_side=80)


def test_a_moved_run_predicts_and_resumes(dataset, tmp_path):
    run = tmp_path / "run"
    train(dataset, run, TrainConfig(**CONFIG, epochs=1), progress_bar=False, callbacks=[RoundTripTheModel()])
    saved = set(safetensors.torch.load_file(run / "model" / WEIGHTS_FILE))
    assert FOURIER_BUFFER not in saved
    assert main(["predict", str(run), str(dataset / "imagesTs"), str(tmp_path / "predictions")]) == 0
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs_trained"] == 2


def test_checkpoints_written_before_the_fix_still_resume(dataset, tmp_path):
    run = tmp_path / "run"
    train(dataset, run, TrainConfig(**CONFIG, epochs=1), progress_bar=False)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    base = biosam2.build_model("tiny", weights="random", num_classes=4, adapter="lw")
    frozen = base.frozen_base_state_dict()
    checkpoint["state_dict"][f"model.{FOURIER_BUFFER}"] = frozen.pop(FOURIER_BUFFER).clone()
    checkpoint["biosam2_base_fingerprint"] = fingerprint(frozen)
    torch.save(checkpoint, last)
    assert main(["train", str(dataset), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs_trained"] == 2
