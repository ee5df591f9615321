"""``download``: fetch, verify and extract one dataset archive.

``run(cfg, paths)`` leaves ``paths.raw`` (``data/raw/<ds>/``) holding exactly
the archive's top folder, so the same archive gives the same DVC hash on every
download and machine; what was fetched from where (source, bytes, sha256, time,
overrides) goes to ``paths.download_record`` (``reports/<ds>/download.json``,
outside the cached tree). What the caller can rely on:

- Sources are tried in order: ``url``, then each of ``mirrors``; each may be
  ``https://``/``http://``, ``file://`` or a plain local path (relative to the
  current folder). HTTP downloads stream to ``<paths.archive>.part`` with a
  progress bar (only when stderr is a terminal), retry with exponential
  backoff on connection errors, 5xx and 429 (``Retry-After`` is honoured, both
  capped at ``download.max_backoff_seconds``) and resume with a Range request.
- The archive is checked before anything is extracted: size (``size``), zip
  signature, sha256. With no pinned ``sha256`` the first good archive's hash
  is printed and recorded in ``paths.known_hashes`` (trust on first use) and
  every later download is checked against it.
- Extraction refuses absolute paths, ``..`` and symlinks, skips ``__MACOSX/``,
  ``.DS_Store``, ``Thumbs.db`` and ``._*``, goes to a temporary folder renamed
  into place, and checks ``<layout.root>/<train>`` and ``<validation>`` exist.
  A failure at any point leaves the previous good tree as it was.
- A verified dataset (record present, its sha256 equal to the pinned or
  recorded hash, tree present) returns at once; an archive already at
  ``paths.archive`` that matches a known hash is extracted without the network.
- ``offline=True`` (or ``download.offline``) uses only what is on disk.

Every failure is a one-line :class:`StageError` that names the fix.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from tasks.config import Config, DatasetConfig, DownloadConfig
from tasks.errors import SourceFailed, StageError
from tasks.io import (
    SHA256_HEX,
    atomic_path,
    file_lock,
    sha256_file,
    storage_error,
    write_json,
    write_text,
)
from tasks.paths import DatasetPaths

log = logging.getLogger(__name__)

RECORD_VERSION = 1
ZIP_CONTENT_TYPES = frozenset(
    {
        "application/zip",
        "application/x-zip",
        "application/x-zip-compressed",
        "application/zip-compressed",
        "application/x-compressed",
        "multipart/x-zip",
        "application/octet-stream",
        "binary/octet-stream",
        "application/download",
        "application/x-download",
        "application/force-download",
    }
)
JUNK_FOLDERS = frozenset({"__MACOSX"})
JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_USER_AGENT = "tasks-download/1 (+python-requests)"


@dataclass(frozen=True)
class DownloadResult:
    """What ``download`` did: where the tree is, what it came from, and how long it took."""

    dataset: str
    source: str
    path: Path
    sha256: str
    bytes: int
    skipped: bool
    seconds: float

    def __str__(self) -> str:
        size = _human(self.bytes)
        if self.skipped:
            return (
                f"{self.dataset}: already verified at {self.path} ({size}, sha256 "
                f"{self.sha256[:12]}…, from {self.source}); skipped in {self.seconds:.2f} s"
            )
        return (
            f"{self.dataset}: {size} from {self.source}, sha256 {self.sha256} verified, "
            f"extracted to {self.path} in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class ExpectedHash:
    """The sha256 an archive must have, and where that value came from (for messages)."""

    sha256: str
    origin: str
    pinned: bool


class _Retry(Exception):
    """A transient failure: try the same source again (after ``wait`` seconds when given)."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config, paths: DatasetPaths, *, offline: bool = False) -> DownloadResult:
    """Make ``paths.raw`` hold the verified, extracted archive of ``paths.dataset``."""
    started = time.monotonic()
    ds = cfg.dataset(paths.dataset)
    offline = offline or cfg.download.offline
    with _exclusive(paths):
        expected = expected_hash(ds, paths)
        record = verified_record(ds, paths, expected)
        if record is not None:
            log.info("%s: already verified at %s; nothing to fetch", ds.name, paths.raw)
            return DownloadResult(
                ds.name,
                str(record.get("source", "?")),
                paths.raw,
                record["sha256"],
                int(record.get("bytes", 0)),
                skipped=True,
                seconds=time.monotonic() - started,
            )

        archive = paths.archive
        if archive.is_file() and (offline or expected is not None):
            try:
                sha, size = check_archive(archive, ds, expected)
            except SourceFailed as failure:
                if offline:
                    raise StageError(
                        f"{ds.name}: the archive at {archive} is unusable: {failure.reason}; "
                        "replace it with the right zip, or run without --offline to download it"
                    ) from None
                log.warning("%s: %s; downloading it again", archive, failure.reason)
            else:
                log.info("%s: using the archive already at %s", ds.name, archive)
                return _install(cfg, ds, paths, str(archive), sha, size, expected, started)
        if offline:
            raise StageError(
                f"{ds.name}: offline and nothing on disk: no verified tree at {paths.raw} and "
                f"no archive at {archive}; copy the zip to {archive}, or run without --offline"
            )

        source, sha, size = fetch_any(ds, cfg.download, paths, expected)
        return _install(cfg, ds, paths, source, sha, size, expected, started)


