"""Running a trained model over whole images and volumes, at their native resolution.

- 2-D images go through the model whole; images with a side above ``max_side`` (default 2048) are
  predicted in overlapping tiles blended with Gaussian weights (MONAI's window placement and
  importance map, as its sliding-window inference), which bounds the model's memory whatever the
  image size.
- 3-D volumes are predicted slice by slice (last axis), ``batch_size`` slices at a time.
- ``precision``: ``"auto"`` (mixed on CUDA: bf16 where supported, else fp16; fp32 elsewhere), ``"32"``,
  ``"bf16-mixed"`` or ``"16-mixed"`` (autocast on the predictor's device, the CPU included).
  Probabilities, when asked for, are float32 whatever the precision.

Memory: whole-image arrays are kept to what the result needs. Label maps are uint8 (uint16 above
256 classes), taken by argmax in row bands (never an int64 map); probabilities are computed only when
asked for. Tiles are blended into a sum of Gaussian-weighted logits; the argmax needs no division by
the weights. Without probabilities that sum is float16, as nnU-Net v2 accumulates its sliding-window
logits (a label can differ from a float32 sum only where two classes are within float16 rounding);
when probabilities are written it is float32, so they equal MONAI's blend to float rounding.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

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
        keep_largest: list[int] | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.max_side = max_side
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.keep_largest = keep_largest or []  # classes whose largest connected component alone is kept

    def finish(self, labels: np.ndarray) -> np.ndarray:
        """A whole case's label map as it is written: compact, postprocessed (see postprocess.py)."""
        from biosam2.inference.postprocess import keep_largest_component

        return compact_labels(keep_largest_component(labels, self.keep_largest))

    def _autocast(self):
        # "32" adds no autocast of its own: inside Lightning's validation loop the trainer's precision applies.
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def predict_2d(self, batch: np.ndarray | torch.Tensor, return_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, C, H, W) normalised images -> label maps (B, H, W) and, if asked, float32 probabilities
        (B, num_classes, H, W), both as numpy arrays on the CPU."""
        batch = torch.as_tensor(batch).to(self.device, torch.float32)
        if max(batch.shape[-2:]) > self.max_side:
            scores, weights = self._blended_tiles(batch, return_probabilities)
        else:
            with self._autocast():
                scores, weights = self.model(batch), None
        if not return_probabilities:
            return _argmax_labels(scores), None
        logits = scores.float() if weights is None else scores.float() / weights
        probabilities = torch.softmax(logits, dim=1)
        # labels from the probabilities written beside them: a near-tie rounds alike in both
        return _argmax_labels(probabilities), probabilities.cpu().numpy()

    def _blended_tiles(self, batch: torch.Tensor, with_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gaussian-weighted sum of the tiles' logits ((B, N, H, W); float16 unless ``with_weights``) and,
        if asked, the sum of the weights at each pixel ((1, 1, H, W), float32): their ratio is MONAI's
        blended logits."""
        from monai.data.utils import compute_importance_map, dense_patch_slices

        height, width = batch.shape[-2:]
        tile = (min(self.tile_size, height), min(self.tile_size, width))
        # MONAI's scan interval: a side that fits in one tile is not scanned.
        step = [t if t == side else max(1, int(t * (1 - self.tile_overlap))) for t, side in zip(tile, (height, width))]
        weight = compute_importance_map(tile, mode="gaussian", device=self.device)
        total = weights = None
        for window in dense_patch_slices((height, width), tile, step):
            with self._autocast():
                logits = self.model(batch[(slice(None), slice(None), *window)])
            if total is None:
                dtype = torch.float32 if with_weights else torch.float16
                total = torch.zeros((batch.shape[0], logits.shape[1], height, width), dtype=dtype, device=self.device)
                if with_weights:
                    weights = torch.zeros((1, 1, height, width), dtype=torch.float32, device=self.device)
            total[(slice(None), slice(None), *window)] += (logits.float() * weight).to(total.dtype)
            if weights is not None:
                weights[(slice(None), slice(None), *window)] += weight
        return total, weights

    @torch.no_grad()
    def predict(self, image: np.ndarray, return_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """A channels-first image (C, H, W) or volume (C, X, Y, Z) -> label map (and probabilities)."""
        if image.ndim == 3:
            labels, probabilities = self.predict_2d(torch.from_numpy(np.ascontiguousarray(image))[None], return_probabilities)
            return self.finish(labels[0]), (probabilities[0] if return_probabilities else None)
        slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))  # (Z, C, X, Y)
        labels = probabilities = None
        for start in range(0, slices.shape[0], self.batch_size):
            chunk_labels, chunk = self.predict_2d(slices[start : start + self.batch_size], return_probabilities)  # (b, X, Y)
            if labels is None:
                labels = np.empty(image.shape[1:], dtype=chunk_labels.dtype)
            labels[..., start : start + chunk_labels.shape[0]] = np.moveaxis(chunk_labels, 0, -1)
            if return_probabilities:
                if probabilities is None:
                    probabilities = np.empty((chunk.shape[1], *image.shape[1:]), dtype=np.float32)
                probabilities[..., start : start + chunk.shape[0]] = np.moveaxis(chunk, 0, -1)
        return self.finish(labels), probabilities


def _argmax_labels(scores: torch.Tensor, band_pixels: int = 1 << 22) -> np.ndarray:
    """Class ids (B, H, W) of the highest score, in row bands: torch's argmax gives int64, 8 bytes a
    pixel, which for a whole 8000x6000 image would be bigger than everything else kept."""
    batch, classes, height, width = scores.shape
    labels = np.empty((batch, height, width), dtype=np.uint8 if classes <= 256 else np.uint16)
    rows = max(1, band_pixels // max(1, batch * width))
    for top in range(0, height, rows):
        labels[:, top : top + rows] = scores[:, :, top : top + rows].argmax(1).cpu().numpy()
    return labels


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
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16, copy=False)
