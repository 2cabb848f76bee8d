"""Running a trained model over whole images and volumes, at their native resolution.

- 2-D images go through the model whole; images with a side above ``max_side`` (default 2048) are
  predicted in overlapping tiles blended with Gaussian weights (MONAI's sliding-window inference),
  which bounds memory whatever the image size.
- 3-D volumes are predicted slice by slice (last axis), ``batch_size`` slices at a time.
- ``precision``: ``"auto"`` (mixed on CUDA: bf16 where supported, else fp16; fp32 elsewhere), ``"32"``,
  ``"bf16-mixed"`` or ``"16-mixed"`` (autocast on the predictor's device, the CPU included).
  Probabilities are float32 whatever the precision.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from biosam2.errors import ConfigError
from biosam2.options import PRECISIONS

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class Predictor:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        precision: str = "auto",
        max_side: int = 2048,
        tile_size: int = 1024,
        tile_overlap: float = 0.25,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.max_side = max_side
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap

    def _autocast(self):
        # "32" adds no autocast of its own: inside Lightning's validation loop the trainer's precision applies.
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def probabilities_2d(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, num_classes, H, W) softmax probabilities (float32, CPU)."""
        batch = batch.to(self.device, torch.float32)
        with self._autocast():
            if max(batch.shape[-2:]) > self.max_side:
                logits = sliding_window_inference(
                    batch,
                    roi_size=(self.tile_size, self.tile_size),
                    sw_batch_size=1,
                    predictor=self.model,
                    overlap=self.tile_overlap,
                    mode="gaussian",
                )
            else:
                logits = self.model(batch)
        return torch.softmax(logits.float(), dim=1).cpu()

    @torch.no_grad()
    def predict(self, image: np.ndarray, return_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """A channels-first image (C, H, W) or volume (C, X, Y, Z) -> label map (and probabilities)."""
        if image.ndim == 3:
            probabilities = self.probabilities_2d(torch.from_numpy(np.ascontiguousarray(image))[None])[0]
            labels = probabilities.argmax(0).numpy()
            return compact_labels(labels), (probabilities.numpy() if return_probabilities else None)
        slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))  # (Z, C, X, Y)
        labels = np.empty(image.shape[1:], dtype=np.int64)
        probabilities = None
        for start in range(0, slices.shape[0], self.batch_size):
            chunk = self.probabilities_2d(slices[start : start + self.batch_size])  # (b, N, X, Y)
            labels[..., start : start + chunk.shape[0]] = np.moveaxis(chunk.argmax(1).numpy(), 0, -1)
            if return_probabilities:
                if probabilities is None:
                    probabilities = np.empty((chunk.shape[1], *image.shape[1:]), dtype=np.float32)
                probabilities[..., start : start + chunk.shape[0]] = np.moveaxis(chunk.numpy(), 0, -1)
        return compact_labels(labels), probabilities


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast to on ``device`` for a precision name (None: no autocast), or a ConfigError."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision == "32":
        return None
    dtype = _AUTOCAST_DTYPES[precision]
    if not _autocast_works(device, dtype):
        other = "bf16-mixed" if precision == "16-mixed" else "16-mixed"
        raise ConfigError(
            f"precision={precision!r}: torch {torch.__version__} cannot autocast to {dtype} on {device}; "
            f"choose 32 or {other}"
        )
    return dtype


def _autocast_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a matmul under autocast really comes out in ``dtype`` (torch turns autocast off, with only a
    warning, for a dtype the device does not support, and raises for bf16 on pre-Ampere GPUs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                ones = torch.ones(2, 2, device=device)
                return (ones @ ones).dtype == dtype
    except RuntimeError:
        return False


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Class ids in the smallest unsigned type that holds them (what label files are written with)."""
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