def _install(
    cfg: Config,
    ds: DatasetConfig,
    paths: DatasetPaths,
    source: str,
    sha: str,
    size: int,
    expected: ExpectedHash | None,
    started: float,
) -> DownloadResult:
    """Extract the verified archive into a temporary folder and rename it onto ``paths.raw``."""
    archive = paths.archive
    with atomic_path(paths.raw) as tmp:
        tmp.mkdir()
        files = extract_archive(archive, tmp, final=paths.raw)
        check_layout(tmp, ds)
        elapsed = time.monotonic() - started
        record = {
            "version": RECORD_VERSION,
            "dataset": ds.name,
            "source": source,
            "archive": str(archive),
            "bytes": size,
            "sha256": sha,
            "verified_against": expected.origin if expected else "trust on first use",
            "files": files,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(elapsed, 3),
            "overrides": list(cfg.overrides),
        }
    write_json(paths.download_record, record)
    if expected is None:
        record_known_hash(paths, sha, source, ds.url)
        message = (
            f"{ds.name}: no sha256 pinned; trusting on first use: {sha} "
            f"(recorded in {paths.known_hashes}; pin it with datasets.{ds.name}.sha256: {sha})"
        )
        log.warning(message)
    log.info("%s: %d files extracted to %s", ds.name, files, paths.raw)
    return DownloadResult(
        ds.name, source, paths.raw, sha, size, skipped=False, seconds=time.monotonic() - started
    )


# ----------------------------------------------------------------------------- hashes and records


_URL_LINE = "# url: "


def expected_hash(ds: DatasetConfig, paths: DatasetPaths) -> ExpectedHash | None:
    """The pinned sha256, else the one recorded on first use, else None."""
    if ds.sha256:
        return ExpectedHash(ds.sha256, f"pinned in params.yaml datasets.{ds.name}.sha256", True)
    known = paths.known_hashes
    if not known.is_file():
        return None
    lines = known.read_text(encoding="utf-8").splitlines()
    recorded_url = next((ln[len(_URL_LINE) :] for ln in lines if ln.startswith(_URL_LINE)), None)
    if recorded_url is not None and recorded_url != ds.url:
        log.warning(
            "%s: datasets.%s.url changed since its sha256 was recorded (was %s); "
            "the new archive is trusted on first use",
            ds.name,
            ds.name,
            recorded_url,
        )
        return None
    for line in lines:
        token = line.strip().split(maxsplit=1)[0].lower() if line.strip() else ""
        if not token or token.startswith("#"):
            continue
        if not SHA256_HEX.match(token):
            raise StageError(
                f"{known}: {token[:20]!r} is not a sha256; delete the file to trust the "
                "next download, or pin the hash in params.yaml"
            )
        return ExpectedHash(token, f"recorded on first use in {known}", False)
    return None


def record_known_hash(paths: DatasetPaths, sha: str, source: str, url: str) -> Path:
    """Write ``sha`` to ``paths.known_hashes`` (``sha256sum`` format, plus comments).

    The record is bound to the configured ``url``: pointing the dataset at
    another URL means another archive, trusted on its own first use.
    """
    when = datetime.now(UTC).isoformat(timespec="seconds")
    text = (
        f"{sha}  {paths.archive.name}\n# trusted on first use {when} from {source}\n"
        f"{_URL_LINE}{url}\n"
    )
    return write_text(paths.known_hashes, text)


