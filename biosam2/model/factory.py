"""Making a model: ``build_model`` (new, on frozen SAM2) and ``load_model`` (from a saved artifact).

One factory for biosam2 (HP, LW) and every baseline it is compared against.

Each variant is frozen SAM2 + the prompt-free multi-class decoder head, plus where training happens:

==============  ==============================================================================
adapter         trainable, besides the class tokens/MLPs (and the PEG when pos_encoding="peg")
==============  ==============================================================================
``hp``          DCNv2 bottleneck adapters in parallel with every Hiera MLP (the paper's HP)
``lw``          re-parameterisable multi-branch adapters (the paper's LW); fuse with reparameterize()
``adaptformer`` the same bottleneck adapters without a spatial module (AdaptFormer)
``lora``        LoRA on every attention projection (qkv, proj), through peft
``none``        nothing else; with pos_encoding="sam2" this is "vanilla SAM2" (decoder-side only)
``full``        SAM2's whole image encoder and mask decoder (full fine-tuning)
==============  ==============================================================================

``METHODS`` names the configurations the benchmarks compare.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from biosam2.errors import CheckpointError, ConfigError
from biosam2.model.adapters import SPATIAL_MODULES, insert_lora, insert_parallel_adapters
from biosam2.model.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_trained_tensors,
    non_finite,
    read_artifact_description,
    read_trained_tensors,
)
from biosam2.model.config import ModelConfig
from biosam2.model.decoder import PromptFreeDecoder
from biosam2.model.encoder import HieraEncoder
from biosam2.model.sam2_weights import RandomWeightsWarning, load_sam2
from biosam2.model.segmenter import BioSAM2
from biosam2.options import DEFAULT_WEIGHTS, RANDOM_WEIGHTS

METHODS: dict[str, dict[str, Any]] = {
    "biosam2-hp": {"adapter": "hp", "pos_encoding": "peg"},
    "biosam2-lw": {"adapter": "lw", "pos_encoding": "peg"},
    "peg-only": {"adapter": "none", "pos_encoding": "peg"},
    "vanilla-sam2": {"adapter": "none", "pos_encoding": "sam2"},
    "adaptformer": {"adapter": "adaptformer", "pos_encoding": "peg"},
    "lora": {"adapter": "lora", "pos_encoding": "peg"},
    "full-finetune": {"adapter": "full", "pos_encoding": "peg"},
}

# Parts of SAM2's mask decoder that the prompt-free head runs (unfrozen by full fine-tuning). The
# original mask tokens/MLPs, IoU head and object-score head are not used: the class heads replace them.
_DECODER_PARTS_USED = (
    "transformer",
    "upscale_conv1",
    "upscale_conv2",
    "upscale_layer_norm",
    "conv_s0",
    "conv_s1",
    "obj_score_token",
    "iou_token",
)


def build_model(
    size: str = "tiny",
    weights: str | Path | None = DEFAULT_WEIGHTS,
    num_classes: int = 2,
    adapter: str = "hp",
    *,
    seed: int = 0,
    **options: Any,
) -> BioSAM2:
    """Build a biosam2 model on frozen SAM2.

    Args:
        size: ``tiny``, ``small``, ``base-plus`` or ``large``.
        weights: ``"hf"`` (pretrained SAM2.1 from the hub or its local cache; the default), ``"meta"``,
            a hub id, a transformers directory, an official ``sam2.1_hiera_*.pt``, or ``"random"``
            (seeded by ``seed``; ``None`` means the same) (see :mod:`biosam2.model.sam2_weights`).
        num_classes: output channels, background included.
        adapter: ``hp``, ``lw``, ``none``, ``adaptformer``, ``lora`` or ``full``.
        options: any other :class:`ModelConfig` field (``pos_encoding``, ``adapter_ratio``,
            ``adapter_scale``, ``adapter_blocks``, ``lora_rank``, ``lora_alpha``, ``input_size``).

    Example:
        >>> import torch, biosam2
        >>> model = biosam2.build_model("tiny", num_classes=3, adapter="lw")  # pretrained  # doctest: +SKIP
        >>> model(torch.rand(1, 3, 97, 211)).shape  # doctest: +SKIP
        torch.Size([1, 3, 97, 211])
    """
    reparameterized = options.pop("reparameterized", False)
    config = ModelConfig(size=size, num_classes=num_classes, adapter=adapter, **options)
    sam2, source = load_sam2(config.size, weights, seed=seed)
    model = assemble(config, sam2, source)
    if reparameterized:
        _fuse(model)
    return model


def load_model(
    directory: str | Path,
    base_weights: str | Path | None = None,
    *,
    check_fingerprint: bool = True,
) -> BioSAM2:
    """Restore a model saved with ``save_pretrained``.

    The frozen SAM2 weights are found again from the reference recorded in the artifact, or taken from
    ``base_weights`` when given (e.g. the same ``.pt`` file on another machine). Their fingerprint must
    match the one recorded at save time.
    """
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
    if fused:  # before the tensors are loaded: the artifact holds the fused convolutions
        _fuse(model)

    weights_path = directory / WEIGHTS_FILE
    tensors = read_trained_tensors(directory, description)
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
    load_trained_tensors(model, {k: v for k, v in tensors.items() if k not in legacy})
    return model


def _fuse(model: BioSAM2) -> None:
    """Fuse a model that has just been made, keeping its mode. Its BatchNorm statistics are the
    initial or saved ones, so eval semantics are the ones meant (reparameterize() refuses training mode)."""
    training = model.training
    model.eval().reparameterize()
    model.train(training)


def assemble(config: ModelConfig, sam2: nn.Module, source) -> BioSAM2:
    """Freeze ``sam2`` and add the PEG, the adapters and the class heads that ``config`` asks for."""
    # SAM2's tensors are recognised by identity only here, before anything can move or copy them;
    # from then on the model knows them by name (peft, for one, renames qkv.weight to qkv.base_layer.weight).
    base_tensor_ids = {id(t) for t in sam2.state_dict(keep_vars=True).values()}
    sam2.requires_grad_(False)

    encoder = HieraEncoder(sam2.vision_encoder, config.pos_encoding)
    blocks = encoder.blocks
    if config.adapter in SPATIAL_MODULES:
        insert_parallel_adapters(
            blocks, config.adapter, config.adapter_ratio, config.adapter_scale, config.adapter_blocks
        )
    elif config.adapter == "lora":
        insert_lora(sam2.vision_encoder.backbone, config.lora_rank, config.lora_alpha, config.adapter_blocks)
    decoder = PromptFreeDecoder(sam2, config.num_classes)

    if config.adapter == "full":
        encoder.vision_encoder.requires_grad_(True)
        backbone = encoder.vision_encoder.backbone
        if config.pos_encoding == "peg":  # SAM2's absolute tables are not used with the PEG
            backbone.pos_embed.requires_grad_(False)
            backbone.pos_embed_window.requires_grad_(False)
        for part in _DECODER_PARTS_USED:
            getattr(decoder.mask_decoder, part).requires_grad_(True)
        decoder.no_memory_embedding.requires_grad_(True)
    model = BioSAM2(config, encoder, decoder, source)
    model.frozen_base_names = frozenset(
        name
        for name, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) in base_tensor_ids and not tensor.requires_grad
    )
    return model


class ParameterCount(NamedTuple):
    total: int
    trainable: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} ({100 * self.trainable_fraction:.2f}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameter counts (each shared tensor counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(
        total=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
    )
