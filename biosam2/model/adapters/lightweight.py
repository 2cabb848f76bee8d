"""The Lightweight (LW) adapter's spatial module: a RepVGG-style block fused for inference.

While training, three parallel branches (3x3 conv + BN, 1x1 conv + BN, identity BN) give the adapter
a richer optimisation landscape. All three are linear in eval mode, so ``reparameterize()`` folds them
into one 3x3 convolution with bias (Ding et al., RepVGG, CVPR 2021): the fused adapter computes the
same function at the cost of a single convolution. Unlike RepAdapter, only the adapter's own topology
is re-parameterised; the frozen backbone is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(channels),
    )


def _fold_batch_norm(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``bn(conv(x, kernel))`` as one convolution, using BN's running statistics."""
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepConv3x3(nn.Module):
    """Multi-branch 3x3 block on (B, C, H, W) that ``reparameterize()`` turns into one ``nn.Conv2d``."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.branch_3x3 = _conv_bn(channels, 3)
        self.branch_1x1 = _conv_bn(channels, 1)
        self.branch_identity = nn.BatchNorm2d(channels)
        self.fused: nn.Conv2d | None = None

    @property
    def is_fused(self) -> bool:
        return self.fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.branch_3x3(x) + self.branch_1x1(x) + self.branch_identity(x)

    @torch.no_grad()
    def fused_kernel_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel_3x3, bias_3x3 = _fold_batch_norm(self.branch_3x3[0].weight, self.branch_3x3[1])
        kernel_1x1, bias_1x1 = _fold_batch_norm(self.branch_1x1[0].weight, self.branch_1x1[1])
        kernel_1x1 = F.pad(kernel_1x1, [1, 1, 1, 1])  # a 1x1 kernel is a 3x3 kernel with zeros around
        identity = torch.zeros_like(kernel_3x3)
        identity[torch.arange(self.channels), torch.arange(self.channels), 1, 1] = 1.0
        kernel_id, bias_id = _fold_batch_norm(identity, self.branch_identity)
        return kernel_3x3 + kernel_1x1 + kernel_id, bias_3x3 + bias_1x1 + bias_id

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches, in place, by the single equivalent 3x3 convolution (eval semantics)."""
        if self.fused is not None:
            return
        kernel, bias = self.fused_kernel_and_bias()
        fused = nn.Conv2d(self.channels, self.channels, 3, padding=1, bias=True)
        fused.to(device=kernel.device, dtype=kernel.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        del self.branch_3x3, self.branch_1x1, self.branch_identity
        self.fused = fused


def reparameterize_modules(module: nn.Module) -> int:
    """Fuse every ``RepConv3x3`` inside ``module`` in place; returns how many were fused."""
    blocks = [m for m in module.modules() if isinstance(m, RepConv3x3) and not m.is_fused]
    for block in blocks:
        block.reparameterize()
    return len(blocks)