def verified_record(
    ds: DatasetConfig, paths: DatasetPaths, expected: ExpectedHash | None
) -> dict[str, Any] | None:
    """The download record when the tree is present and its hash is the expected one."""
    if expected is None or not paths.download_record.is_file():
        return None
    try:
        record = json.loads(paths.download_record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("sha256") != expected.sha256:
        return None
    if ds.size and record.get("bytes") != ds.size:
        return None
    root = paths.raw / ds.layout.root
    if not all((root / folder).is_dir() for folder in (ds.layout.train, ds.layout.validation)):
        return None
    return record


def check_archive(path: Path, ds: DatasetConfig, expected: ExpectedHash | None) -> tuple[str, int]:
    """Size, zip signature and sha256 of a complete archive; returns (sha256, bytes)."""
    size = path.stat().st_size
    _check_size(size, ds)
    with open(path, "rb") as handle:
        _sniff(handle.read(512))
    if not zipfile.is_zipfile(path):
        raise SourceFailed("not a zip archive (no zip directory at the end: truncated?)")
    sha = sha256_file(path)
    _check_hash(sha, ds, expected)
    return sha, size


def _check_size(size: int, ds: DatasetConfig) -> None:
    if ds.size and size != ds.size:
        raise SourceFailed(
            f"got {size} bytes but params.yaml says datasets.{ds.name}.size: {ds.size} "
            "(truncated, or a different file)"
        )


def _check_hash(sha: str, ds: DatasetConfig, expected: ExpectedHash | None) -> None:
    if expected is None or sha == expected.sha256:
        return
    fix = f"pin the new hash (datasets.{ds.name}.sha256: {sha} in params.yaml)"
    if not expected.pinned:
        fix += f" or delete {expected.origin.rsplit(' in ', 1)[-1]}"
    raise SourceFailed(
        f"sha256 mismatch: got {sha}, expected {expected.sha256} ({expected.origin}); "
        f"if the upstream archive really changed, {fix}; otherwise the file is corrupt or "
        "tampered with: try again or use a mirror"
    )


def _sniff(head: bytes) -> None:
    """Refuse a body that is plainly not a zip, from its first bytes."""
    text = head.lstrip()[:64].lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body")):
        raise SourceFailed(
            "got an HTML page, not the zip (a login or error page?); use a direct download "
            "link, or a mirror"
        )
    if not head.startswith(b"PK"):
        raise SourceFailed(f"not a zip archive (it starts with {head[:8]!r})")


# ----------------------------------------------------------------------------- fetching


def fetch_any(
    ds: DatasetConfig, dl: DownloadConfig, paths: DatasetPaths, expected: ExpectedHash | None
) -> tuple[str, str, int]:
    """Try ``url`` then each mirror; the first good archive lands at ``paths.archive``.

    Returns (source, sha256, bytes). Raises StageError naming every source tried.
    """
    sources = [ds.url, *ds.mirrors]
    failures: list[tuple[str, SourceFailed]] = []
    part = partial_path(paths)
    with requests.Session() as session:
        session.headers["User-Agent"] = _USER_AGENT
        for source in sources:
            log.info("%s: fetching %s", ds.name, source)
            try:
                sha, size = fetch_source(source, part, ds, dl, session=session)
                _check_hash(sha, ds, expected)
            except OSError as error:
                full = storage_error(error, f"downloading {source} to {part}")
                if full is None:
                    raise
                raise StageError(f"{ds.name}: {full} (the download resumes there)") from None
            except SourceFailed as failure:
                log.warning("%s: %s failed: %s", ds.name, source, failure.reason)
                failures.append((source, failure))
                if not failure.unreachable:
                    _discard(part)
                continue
            os.replace(part, paths.archive)
            _discard(part)
            return source, sha, size
    raise StageError(_failure_message(ds, paths, failures))


def _failure_message(
    ds: DatasetConfig, paths: DatasetPaths, failures: list[tuple[str, SourceFailed]]
) -> str:
    tried = "; ".join(f"{source}: {failure.reason}" for source, failure in failures)
    if all(failure.unreachable for _, failure in failures):
        return (
            f"{ds.name}: cannot reach any source (tried {tried}). Fix: add a mirror with "
            f"--set 'datasets.{ds.name}.mirrors=[\"file:///path/to.zip\"]' (or under "
            f"datasets.{ds.name}.mirrors in params.yaml), or put the archive at "
            f"{paths.archive} and run with --offline"
        )
    if len(failures) == 1:
        return f"{ds.name}: {tried}"
    return f"{ds.name}: no source gave a good archive (tried {tried})"


def partial_path(paths: DatasetPaths) -> Path:
    """Where an unfinished download lives until it is verified (kept for resume)."""
    return paths.archive.with_name(paths.archive.name + ".part")


def _discard(part: Path) -> None:
    for path in (part, _part_meta(part)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def local_source(source: str) -> Path | None:
    """The file a ``file://`` URL or plain path names; None for http(s)."""
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise SourceFailed(f"file:// URL with host {parsed.netloc!r}; write file:///path")
        return Path(unquote(parsed.path))
    return Path(source).expanduser()


def fetch_source(
    source: str,
    part: Path,
    ds: DatasetConfig,
    dl: DownloadConfig,
    session: requests.Session | None = None,
) -> tuple[str, int]:
    """Bring one source's archive to ``part`` and check size and zip signature.

    Returns (sha256, bytes). Raises SourceFailed; on an unreachable source the
    partial file is kept so the next try resumes it.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    path = local_source(source)
    if path is not None:
        sha, size = _copy_local(path, part, ds, dl)
    else:
        owned = session is None
        session = session or requests.Session()
        try:
            sha, size = _fetch_http(session, source, part, ds, dl)
        finally:
            if owned:
                session.close()
    _check_size(size, ds)
    if not zipfile.is_zipfile(part):
        raise SourceFailed("not a zip archive (no zip directory at the end: truncated?)")
    return sha, size


def _copy_local(path: Path, part: Path, ds: DatasetConfig, dl: DownloadConfig) -> tuple[str, int]:
    if not path.is_file():
        raise SourceFailed(f"no such file {path}", unreachable=True)
    total = path.stat().st_size
    _check_size(total, ds)
    digest = hashlib.sha256()
    with open(path, "rb") as src, open(part, "wb") as dst, _progress(ds.name, total, 0) as bar:
        head = src.read(dl.chunk_bytes)
        _sniff(head)
        block = head
        while block:
            dst.write(block)
            digest.update(block)
            bar.update(len(block))
            block = src.read(dl.chunk_bytes)
    return digest.hexdigest(), total


def _fetch_http(
    session: requests.Session, url: str, part: Path, ds: DatasetConfig, dl: DownloadConfig
) -> tuple[str, int]:
    """Download ``url`` into ``part`` with retries and Range resume."""
    failures = 0
    high_water = part.stat().st_size if part.exists() else 0
    while True:
        try:
            return _http_attempt(session, url, part, ds, dl)
        except _Retry as retry:
            size_now = part.stat().st_size if part.exists() else 0
            if size_now > high_water:
                high_water, failures = size_now, 0  # progress: a fresh retry budget
            failures += 1
            if failures >= dl.retries:
                raise SourceFailed(
                    f"{retry.reason} (gave up after {failures} attempts)", unreachable=True
                ) from None
            wait = (
                retry.wait if retry.wait is not None else dl.backoff_seconds * 2 ** (failures - 1)
            )
            wait = min(max(wait, 0.0), dl.max_backoff_seconds)
            log.warning(
                "%s: %s; retry %d of %d in %.2f s",
                url,
                retry.reason,
                failures,
                dl.retries - 1,
                wait,
            )
            time.sleep(wait)


def _http_attempt(
    session: requests.Session, url: str, part: Path, ds: DatasetConfig, dl: DownloadConfig
) -> tuple[str, int]:
    offset = part.stat().st_size if part.exists() else 0
    meta = _read_meta(part) if offset else {}
    if offset and meta.get("url") not in (None, url) and not meta.get("etag"):
        offset = 0  # a partial from another source with nothing to tie it to this one
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    try:
        response = session.get(
            url, headers=headers, stream=True, timeout=(dl.timeout_seconds, dl.timeout_seconds)
        )
    except (requests.exceptions.InvalidURL, urllib3.exceptions.LocationValueError) as error:
        # urllib3 raises LocationParseError itself (not wrapped by requests) for a host
        # with an empty or over-long label, e.g. ``http://example..com/x.zip``.
        raise SourceFailed(
            f"invalid URL ({error}); correct it under datasets.{ds.name} in params.yaml"
        ) from None
    except requests.RequestException as error:
        raise _Retry(_reason(error)) from None
    with response:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retry(
                f"HTTP {status} {response.reason}",
                _retry_after(response.headers.get("Retry-After")),
            )
        if status == 416 and offset:
            total = _range_total(response.headers.get("Content-Range"))
            if total == offset:
                return sha256_file(part), offset
            _discard(part)
            raise _Retry("the server refused to resume (416); starting over", wait=0)
        if status >= 400:
            raise SourceFailed(f"HTTP {status} {response.reason}", unreachable=True)
        if status not in (200, 206):
            raise SourceFailed(f"unexpected HTTP {status} {response.reason}")
        _check_content_type(response.headers.get("Content-Type"))

        length = _int(response.headers.get("Content-Length"))
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                _discard(part)
                raise _Retry(f"the server resumed at byte {start}, not {offset}", wait=0)
        else:
            if offset:
                log.info("%s: the server ignored the Range request; starting over", url)
            offset, total = 0, length
        if total is not None:
            _check_size(total, ds)
        _write_meta(part, url, response.headers, total)
        return _stream(response, part, offset, total, ds, dl)


def _stream(
    response: requests.Response,
    part: Path,
    offset: int,
    total: int | None,
    ds: DatasetConfig,
    dl: DownloadConfig,
) -> tuple[str, int]:
    digest = hashlib.sha256()
    if offset:
        with open(part, "rb") as done:
            while block := done.read(1 << 20):
                digest.update(block)
    received = offset
    blocks = _blocks(response, dl.chunk_bytes)
    with open(part, "r+b" if offset else "wb") as out, _progress(ds.name, total, offset) as bar:
        out.seek(offset)
        out.truncate()
        while True:
            try:
                block = next(blocks, None)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
                raise _Retry(
                    f"connection dropped after {received} bytes ({_reason(error)})"
                ) from None
            if block is None:
                break
            if received == 0:
                _sniff(block)
            out.write(block)
            out.flush()  # what arrived survives a kill, for the next run to resume
            digest.update(block)
            received += len(block)
            bar.update(len(block))
    if total is not None and received != total:
        raise _Retry(f"body ended after {received} of {total} bytes")
    return digest.hexdigest(), received


def _blocks(response: requests.Response, size: int) -> Iterator[bytes]:
    """The body as it arrives: ``read1`` hands over what came before a dropped connection."""
    raw = response.raw
    if hasattr(raw, "read1"):
        while block := raw.read1(size, decode_content=True):
            yield block
    else:  # urllib3 1.x
        yield from response.iter_content(size)


def _check_content_type(value: str | None) -> None:
    if not value:
        return
    mime = value.split(";", 1)[0].strip().lower()
    if mime in ("text/html", "application/xhtml+xml"):
        raise SourceFailed(
            f"got an HTML page ({mime}), not the zip (a login or error page?); use a direct "
            "download link, or a mirror"
        )
    if mime not in ZIP_CONTENT_TYPES:
        raise SourceFailed(f"got content type {mime!r}, not a zip archive; check the URL")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    match = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _range_total(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+\*/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _part_meta(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict[str, Any]:
    try:
        meta = json.loads(_part_meta(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_meta(part: Path, url: str, headers: Any, total: int | None) -> None:
    etag = headers.get("ETag")
    meta = {
        "url": url,
        "etag": etag if etag and not etag.startswith("W/") else None,
        "last_modified": headers.get("Last-Modified"),
        "total": total,
    }
    write_json(_part_meta(part), meta)


def _reason(error: BaseException) -> str:
    """A short reason for a requests error (its repr nests three levels deep)."""
    if isinstance(error, requests.exceptions.Timeout):
        return "timed out"
    text = str(error)
    for marker in ("Connection refused", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    if "Errno -3" in text or "Temporary failure in name resolution" in text:
        return "name resolution failed"
    if "IncompleteRead" in text or "Connection broken" in text:
        return "connection broken"
    return type(error).__name__ + (f": {text[:120]}" if text else "")


def _progress(name: str, total: int | None, initial: int, stream: Any = None) -> tqdm:
    """A byte progress bar on stderr, silent unless that stream is a terminal."""
    stream = stream or sys.stderr
    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=stream,
        disable=not _isatty(stream),
        leave=False,
    )


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ----------------------------------------------------------------------------- extraction


def member_target(name: str) -> PurePosixPath | None:
    """The relative path an archive entry extracts to; None to skip junk.

    Raises SourceFailed for an absolute path, a drive, or a ``..`` component.
    """
    clean = name.replace("\\", "/")
    if clean.startswith("/") or PureWindowsPath(clean).drive:
        raise SourceFailed(f"unsafe archive entry {name!r}: absolute path; refusing to extract")
    parts = [part for part in clean.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SourceFailed(f"unsafe archive entry {name!r}: '..' in path; refusing to extract")
    if not parts:
        return None
    if any(part in JUNK_FOLDERS for part in parts):
        return None
    if parts[-1] in JUNK_FILES or parts[-1].startswith("._"):
        return None
    return PurePosixPath(*parts)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def extract_archive(archive: Path, target: Path, *, final: Path | None = None) -> int:
    """Extract ``archive`` into the folder ``target`` safely; returns the files written.

    Every entry is checked before the first byte is written, so an unsafe
    archive writes nothing at all. ``final``: where ``target`` goes once
    complete (a temporary ``target`` is renamed there), as messages name it.
    """
    target = Path(target)
    final = Path(final or target)
    try:
        with zipfile.ZipFile(archive) as bundle:
            plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
            needed = 0
            for info in bundle.infolist():
                relative = member_target(info.filename)
                if relative is None:
                    continue
                if _is_symlink(info):
                    raise SourceFailed(
                        f"unsafe archive entry {info.filename!r}: a symlink; refusing to extract"
                    )
                plan.append((info, relative))
                needed += info.file_size
            _check_space(target, needed)
            files = 0
            made: set[Path] = set()
            for info, relative in plan:
                destination = target.joinpath(*relative.parts)
                folder = destination if info.is_dir() else destination.parent
                if folder not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(folder)
                if info.is_dir():
                    continue
                with bundle.open(info) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                files += 1
    except SourceFailed as failure:
        raise StageError(
            f"{archive}: {failure.reason}; nothing was extracted (use a trusted source)"
        ) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as error:
        raise StageError(
            f"{archive}: not a readable zip archive ({error}); delete it and download again"
        ) from None
    except OSError as error:
        doing = f"extracting {archive} to {final}"
        full = storage_error(error, doing, where=final.parent)
        if full is not None:
            kept = "; the previous tree there is kept" if final != target and final.exists() else ""
            raise StageError(full + kept) from None
        raise StageError(f"{archive}: extracting to {target} failed: {error}") from None
    return files


def _check_space(target: Path, needed: int) -> None:
    free = shutil.disk_usage(target).free
    if needed > free:
        raise StageError(
            f"extracting needs {_human(needed)} but {target} has {_human(free)} free; "
            "free some space"
        )


def check_layout(root: Path, ds: DatasetConfig) -> None:
    """Refuse an extracted tree without ``<layout.root>/<train>`` and ``<validation>``."""
    top = Path(root) / ds.layout.root
    missing = [
        f"{ds.layout.root}/{folder}/"
        for folder in (ds.layout.train, ds.layout.validation)
        if not (top / folder).is_dir()
    ]
    if not missing:
        return
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(root).iterdir())
    if top.is_dir():
        found = sorted(f"{ds.layout.root}/{p.name}" for p in top.iterdir() if p.is_dir())
    raise StageError(
        f"{ds.name}: the archive has no {' or '.join(missing)} (found: "
        f"{', '.join(found[:10]) or 'nothing'}); fix datasets.{ds.name}.layout in params.yaml "
        "or use the right archive"
    )


# ----------------------------------------------------------------------------- helpers


def _exclusive(paths: DatasetPaths) -> Any:
    """One download of a dataset at a time (a second waits, then finds it verified)."""
    return file_lock(
        paths.archive.with_name(f".{paths.dataset}.lock"),
        waiting=f"another download of {paths.dataset} is running; waiting for it",
    )


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover
