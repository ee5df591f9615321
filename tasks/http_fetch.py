"""Resumable HTTP download of one file into a partial file.

:func:`fetch` streams a URL into ``part`` and returns its sha256 and size. What
the caller can rely on:

- Connection errors, timeouts, 5xx and 429 are retried with exponential
  backoff (``backoff_seconds`` doubling), or after the server's ``Retry-After``,
  both capped at ``max_backoff_seconds``; ``retries`` attempts in all, and an
  attempt that added bytes gives a fresh budget.
- What arrived stays in ``part`` (flushed block by block, so it survives a
  kill); the next attempt, or the next run, resumes it with a Range request.
  ``<part>.json`` remembers the URL and the server's validator (strong ETag or
  Last-Modified), sent as ``If-Range`` so a changed file is fetched whole.
- The caller's :class:`Checks` run as soon as what they check is known: the
  Content-Type, the announced size, the first bytes of the body.
- A progress bar on stderr, drawn only when stderr is a terminal.

A source that gives no good file raises :class:`SourceFailed` (``unreachable``
when it could not be reached or had nothing there); an unusable URL raises
:class:`BadURL`, one of those.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from tasks.config import DownloadConfig
from tasks.errors import SourceFailed
from tasks.io import sha256_file, write_json

log = logging.getLogger(__name__)


def _accept(_: Any) -> None:
    """A check that accepts anything."""


@dataclass(frozen=True)
class Checks:
    """What the caller accepts; each check raises :class:`SourceFailed` to refuse."""

    content_type: Callable[[str | None], None] = _accept
    """The Content-Type header (None when the server sent none)."""
    size: Callable[[int], None] = _accept
    """The whole file's size, once the server has announced it."""
    head: Callable[[bytes], None] = _accept
    """The first block of the body (when a download starts from byte 0)."""


ANYTHING = Checks()
"""No checks: any answer with a 200 or 206 status is downloaded."""


class BadURL(SourceFailed):
    """The URL cannot be requested at all (malformed host, port out of range, ...)."""


class _Retry(Exception):
    """A transient failure: try the same source again (after ``wait`` seconds when given)."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


def fetch(
    session: requests.Session,
    url: str,
    part: Path,
    dl: DownloadConfig,
    *,
    checks: Checks = ANYTHING,
    label: str = "",
) -> tuple[str, int]:
    """Download ``url`` into ``part`` with retries and Range resume; returns (sha256, bytes).

    ``dl``: retries, backoff, timeout and block size (params.yaml ``download``);
    ``label`` names the download on its progress bar.
    """
    failures = 0
    high_water = part.stat().st_size if part.exists() else 0
    while True:
        try:
            return _attempt(session, url, part, dl, checks, label)
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


def discard(part: Path) -> None:
    """Delete a partial file and what it remembers about its source."""
    for path in (part, _part_meta(part)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def progress(name: str, total: int | None, initial: int, stream: Any = None) -> tqdm:
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


# ----------------------------------------------------------------------------- one attempt


def _attempt(
    session: requests.Session,
    url: str,
    part: Path,
    dl: DownloadConfig,
    checks: Checks,
    label: str,
) -> tuple[str, int]:
    offset, headers = _resume_request(part, url)
    with _get(session, url, headers, dl) as response:
        if response.status_code == 416 and offset:
            return _already_complete(response, part, offset)
        _check_status(response)
        checks.content_type(response.headers.get("Content-Type"))
        offset, total = _body_range(response, url, part, offset)
        if total is not None:
            checks.size(total)
        _write_meta(part, url, response.headers, total)
        return _stream(response, part, offset, total, dl, checks.head, label)


def _resume_request(part: Path, url: str) -> tuple[int, dict[str, str]]:
    """The byte to ask for first (0: the whole file) and the request headers saying so."""
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
    return offset, headers


def _get(
    session: requests.Session, url: str, headers: dict[str, str], dl: DownloadConfig
) -> requests.Response:
    try:
        return session.get(
            url, headers=headers, stream=True, timeout=(dl.timeout_seconds, dl.timeout_seconds)
        )
    except (requests.exceptions.InvalidURL, urllib3.exceptions.LocationValueError) as error:
        # urllib3 raises LocationParseError itself (not wrapped by requests) for a host
        # with an empty or over-long label, e.g. ``http://example..com/x.zip``.
        raise BadURL(f"invalid URL ({error})") from None
    except requests.RequestException as error:
        raise _Retry(_reason(error)) from None


def _already_complete(response: requests.Response, part: Path, offset: int) -> tuple[str, int]:
    """A 416 to a Range request: the partial file is whole when the server says so."""
    total = _range_total(response.headers.get("Content-Range"))
    if total == offset:
        return sha256_file(part), offset
    discard(part)
    raise _Retry("the server refused to resume (416); starting over", wait=0)


def _check_status(response: requests.Response) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Retry(
            f"HTTP {status} {response.reason}",
            _retry_after(response.headers.get("Retry-After")),
        )
    if status >= 400:
        raise SourceFailed(f"HTTP {status} {response.reason}", unreachable=True)
    if status not in (200, 206):
        raise SourceFailed(f"unexpected HTTP {status} {response.reason}")


def _body_range(
    response: requests.Response, url: str, part: Path, offset: int
) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's size (None: not announced)."""
    if response.status_code == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start != offset:
            discard(part)
            raise _Retry(f"the server resumed at byte {start}, not {offset}", wait=0)
        return offset, total
    if offset:
        log.info("%s: the server ignored the Range request; starting over", url)
    return 0, _int(response.headers.get("Content-Length"))


def _stream(
    response: requests.Response,
    part: Path,
    offset: int,
    total: int | None,
    dl: DownloadConfig,
    check_head: Callable[[bytes], None],
    label: str,
) -> tuple[str, int]:
    digest = hashlib.sha256()
    if offset:
        with open(part, "rb") as done:
            while block := done.read(1 << 20):
                digest.update(block)
    received = offset
    blocks = _blocks(response, dl.chunk_bytes)
    with open(part, "r+b" if offset else "wb") as out, progress(label, total, offset) as bar:
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
                check_head(block)
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


# ----------------------------------------------------------------------------- headers


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


# ----------------------------------------------------------------------------- the partial file


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


# ----------------------------------------------------------------------------- helpers


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


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


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
