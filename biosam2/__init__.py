"""biosam2: prompt-free, multi-class biomedical semantic segmentation on a frozen SAM2.

>>> import torch, biosam2
>>> model = biosam2.build_model("tiny", weights=None, num_classes=3, adapter="hp")  # doctest: +SKIP
>>> logits = model(torch.rand(2, 3, 97, 211))  # doctest: +SKIP
"""

from biosam2.errors import BioSAM2Error, CheckpointError, ConfigError, DataError
from biosam2.model import (
    ADAPTERS,
    METHODS,
    SAM2_SIZES,
    BioSAM2,
    ModelConfig,
    ParameterCount,
    build_model,
    count_parameters,
    load_model,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "METHODS",
    "SAM2_SIZES",
    "BioSAM2",
    "BioSAM2Error",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelConfig",
    "ParameterCount",
    "build_model",
    "count_parameters",
    "load_model",
]
