"""Safe extraction, layout checks and the small pure helpers of the download stage."""

from __future__ import annotations

import io
import time
import zipfile
from email.utils import formatdate
from pathlib import Path, PurePosixPath

import pytest

from tasks.config import parse_config
from tasks.errors import StageError
from tasks.paths import DatasetPaths
from tasks.steps.download import (
    SourceFailed,
    _progress,
    _retry_after,
    check_layout,
    expected_hash,
    extract_archive,
    local_source,
    member_target,
)
from tests.datagen import make_archive, tiny_params


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "C:/Windows/x.dll", "..\\evil.txt", "a/../../evil.txt", "../x"]
)
def test_member_target_refuses_absolute_and_parent_paths(name):
    with pytest.raises(SourceFailed, match="unsafe archive entry"):
        member_target(name)


@pytest.mark.parametrize(
    "name",
    ["__MACOSX/root/._a.jpg", "root/.DS_Store", "root/train/cats/Thumbs.db", "root/._a.jpg", "./"],
)
def test_member_target_skips_junk(name):
    assert member_target(name) is None


def test_member_target_keeps_normal_entries():
    assert member_target("root/train/cats/c.1.jpg") == PurePosixPath("root/train/cats/c.1.jpg")
    assert member_target("./root/val/") == PurePosixPath("root/val")


def _good_zip(tmp_path: Path, **extra: bytes) -> Path:
    return make_archive(
        tmp_path / "good.zip", counts={"train": 1, "validation": 1}, size=16, extra=extra
    )


def _add_symlink(path: Path, name: str, target: str) -> None:
    with zipfile.ZipFile(path, "a") as bundle:
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        bundle.writestr(info, target)


@pytest.mark.parametrize(
    "bad",
    ["../outside.txt", "/abs/outside.txt", "cats_and_dogs_filtered/../../outside.txt", "link"],
)
def test_an_unsafe_entry_refuses_the_whole_archive_before_writing(tmp_path, bad):
    archive = _good_zip(tmp_path)
    if bad == "link":
        _add_symlink(archive, "cats_and_dogs_filtered/train/cats/link.jpg", "/etc/passwd")
    else:
        with zipfile.ZipFile(archive, "a") as bundle:
            bundle.writestr(bad, b"owned")
    target = tmp_path / "out" / "target"
    target.mkdir(parents=True)
    with pytest.raises(StageError, match="unsafe archive entry") as error:
        extract_archive(archive, target)
    assert ("symlink" in str(error.value)) == (bad == "link")
    assert list(target.iterdir()) == []
    assert not any(p.name == "outside.txt" for p in tmp_path.rglob("*"))


def test_junk_is_skipped_and_files_are_byte_identical(tmp_path):
    archive = _good_zip(
        tmp_path,
        **{
            "__MACOSX/cats_and_dogs_filtered/._train": b"mac",
            "cats_and_dogs_filtered/.DS_Store": b"ds",
            "cats_and_dogs_filtered/train/cats/Thumbs.db": b"thumbs",
        },
    )
    target = tmp_path / "out"
    target.mkdir()
    count = extract_archive(archive, target)
    written = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert count == len(written) == 4
    assert not any(("__MACOSX" in w or "DS_Store" in w or "Thumbs" in w) for w in written)
    with zipfile.ZipFile(archive) as bundle:
        for name in written:
            assert (target / name).read_bytes() == bundle.read(name)


def test_a_corrupt_zip_is_a_clear_error(tmp_path):
    archive = _good_zip(tmp_path)
    with zipfile.ZipFile(archive) as bundle:
        info = next(i for i in bundle.infolist() if not i.is_dir())
    header = 30 + len(info.filename.encode()) + len(info.extra)
    middle = info.header_offset + header + info.compress_size // 2
    data = bytearray(archive.read_bytes())
    data[middle] ^= 0xFF
    archive.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match="not a readable zip archive.*download again"):
        extract_archive(archive, tmp_path / "out")


def _dataset(**layout):
    raw = tiny_params({"cats_vs_dogs": "file:///x.zip"})
    raw["datasets"]["cats_vs_dogs"]["layout"].update(layout)
    return parse_config(raw).dataset("cats_vs_dogs")


def test_check_layout_names_the_missing_folders(tmp_path):
    (tmp_path / "cats_and_dogs_filtered" / "train").mkdir(parents=True)
    check_layout(tmp_path, _dataset(validation="train"))
    with pytest.raises(StageError, match="no cats_and_dogs_filtered/validation/ .*found: "):
        check_layout(tmp_path, _dataset())
    with pytest.raises(StageError, match="no other/train/ or other/validation/ .*cats_and_dogs"):
        check_layout(tmp_path, _dataset(root="other"))


def test_known_hash_record_is_read_and_a_malformed_one_is_named(tmp_path):
    ds = _dataset()
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    assert expected_hash(ds, paths) is None
    paths.known_hashes.parent.mkdir(parents=True)
    paths.known_hashes.write_text("A" * 64 + "  cats_vs_dogs.zip\n# trusted on first use\n")
    got = expected_hash(ds, paths)
    assert got is not None and got.sha256 == "a" * 64 and not got.pinned
    paths.known_hashes.write_text("not-a-hash  cats_vs_dogs.zip\n")
    with pytest.raises(StageError, match=f"{paths.known_hashes}.*not a sha256.*delete"):
        expected_hash(ds, paths)
    pinned = parse_config(
        tiny_params({"cats_vs_dogs": "file:///x.zip"}),
        ["datasets.cats_vs_dogs.sha256=" + "b" * 64],
    ).dataset("cats_vs_dogs")
    got = expected_hash(pinned, paths)  # a pin wins over the (broken) record
    assert got is not None and got.sha256 == "b" * 64 and got.pinned


def test_retry_after_reads_seconds_and_http_dates():
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = _retry_after(formatdate(time.time() + 60, usegmt=True))
    assert later is not None and 55 < later <= 60


def test_local_sources():
    assert local_source("https://example.com/a.zip") is None
    assert local_source("file:///srv/my%20data/a.zip") == Path("/srv/my data/a.zip")
    assert local_source("data/a.zip") == Path("data/a.zip")
    with pytest.raises(SourceFailed, match="host"):
        local_source("file://server/share/a.zip")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal():
    quiet, loud = io.StringIO(), _Terminal()
    for stream in (quiet, loud):
        with _progress("cats", 2048, 0, stream=stream) as bar:
            bar.update(1024)
            bar.refresh()
    assert quiet.getvalue() == ""
    assert "cats" in loud.getvalue() and "%|" in loud.getvalue()
