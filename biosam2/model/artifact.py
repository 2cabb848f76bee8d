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
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from biosam2.atomic_io import replace_directory
from biosam2.errors import CheckpointError, ConfigError
from biosam2.model.config import ModelConfig
from biosam2.model.segmenter import non_finite
from biosam2.model.sam2_weights import RandomWeightsWarning, WeightsSource
from biosam2.options import RANDOM_WEIGHTS

WEIGHTS_FILE = "biosam2.safetensors"
CONFIG_FILE = "biosam2.json"
FORMAT = "biosam2-artifact"
FORMAT_VERSION = 1


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


def load_model(
    directory: str | Path,
    base_weights: str | Path | None = None,
    *,
    check_fingerprint: bool = True,
):
    """Restore a model saved with ``save_pretrained``.

    The frozen SAM2 weights are found again from the reference recorded in the artifact, or taken from
    ``base_weights`` when given (e.g. the same ``.pt`` file on another machine). Their fingerprint must
    match the one recorded at save time.
    """
    from biosam2.model.factory import assemble
    from biosam2.model.sam2_weights import load_sam2

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    description = read_artifact_description(directory)
    try:
        config = ModelConfig.from_dict(description["model"])
    except (ConfigError, TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: invalid model options: {error}") from None
    fused = config.reparameterized
    config.reparameterized = False
    recorded = description["base_weights"]
    from_description = base_weights is None
    if from_description:
        base_weights = RANDOM_WEIGHTS if recorded["kind"] == "random" else recorded["reference"]
    with warnings.catch_warnings():
        if recorded["kind"] == "random" and base_weights == RANDOM_WEIGHTS:  # already warned when it was trained
            warnings.simplefilter("ignore", RandomWeightsWarning)
        try:
            sam2, source = load_sam2(config.size, base_weights, seed=recorded.get("seed", 0))
        except CheckpointError as error:
            if not from_description:
                raise
            raise CheckpointError(
                f"{config_path}: the base SAM2 weights it names cannot be used here: {error}. If you have the "
                "weights the model was trained on elsewhere, pass them: biosam2 predict --weights PATH, or "
                "load_model(..., base_weights=PATH)"
            ) from None
    model = assemble(config, sam2, source)
    if fused:
        model.reparameterize()

    weights_path = directory / WEIGHTS_FILE
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: missing; the artifact is incomplete") from None
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({error})") from None
    legacy = model.check_trained_tensors(tensors, f"{weights_path} (described by {CONFIG_FILE})")
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{weights_path}: {len(bad)} trained tensor(s) hold NaN or Inf values ({', '.join(bad[:4])}); the model diverged")
    if check_fingerprint and model.base_fingerprint(leave_out=legacy) != description["base_fingerprint"]:
        raise CheckpointError(
            f"{directory}: the base SAM2 weights ({source.reference or 'random, seed ' + str(source.seed)}) are not "
            f"the ones this artifact was trained on ({recorded['reference'] or 'random, seed ' + str(recorded['seed'])}); "
            "pass the original weights as base_weights"
        )
    _load_trained_tensors(model, {k: v for k, v in tensors.items() if k not in legacy}, weights_path)
    return model


def _load_trained_tensors(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the trained tensors in; names and shapes were checked by ``check_trained_tensors``."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
