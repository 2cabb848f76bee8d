"""Small model artifacts: only what was trained, plus a reference to the frozen SAM2 weights.

An artifact directory holds

- ``biosam2.safetensors``: the trained tensors (adapters, PEG, class heads, their buffers, and any
  SAM2 tensor that was unfrozen);
- ``biosam2.json``: the :class:`ModelConfig`, where the base SAM2 weights came from, and a fingerprint
  of those weights so that restoring on different base weights is an error, not silently wrong logits.

The directory is written as a whole (staging folder, then a swap): never half an artifact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from biosam2.atomic_io import replace_directory
from biosam2.errors import CheckpointError
from biosam2.model.sam2_weights import WeightsSource

WEIGHTS_FILE = "biosam2.safetensors"
CONFIG_FILE = "biosam2.json"
FORMAT = "biosam2-artifact"
# 2: a fused LW adapter is a plain nn.Conv2d in its adapter's ``spatial`` slot (format 1 kept it inside
# the multi-branch block: ``spatial.fused.weight``); format 1 files are read with their names mapped.
FORMAT_VERSION = 2
_FUSED_IN_FORMAT_1 = re.compile(r"\.spatial\.fused\.(weight|bias)$")


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an Inf."""
    return sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())


def save_artifact(model, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves what it wraps
    source: WeightsSource = model.weights_source
    tensors = {name: t.contiguous().clone() for name, t in model.trained_state_dict().items()}
    bad = non_finite(tensors)
    if bad:  # a diverged model must never become an artifact that predicts background everywhere
        raise CheckpointError(f"{directory}: not saved: {len(bad)} trained tensor(s) hold NaN or Inf values ({', '.join(bad[:4])})")
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "base_weights": {"kind": source.kind, "reference": source.reference, "seed": source.seed},
        "base_fingerprint": model.base_fingerprint(),
        "trained_tensors": len(tensors),
        "trained_parameters": sum(t.numel() for t in tensors.values()),
        "metadata": metadata or {},
    }

    def write(staging: Path) -> None:
        safetensors.torch.save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")

    replace_directory(write, directory)
    return directory


def read_artifact_description(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a biosam2 artifact directory (it does not exist or is a file)")
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory}: not a biosam2 artifact: {CONFIG_FILE} is missing (save one with model.save_pretrained)"
        )
    try:
        description = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not a biosam2 artifact description (format != {FORMAT!r})")
    if description.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: written by a newer biosam2 (format {description['format_version']}); upgrade biosam2"
        )
    problems = _description_problems(description)
    if problems:
        raise CheckpointError(
            f"{config_path}: not as save_pretrained writes it (edited or damaged): {'; '.join(problems)}"
        )
    return description


BASE_KINDS = ("random", "hub", "directory", "official")


def _description_problems(description: dict[str, Any]) -> list[str]:
    """What load_model needs from biosam2.json and does not find there, in words."""
    problems = []
    if not isinstance(description.get("model"), dict):
        problems.append("'model' (the model options) is missing or not an object")
    if not isinstance(description.get("base_fingerprint"), str):
        problems.append("'base_fingerprint' is missing or not a string")
    base = description.get("base_weights")
    if not isinstance(base, dict) or base.get("kind") not in BASE_KINDS:
        problems.append(f"'base_weights' must be an object whose 'kind' is one of {', '.join(BASE_KINDS)}")
        return problems
    reference, seed = base.get("reference"), base.get("seed", 0)
    if base["kind"] == "random":
        if not isinstance(seed, int) or isinstance(seed, bool):
            problems.append(f"'base_weights.seed' {seed!r} is not an integer")
    elif not isinstance(reference, str) or not reference:
        problems.append(f"'base_weights.reference' {reference!r} does not name the base weights")
    elif base["kind"] in ("directory", "official") and not reference.startswith("hf://") and not Path(reference).is_absolute():
        # save_pretrained records absolute paths: a relative one would mean another file in another folder.
        problems.append(
            f"'base_weights.reference' {reference!r} is a relative path, which would depend on the working directory"
        )
    return problems


def read_trained_tensors(directory: Path, description: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The artifact's tensors, named as this biosam2 names them (``description``: its biosam2.json)."""
    weights_path = directory / WEIGHTS_FILE
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: missing; the artifact is incomplete") from None
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({error})") from None
    if description.get("format_version", 0) < 2:
        tensors = {_FUSED_IN_FORMAT_1.sub(r".spatial.\1", name): t for name, t in tensors.items()}
    return tensors


def load_trained_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the trained tensors in; names and shapes were checked by ``check_trained_tensors``."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
