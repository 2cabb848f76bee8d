"""The High-Performance (HP) adapter's spatial module: a modulated deformable convolution (DCNv2).

DCNv2 (Zhu et al., CVPR 2019) samples its 3x3 kernel at learned offsets and weighs every sample by a
learned sigmoid modulation mask, so the kernel can follow thin, curved boundaries (membranes, organ
outlines). Offsets and mask are predicted from the input by a small 3x3 convolution.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import DeformConv2d, deform_conv2d


class ModulatedDeformableConv(nn.Module):
    """DCNv2 on (B, C, H, W); starts as a plain 3x3 convolution (zero offsets, uniform modulation).

    The offset/mask predictor is zero-initialised: offsets start at 0 and the modulation at
    sigmoid(0) = 0.5 everywhere, DCNv2's own initialisation. With zero offsets and a modulation of 1
    the module computes exactly ``conv2d(x, self.conv.weight, self.conv.bias, padding=1)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        taps = kernel_size * kernel_size
        self.conv = DeformConv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        # Per tap: (dy, dx) offsets, then one modulation logit.
        self.offset_and_mask = nn.Conv2d(channels, 3 * taps, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset_and_mask.weight)
        nn.init.zeros_(self.offset_and_mask.bias)
        self.taps = taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask_logits = self.offset_and_mask(x).split([2 * self.taps, self.taps], dim=1)
        # torchvision's deformable convolution has no bfloat16 kernel (CPU or CUDA) and no CPU autocast
        # rule, so under mixed precision or on a .bfloat16() model it would raise: it always runs in
        # float32 with autocast off (a no-op for fp32 tensors) and hands back the input's dtype.
        conv = self.conv
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(
                x.float(), offset.float(), conv.weight.float(), None if conv.bias is None else conv.bias.float(),
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                mask=torch.sigmoid(mask_logits.float()),
            )
        return out.to(x.dtype)
