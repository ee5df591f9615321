"""File I/O every layer shares: atomic writes, digests, one file lock.

- Atomic writes: every output goes to a temporary sibling first and is renamed
  into place, so a reader sees the old file or the new one, never half of one,
  and a failed or interrupted step leaves the previous good output untouched.
- Digests: sha256 for archives and weights, MD5 as DVC records it for a file
  (so MLflow tags and ``dvc.lock`` agree).
- :func:`file_lock`: one holder at a time across processes (``fcntl.flock``).
- :func:`storage_error`: a write the storage refused (disk full, quota, file-size
  limit) as one line that names what was being written and the fix.

Standard library only: Airflow's DAG processor imports this.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import StageError

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
"""A sha256 digest as hex text (lowercase)."""


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The caller writes a file (or a folder) at the yielded path. On an exception
    the temporary is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix or target.suffix}", dir=target.parent
    )
    os.close(handle)
    tmp = Path(name)
    tmp.unlink()
    try:
        yield tmp
        if tmp.is_dir() and not tmp.is_symlink():
            replace_dir(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def replace_dir(source: Path, target: Path) -> None:
    """Move folder ``source`` onto ``target``, replacing any folder already there.

    Two renames: the old folder is set aside first and removed only after the
    new one is in place, so an interruption never leaves ``target`` missing
    with nothing to restore.
    """
    target = Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, payload: Any) -> Path:
    return write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def file_digest(path: Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of the file at ``path``, read in ``chunk``-byte blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def file_md5(path: Path) -> str:
    """The MD5 DVC records for a file output (so MLflow and dvc.lock agree)."""
    return file_digest(path, "md5")


@contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``waiting``: logged once when another process holds the lock, before blocking.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.info("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}
"""The errors of a write the storage refused, as a person says them."""


def storage_error(
    error: BaseException, doing: str | None = None, where: str | Path | None = None
) -> str | None:
    """One line for a write the storage refused (``ENOSPC``, ``EDQUOT``, ``EFBIG``), else None.

    ``error`` or any exception it was raised from (libraries wrap the ``OSError``)
    counts. ``doing`` says what was being written ("extracting X to Y"), by default
    the ``OSError``'s file; ``where`` is the folder whose file system is full (by
    default that file's). The line ends with the fix: free space there (saying how
    much is free now), or raise the file-size limit (``ulimit -f``) when one is set.
    """
    found = _storage_oserror(error)
    if found is None:
        return None
    written = Path(found.filename) if isinstance(found.filename, str) else None
    doing = doing or (f"writing {written}" if written else "writing a file")
    reason = STORAGE_ERRNOS[found.errno]
    if found.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            fix = f"raise the file-size limit (ulimit -f, now {_size(limit)} per file)"
        else:
            fix = "write to a file system that allows larger files"
        return f"{reason} while {doing}; {fix}, then rerun"
    folder = _existing_folder(Path(where or written or "."))
    free = f"{_size(shutil.disk_usage(folder).free)} free now" if folder else "free space unknown"
    fix = f"free space on the file system of {folder} ({free})"
    if folder and found.errno == errno.ENOSPC and _no_inodes(folder):
        reason = "no inodes (room for new files) left on the device"
        fix = f"delete files on the file system of {folder} or give it more inodes ({free})"
    if found.errno == errno.EDQUOT:
        fix += " or raise the quota"
    return f"{reason} while {doing}; {fix}, then rerun"


@contextmanager
def kept_on_full_disk(target: Path, doing: str, what: str) -> Iterator[None]:
    """A storage error (full disk, quota, file-size limit) while ``doing`` ``target`` (an
    atomic write) as one StageError naming it and that the previous ``what`` is kept.

    Libraries that write through their own I/O (pyarrow, h5py) raise it without a file
    name; this names the file and the file system that is full.
    """
    try:
        yield
    except OSError as error:
        full = storage_error(error, f"{doing} {target}", where=target.parent)
        if full is None:
            raise
        kept = f"the previous {what} there is kept" if target.exists() else "nothing was saved"
        raise StageError(f"{full}; {kept}") from None


def _no_inodes(folder: Path) -> bool:
    """Whether ``folder``'s file system is out of inodes (bytes may be free)."""
    stats = os.statvfs(folder)
    return stats.f_files > 0 and stats.f_favail == 0


def _storage_oserror(error: BaseException | None) -> OSError | None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def _existing_folder(path: Path) -> Path | None:
    path = path.absolute()
    for folder in (path, *path.parents):
        if folder.is_dir():
            return folder
    return None


def human_size(count: float, byte_unit: str = "B") -> str:
    """A byte count as a person reads it (powers of 1000): ``512 B``, ``3.4 MB``."""
    for unit in (byte_unit, "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == byte_unit else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover


def _size(count: float) -> str:
    return human_size(count, "bytes")


def link_or_copy(source: Path, target: Path) -> None:
    """``source`` at ``target`` too: a hard link (no second copy), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
