"""Intensity normalisation per modality, to the [0, 1]-like range the model expects.

Schemes (stated in ``dataset.json`` as ``"normalization": {"scheme": ..., ...}``, or derived):

- ``uint8``: 8-bit images (RGB or grey photographs, endoscopy, EM): ``x / 255``.
- ``ct``: Hounsfield units clipped to a window ``[low, high]`` and scaled to [0, 1]. When the window
  is not stated it is derived as nnU-Net does: the 0.5 and 99.5 percentiles of the intensities inside
  the labelled foreground of the training cases.
- ``zscore``: per image / per volume and per channel ``(x - mean) / std`` (MRI), mapped so that +-3 SD
  spans [0, 1].
- ``percentile``: per image and per channel, the 0.5-99.5 percentile range scaled to [0, 1] (16-bit or float images
  without a known modality, e.g. microscopy).

Derivation when not stated: a channel named ``CT`` gives ``ct``; MRI-like names (MR, MRI, T1, T2,
FLAIR, ADC, DWI, cine) give ``zscore``; otherwise 8-bit data gives ``uint8`` and anything else
``percentile``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from biosam2.data.dataset_format import IGNORE_INDEX
from biosam2.errors import DataError

SCHEMES = ("uint8", "ct", "zscore", "percentile")
Statistics = tuple[tuple[float, float], ...]  # per channel
_MRI_NAMES = re.compile(r"\b(mr|mri|t1\w*|t2\w*|flair|adc|dwi|cine)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Normalization:
    scheme: str
    window: tuple[float, float] | None = None  # ct only

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise DataError(f"normalization scheme {self.scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
        if self.scheme == "ct":
            if self.window is None or len(self.window) != 2 or not self.window[0] < self.window[1]:
                raise DataError(f"ct normalization needs a window [low, high] with low < high, got {self.window}")

    def apply(self, array: np.ndarray, statistics: Statistics | None = None) -> np.ndarray:
        """Normalise one channels-first image (C, H, W) or volume (C, X, Y, Z) to float32.

        ``zscore`` and ``percentile`` take each channel's own statistics, as nnU-Net does: T1, T2 and
        FLAIR of one case have unrelated intensity ranges. ``uint8`` and ``ct`` are fixed maps.
        ``statistics``: those of the whole image or volume (:meth:`statistics`), given when ``array`` is
        a part of it (one slice read from the preprocessed cache); the result is then exactly that
        part of the whole normalised volume, as every step after the statistics is element-wise.
        """
        # One float32 copy, normalised in place: a huge image costs one image-sized float array, not three.
        array = np.array(array, dtype=np.float32, order="C")
        if self.scheme == "uint8":
            array /= 255.0
        elif self.scheme == "ct":
            low, high = self.window
            np.clip(array, low, high, out=array)
            array -= low
            array /= high - low
        else:
            statistics = self.statistics(array) if statistics is None else statistics
            if len(statistics) != len(array):
                raise ValueError(f"{len(statistics)} channel statistics for {len(array)} channel(s)")
            for channel, (first, second) in zip(array, statistics, strict=True):
                self._per_channel(channel, first, second)
        return array

    def statistics(self, array: np.ndarray) -> Statistics | None:
        """Per channel (mean, std) for ``zscore``, (0.5, 99.5 percentile) for ``percentile``, of a whole
        channels-first image or volume; None for the fixed maps."""
        if self.scheme in ("uint8", "ct"):
            return None
        array = np.asarray(array, dtype=np.float32)  # the statistics of the float32 values, as apply() sees them
        if self.scheme == "zscore":
            return tuple((float(channel.mean()), float(channel.std())) for channel in array)
        return tuple(tuple(float(v) for v in np.percentile(channel, [0.5, 99.5])) for channel in array)

    def _per_channel(self, channel: np.ndarray, first: float, second: float) -> None:
        if self.scheme == "zscore":
            channel -= first
            channel /= max(second, 1e-6)
            channel /= 6.0
            channel += 0.5
            return
        low, high = np.float64(first), np.float64(second)  # np.percentile's float64: the arithmetic stays float64
        if high <= low:  # constant channel
            channel[...] = 0
            return
        channel[...] = (np.clip(channel, low, high) - low) / (high - low)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, **({"window": list(self.window)} if self.window else {})}

    @classmethod
    def from_dict(cls, payload: dict[str, Any], source: str = "normalization") -> Normalization:
        if not isinstance(payload, dict) or "scheme" not in payload:
            raise DataError(f"{source}: expected {{\"scheme\": one of {', '.join(SCHEMES)}, ...}}, got {payload!r}")
        window = payload.get("window")
        return cls(payload["scheme"], tuple(float(v) for v in window) if window is not None else None)


def scheme_for(channel_names: dict[str, str], dtype: np.dtype) -> str:
    names = " ".join(channel_names.values())
    if re.search(r"\bct\b", names, re.IGNORECASE):
        return "ct"
    if _MRI_NAMES.search(names):
        return "zscore"
    return "uint8" if np.dtype(dtype) == np.uint8 else "percentile"


def ct_window_from_foreground(images: list[np.ndarray], labels: list[np.ndarray], max_samples: int = 1_000_000) -> tuple[float, float]:
    """nnU-Net's CT statistics: 0.5/99.5 percentiles of foreground intensities (sub-sampled)."""
    return ct_window_from_cases(zip(images, labels, strict=True), len(images), max_samples)


def ct_window_from_cases(cases: Iterable[tuple[np.ndarray, np.ndarray]], count: int, max_samples: int = 1_000_000) -> tuple[float, float]:
    """:func:`ct_window_from_foreground` over ``count`` (image, label) pairs read one at a time: only the
    sampled intensities are kept, never the volumes."""
    rng = np.random.default_rng(0)
    samples = []
    per_case = max(1, max_samples // max(1, count))
    for image, label in cases:
        label = np.asarray(label)
        values = np.asarray(image)[(label > 0) & (label != IGNORE_INDEX)]  # unannotated pixels are no foreground
        if values.size > per_case:
            values = rng.choice(values, per_case, replace=False)
        samples.append(values.astype(np.float64))
    pooled = np.concatenate(samples) if samples else np.empty(0)
    if pooled.size == 0:
        raise DataError("cannot derive a CT window: the training labels have no foreground; state one in dataset.json")
    low, high = np.percentile(pooled, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)
