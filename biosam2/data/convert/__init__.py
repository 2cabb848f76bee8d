"""Converters from public datasets' own layouts to the one format biosam2 reads (nnU-Net v2 raw).

Each writes ``DST/dataset.json`` (with the normalisation where known, the source, how the split was
made and notes such as unknown spacing), ``DST/splits_final.json`` (one fold; val carved from the
training cases, never the test set), ``imagesTr/labelsTr`` (train + val) and ``imagesTs/labelsTs``
(test). The splits are fixed and documented in each module: ``isbi2012``, ``kvasir_seg``, ``acdc``,
``synapse``. ``limit`` keeps the first N cases (by id) of each split, after splitting the full list,
so a quick run uses the same split as a full one. ::

    summary = convert_dataset("kvasir-seg", "Kvasir-SEG", "datasets/kvasir", seed=0)
    print(summary)  # cases per split, and notes to read
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from biosam2.data.convert.acdc import convert_acdc
from biosam2.data.convert.common import ConversionSummary
from biosam2.data.convert.isbi2012 import convert_isbi2012
from biosam2.data.convert.kvasir_seg import convert_kvasir_seg
from biosam2.data.convert.synapse import SOURCE_LABEL_MAPS, convert_synapse, map_to_synapse
from biosam2.errors import ConfigError

CONVERTERS: dict[str, Callable[..., ConversionSummary]] = {
    "isbi2012": convert_isbi2012,
    "kvasir-seg": convert_kvasir_seg,
    "acdc": convert_acdc,
    "synapse": convert_synapse,
}
_COMMON = {"seed", "limit", "overwrite"}

# Bump when any converter writes different files for the same source (labels, splits, geometry,
# dataset.json keys): whatever cached a conversion (the accuracy harness) then knows to redo it.
# 2: datasets whose spacing is a 1 mm stand-in say "spacing": "unknown" in dataset.json (HD95 in voxels).
CONVERTER_FORMAT_VERSION = 2


def converter_options(name: str) -> list[str]:
    """The dataset-specific keyword options of a converter (e.g. ``source_labels`` for synapse)."""
    parameters = inspect.signature(CONVERTERS[name]).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON]


def check_conversion(name: str, options: dict[str, Any]) -> None:
    """Refuse an unknown converter, or options it does not take, before anything is read or written."""
    if name not in CONVERTERS:
        raise ConfigError(f"unknown dataset {name!r} to convert; choose one of {', '.join(CONVERTERS)}")
    unknown = sorted(set(options) - set(converter_options(name)))
    if unknown:
        allowed = converter_options(name)
        raise ConfigError(
            f"{name} converter has no option(s) {', '.join(unknown)}; "
            + (f"it takes {', '.join(allowed)}" if allowed else "it takes only seed, limit and overwrite")
        )


def convert_dataset(
    name: str,
    src: str | Path,
    dst: str | Path,
    *,
    seed: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    **options: Any,
) -> ConversionSummary:
    """Convert the dataset ``name`` (a key of :data:`CONVERTERS`) from ``src`` into a new dataset at ``dst``."""
    check_conversion(name, options)
    return CONVERTERS[name](Path(src), Path(dst), seed=seed, limit=limit, overwrite=overwrite, **options)


__all__ = [
    "CONVERTERS",
    "CONVERTER_FORMAT_VERSION",
    "SOURCE_LABEL_MAPS",
    "ConversionSummary",
    "check_conversion",
    "convert_dataset",
    "converter_options",
    "map_to_synapse",
]
