"""Meta's official SAM2.1 checkpoints (``sam2.1_hiera_*.pt``) in the transformers layout.

An official checkpoint is a dict whose key ``"model"`` holds the state dict of Meta's ``SAM2Base``.
``convert_official_state_dict`` renames its entries to those of ``transformers.Sam2Model`` and sets
aside the video-only memory modules, which an image model does not use.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from biosam2.errors import CheckpointError

# Entries of the official state dict that only SAM2's video memory uses (see shared/fixtures/README).
VIDEO_ONLY_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "mask_downsample.",
    "no_obj_embed_spatial",
)

# (pattern, replacement) applied in order to every key. Meta's modules use nn.Sequential indices
# (``layers.0``) where transformers uses names (``proj_in``), and ``norm``/``out_proj`` names where
# transformers says ``layer_norm``/``o_proj``.
_RENAMES: list[tuple[str, str]] = [
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
    (r"^no_mem_embed$", "no_memory_embedding"),
    # Hiera blocks
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"(\.blocks\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"(\.blocks\.\d+\.mlp)\.layers\.0\.", r"\1.proj_in."),
    (r"(\.blocks\.\d+\.mlp)\.layers\.1\.", r"\1.proj_out."),
    # prompt encoder
    (r"\.pe_layer\.positional_encoding_gaussian_matrix$", ".shared_embedding.positional_embedding"),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    # mask decoder
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    (r"\.transformer\.norm_final_attn\.", ".transformer.layer_norm_final_attn."),
    (r"(\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"\.out_proj\.", ".o_proj."),
    (r"(\.transformer\.layers\.\d+\.mlp)\.layers\.0\.", r"\1.proj_in."),
    (r"(\.transformer\.layers\.\d+\.mlp)\.layers\.1\.", r"\1.proj_out."),
    # three-layer MLP heads: layers.0 -> proj_in, layers.1 -> layers.0, layers.2 -> proj_out
    (r"((?:output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head))\.layers\.0\.", r"\1.proj_in."),
    (r"((?:output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head))\.layers\.1\.", r"\1.layers.0."),
    (r"((?:output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head))\.layers\.2\.", r"\1.proj_out."),
]
_POINT_EMBEDDING = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")


def rename_official_key(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official SAM2.1 state dict to ``transformers.Sam2Model`` keys.

    Returns the converted dict and the video-only keys that were set aside.
    """
    converted: dict[str, torch.Tensor] = {}
    video_only: list[str] = []
    point_embeddings: dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(VIDEO_ONLY_PREFIXES):
            video_only.append(key)
            continue
        match = _POINT_EMBEDDING.match(key)
        if match:  # four nn.Embedding(1, C) in Meta's code, one nn.Embedding(4, C) in transformers
            point_embeddings[int(match.group(1))] = value
            continue
        converted[rename_official_key(key)] = value
    if point_embeddings:
        order = sorted(point_embeddings)
        if order != list(range(len(order))):
            raise CheckpointError(f"point embeddings are not numbered 0..n-1: found {order}")
        converted["prompt_encoder.point_embed.weight"] = torch.cat([point_embeddings[i] for i in order], dim=0)
    # transformers keeps a second copy of the random Fourier matrix for the image-wide encoding.
    fourier = "prompt_encoder.shared_embedding.positional_embedding"
    if fourier in converted:
        converted["shared_image_embedding.positional_embedding"] = converted[fourier]
    return converted, video_only


def read_official_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside an official ``.pt`` file, read without executing any pickled code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects other than tensors and plain "
            f"containers, which could run arbitrary code ({str(error).splitlines()[0]}). Only official "
            "SAM2 checkpoints (a dict with tensors under 'model') are accepted."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error}). Is it truncated?") from None
    except (KeyError, ValueError):  # what torch's legacy (non-zip) reader raises on a file that is no checkpoint (text)
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither torch.save's zip nor its legacy format)"
        ) from None
    if isinstance(payload, dict) and "model" in payload:
        payload = payload["model"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(
            f"{path}: expected an official SAM2 checkpoint, a dict whose key 'model' holds a state dict "
            "of tensors; found something else"
        )
    return payload
