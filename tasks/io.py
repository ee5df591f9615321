"""File I/O every layer shares: atomic writes, digests, one file lock.

- Atomic writes: every output goes to a temporary sibling first and is renamed
  into place, so a reader sees the old file or the new one, never half of one,
  and a failed or interrupted step leaves the previous good output untouched.
- Digests: sha256 for archives and weights, MD5 as DVC records it for a file
  (so MLflow tags and ``dvc.lock`` agree).
- :func:`file_lock`: one holder at a time across processes (``fcntl.flock``).

Standard library only: Airflow's DAG processor imports this.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
