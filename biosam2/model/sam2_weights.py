"""Getting a ``transformers.Sam2Model`` of a given size from any weights source.

Sources (``weights=``):

- ``"hf"`` (the default everywhere): the size's pretrained SAM2.1 in transformers format on the Hugging
  Face hub (``facebook/sam2.1-hiera-*``), taken from the local hub cache when it is there;
- ``"random"`` (or ``None``): random initialisation from a fixed seed, with a warning (results are not
  representative; for tests, demos and CPU benchmarks, which ask for it explicitly);
- ``"meta"``: Meta's official ``sam2.1_hiera_*.pt`` from the same hub repository;
- a hub id such as ``"facebook/sam2.1-hiera-tiny"``;
- a local directory saved in transformers format (``config.json`` + ``model.safetensors``);
- a local official ``.pt``/``.pth`` file, converted by :mod:`biosam2.model.official_checkpoint`.

Nothing is ever unpickled beyond tensors: transformers directories are read from safetensors only and
``.pt`` files with ``weights_only=True``.

Hub files are looked up in the local cache first; when they are missing and the hub is unreachable (no
network, or ``HF_HUB_OFFLINE=1``), loading fails at once with a message saying how to pass a local
checkpoint, instead of waiting for the hub client's retries.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Sam2Model

from biosam2.errors import CheckpointError
from biosam2.model.official_checkpoint import convert_official_state_dict, read_official_checkpoint
from biosam2.model.sam2_sizes import Sam2Size, get_size, identify_size
from biosam2.options import DEFAULT_WEIGHTS, RANDOM_WEIGHTS


# Files of a transformers-format SAM2 repository on the hub (what Sam2Model.from_pretrained reads).
_TRANSFORMERS_FILES = ("config.json", "model.safetensors")


class RandomWeightsWarning(UserWarning):
    """The SAM2 backbone is randomly initialised: accuracy will not be representative."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the frozen SAM2 weights came from, recorded in every biosam2 artifact."""

    kind: str  # "random" | "hub" | "directory" | "official"
    reference: str | None  # hub id or absolute path; None for random
    seed: int = 0  # only meaningful for random weights


def resolve_weights(size: Sam2Size, weights: str | Path | None) -> WeightsSource:
    """Classify a ``weights=`` argument without loading anything."""
    if weights is None or str(weights) == RANDOM_WEIGHTS:
        return WeightsSource("random", None)
    text = str(weights)
    if text == "hf":
        return WeightsSource("hub", size.hub_id)
    if text == "meta":
        return WeightsSource("official", f"hf://{size.hub_id}/{size.official_file}")
    path = Path(text).expanduser()
    if path.is_dir():
        return WeightsSource("directory", str(path.resolve()))
    if path.is_file():
        return WeightsSource("official", str(path.resolve()))
    if path.suffix in {".pt", ".pth"} or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such checkpoint file or directory")
    if text.count("/") == 1 and not text.startswith("/"):
        return WeightsSource("hub", text)
    raise CheckpointError(
        f"weights={text!r} is neither an existing file or directory nor a Hugging Face hub id "
        "(owner/name); use 'hf', 'meta', 'random', a hub id, a transformers directory or a .pt file"
    )


