"""The biosam2 model: frozen SAM2 + PEG + adapters + a prompt-free multi-class decoder head.

Names are imported on first use, so that ``biosam2.model.config`` (what the command line reads its
defaults from) loads without torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from biosam2.model.config import ADAPTERS, ModelConfig
    from biosam2.model.factory import METHODS, ParameterCount, build_model, count_parameters, load_model
    from biosam2.model.sam2_sizes import SAM2_SIZES
    from biosam2.model.segmenter import BioSAM2

_WHERE = {
    "ADAPTERS": "config",
    "ModelConfig": "config",
    "METHODS": "factory",
    "ParameterCount": "factory",
    "build_model": "factory",
    "count_parameters": "factory",
    "load_model": "factory",
    "SAM2_SIZES": "sam2_sizes",
    "BioSAM2": "segmenter",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"biosam2.model.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'biosam2.model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
