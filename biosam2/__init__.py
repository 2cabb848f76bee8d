"""biosam2: prompt-free, multi-class biomedical semantic segmentation on a frozen SAM2.

>>> import torch, biosam2
>>> model = biosam2.build_model("tiny", weights="random", num_classes=3, adapter="hp")  # doctest: +SKIP
>>> logits = model(torch.rand(2, 3, 97, 211))  # doctest: +SKIP

The model API is imported on first use, so that ``biosam2 -h`` does not pay for torch and
transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from biosam2.errors import BioSAM2Error, CheckpointError, ConfigError, DataError

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
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

_FROM_MODEL = (
    "ADAPTERS",
    "METHODS",
    "SAM2_SIZES",
    "BioSAM2",
    "ModelConfig",
    "ParameterCount",
    "build_model",
    "count_parameters",
    "load_model",
)

__all__ = [*_FROM_MODEL, "BioSAM2Error", "CheckpointError", "ConfigError", "DataError"]


def __getattr__(name: str) -> Any:
    if name in _FROM_MODEL:
        return getattr(importlib.import_module("biosam2.model"), name)
    raise AttributeError(f"module 'biosam2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_MODEL})
