"""LoRA on the attention projections of Hiera (a baseline), through ``peft``."""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, inject_adapter_in_model
from torch import nn


def insert_lora(
    backbone: nn.Module, rank: int, alpha: float, block_indices: Sequence[int] | None = None
) -> None:
    """Add LoRA to ``blocks.N.attn.qkv`` and ``blocks.N.attn.proj`` of the chosen blocks (all by default)."""
    blocks = r"\d+" if block_indices is None else "(?:" + "|".join(str(i) for i in block_indices) + ")"
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=rf"blocks\.{blocks}\.attn\.(?:qkv|proj)",
    )
    inject_adapter_in_model(config, backbone)
