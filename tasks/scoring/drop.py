"""A drop of new images: brought to a local folder, then checked image by image.

A drop is one folder of images (any depth), a ``.zip`` of one, an ``https://``
URL of such a zip (downloaded with the dataset download's retries and resume),
or an ``s3://bucket/prefix/`` (every object under it; the endpoint from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, as boto3 reads it). A drop laid
out folder-per-class, with only the dataset's class names as its top folders, is
*labelled*: its labels are checked against the predictions (live accuracy).

Each file goes through ``validate``'s own checks (:func:`tasks.ml.manifest.inspect_image`:
read, hash, full decode under the pixel limit, format, smallest side); a file
with the same bytes as one before it (in path order) is a duplicate. Files that
fail are quarantined with their reason and not scored; hidden and junk files are
not part of the drop.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tasks.config import DownloadConfig, ValidateConfig
from tasks.errors import StageError

if TYPE_CHECKING:
    import pandas as pd

DROP_SPLIT = "drop"
DUPLICATE = "duplicate of"


@dataclass(frozen=True)
class Drop:
    """A checked drop: one manifest-like row per file (``path`` relative to ``folder``)."""

    name: str
    source: str
    folder: Path
    labelled: bool
    frame: pd.DataFrame
    digest: str
    """sha256 over the sorted (path, file sha256) pairs: the drop's content."""

    @property
    def ok(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] == "ok"].reset_index(drop=True)

    @property
    def quarantined(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] != "ok"].reset_index(drop=True)


def drop_name(source: str) -> str:
    """The drop's name from its source: the folder's, the zip's stem, the prefix's last part."""
    path = urlparse(source).path if "://" in source else source
    last = PurePosixPath(path.rstrip("/")).name
    name = last[: -len(".zip")] if last.lower().endswith(".zip") else last
    if not name or name in {".", ".."}:
        raise StageError(f"cannot name the drop from {source!r}; pass --drop NAME")
    return name


@contextmanager
def local_drop(source: str, download: DownloadConfig) -> Iterator[Path]:
    """The drop as a local folder: the folder itself, or a temporary copy removed after."""
    scheme = urlparse(source).scheme.lower()
    if scheme in {"http", "https"}:
        with tempfile.TemporaryDirectory(prefix="tasks-drop-") as tmp:
            archive = Path(tmp) / "drop.zip"
            _fetch_url(source, archive, download)
            yield _extracted(archive, Path(tmp) / "files")
        return
    if scheme == "s3":
        with tempfile.TemporaryDirectory(prefix="tasks-drop-") as tmp:
            yield _download_prefix(source, Path(tmp))
        return
    path = Path(source[len("file://") :] if scheme == "file" else source)
    if path.is_dir():
        yield path
    elif path.is_file() and path.suffix.lower() == ".zip":
        with tempfile.TemporaryDirectory(prefix="tasks-drop-") as tmp:
            yield _extracted(path, Path(tmp) / "files")
    else:
        raise StageError(
            f"drop {source} not found: pass a folder of images, a .zip, an https:// URL of a "
            "zip or an s3://bucket/prefix"
        )


def _extracted(archive: Path, target: Path) -> Path:
    from tasks.archives import check_zip_file, extract_archive

    check_zip_file(archive)
    target.mkdir(parents=True)
    extract_archive(archive, target)
    entries = [entry for entry in target.iterdir() if not entry.name.startswith(".")]
    # a zip of one folder (what zipping a drop folder gives): the drop is that folder
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def _fetch_url(url: str, part: Path, download: DownloadConfig) -> None:
    import requests

    from tasks.errors import SourceFailed
    from tasks.http_fetch import fetch

    with requests.Session() as session:
        try:
            fetch(session, url, part, download, label=drop_name(url))
        except SourceFailed as failure:
            raise StageError(f"cannot download the drop {url}: {failure.reason}") from None


def _download_prefix(source: str, target: Path) -> Path:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(source)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    client = boto3.client("s3")
    count = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix) :]
                if not relative or relative.endswith("/") or ".." in PurePosixPath(relative).parts:
                    continue
                local = target / relative
                local.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(local))
                count += 1
    except (BotoCoreError, ClientError) as error:
        raise StageError(f"cannot read the drop {source}: {error}") from None
    if not count:
        raise StageError(f"no objects under {source}; check the bucket and prefix")
    return target


def check_drop(
    name: str, source: str, folder: Path, classes: Sequence[str], settings: ValidateConfig
) -> Drop:
    """Every file of the drop through validate's image checks, duplicates quarantined."""
    from tasks.ml.manifest import FoundFile, Scan, build_manifest, is_junk

    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(is_junk(part) for part in p.relative_to(folder).parts)
    )
    if not files:
        raise StageError(f"drop {source} holds no files; put the images in it and score again")
    labelled = _is_labelled(folder, classes)
    found = [
        FoundFile(
            path=f.relative_to(folder).as_posix(),
            split=DROP_SPLIT,
            label=f.relative_to(folder).parts[0] if labelled else classes[0],
        )
        for f in files
    ]
    frame = build_manifest(Scan(raw=folder, files=found), settings)
    if not labelled:
        frame["label"] = ""
    frame = _duplicates_quarantined(frame)
    pairs = "\n".join(f"{p}\t{s}" for p, s in zip(frame["path"], frame["sha256"], strict=True))
    digest = hashlib.sha256(pairs.encode()).hexdigest()
    return Drop(name, source, folder, labelled, frame, digest)


def _is_labelled(folder: Path, classes: Sequence[str]) -> bool:
    """Folder-per-class: only class-named folders at the top (hidden entries aside)."""
    top = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    return bool(top) and all(entry.is_dir() and entry.name in classes for entry in top)


def _duplicates_quarantined(frame: pd.DataFrame) -> pd.DataFrame:
    """A usable file with the bytes of an earlier one (path order) is quarantined, naming it."""
    frame = frame.copy()
    first: dict[str, str] = {}
    for index, row in frame.iterrows():
        if row["status"] != "ok":
            continue
        earlier = first.setdefault(row["sha256"], row["path"])
        if earlier != row["path"]:
            frame.loc[index, ["status", "reason"]] = ["quarantined", f"{DUPLICATE} {earlier}"]
    return frame
