"""The preprocessed cache: every training case read, checked and written once, then read lazily.

Layout (``CACHE`` is ``--cache-dir``, by default ``DATA/biosam2-cache``, or a per-user folder when the
dataset folder is read-only: see :func:`default_cache_dir`)::

    CACHE/.lock                 held while a process writes (others wait: see preprocess())
    CACHE/cases/CASE.image.npy  the source intensities, channels first; volumes slice-major (Z, C, X, Y)
    CACHE/cases/CASE.label.npy  uint8 class ids, IGNORE_INDEX where unannotated; (Z, X, Y) or (H, W)
    CACHE/cases/CASE.json       the case's marker, written last: fingerprint, statistics, geometry, per-slice classes

Choices:

- ``.npy`` files: numpy memory-maps them (no dependency, no decompression), so a training sample reads
  exactly its slice; volumes are stored slice-major so that one slice is one contiguous block.
  Uncompressed, they cost the source's own bytes per voxel (e.g. 2 for int16 CT, 1 for the uint8 label).
- Source intensities, not normalised floats: half the disk of float32 for int16 data, and the
  normalisation is applied on read (:meth:`Normalization.apply` with the whole case's statistics),
  which gives exactly the values of the in-memory normalised arrays, bit for bit. A CT window is
  therefore not part of the cache: changing it changes what is read, never what is stored.
  Sources wider than 32 bits are stored as float32, the first thing normalisation does with them.
- Fingerprint per case: the source files' names, sizes and modification times (not content hashes,
  which would read the whole dataset at every start), the scheme (its statistics are stored), the
  label mapping (ignore label) and :data:`PREPROCESS_VERSION`. Anything else re-preprocesses the case.
- Atomic per case: the old marker is removed first, the arrays written to temporary files and
  renamed, the marker written last; a kill at any point leaves the case unmarked and it is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from biosam2.atomic_io import DirectoryLocked, atomic_output, atomic_write_json, directory_lock
from biosam2.data.cases import Case, check_pixel_type, normalization_scheme, read_case_image, read_case_label
from biosam2.data.dataset_format import IGNORE_INDEX, CaseFiles, DatasetSpec, load_dataset_spec
from biosam2.data.image_io import LoadedImage
from biosam2.data.normalization import Normalization, Statistics
from biosam2.errors import DataError

log = logging.getLogger("biosam2")

PREPROCESS_VERSION = 1  # raise when what is stored changes: every cached case is then redone
CACHE_FOLDER = "biosam2-cache"
_KEPT_TYPES = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32"))


def default_cache_dir(root: Path) -> Path:
    """``DATA/biosam2-cache`` if it can be made, else ``$XDG_CACHE_HOME/biosam2/NAME-HASH`` (``~/.cache``)."""
    inside = root / CACHE_FOLDER
    with contextlib.suppress(OSError):
        inside.mkdir(exist_ok=True)
        if os.access(inside, os.W_OK):
            return inside
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return base / "biosam2" / f"{root.resolve().name}-{digest}"


def case_fingerprint(spec: DatasetSpec, files: CaseFiles, scheme: str) -> dict[str, Any]:
    sources = []
    for path in [*files.images, *([files.label] if files.label is not None else [])]:
        stat = path.stat()
        sources.append([path.name, stat.st_size, stat.st_mtime_ns])
    return {"version": PREPROCESS_VERSION, "scheme": scheme, "ignore_label": spec.ignore_label, "sources": sources}


def _paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    cases = folder / "cases"
    return cases / f"{case_id}.image.npy", cases / f"{case_id}.label.npy", cases / f"{case_id}.json"


def _valid_marker(folder: Path, spec: DatasetSpec, files: CaseFiles, scheme: str) -> dict[str, Any] | None:
    image, label, marker = _paths(folder, files.case_id)
    try:
        payload = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if payload.get("fingerprint") != case_fingerprint(spec, files, scheme) or not (image.is_file() and label.is_file()):
        return None
    return payload


def write_case(spec: DatasetSpec, files: CaseFiles, scheme: str, folder: Path) -> None:
    """Read, check and store one case (run in a worker process by preprocess())."""
    image_path, label_path, marker = _paths(folder, files.case_id)
    fingerprint = case_fingerprint(spec, files, scheme)  # before reading: a file changed meanwhile is redone next time
    raw, reference = read_case_image(spec, files)
    check_pixel_type(scheme, raw, reference)
    label = read_case_label(spec, files, reference).astype(np.uint8)  # ids < IGNORE_INDEX = 255 (dataset_format)
    statistics = None if scheme in ("uint8", "ct") else Normalization(scheme).statistics(raw)
    stored = raw if raw.dtype in _KEPT_TYPES else raw.astype(np.float32)
    if reference.is_volume:
        stored, label = np.moveaxis(stored, -1, 0), np.moveaxis(label, -1, 0)
    slices = label if reference.is_volume else label[None]
    # Which classes each slice holds, for foreground-aware sampling.
    slice_classes = [np.flatnonzero(np.bincount(s.ravel(), minlength=256)[:IGNORE_INDEX]).tolist() for s in slices]
    marker.unlink(missing_ok=True)
    for path, array in ((image_path, stored), (label_path, label)):
        with atomic_output(path, suffix=".npy") as temporary:
            np.save(temporary, np.ascontiguousarray(array))
    atomic_write_json(marker, {
        "case_id": files.case_id,
        "fingerprint": fingerprint,
        "statistics": statistics,
        "num_slices": int(stored.shape[0]) if reference.is_volume else None,
        "source": str(reference.path),
        "source_shape": list(reference.array.shape),
        "spacing": list(reference.spacing),
        "affine": reference.affine.tolist() if reference.affine is not None else None,
        "slice_classes": slice_classes,
    })


def preprocess(
    spec: DatasetSpec, cases: list[CaseFiles], scheme: str, cache_dir: str | Path | None = None, *, workers: int = 0, progress: bool = True
) -> tuple[Path, int]:
    """Bring the cache up to date for ``cases``; returns its folder and how many cases were (re)written.

    One process writes at a time: another (a second ``preprocess`` or ``train``) waits for its lock, then
    finds the cases done; the other ranks of a multi-process run call wait_for_cache() instead. A killed
    run leaves its finished cases marked and the rest is redone.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(spec.root)
    try:
        (folder / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{folder}: cannot create the preprocessed cache there ({error.strerror}); give a writable --cache-dir") from None
    waiting = False
    while True:
        try:
            with directory_lock(folder):
                return folder, _build_missing(spec, cases, scheme, folder, workers, progress)
        except DirectoryLocked as locked:
            if not waiting:
                log.info("waiting for %s to finish preprocessing into %s", locked.holder, folder)
                waiting = True
            time.sleep(1)


def wait_for_cache(spec: DatasetSpec, cases: list[CaseFiles], scheme: str, cache_dir: str | Path | None = None, poll: float = 2.0) -> Path:
    """For the other processes of a multi-process run: wait until rank 0 has preprocessed ``cases``.

    They never write, so they cannot race rank 0 on a file system whose locks do not reach across
    nodes. If rank 0 fails, its launcher (torchrun, SLURM, Lightning) ends them.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(spec.root)
    logged = False
    while True:
        done = sum(_valid_marker(folder, spec, files, scheme) is not None for files in cases)
        if done == len(cases):
            return folder
        if not logged:
            log.info("waiting for rank 0 to preprocess into %s (%d of %d cases ready)", folder, done, len(cases))
            logged = True
        time.sleep(poll)


def _build_missing(spec: DatasetSpec, cases: list[CaseFiles], scheme: str, folder: Path, workers: int, progress: bool) -> int:
    missing = [files for files in cases if _valid_marker(folder, spec, files, scheme) is None]
    if not missing:
        return 0
    for leftover in (folder / "cases").glob(".*"):  # temporary files of a killed run (we hold the lock)
        leftover.unlink(missing_ok=True)
    from tqdm import tqdm

    log.info("preprocessing %d of %d case(s) into %s", len(missing), len(cases), folder)
    bar = tqdm(total=len(missing), desc="preprocess", unit="case", disable=not progress)
    try:
        if workers <= 1:
            for files in missing:
                write_case(spec, files, scheme, folder)
                bar.update()
        else:
            # spawn: forking a process that holds torch's threads can deadlock
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(write_case, spec, files, scheme, folder) for files in missing]
                try:
                    for future in as_completed(futures):
                        future.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise
    finally:
        bar.close()
    return len(missing)


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk: file paths and a few numbers, cheap to send to loader workers.

    Offers what the training data asks of an in-memory :class:`Case`: ``num_slices``, ``sample(z)``
    (one slice, read through a memory map) and ``load()`` (the whole case, for validation).
    """

    case_id: str
    image_path: Path
    label_path: Path
    normalization: Normalization
    statistics: Statistics | None
    num_slices: int | None
    geometry: tuple[tuple[int, ...], tuple[float, ...], tuple[tuple[float, ...], ...] | None, str]  # shape, spacing, affine, source
    foreground_slices: tuple[int, ...] = ()  # slices holding a class above the background (the stored per-slice index)

    @property
    def is_volume(self) -> bool:
        return self.num_slices is not None

    @property
    def plane_shape(self) -> tuple[int, int]:
        return tuple(self.geometry[0][:2])

    def labels_of(self, z: int | None) -> np.ndarray:
        labels = np.load(self.label_path, mmap_mode="r")
        return np.array(labels if z is None else labels[z])

    def sample(self, z: int | None, region: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
        # Opened per sample and dropped after: the mapping, and its pages in this process, go with it.
        # With a region only its rows are read (normalisation uses the whole case's statistics).
        image, label = np.load(self.image_path, mmap_mode="r"), np.load(self.label_path, mmap_mode="r")
        if z is not None:
            image, label = image[z], label[z]
        if region is not None:
            image, label = image[(slice(None), *region)], label[region]
        return self.normalization.apply(image, self.statistics), np.array(label)

    def load(self) -> Case:
        image, label = np.load(self.image_path, mmap_mode="r"), np.load(self.label_path, mmap_mode="r")
        if self.is_volume:
            image, label = np.moveaxis(image, 0, -1), np.moveaxis(label, 0, -1)
        shape, spacing, affine, source = self.geometry
        reference = LoadedImage(np.broadcast_to(np.zeros((), np.uint8), shape), Path(source), spacing, None if affine is None else np.array(affine))
        return Case(self.case_id, self.normalization.apply(image, self.statistics), np.ascontiguousarray(label, dtype=np.int64), reference)


def cached_cases(folder: Path, spec: DatasetSpec, cases: list[CaseFiles], normalization: Normalization) -> list[CachedCase]:
    """The cache's entries for ``cases`` (all preprocessed: see preprocess()), read with ``normalization``."""
    entries = []
    for files in cases:
        payload = _valid_marker(folder, spec, files, normalization.scheme)
        if payload is None:
            raise DataError(f"{folder}: case {files.case_id} is missing or out of date in the cache; run `biosam2 preprocess {spec.root}`")
        image, label, _ = _paths(folder, files.case_id)
        geometry = (
            tuple(payload["source_shape"]),
            tuple(payload["spacing"]),
            None if payload["affine"] is None else tuple(map(tuple, payload["affine"])),
            payload["source"],
        )
        statistics = None if payload["statistics"] is None else tuple(tuple(pair) for pair in payload["statistics"])
        foreground = tuple(z for z, classes in enumerate(payload["slice_classes"]) if any(c > 0 for c in classes))
        entries.append(CachedCase(files.case_id, image, label, normalization, statistics, payload["num_slices"], geometry, foreground))
    return entries


def preprocess_dataset(data: str | Path, cache_dir: str | Path | None = None, *, workers: int = 0, progress: bool = True) -> str:
    """``biosam2 preprocess``: every labelled training case (imagesTr) into the cache; returns a summary line."""
    spec = load_dataset_spec(data)
    cases = spec.list_cases("train")
    folder, written = preprocess(spec, cases, normalization_scheme(spec, cases), cache_dir, workers=workers, progress=progress)
    size = sum(path.stat().st_size for path in (folder / "cases").iterdir() if path.is_file())
    return (
        f"{folder}: {len(cases)} case(s) preprocessed ({written} written now, {len(cases) - written} up to date), "
        f"{size / 1e6:.1f} MB; remove the folder to free the space (train rebuilds it)"
    )

