"""File digests: sha256 for archives and weights, MD5 as DVC records it for a file."""

from __future__ import annotations

import hashlib
from pathlib import Path


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
