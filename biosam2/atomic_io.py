"""Writing files so that a crash, a kill or a full disk never leaves a half-written one behind.

Every output goes to a temporary file in the destination's directory, is flushed to disk, and only
then renamed over the destination (``os.replace`` is atomic on POSIX and Windows). On failure the
temporary file is removed and the previous version of the destination, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    ``suffix`` keeps the extension visible to writers that choose a format from the name
    (e.g. nibabel needs ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output_with_data_files(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_output`, for writers that make a header and data files beside it (MetaImage
    ``.mhd`` + ``.zraw``, detached NRRD ``.nhdr`` + ``.raw.gz``): the header names its data file, so
    both are written under their final names in a private staging folder beside ``path``. On success
    the data files are moved in first and the header last, so no header ever points to a temporary
    name (copies such as ``cp OUT/*`` stay readable, ``--overwrite`` replaces the pair)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = make_staging_dir(path.parent, path.name)
    try:
        yield folder / path.name
        _flush_directory(folder)
        for produced in sorted(folder.iterdir()):
            if produced.name != path.name:
                os.replace(produced, path.parent / produced.name)
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        stream.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        write(stream)


# In a folder while `predict` moves results into it one by one; readers refuse the folder meanwhile.
INCOMPLETE_MARKER = ".biosam2-predict-incomplete"

# Staging folders carry this host's name and the pid of the run that made them, so that a later run
# can tell a killed run's leftovers (pid dead) from a running one's and remove them.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_STAGING = re.compile(r"\.(?P<purpose>.+)\.biosam2-staging\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def remove_stale_staging(parent: str | Path) -> list[Path]:
    """Remove the staging folders in ``parent`` left by killed biosam2 runs on this host; returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(parent).iterdir():
            match = _STAGING.fullmatch(entry.name)
            if not match or match["host"] != _HOST or _alive(int(match["pid"])) or not entry.is_dir():
                continue
            purpose = match["purpose"]
            if purpose.endswith(".old") and not (Path(parent) / purpose[: -len(".old")]).exists():
                continue  # killed between the two renames: this holds the only copy of the old folder
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def make_staging_dir(parent: str | Path, purpose: str) -> Path:
    """A new hidden folder in ``parent`` named with this run's pid (stale ones there are removed first)."""
    remove_stale_staging(parent)
    return Path(tempfile.mkdtemp(prefix=f".{purpose}.biosam2-staging.{_HOST}.{os.getpid()}.", dir=parent))


def _flush_directory(staging: Path) -> None:
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
    for file in staging.rglob("*"):
        if file.is_file():
            with open(file, "rb") as written:
                os.fsync(written.fileno())


def publish_directory(staging: Path, target: Path) -> None:
    """Make a finished staging folder ``target`` with one rename (``target`` must not exist or be empty)."""
    _flush_directory(staging)
    os.replace(staging, target)


def replace_directory(build: Callable[[Path], None], target: str | Path) -> None:
    """Build a directory's contents in a staging folder, then swap it in for ``target``.

    Readers see either the old complete directory or the new complete one: the old one is only
    removed after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(target.parent, target.name)
    try:
        build(staging)
        _flush_directory(staging)
        if target.exists():
            retired = make_staging_dir(target.parent, f"{target.name}.old")
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---- one writer per run directory ----------------------------------------------------------------
LOCK_FILE = ".lock"


class DirectoryLocked(Exception):
    """Another live process holds the directory's lock; ``holder`` is what it wrote there."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def directory_lock(directory: str | Path) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on ``DIRECTORY/.lock`` for the duration of the block.

    The OS releases the lock when the process ends, however it ends (a SIGKILL included), so a dead
    holder never blocks the next run; no stale-lock guessing is needed. The file itself stays: removing
    it would let a late opener lock an unlinked file while a third process locks a new one. Raises
    :class:`DirectoryLocked` at once (no waiting) if another process holds it. ``flock`` is per host on
    some network file systems: it keeps two runs on one machine apart, not necessarily on two nodes.
    """
    import fcntl

    path = Path(directory) / LOCK_FILE
    # O_CLOEXEC (Python's default): launched child processes (DDP ranks) do not inherit the lock.
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode("utf-8", "replace").strip()
            raise DirectoryLocked(holder or "another process") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield path
    finally:
        os.close(descriptor)  # releases the lock


# ---- a full disk, whatever the writer raises -------------------------------------------------------
def free_bytes(directory: str | Path) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def disk_full(error: BaseException, directory: str | Path) -> bool:
    """Whether a failed write was a full disk. Writers do not all say so: torch.save raises a
    RuntimeError ("unexpected pos ..."), numpy an OSError without errno ("N requested and M written"),
    so when the error itself does not tell, the free space left in ``directory`` decides (call this
    while the partial file still exists)."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(error, OSError) and "requested and" in str(error) and "written" in str(error):
        return True  # numpy's short write: the partial file is already gone, the free space may not tell
    try:
        return free_bytes(directory) < (16 << 20)
    except OSError:
        return False
