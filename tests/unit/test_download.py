"""The download stage against a real loopback HTTP server with injected faults."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tasks.cli import main
from tasks.config import Config, parse_config
from tasks.dev.httpserver import LOGIN_PAGE, ArchiveServer, closed_port
from tasks.errors import StageError
from tasks.paths import DatasetPaths
from tasks.steps import download
from tasks.steps.download import DownloadResult, partial_path
from tests.conftest import REPO
from tests.datagen import LAYOUTS, make_archive, tiny_params

pytestmark = pytest.mark.network

DS = "cats_vs_dogs"
COUNTS = {"train": 2, "validation": 1}


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[str, bytes]:
    """Generated archives in both real layouts, as bytes."""
    base = tmp_path_factory.mktemp("zips")
    return {
        name: make_archive(base / f"{name}.zip", name, COUNTS, size=16).read_bytes()
        for name in LAYOUTS
    }


@pytest.fixture
def server():
    with ArchiveServer() as running:
        yield running


@pytest.fixture
def ws(tmp_path) -> Path:
    return tmp_path / "ws"


def config(url: str, dataset: str = DS, overrides: tuple[str, ...] = (), **fields) -> Config:
    """Tiny params for one dataset at ``url``; ``fields`` go into its dataset entry."""
    raw = tiny_params({dataset: url}, COUNTS)
    raw["datasets"][dataset].update(fields)
    return parse_config(raw, overrides)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(paths: DatasetPaths, dataset: str = DS) -> Path:
    return paths.raw / LAYOUTS[dataset]["root"]


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_downloads_verifies_extracts_and_records(server, zips, ws, dataset, caplog):
    body = zips[dataset]
    url = server.add(f"/{dataset}.zip", body)
    cfg = config(url, dataset, overrides=("train.epochs=3",))
    paths = DatasetPaths.of(dataset, ws)

    with caplog.at_level(logging.WARNING, logger="tasks.steps.download"):
        result = download.run(cfg, paths)

    layout = LAYOUTS[dataset]
    assert isinstance(result, DownloadResult)
    assert (result.dataset, result.source, result.path) == (dataset, url, paths.raw)
    assert (result.sha256, result.bytes, result.skipped) == (sha(body), len(body), False)
    for split in ("train", "validation"):
        for label in layout["classes"]:
            images = sorted((tree(paths, dataset) / layout[split] / label).glob("*.jpg"))
            assert len(images) == COUNTS[split]
    record = json.loads(paths.download_record.read_text())
    assert record["source"] == url
    assert record["sha256"] == sha(body)
    assert record["bytes"] == len(body)
    assert record["overrides"] == ["train.epochs=3"]
    assert record["time"].endswith("+00:00")
    # Trust on first use: printed, and recorded for the next download.
    assert paths.known_hashes.read_text().split()[0] == sha(body)
    assert any(
        sha(body) in r.getMessage() and "first use" in r.getMessage() for r in caplog.records
    )
    assert paths.archive.read_bytes() == body
    assert not partial_path(paths).exists()
    summary = str(result)
    assert "\n" not in summary and dataset in summary and sha(body) in summary


def test_second_call_is_skipped_without_touching_the_server(server, zips, ws):
    url = server.add("/a.zip", zips[DS])
    cfg, paths = config(url), DatasetPaths.of(DS, ws)
    first = download.run(cfg, paths)
    before = server.count()
    files = [paths.raw, *sorted(tree(paths).rglob("*")), paths.download_record]

    def stamps() -> list[tuple[int, int]]:
        return [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]

    before_stamps = stamps()
    again = download.run(cfg, paths)
    assert server.count() == before == 1
    # What the old "< 0.5 s" stood for: it returned at once, extracting and writing nothing
    # (an extraction renames a new tree into place; a record rewrite replaces the file).
    assert stamps() == before_stamps
    assert again.skipped and not first.skipped
    assert (again.sha256, again.source, again.bytes) == (first.sha256, url, first.bytes)
    assert "already verified" in str(again)


def test_archive_on_disk_with_a_known_hash_is_reextracted_without_the_network(server, zips, ws):
    """DVC deletes data/raw/<ds> before rerunning the stage; the archive is still good."""
    url = server.add("/a.zip", zips[DS])
    cfg, paths = config(url), DatasetPaths.of(DS, ws)
    download.run(cfg, paths)
    shutil.rmtree(paths.raw)
    result = download.run(cfg, paths)
    assert server.count() == 1
    assert not result.skipped and result.source == str(paths.archive)
    assert (tree(paths) / "train" / "cats").is_dir()


def corrupt(body: bytes) -> bytes:
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


def test_one_changed_byte_fails_the_pinned_sha256(server, zips, ws):
    good, bad = zips[DS], corrupt(zips[DS])
    url = server.add("/a.zip", bad)
    paths = DatasetPaths.of(DS, ws)
    with pytest.raises(StageError) as error:
        download.run(config(url, sha256=sha(good)), paths)
    message = str(error.value)
    assert "sha256 mismatch" in message and "\n" not in message
    assert sha(good) in message and sha(bad) in message
    assert "params.yaml" in message
    assert not paths.raw.exists() and not paths.archive.exists()
    assert not partial_path(paths).exists()


def test_one_changed_byte_fails_against_the_trust_on_first_use_record(server, zips, ws):
    good, bad = zips[DS], corrupt(zips[DS])
    url = server.add("/a.zip", good)
    paths = DatasetPaths.of(DS, ws)
    download.run(config(url), paths)
    server.add("/a.zip", bad)
    shutil.rmtree(paths.raw)
    paths.archive.unlink()
    with pytest.raises(StageError) as error:
        download.run(config(url), paths)
    message = str(error.value)
    assert sha(good) in message and sha(bad) in message
    assert f"delete {paths.known_hashes}" in message and "params.yaml" in message
    assert paths.known_hashes.read_text().split()[0] == sha(good)


def test_an_html_login_page_is_refused(server, ws):
    url = server.add_login_page("/login.zip")
    paths = DatasetPaths.of(DS, ws)
    with pytest.raises(StageError, match="HTML page") as error:
        download.run(config(url), paths)
    assert "cannot reach" not in str(error.value)
    assert not paths.raw.exists() and not partial_path(paths).exists()


def test_an_html_page_sent_as_octet_stream_is_refused(server, ws):
    url = server.add("/page.zip", LOGIN_PAGE, content_type="application/octet-stream")
    with pytest.raises(StageError, match="HTML page"):
        download.run(config(url), DatasetPaths.of(DS, ws))


def test_a_wrong_content_type_is_refused(server, zips, ws):
    url = server.add("/a.zip", zips[DS], content_type="application/json")
    with pytest.raises(StageError, match="content type 'application/json'"):
        download.run(config(url), DatasetPaths.of(DS, ws))


def test_a_body_shorter_than_the_configured_size_is_refused(server, zips, ws):
    body = zips[DS]
    url = server.add("/a.zip", body[:-100])
    paths = DatasetPaths.of(DS, ws)
    with pytest.raises(StageError, match=f"{len(body) - 100} bytes but .*size: {len(body)}"):
        download.run(config(url, size=len(body)), paths)
    assert not paths.raw.exists()


def test_a_truncated_body_without_length_is_not_a_zip(server, zips, ws):
    url = server.add("/a.zip", zips[DS][:-100], send_length=False)
    with pytest.raises(StageError, match="not a zip archive"):
        download.run(config(url), DatasetPaths.of(DS, ws))


def test_a_file_that_is_not_a_zip_is_refused(server, ws):
    url = server.add(
        "/a.zip", b"\x1f\x8b\x08" + bytes(200), content_type="application/octet-stream"
    )
    with pytest.raises(StageError, match="not a zip archive"):
        download.run(config(url), DatasetPaths.of(DS, ws))


def test_an_unsafe_archive_writes_nothing_and_keeps_the_previous_copy(server, zips, ws, tmp_path):
    good = zips[DS]
    paths = DatasetPaths.of(DS, ws)
    download.run(config(server.add("/good.zip", good)), paths)
    kept = files_under(paths.raw)

    evil_zip = tmp_path / "evil.zip"
    make_archive(evil_zip, DS, COUNTS, size=16, seed=7)
    with zipfile.ZipFile(evil_zip, "a") as bundle:
        bundle.writestr("../escaped.txt", b"owned")
        bundle.writestr("/tmp/absolute-escape.txt", b"owned")
        link = zipfile.ZipInfo("cats_and_dogs_filtered/train/cats/link.jpg")
        link.create_system = 3
        link.external_attr = (0o120777) << 16
        bundle.writestr(link, "../../../../../etc/passwd")
    paths.known_hashes.unlink()  # "the upstream really changed": trust the next archive
    url = server.add("/evil.zip", evil_zip.read_bytes())

    with pytest.raises(StageError, match="unsafe archive entry") as error:
        download.run(config(url), paths)
    assert "\n" not in str(error.value)
    assert files_under(paths.raw) == kept
    assert not any(p.name in ("escaped.txt", "absolute-escape.txt") for p in tmp_path.rglob("*"))
    assert not Path("/tmp/absolute-escape.txt").exists()
    assert not paths.known_hashes.exists()  # an unsafe archive is never trusted
    assert [p.name for p in paths.raw.parent.iterdir()] == [DS]  # no temp folders left


def corrupt_last_member(body: bytes) -> bytes:
    """Flip a byte inside the last file's data: the zip opens, extraction fails midway."""
    with zipfile.ZipFile(io.BytesIO(body)) as bundle:
        info = [i for i in bundle.infolist() if not i.is_dir()][-1]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(body)
    data[start + info.compress_size // 2] ^= 0xFF
    return bytes(data)


def test_a_failure_midway_through_extraction_keeps_the_previous_copy(server, zips, ws):
    paths = DatasetPaths.of(DS, ws)
    download.run(config(server.add("/good.zip", zips[DS])), paths)
    kept = files_under(paths.raw)
    paths.known_hashes.unlink()
    url = server.add("/broken.zip", corrupt_last_member(zips[DS]))
    with pytest.raises(StageError, match="not a readable zip archive"):
        download.run(config(url), paths)
    assert files_under(paths.raw) == kept
    assert [p.name for p in paths.raw.parent.iterdir()] == [DS]


def test_an_interrupted_fetch_is_resumed_by_the_next_run(server, zips, ws):
    body = zips[DS]
    url = server.add("/a.zip", body, drop_after=1000)
    paths = DatasetPaths.of(DS, ws)
    once = config(url, overrides=("download.retries=1",))
    with pytest.raises(StageError, match="cannot reach any source"):
        download.run(once, paths)
    assert partial_path(paths).read_bytes() == body[:1000]
    download.run(once, paths)
    assert [r.header("Range") for r in server.requests_for("/a.zip")] == [None, "bytes=1000-"]
    assert paths.archive.read_bytes() == body


def test_a_killed_run_leaves_the_previous_copy_and_the_next_run_resumes(
    server, zips, ws, write_params, tmp_path
):
    paths = DatasetPaths.of(DS, ws)
    download.run(config(server.add("/v1.zip", zips[DS])), paths)
    kept = files_under(paths.raw)
    paths.known_hashes.unlink()  # the upstream changed: v2 will be trusted on first use
    v2 = make_archive(tmp_path / "v2.zip", DS, COUNTS, size=16, seed=3).read_bytes()
    url = server.add("/v2.zip", v2, rate=len(v2) // 3)  # about 3 s for the whole body
    params = write_params(tiny_params({DS: url}, COUNTS))
    command = [sys.executable, "-m", "tasks", "download", DS, "--params", str(params)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [*command, "--root", str(ws)], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    part = partial_path(paths)
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        assert process.poll() is None, "the download ended before it could be interrupted"
        time.sleep(0.01)
    process.kill()
    process.wait(10)
    received = part.stat().st_size
    assert 0 < received < len(v2)
    assert files_under(paths.raw) == kept

    server.add("/v2.zip", v2)  # same bytes and ETag, no throttle
    result = download.run(config(url), paths)
    last = server.requests_for("/v2.zip")[-1]
    assert last.header("Range") == f"bytes={received}-" and last.status == 206
    assert result.sha256 == sha(v2) and paths.archive.read_bytes() == v2
    assert files_under(paths.raw) != kept


def test_a_missing_split_folder_is_named(server, zips, ws):
    url = server.add("/bees.zip", zips["ants_vs_bees"])
    cfg = config(url, layout={"root": "hymenoptera_data", "train": "train", "validation": "valid"})
    paths = DatasetPaths.of(DS, ws)
    with pytest.raises(StageError, match="no hymenoptera_data/valid/") as error:
        download.run(cfg, paths)
    assert "hymenoptera_data/val" in str(error.value)  # what was found instead
    assert not paths.raw.exists() and not paths.known_hashes.exists()


def test_file_urls_and_plain_paths_are_sources(zips, ws, tmp_path, monkeypatch):
    archive = tmp_path / "mirror" / "cats.zip"
    archive.parent.mkdir()
    archive.write_bytes(zips[DS])
    monkeypatch.chdir(tmp_path)
    for n, source in enumerate([archive.as_uri(), str(archive), "mirror/cats.zip"]):
        paths = DatasetPaths.of(DS, ws / str(n))
        result = download.run(config(source), paths)
        assert result.source == source and result.sha256 == sha(zips[DS])
        assert (tree(paths) / "validation" / "dogs").is_dir()


def test_mirrors_are_tried_in_order_after_url(server, zips, ws, tmp_path, caplog):
    missing = server.url("/gone.zip")
    local = tmp_path / "cats.zip"
    local.write_bytes(zips[DS])
    later = server.add("/later.zip", zips[DS])
    with closed_port() as port, caplog.at_level(logging.WARNING, logger="tasks.steps.download"):
        dead = f"http://127.0.0.1:{port}/cats.zip"
        cfg = config(missing, mirrors=[dead, local.as_uri(), later])
        result = download.run(cfg, DatasetPaths.of(DS, ws))
    assert result.source == local.as_uri()
    assert [r.status for r in server.requests_for("/gone.zip")] == [404]
    assert server.requests_for("/later.zip") == []
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 2
    assert missing in failed[0] and "HTTP 404" in failed[0]
    assert dead in failed[1] and "connection refused" in failed[1]


class SilentServer:
    """A loopback server that accepts every connection and then sends nothing (a stalled
    upstream: the client's read timeout has to fire). ``accepted``: connections so far."""

    def __init__(self):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/cats.zip"
        self.held: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    @property
    def accepted(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_stalled_source_times_out_is_retried_then_the_next_mirror_serves(
    server, zips, ws, caplog
):
    """A server that accepts and sends nothing → each try ends at the read timeout, the
    retries are used up, the next mirror serves the archive; the tree is as from a clean run."""
    good = server.add("/good.zip", zips[DS])
    stalled = SilentServer()
    try:
        cfg = parse_config(
            {**tiny_params({DS: stalled.url}, COUNTS),
             "download": {"timeout_seconds": 0.5, "retries": 2, "backoff_seconds": 0}},
        )  # fmt: skip
        cfg.datasets[DS].mirrors.append(good)
        with caplog.at_level(logging.WARNING, logger="tasks.steps.download"):
            started = time.monotonic()
            result = download.run(cfg, DatasetPaths.of(DS, ws))
            took = time.monotonic() - started
    finally:
        stalled.close()
    assert result.source == good and result.sha256 == sha(zips[DS])
    assert stalled.accepted == 2  # both tries reached it; neither got an answer
    assert [r.status for r in server.requests_for("/good.zip")] == [200]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert stalled.url in warned and "timed out" in warned
    print(f"stalled source given up after {took:.1f} s")
    with zipfile.ZipFile(io.BytesIO(zips[DS])) as archive:
        inside = {n: archive.read(n) for n in archive.namelist() if not n.endswith("/")}
    root = LAYOUTS[DS]["root"]
    got = files_under(tree(DatasetPaths.of(DS, ws)))
    assert {f"{root}/{name}": data for name, data in got.items()} == inside


def test_offline_with_nothing_on_disk_says_where_to_put_the_archive(server, zips, ws):
    url = server.add("/a.zip", zips[DS])
    paths = DatasetPaths.of(DS, ws)
    with pytest.raises(StageError, match="offline") as error:
        download.run(config(url), paths, offline=True)
    assert str(paths.archive) in str(error.value)
    assert server.count() == 0


@pytest.mark.parametrize("how", ["argument", "config"])
def test_offline_uses_an_archive_already_on_disk(zips, ws, how):
    paths = DatasetPaths.of(DS, ws)
    paths.archive.parent.mkdir(parents=True)
    paths.archive.write_bytes(zips[DS])
    with closed_port() as port:  # offline: never contacted, and it would refuse
        url = f"http://127.0.0.1:{port}/never.zip"
        if how == "argument":
            result = download.run(config(url), paths, offline=True)
        else:
            result = download.run(config(url, overrides=("download.offline=true",)), paths)
    assert result.source == str(paths.archive) and not result.skipped
    assert paths.known_hashes.read_text().split()[0] == sha(zips[DS])
    assert (tree(paths) / "train" / "dogs").is_dir()


def test_offline_with_a_verified_tree_is_skipped(server, zips, ws):
    url = server.add("/a.zip", zips[DS])
    paths = DatasetPaths.of(DS, ws)
    download.run(config(url), paths)
    paths.archive.unlink()
    result = download.run(config(url), paths, offline=True)
    assert result.skipped and server.count() == 1


def test_offline_with_a_broken_archive_names_it(ws):
    paths = DatasetPaths.of(DS, ws)
    paths.archive.parent.mkdir(parents=True)
    paths.archive.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(StageError, match="unusable.*not a zip") as error:
        download.run(config("file:///nowhere.zip"), paths, offline=True)
    assert str(paths.archive) in str(error.value)


def test_two_concurrent_downloads_fetch_once(server, zips, ws):
    url = server.add("/a.zip", zips[DS])
    cfg, paths = config(url), DatasetPaths.of(DS, ws)
    results: list[DownloadResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(download.run(cfg, paths))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 2 and server.count() == 1
    assert sorted(r.skipped for r in results) == [False, True]


def test_cli_reports_an_unreachable_source_in_one_line(write_params, ws, capsys):
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}/cats_and_dogs_filtered.zip"
        params = write_params(tiny_params({DS: url}, COUNTS))
        code = main(["download", DS, "--params", str(params), "--root", str(ws)])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "cannot reach any source" in line and url in line
    assert f"--set 'datasets.{DS}.mirrors=[\"file:///path/to.zip\"]'" in line
    assert str(DatasetPaths.of(DS, ws).archive) in line and "--offline" in line


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/cats.zip",  # requests: InvalidURL (port out of range)
        "http://example..com/cats.zip",  # urllib3: LocationParseError (empty label), unwrapped
    ],
)
def test_cli_reports_an_invalid_url_in_one_line_naming_the_param(write_params, ws, capsys, url):
    params = write_params(tiny_params({DS: url}, COUNTS))
    code = main(["download", DS, "--params", str(params), "--root", str(ws)])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {DS}: {url}: invalid URL (")
    assert errors[0].endswith(f"; correct it under datasets.{DS} in params.yaml")
    assert not DatasetPaths.of(DS, ws).raw.exists()


def test_cli_downloads_and_prints_the_summary(server, zips, write_params, ws, capsys):
    url = server.add("/a.zip", zips[DS])
    params = write_params(tiny_params({DS: "file:///not/used.zip"}, COUNTS))
    argv = ["download", DS, "--params", str(params), "--root", str(ws)]
    assert main([*argv, "--set", f"datasets.{DS}.url={url}"]) == 0
    out, err = capsys.readouterr()
    assert sha(zips[DS]) in out and url in out
    assert "%|" not in err  # no progress bar when stderr is not a terminal
    assert main([*argv, "--set", f"datasets.{DS}.url={url}", "--offline"]) == 0
    assert "already verified" in capsys.readouterr().out


def test_a_changed_url_is_fetched_again_and_trusted_on_its_own_first_use(archive_server, tmp_path):
    from tasks.config import parse_config
    from tasks.paths import DatasetPaths
    from tasks.steps import download
    from tests.datagen import make_archive, tiny_params

    first = make_archive(tmp_path / "a.zip", "cats_vs_dogs", seed=1)
    second = make_archive(tmp_path / "b.zip", "cats_vs_dogs", seed=2)
    url_a = archive_server.add("/changed-url-a.zip", first.read_bytes())
    url_b = archive_server.add("/changed-url-b.zip", second.read_bytes())
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path / "ws")
    result_a = download.run(parse_config(tiny_params({"cats_vs_dogs": url_a})), paths)
    result_b = download.run(parse_config(tiny_params({"cats_vs_dogs": url_b})), paths)
    assert not result_b.skipped
    assert result_b.sha256 != result_a.sha256
    assert archive_server.count("/changed-url-b.zip") >= 1
    assert result_b.sha256 in paths.known_hashes.read_text()
    assert url_b in paths.known_hashes.read_text()


def _dvc_dir_hash(root: Path, dataset: str) -> str:
    """The hash DVC gives ``data/raw/<dataset>`` (``dvc add`` in a throwaway DVC repo)."""
    import yaml

    for args in (["init", "--no-scm", "-q"], ["add", "-q", f"data/raw/{dataset}"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True)
    entry = yaml.safe_load((root / "data" / "raw" / f"{dataset}.dvc").read_text())["outs"][0]
    return entry["md5"]


@pytest.mark.slow
def test_the_same_archive_gets_the_same_dvc_hash_on_every_download(server, zips, tmp_path):
    """Run metadata (source, time, overrides) lives beside the tree, not in it."""
    url = server.add("/same.zip", zips[DS])
    first, second = DatasetPaths.of(DS, tmp_path / "one"), DatasetPaths.of(DS, tmp_path / "two")
    download.run(config(url), first)
    time.sleep(1.1)  # a later download: the record's time differs
    download.run(config(url, overrides=("train.epochs=2",)), second)
    assert not list(first.raw.rglob(".download.json"))
    assert files_under(first.raw) == files_under(second.raw)
    one, two = (json.loads(p.download_record.read_text()) for p in (first, second))
    assert one["time"] != two["time"] and one["overrides"] != two["overrides"]
    assert first.download_record.parent == first.reports
    assert _dvc_dir_hash(first.root, DS) == _dvc_dir_hash(second.root, DS)
