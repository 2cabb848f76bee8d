"""Bottleneck adapters in parallel with the MLP of every Hiera block.

Each adapted block computes ``x = x + mlp(norm2(x)) + scale * adapter(norm2(x))`` with
``adapter = up(spatial(GELU(down(.))))`` on the block's 2-D token map (as in G-SAM and AdaptFormer).
The spatial module is what distinguishes the variants:

- ``hp``: a modulated deformable convolution (:mod:`.high_performance`);
- ``lw``: a multi-branch block fused into one 3x3 convolution for inference (:mod:`.lightweight`);
- ``adaptformer``: none (AdaptFormer's parallel MLP adapter), so comparisons isolate the spatial module.

Adapters are inserted by wrapping each block's ``mlp`` module (transformers' code is not edited).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from biosam2.model.adapters.high_performance import ModulatedDeformableConv
from biosam2.model.adapters.lightweight import RepConv3x3

SPATIAL_MODULES: dict[str, Callable[[int], nn.Module] | None] = {
    "hp": ModulatedDeformableConv,
    "lw": RepConv3x3,
    "adaptformer": None,
}


class BottleneckAdapter(nn.Module):
    """down -> GELU -> spatial module on the (B, C, H, W) map -> up, on channels-last tokens."""

    def __init__(self, dim: int, hidden: int, spatial: nn.Module | None = None):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.spatial = spatial
        self.up = nn.Linear(hidden, dim)
        # Near zero, not zero: the adapted model starts as (almost) the frozen one, yet every adapter
        # parameter gets a gradient from the first step (a zero `up` would block them all).
        nn.init.normal_(self.up.weight, std=1e-3)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        hidden = self.act(self.down(tokens))
        if self.spatial is not None:
            hidden = self.spatial(hidden.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.up(hidden)


class MlpWithParallelAdapter(nn.Module):
    """Stands in for a block's ``mlp``: the frozen MLP plus a scaled adapter on the same input."""

    def __init__(self, mlp: nn.Module, adapter: BottleneckAdapter, scale: float):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens) + self.scale * self.adapter(tokens)


def insert_parallel_adapters(
    blocks: Sequence[nn.Module],
    kind: str,
    ratio: float,
    scale: float,
    block_indices: Sequence[int] | None = None,
) -> list[BottleneckAdapter]:
    """Wrap the MLP of the chosen Hiera blocks (all by default); returns the new adapters."""
    make_spatial = SPATIAL_MODULES[kind]
    chosen = range(len(blocks)) if block_indices is None else block_indices
    adapters = []
    for index in chosen:
        block = blocks[index]
        dim = block.dim_out  # the MLP runs after q-pooling, at the block's output width
        hidden = max(1, round(dim * ratio))
        adapter = BottleneckAdapter(dim, hidden, make_spatial(hidden) if make_spatial else None)
        block.mlp = MlpWithParallelAdapter(block.mlp, adapter, scale)
        adapters.append(adapter)
    return adapters
