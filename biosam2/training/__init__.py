"""Training on PyTorch Lightning: the paper's recipe, resumable runs, small checkpoints."""

from biosam2.training.config import TrainConfig
from biosam2.training.run import train

__all__ = ["TrainConfig", "train"]
