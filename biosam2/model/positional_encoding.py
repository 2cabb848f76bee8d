"""Positional encodings for Hiera's token map.

SAM2's own encoding interpolates a learned 7x7 (or 14x14) table to the token grid and adds an 8x8
window table *tiled* over it, so it only works when the grid is a multiple of 8 (the image a
multiple of 32) and it is tied to the 1024-px pre-training grid. The paper replaces it with a
convolutional Positional Encoding Generator (PEG, Chu et al., CPVT): a depthwise 3x3 convolution on
the token map, added residually, which gives each token its position from its neighbourhood (and the
zero padding at the border) at any size and aspect ratio.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam2.modeling_sam2 import Sam2HieraDetModel


class PositionalEncodingGenerator(nn.Module):
    """CPVT's PEG on channels-last tokens: ``x + depthwise_conv3x3(x)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        encoding = self.proj(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return tokens + encoding


class Sam2AbsolutePositionalEncoding(nn.Module):
    """SAM2's original (frozen) interpolated + tiled embedding, kept for ablations."""

    def __init__(self, backbone: Sam2HieraDetModel):
        super().__init__()
        # Not registered as a submodule: the backbone already owns its tables.
        self._backbone = [backbone]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self._backbone[0]._get_pos_embed(tokens.shape[1:3]).to(tokens.dtype)

