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
    """Multi-branch 3x3 block on (B, C, H, W); :func:`reparameterize_modules` puts the one
    ``nn.Conv2d`` that :meth:`fuse` returns in its place (as timm's re-parameterisable blocks)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.branch_3x3 = _conv_bn(channels, 3)
        self.branch_1x1 = _conv_bn(channels, 1)
        self.branch_identity = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    def fuse(self) -> nn.Conv2d:
        """The single 3x3 convolution that computes what this block computes in eval mode."""
        kernel, bias = self.fused_kernel_and_bias()
        fused = nn.Conv2d(self.channels, self.channels, 3, padding=1, bias=True, device=kernel.device, dtype=kernel.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        return fused


def reparameterize_modules(module: nn.Module) -> int:
    """Replace every ``RepConv3x3`` inside ``module`` by its fused ``nn.Conv2d``; returns how many."""
    if isinstance(module, RepConv3x3):
        raise TypeError("a RepConv3x3 cannot replace itself: use block.fuse(), or pass the module that holds it")
    blocks = [(name, m) for name, m in module.named_modules() if isinstance(m, RepConv3x3)]
    for name, block in blocks:
        parent, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent), attribute, block.fuse())
    return len(blocks)
