"""The biosam2 model: frozen SAM2 + PEG + adapters + a prompt-free multi-class decoder head."""

from biosam2.model.config import ADAPTERS, ModelConfig
from biosam2.model.factory import METHODS, ParameterCount, build_model, count_parameters, load_model
from biosam2.model.sam2_sizes import SAM2_SIZES
from biosam2.model.segmenter import BioSAM2

__all__ = [
    "ADAPTERS",
    "METHODS",
    "SAM2_SIZES",
    "BioSAM2",
    "ModelConfig",
    "ParameterCount",
    "build_model",
    "count_parameters",
    "load_model",
]
