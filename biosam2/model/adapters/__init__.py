"""Adapters added to the frozen Hiera encoder: HP and LW (the paper's), AdaptFormer and LoRA (baselines)."""

from biosam2.model.adapters.bottleneck import (
    SPATIAL_MODULES,
    BottleneckAdapter,
    MlpWithParallelAdapter,
    insert_parallel_adapters,
)
from biosam2.model.adapters.high_performance import ModulatedDeformableConv
from biosam2.model.adapters.lightweight import RepConv3x3, reparameterize_modules
from biosam2.model.adapters.lora import insert_lora

__all__ = [
    "SPATIAL_MODULES",
    "BottleneckAdapter",
    "MlpWithParallelAdapter",
    "ModulatedDeformableConv",
    "RepConv3x3",
    "insert_lora",
    "insert_parallel_adapters",
    "reparameterize_modules",
]
