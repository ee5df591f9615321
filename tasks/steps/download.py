"""``download``: fetch, verify and extract one dataset archive.

``run(cfg, paths)`` leaves ``paths.raw`` (``data/raw/<ds>/``) holding exactly
the archive's top folder, so the same archive gives the same DVC hash on every
download and machine; what was fetched from where (source, bytes, sha256, time,
overrides) goes to ``paths.download_record`` (``reports/<ds>/download.json``,
outside the cached tree). What the caller can rely on:

- Sources are tried in order: ``url``, then each of ``mirrors``; each may be
  ``https://``/``http://``, ``file://`` or a plain local path (relative to the
  current folder). HTTP downloads stream to ``<paths.archive>.part``, retry and
  resume (:mod:`tasks.http_fetch`).
- The archive is checked before anything is extracted: size (``size``), zip
  signature, sha256. With no pinned ``sha256`` the first good archive's hash
  is printed and recorded in ``paths.known_hashes`` (trust on first use) and
  every later download is checked against it.
- Extraction is safe (:mod:`tasks.archives`) and goes to a temporary folder
  renamed into place once ``<layout.root>/<train>`` and ``<validation>`` exist: a
  failure at any point leaves the previous good tree as it was.
- A verified dataset (record present, its sha256 equal to the pinned or
  recorded hash, tree present) returns at once; an archive already at
  ``paths.archive`` that matches a known hash is extracted without the network.
- ``offline=True`` (or ``download.offline``) uses only what is on disk.
- ``datasets.<ds>.format: shards`` (``auto``: above
  :data:`tasks.config.SHARDS_ABOVE` files) extracts nothing: ``paths.raw`` holds
  the checked archive itself, ``archive.zip`` (hard-linked where it can be), one
  DVC object instead of one per image; ``validate`` reads the images from it.

Every failure is a one-line :class:`StageError` that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from tasks.archives import (
    archive_summary,
    check_layout,
    check_zip_content_type,
    check_zip_file,
    check_zip_head,
    extract_archive,
)
from tasks.config import Config, DatasetConfig, DownloadConfig
from tasks.errors import SourceFailed, StageError
from tasks.http_fetch import BadURL, Checks, discard, fetch, local_source, progress
from tasks.io import (
    SHA256_HEX,
    atomic_path,
    file_lock,
    human_size,
    link_or_copy,
    sha256_file,
    storage_error,
    write_json,
    write_text,
)
from tasks.paths import DatasetPaths

log = logging.getLogger(__name__)

RECORD_VERSION = 1
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
    stored_as: str = "files"

    def __str__(self) -> str:
        size = human_size(self.bytes)
        if self.skipped:
            return (
                f"{self.dataset}: already verified at {self.path} ({size}, sha256 "
                f"{self.sha256[:12]}…, from {self.source}); skipped in {self.seconds:.2f} s"
            )
        return (
            f"{self.dataset}: {size} from {self.source}, sha256 {self.sha256} verified, "
            f"{'kept whole in' if self.stored_as == 'shards' else 'extracted to'} {self.path} "
            f"in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class ExpectedHash:
    """The sha256 an archive must have, and where that value came from (for messages)."""

    sha256: str
    origin: str
    pinned: bool


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
    """Extract the verified archive (or, stored as shards, place it whole) into a temporary
    folder and rename it onto ``paths.raw``."""
    archive = paths.archive
    files, folders = archive_summary(archive)
    check_layout(folders, ds)
    stored_as = ds.stored_as(files)
    with atomic_path(paths.raw) as tmp:
        tmp.mkdir()
        if stored_as == "shards":
            link_or_copy(archive, tmp / paths.raw_archive.name)
        else:
            files = extract_archive(archive, tmp, final=paths.raw)
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
            "format": stored_as,
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
    done = "kept whole (format: shards) in" if stored_as == "shards" else "extracted to"
    log.info("%s: %d files %s %s", ds.name, files, done, paths.raw)
    seconds = time.monotonic() - started
    return DownloadResult(ds.name, source, paths.raw, sha, size, False, seconds, stored_as)


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
    stored_as = record.get("format", "files")
    if ds.format not in ("auto", stored_as):
        return None
    if stored_as == "shards":
        return record if paths.raw_archive.is_file() else None
    root = paths.raw / ds.layout.root
    if not all((root / folder).is_dir() for folder in (ds.layout.train, ds.layout.validation)):
        return None
    return record


def check_archive(path: Path, ds: DatasetConfig, expected: ExpectedHash | None) -> tuple[str, int]:
    """Size, zip signature and sha256 of a complete archive; returns (sha256, bytes)."""
    size = path.stat().st_size
    _check_size(size, ds)
    with open(path, "rb") as handle:
        check_zip_head(handle.read(512))
    check_zip_file(path)
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


def _checks(ds: DatasetConfig) -> Checks:
    """What ``ds``'s archive must look like, checked while it downloads."""
    return Checks(
        content_type=check_zip_content_type,
        size=lambda total: _check_size(total, ds),
        head=check_zip_head,
    )


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
                full = storage_error(error, f"downloading {source} to {part}", part.parent)
                if full is None:
                    raise
                raise StageError(f"{ds.name}: {full} (the download resumes there)") from None
            except SourceFailed as failure:
                log.warning("%s: %s failed: %s", ds.name, source, failure.reason)
                failures.append((source, failure))
                if not failure.unreachable:
                    discard(part)
                continue
            os.replace(part, paths.archive)
            discard(part)
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
            sha, size = fetch(session, source, part, dl, checks=_checks(ds), label=ds.name)
        except BadURL as error:
            raise SourceFailed(
                f"{error.reason}; correct it under datasets.{ds.name} in params.yaml"
            ) from None
        finally:
            if owned:
                session.close()
    _check_size(size, ds)
    check_zip_file(part)
    return sha, size


def _copy_local(path: Path, part: Path, ds: DatasetConfig, dl: DownloadConfig) -> tuple[str, int]:
    if not path.is_file():
        raise SourceFailed(f"no such file {path}", unreachable=True)
    total = path.stat().st_size
    _check_size(total, ds)
    digest = hashlib.sha256()
    with open(path, "rb") as src, open(part, "wb") as dst, progress(ds.name, total, 0) as bar:
        head = src.read(dl.chunk_bytes)
        check_zip_head(head)
        block = head
        while block:
            dst.write(block)
            digest.update(block)
            bar.update(len(block))
            block = src.read(dl.chunk_bytes)
    return digest.hexdigest(), total


# ----------------------------------------------------------------------------- helpers


def _exclusive(paths: DatasetPaths) -> Any:
    """One download of a dataset at a time (a second waits, then finds it verified)."""
    return file_lock(
        paths.archive.with_name(f".{paths.dataset}.lock"),
        waiting=f"another download of {paths.dataset} is running; waiting for it",
    )
