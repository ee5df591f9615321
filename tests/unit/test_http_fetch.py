"""The resumable HTTP fetcher against a real loopback server with injected faults, and its
small helpers (Retry-After, the progress bar)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from email.utils import formatdate
from pathlib import Path

import pytest
import requests

from tasks.config import DownloadConfig, parse_config
from tasks.dev.httpserver import ArchiveServer
from tasks.errors import SourceFailed
from tasks.http_fetch import _retry_after, fetch, progress
from tests.datagen import make_archive, tiny_params

DS = "cats_vs_dogs"
COUNTS = {"train": 2, "validation": 1}


@pytest.fixture(scope="module")
def body(tmp_path_factory) -> bytes:
    """A generated dataset archive, as bytes: what a download fetches."""
    path = tmp_path_factory.mktemp("zips") / f"{DS}.zip"
    return make_archive(path, DS, COUNTS, size=16).read_bytes()


@pytest.fixture
def server():
    with ArchiveServer() as running:
        yield running


@pytest.fixture
def part(tmp_path) -> Path:
    return tmp_path / f"{DS}.zip.part"


def settings(*overrides: str) -> DownloadConfig:
    """The tests' ``download`` params (3 attempts, backoff 0.01 s doubling, capped at 0.05 s)."""
    return parse_config(tiny_params({DS: "file:///unused.zip"}, COUNTS), overrides).download


def get(url: str, part: Path, *overrides: str) -> tuple[str, int]:
    with requests.Session() as session:
        return fetch(session, url, part, settings(*overrides))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def retry_waits(caplog) -> list[str]:
    """The waits the download announced before each retry ("0.02" for "... in 0.02 s")."""
    return [
        r.getMessage().rsplit(" in ", 1)[1].removesuffix(" s")
        for r in caplog.records
        if "; retry " in r.getMessage()
    ]


@pytest.mark.network
def test_503_twice_then_ok_retries_with_backoff(server, body, part, caplog):
    url = server.add("/a.zip", body, statuses=[503, 503])
    with caplog.at_level(logging.WARNING, logger="tasks.http_fetch"):
        got = get(url, part)
    assert [r.status for r in server.requests_for("/a.zip")] == [503, 503, 200]
    assert got == (sha(body), len(body))
    assert retry_waits(caplog) == ["0.01", "0.02"]  # backoff_seconds 0.01, doubling


@pytest.mark.network
@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_is_honoured(server, body, part, status, caplog):
    url = server.add("/a.zip", body, statuses=[status], retry_after="1")
    with caplog.at_level(logging.WARNING, logger="tasks.http_fetch"):
        get(url, part, "download.max_backoff_seconds=5")
    first, second = server.requests_for("/a.zip")
    assert (first.status, second.status) == (status, 200)
    # backoff_seconds is 0.01: the one-second wait is the server's Retry-After ...
    assert retry_waits(caplog) == ["1.00"]
    # ... and it was slept, not just announced (a lower bound: load only makes it longer).
    assert second.time - first.time >= 0.95


@pytest.mark.network
def test_retry_after_is_capped_by_max_backoff(server, body, part, caplog):
    url = server.add("/a.zip", body, statuses=[429], retry_after="30")
    with caplog.at_level(logging.WARNING, logger="tasks.http_fetch"):
        get(url, part, "download.max_backoff_seconds=0.2")
    first, second = server.requests_for("/a.zip")
    assert (first.status, second.status) == (429, 200)
    assert retry_waits(caplog) == ["0.20"]  # max_backoff_seconds, not the 30 s asked for
    assert second.time - first.time >= 0.15


@pytest.mark.network
def test_endless_503_gives_up_after_the_configured_attempts(server, body, part):
    url = server.add("/a.zip", body, statuses=[503] * 10)
    with pytest.raises(SourceFailed) as error:
        get(url, part)
    assert len(server.requests_for("/a.zip")) == 3  # download.retries in tiny_params
    # Unreachable: the download stage says "cannot reach any source" and tries the next.
    assert error.value.unreachable
    assert "HTTP 503" in error.value.reason and "gave up after 3 attempts" in error.value.reason


@pytest.mark.network
def test_dropped_connection_is_resumed_with_a_range_request(server, body, part):
    half = len(body) // 2
    url = server.add("/a.zip", body, drop_after=half)
    got = get(url, part)
    first, second = server.requests_for("/a.zip")
    assert first.header("Range") is None
    assert second.header("Range") == f"bytes={half}-"
    assert second.header("If-Range") == server.routes["/a.zip"].etag
    assert second.status == 206
    assert part.read_bytes() == body
    assert got == (sha(body), len(body))


@pytest.mark.network
def test_repeated_drops_that_make_progress_do_not_use_up_the_retries(server, body, part):
    quarter = len(body) // 4 + 1
    url = server.add("/a.zip", body, drop_after=quarter, drops=10)
    get(url, part, "download.retries=2")
    ranges = [r.header("Range") for r in server.requests_for("/a.zip")]
    assert ranges == [None] + [f"bytes={quarter * n}-" for n in (1, 2, 3)]
    assert part.read_bytes() == body


@pytest.mark.network
def test_a_server_that_ignores_range_restarts_from_zero(server, body, part):
    url = server.add("/a.zip", body, drop_after=len(body) // 3, ignore_range=True)
    got = get(url, part)
    first, second = server.requests_for("/a.zip")
    assert second.header("Range") == f"bytes={len(body) // 3}-"
    assert second.status == 200
    assert part.read_bytes() == body
    assert got == (sha(body), len(body))


@pytest.mark.network
def test_a_stale_partial_of_another_version_is_replaced(server, body, part):
    url = server.add("/a.zip", body)
    part.write_bytes(b"PK" + b"old version" * 50)
    Path(f"{part}.json").write_text(json.dumps({"url": url, "etag": '"old"'}))
    get(url, part)
    (request,) = server.requests_for("/a.zip")
    assert request.header("If-Range") == '"old"' and request.status == 200
    assert part.read_bytes() == body


@pytest.mark.network
def test_a_complete_partial_is_used_when_the_server_answers_416(server, body, part):
    url = server.add("/a.zip", body)
    part.write_bytes(body)
    got = get(url, part)
    assert [r.status for r in server.requests_for("/a.zip")] == [416]
    assert got == (sha(body), len(body)) and part.read_bytes() == body


def test_retry_after_reads_seconds_and_http_dates():
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = _retry_after(formatdate(time.time() + 60, usegmt=True))
    assert later is not None and 55 < later <= 60


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal():
    quiet, loud = io.StringIO(), _Terminal()
    for stream in (quiet, loud):
        with progress("cats", 2048, 0, stream=stream) as bar:
            bar.update(1024)
            bar.refresh()
    assert quiet.getvalue() == ""
    assert "cats" in loud.getvalue() and "%|" in loud.getvalue()
