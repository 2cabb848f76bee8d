"""Pretrained SAM2.1 is the default; random weights only when asked; no network fails at once.

The hub path is exercised for real on a Hugging Face cache laid out as the hub client writes it
(``models--facebook--sam2.1-hiera-tiny/{refs,snapshots}``), holding a transformers-format SAM2 tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from transformers import Sam2Model

import biosam2
from biosam2.errors import CheckpointError
from biosam2.model.sam2_sizes import get_size
from biosam2.training.config import TrainConfig


def fill_hub_cache(cache: Path, size: str = "tiny") -> Path:
    """A hub cache holding a random SAM2 of ``size`` in transformers format, as hf_hub_download leaves it."""
    spec = get_size(size)
    repo = cache / f"models--{spec.hub_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    torch.manual_seed(1)
    Sam2Model(spec.transformers_config()).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_build_model_defaults_to_pretrained_weights_from_the_hub_cache(tmp_path, monkeypatch):
    snapshot = fill_hub_cache(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the cache alone must do

    model = biosam2.build_model("tiny", num_classes=2, adapter="lw")
    assert (model.weights_source.kind, model.weights_source.reference) == ("hub", "facebook/sam2.1-hiera-tiny")
    cached = Sam2Model.from_pretrained(snapshot)
    ours = model.encoder.vision_encoder.backbone.patch_embed.projection.weight
    assert torch.equal(ours, cached.vision_encoder.backbone.patch_embed.projection.weight)

    model.save_pretrained(tmp_path / "artifact")
    restored = biosam2.load_model(tmp_path / "artifact")  # base found again through the hub id
    assert restored.weights_source == model.weights_source
    assert restored.base_fingerprint() == model.base_fingerprint()


def test_training_defaults_to_pretrained_and_null_in_old_configs_means_random(tmp_path):
    assert TrainConfig().weights == "hf"
    assert TrainConfig(weights="random").weights == "random"
    old = tmp_path / "config.yaml"  # a run saved before "random" existed wrote null for random weights
    old.write_text(yaml.safe_dump({**TrainConfig().to_dict(), "weights": None}))
    assert TrainConfig.from_yaml(old).weights == "random"


def test_random_weights_only_when_asked():
    with pytest.warns(biosam2.model.sam2_weights.RandomWeightsWarning, match="randomly initialised"):
        model = biosam2.build_model("tiny", weights="random", adapter="none")
    assert model.weights_source.kind == "random"


def _train_without_weights(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``biosam2 train`` with the default weights, an empty HF_HOME and no dataset at all."""
    environment = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf-home"), **env}
    for name in ("HF_HUB_CACHE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        environment.pop(name, None)  # a proxy would hide the refused connection this test is about
    command = [sys.executable, "-m", "biosam2", "train", str(tmp_path / "no-such-dataset"), "--out", str(tmp_path / "run")]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        # A hub endpoint that refuses connections: what a machine without network sees, without retries.
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),
    ],
    ids=["offline", "unreachable"],
)
def test_default_weights_without_network_or_cache_fail_before_reading_data(tmp_path, env, reason):
    result = _train_without_weights(tmp_path, **env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "facebook/sam2.1-hiera-tiny" in errors[0] and reason in errors[0]
    assert "--weights PATH" in errors[0]  # how to pass a local checkpoint
    assert "no-such-dataset" not in result.stderr  # the dataset was never looked at
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_offline_hub_weights_raise_a_checkpoint_error_in_python(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        biosam2.build_model("tiny")
