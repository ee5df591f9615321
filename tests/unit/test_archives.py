"""Safe extraction of an untrusted zip: unsafe entries refused before anything is written,
junk skipped, a corrupt archive named."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

import pytest

from tasks.archives import archive_files, archive_summary, extract_archive, member_target
from tasks.errors import SourceFailed, StageError
from tests.datagen import make_archive


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


def test_the_streamed_summary_counts_what_extraction_would_write_even_past_zip64(tmp_path):
    """Over 65,535 entries a zip needs the zip64 end record; names may be UTF-8."""
    bundle = tmp_path / "many.zip"
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_STORED) as out:
        out.writestr("root/", b"")
        out.writestr("root/train/", b"")
        for n in range(66_000):
            out.writestr(f"root/train/{'ab'[n % 2]}/{n}.jpg", b"x")
        out.writestr("root/val/b/bée.jpg", b"x")
        out.writestr("root/README", b"x")
        out.writestr("__MACOSX/root/._x.jpg", b"x")
        out.writestr("root/val/.DS_Store", b"x")
    files, folders = archive_summary(bundle)
    assert files == len(archive_files(bundle)) == 66_002
    assert folders == {"root/train", "root/val"}


@pytest.mark.parametrize("bad", ["../evil.jpg", "link"])
def test_the_streamed_summary_refuses_an_unsafe_archive_and_a_non_zip(tmp_path, bad):
    bundle = tmp_path / "bad.zip"
    with zipfile.ZipFile(bundle, "w") as out:
        out.writestr("root/train/a/1.jpg", b"x")
        entry = zipfile.ZipInfo(bad)
        if bad == "link":
            entry.external_attr = 0o120777 << 16  # a symlink
        out.writestr(entry, b"target")
    with pytest.raises(StageError, match="unsafe archive entry .*nothing was extracted"):
        archive_summary(bundle)
    (tmp_path / "page.zip").write_text("<html>not a zip</html>")
    with pytest.raises(StageError, match="not a readable zip archive"):
        archive_summary(tmp_path / "page.zip")
