"""Training on PyTorch Lightning: the paper's recipe, resumable runs, small checkpoints.

``train`` (and Lightning with it) is imported on first use: ``TrainConfig`` alone loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from biosam2.training.config import TrainConfig

if TYPE_CHECKING:
    from biosam2.training.run import train

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from biosam2.training.run import train

        return train
    raise AttributeError(f"module 'biosam2.training' has no attribute {name!r}")
