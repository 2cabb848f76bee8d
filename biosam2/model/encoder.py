"""SAM2's frozen image encoder (Hiera + FPN neck), run block by block.

Running the blocks ourselves (instead of calling ``Sam2HieraDetModel.forward``) is what lets the
positional encoding be swapped for the PEG; the blocks, their adapters and the neck are transformers'
modules, called as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.sam2.modeling_sam2 import Sam2VisionModel

from biosam2.model.positional_encoding import PositionalEncodingGenerator, Sam2AbsolutePositionalEncoding

# Patch embedding (stride 4) and three 2x query-poolings: inputs must be a multiple of 32 per side
# for the FPN's 2x top-down upsampling to line up; the segmenter pads to this and crops back.
HIERA_TOTAL_STRIDE = 32


class HieraEncoder(nn.Module):
    """Image (B, 3, H, W), H and W multiples of 32 -> FPN features at strides 4, 8 and 16 (256 ch)."""

    def __init__(self, vision_encoder: Sam2VisionModel, pos_encoding: str):
        super().__init__()
        self.vision_encoder = vision_encoder
        backbone = vision_encoder.backbone
        if pos_encoding == "peg":
            self.positional_encoding: nn.Module = PositionalEncodingGenerator(backbone.config.hidden_size)
        else:
            self.positional_encoding = Sam2AbsolutePositionalEncoding(backbone)
        self.gradient_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vision_encoder.backbone.blocks

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        backbone = self.vision_encoder.backbone
        tokens = self.positional_encoding(backbone.patch_embed(pixels))  # (B, H/4, W/4, C)
        stage_outputs = []
        for index, block in enumerate(backbone.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if index in backbone.stage_ends:
                stage_outputs.append(tokens)
        fpn_features, _ = self.vision_encoder.neck(stage_outputs)
        levels = self.vision_encoder.num_feature_levels
        return list(fpn_features[-levels:][::-1])  # high to low resolution: strides 4, 8, 16
