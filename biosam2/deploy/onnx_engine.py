"""The ONNX Runtime engine: an exported file that the Predictor calls in place of the PyTorch model.

``OnnxModel`` takes what the model takes, a (B, C, H, W) float batch scaled to [0, 1], and gives back
its logits, so that everything around the model (batching, tiling, probabilities, argmax, writing
PNG/NIfTI) stays the Predictor's and predict_files' one implementation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biosam2.deploy.export import SIDECAR_FORMAT, sidecar_path
from biosam2.errors import CheckpointError, ConfigError


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "--engine onnxruntime needs the onnxruntime package: pip install 'biosam2[deploy]'"
        ) from None
    return onnxruntime


def read_sidecar(path: str | Path) -> dict[str, Any]:
    sidecar = sidecar_path(path)
    try:
        description = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{sidecar}: missing; it is written beside {Path(path).name} by `biosam2 export`") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{sidecar}: not valid JSON ({error})") from None
    if description.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{sidecar}: not a biosam2 ONNX sidecar (format {description.get('format')!r})")
    return description


class OnnxModel:
    """An exported ``--output logits`` file, callable like the model on CPU tensors.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, optimization: str = "all"):
        ort = _onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: ONNX file not found")
        self.description = read_sidecar(self.path)
        kind = self.description["output"]["kind"]
        if kind != "logits":
            raise ConfigError(
                f"{self.path}: exported with --output {kind}; the prediction engine blends tiles and takes softmax "
                "itself, so it needs a file exported with --output logits"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        if threads:
            options.intra_op_num_threads = threads
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NotImplemented

        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except (Fail, InvalidGraph, InvalidProtobuf, NotImplemented) as error:
            # e.g. an older onnxruntime without a DeformConv kernel (HP models), or a damaged file
            raise CheckpointError(
                f"{self.path}: onnxruntime {ort.__version__} cannot load it ({str(error).splitlines()[0]}); "
                "re-export it, or for an HP model (DeformConv) use onnxruntime >= 1.32 or an LW model"
            ) from None
        self.channels = self.description["channels"]
        self.num_classes = self.description["num_classes"]

    # What the Predictor asks of a model --------------------------------------------------------------
    def to(self, device: torch.device | str) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ConfigError(f"--engine onnxruntime runs on the CPU; leave out --device {device} (or use --device cpu)")
        return self

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            if images.ndim == 4 and images.shape[1] == 1 and self.channels == 3:
                images = images.expand(-1, 3, -1, -1)  # grey into a colour model is R = G = B, as in the model
            else:
                raise ConfigError(f"{self.path}: expects images (B, {self.channels}, H, W), got {tuple(images.shape)}")
        batch = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"images": batch})[0])