def load_sam2(
    size_name: str, weights: str | Path | None = DEFAULT_WEIGHTS, seed: int = 0
) -> tuple[Sam2Model, WeightsSource]:
    """A ``Sam2Model`` of the given size holding the requested weights, on the CPU, in eval mode."""
    size = get_size(size_name)
    source = resolve_weights(size, weights)
    if source.kind == "random":
        warnings.warn(
            f"SAM2 {size.name} is randomly initialised (seed {seed}), as asked: results are not "
            "representative of the method. Pretrained weights: weights='hf' (the default), 'meta' or a checkpoint.",
            RandomWeightsWarning,
            stacklevel=3,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Sam2Model(size.transformers_config())
        return model.eval(), WeightsSource("random", None, seed)
    if source.kind == "hub":
        model = _load_transformers_format(size, fetch_weights(source), source.reference)
    elif source.kind == "directory":
        model = _load_transformers_format(size, source.reference)
    else:
        model = _load_official(size, source.reference)
    return model.eval(), source


def prepare_weights(size_name: str, weights: str | Path | None) -> WeightsSource:
    """Check a ``weights=`` argument and make hub files local now, without building a model."""
    source = resolve_weights(get_size(size_name), weights)
    fetch_weights(source)
    return source


def fetch_weights(source: WeightsSource) -> str | None:
    """Make a hub source available locally (cache first) and return its local path; None for random.

    Called before anything else by ``train``, so that a missing download fails before any data is read.
    """
    if source.kind == "hub":
        files = [_hub_file(source.reference, name) for name in _TRANSFORMERS_FILES]
        return str(Path(files[0]).parent)
    if source.kind == "official" and source.reference.startswith("hf://"):
        repo_id, filename = source.reference.removeprefix("hf://").rsplit("/", 1)
        return _hub_file(repo_id, filename)
    return source.reference


def _hub_file(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download, is_offline_mode, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    how = (
        f"Download {filename} from https://huggingface.co/{repo_id} on a machine with network access and pass "
        "its folder (transformers format) or Meta's sam2.1_hiera_*.pt file with --weights PATH "
        "(build_model(weights=PATH)), or fill the Hugging Face cache (HF_HOME); --weights random trains "
        "on a random SAM2 (for tests only)."
    )
    if is_offline_mode():
        raise CheckpointError(f"{repo_id}/{filename}: not in the Hugging Face cache and HF_HUB_OFFLINE is set. {how}")
    unreachable = _hub_unreachable()
    if unreachable:
        raise CheckpointError(f"{repo_id}/{filename}: not in the Hugging Face cache and {unreachable}. {how}")
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, etag_timeout=5)
    except Exception as error:  # the hub client raises many types for network and auth problems
        raise CheckpointError(
            f"{repo_id}/{filename}: not in the Hugging Face cache and could not be downloaded "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}). {how}"
        ) from None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one quick connection attempt), or None.

    The hub client retries a failed connection for about half a minute; without network we say so at
    once. Behind a proxy the hub client's own connection decides, so nothing is probed.
    """
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"the hub at {constants.ENDPOINT} cannot be reached ({error.strerror or error})"
    return None


def _load_transformers_format(size: Sam2Size, path: str, reference: str | None = None) -> Sam2Model:
    reference = reference or path
    try:
        model, info = Sam2Model.from_pretrained(
            path, use_safetensors=True, output_loading_info=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{reference}: could not load SAM2 weights in transformers format ({error}). A directory needs "
            "config.json and model.safetensors; a hub id needs network access or a filled Hugging Face "
            "cache (without network, download elsewhere and pass the local directory)."
        ) from None
    backbone = model.config.vision_config.backbone_config
    found = identify_size(backbone.hidden_size, sum(backbone.blocks_per_stage))
    if found != size.name:
        raise CheckpointError(
            f"{reference}: this is a SAM2 {found or 'of unknown size'} checkpoint "
            f"(width {backbone.hidden_size}, {sum(backbone.blocks_per_stage)} blocks), but size={size.name!r} "
            f"was requested; pass size={found!r} or a {size.name} checkpoint"
        )
    problems = {
        kind: sorted(str(entry) for entry in info.get(kind) or ())
        for kind in ("missing_keys", "mismatched_keys")
        if info.get(kind)
    }
    if problems:
        raise CheckpointError(f"{reference}: incomplete SAM2 checkpoint: {_describe(problems)}")
    return model


def _load_official(size: Sam2Size, reference: str) -> Sam2Model:
    path = Path(fetch_weights(WeightsSource("official", reference)))
    converted, _video_only = convert_official_state_dict(read_official_checkpoint(path))
    with torch.device("meta"):
        skeleton = Sam2Model(size.transformers_config())
    expected = skeleton.state_dict()

    # Name the size the file really is, if it is another one: the most common mistake.
    patch = converted.get("vision_encoder.backbone.patch_embed.projection.weight")
    blocks = {k.split(".")[3] for k in converted if k.startswith("vision_encoder.backbone.blocks.")}
    found = identify_size(patch.shape[0], len(blocks)) if patch is not None else None
    if found is not None and found != size.name:
        raise CheckpointError(
            f"{path}: this is a SAM2 {found} checkpoint, but size={size.name!r} was requested; "
            f"pass size={found!r} or a {size.name} checkpoint"
        )
    problems = {
        "missing_keys": sorted(set(expected) - set(converted)),
        "unexpected_keys": sorted(set(converted) - set(expected)),
        "mismatched_keys": sorted(
            f"{k} {tuple(converted[k].shape)} != {tuple(expected[k].shape)}"
            for k in set(expected) & set(converted)
            if converted[k].shape != expected[k].shape
        ),
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointError(
            f"{path}: not a complete official SAM2.1 {size.name} checkpoint: {_describe(problems)}. "
            "Use the unmodified sam2.1_hiera_*.pt file from Meta (or weights='meta')."
        )
    # Every tensor comes from the file: build on the meta device and adopt the file's tensors
    # instead of paying for a random initialisation that would be overwritten.
    skeleton.load_state_dict(converted, strict=True, assign=True)
    leftover = [name for name, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: the checkpoint does not provide {', '.join(leftover[:8])}")
    return skeleton


def _describe(problems: dict[str, list[str]], shown: int = 8) -> str:
    parts = []
    for kind, keys in problems.items():
        listed = ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")
        parts.append(f"{len(keys)} {kind.replace('_', ' ')} ({listed})")
    return "; ".join(parts)


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A SHA-256 over names, shapes and bytes: detects an artifact restored on other base weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
