"""Test-time augmentation and ensembles: several models, and/or mirrored inputs, as one model.

:class:`Averaged` returns the logarithm of the mean of the softmax probabilities of every
(model, mirroring) pair, each mirrored prediction flipped back first. Its output is a valid logit map
(softmax of it gives the averaged probabilities; its argmax is theirs), so the :class:`Predictor`
runs it exactly as one model: whole images, tiles, volumes slice by slice, probabilities. The issue
asked for averaged probabilities (nnU-Net's ensembles do so; its own mirroring averages logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from biosam2.errors import ConfigError

# The four mirrorings of a 2-D image (none, left-right, up-down, both): nnU-Net's for 2-D models.
MIRRORS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class Averaged(nn.Module):
    def __init__(self, models: Sequence[nn.Module], mirror: bool = False):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.mirrors = MIRRORS if mirror else MIRRORS[:1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for model in self.members:
            for axes in self.mirrors:
                logits = model(torch.flip(images, axes) if axes else images)
                probabilities = torch.softmax((torch.flip(logits, axes) if axes else logits).float(), dim=1)
                total = probabilities if total is None else total + probabilities
        # a floor keeps log finite: Gaussian tile weights times -inf would give NaN
        return torch.log((total / (len(self.members) * len(self.mirrors))).clamp_min(1e-12))


def check_ensemble(metadata: Sequence[tuple[str, dict]]) -> None:
    """Refuse members that cannot be averaged: other classes, channels or intensity normalisation."""
    (first_name, first), *others = metadata
    for name, other in others:
        for key in ("labels", "channel_names", "normalization"):
            if other.get(key) != first.get(key):
                raise ConfigError(f"--ensemble {name}: its {key} {other.get(key)} differ from {first_name}'s "
                                  f"{first.get(key)}; only models of one task are averaged")
