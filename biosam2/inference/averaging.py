"""Test-time augmentation and ensembles: several models, and/or mirrored inputs, as one model.

:class:`Averaged` returns the logarithm of the mean of the softmax probabilities of every
(model, mirroring) pair, each mirrored prediction flipped back first. Its output is a valid logit map
(softmax of it gives the averaged probabilities; its argmax is theirs), so the :class:`Predictor`
runs it exactly as one model: whole images, tiles, volumes slice by slice, probabilities. The issue
asked for averaged probabilities (nnU-Net's ensembles do so; its own mirroring averages logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


def load_run_model(path: str | Path, base_weights: str | None = None) -> tuple[nn.Module, dict]:
    """A run directory (RUN/model) or an artifact directory -> (model, the artifact's metadata)."""
    from biosam2.model.artifact import read_artifact_description
    from biosam2.model.factory import load_model

    path = Path(path)
    artifact = path / "model" if (path / "model" / "biosam2.json").exists() else path
    return load_model(artifact, base_weights=base_weights), read_artifact_description(artifact).get("metadata", {})


def load_for_prediction(run: str | Path, *, ensemble: Sequence[str | Path] = (), tta: bool = False,
                        base_weights: str | None = None) -> tuple[nn.Module, dict]:
    """What `biosam2 predict RUN [--ensemble RUN...] [--tta]` predicts with: the run's model, or an
    :class:`Averaged` of it and the ensemble's; the metadata is the first run's (its postprocessing too)."""
    model, metadata = load_run_model(run, base_weights)
    if ensemble or tta:
        members = [(str(run), model, metadata)] + [(str(other), *load_run_model(other, base_weights)) for other in ensemble]
        check_ensemble([(name, meta) for name, _, meta in members])
        model = Averaged([member for _, member, _ in members], mirror=tta)
    return model, metadata
