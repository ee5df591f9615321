"""Zip archives from sources not fully trusted: recognising one, extracting it safely.

The ``check_zip_*`` functions refuse what is plainly not a zip (an HTML login
or error page, another content type, a file with no zip directory at its end)
with a :class:`SourceFailed` that says so; a download runs them as the bytes
arrive.

:func:`extract_archive` checks every entry before it writes the first byte, so
an archive it refuses writes nothing at all:

- an absolute path, a drive or a ``..`` component refuses the whole archive
  (it would write outside the target), and so does a symlink;
- junk is skipped: ``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``
  and AppleDouble ``._*`` files;
- the uncompressed size must fit in the free space of the target's disk.

Extract into a temporary folder and rename it into place
(:func:`tasks.io.atomic_path`), so a failure midway keeps the previous tree.
Every extraction failure is a one-line :class:`StageError`.
"""

from __future__ import annotations

import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from tasks.config import DatasetConfig
from tasks.errors import SourceFailed, StageError
from tasks.io import human_size, storage_error

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

_Plan = list[tuple[zipfile.ZipInfo, PurePosixPath]]


# ----------------------------------------------------------------------------- is it a zip


def check_zip_head(head: bytes) -> None:
    """Refuse a body that is plainly not a zip, from its first bytes."""
    text = head.lstrip()[:64].lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body")):
        raise SourceFailed(
            "got an HTML page, not the zip (a login or error page?); use a direct download "
            "link, or a mirror"
        )
    if not head.startswith(b"PK"):
        raise SourceFailed(f"not a zip archive (it starts with {head[:8]!r})")


def check_zip_content_type(value: str | None) -> None:
    """Refuse a Content-Type that says the body is not a zip (none: nothing to say)."""
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


def check_zip_file(path: Path) -> None:
    """Refuse a file without a zip directory at its end (not a zip, or truncated)."""
    if not zipfile.is_zipfile(path):
        raise SourceFailed("not a zip archive (no zip directory at the end: truncated?)")


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
            plan, needed = _plan(bundle)
            _check_space(target, needed, archive, final)
            return _write(bundle, plan, target)
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


def _plan(bundle: zipfile.ZipFile) -> tuple[_Plan, int]:
    """The entries to write with their relative paths, and their uncompressed bytes.

    Raises SourceFailed on the first unsafe entry.
    """
    plan: _Plan = []
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
    return plan, needed


def _write(bundle: zipfile.ZipFile, plan: _Plan, target: Path) -> int:
    """Write the planned entries under ``target``; returns the files written."""
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
    return files


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_space(target: Path, needed: int, archive: Path, final: Path) -> None:
    """Refuse before the first byte when the tree cannot fit (``final``: where it goes)."""
    free = shutil.disk_usage(target).free
    if needed > free:
        kept = "; the previous tree there is kept" if final != target and final.exists() else ""
        raise StageError(
            f"extracting {archive} to {final} needs {human_size(needed)} but its file system "
            f"has {human_size(free)} free; free space on the file system of {final.parent}, "
            f"then rerun{kept}"
        )


def check_layout(folders: set[str], ds: DatasetConfig) -> None:
    """Refuse an archive whose files sit in no ``<layout.root>/<train>/`` or
    ``<validation>/`` (``folders``: the ``<top>/<sub>`` folders its files are in), before
    anything is extracted."""
    wanted = [f"{ds.layout.root}/{folder}" for folder in (ds.layout.train, ds.layout.validation)]
    missing = [f"{folder}/" for folder in wanted if folder not in folders]
    if missing:
        raise StageError(
            f"{ds.name}: the archive has no {' or '.join(missing)} (found: "
            f"{', '.join(sorted(folders)[:10]) or 'nothing'}); fix datasets.{ds.name}.layout "
            "in params.yaml or use the right archive"
        )


# ----------------------------------------------------------------------------- a summary, streamed

_EOCD, _EOCD64, _LOCATOR64, _ENTRY = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"PK\x01\x02"


def archive_files(archive: Path) -> dict[str, str]:
    """The files ``archive`` would extract: relative POSIX path (junk skipped) -> the
    entry's name in the zip, with :func:`extract_archive`'s checks (an unsafe archive is
    refused whole)."""
    return {relative.as_posix(): name for name, relative in _checked_files(archive)}


def archive_summary(archive: Path) -> tuple[int, set[str]]:
    """How many files ``archive`` would extract and the ``<top>/<sub>`` folders they are
    in, with the same checks, holding nothing per file."""
    files, folders = 0, set()
    for _, relative in _checked_files(archive):
        files += 1
        if len(relative.parts) >= 3:
            folders.add("/".join(relative.parts[:2]))
    return files, folders


def _checked_files(archive: Path) -> Iterator[tuple[str, PurePosixPath]]:
    """(entry name, relative path) of each file entry, read from the zip's directory one
    entry at a time (``zipfile`` holds an object per entry); a StageError for an unsafe
    entry or an unreadable zip."""
    try:
        for name, attributes in _central_directory(archive):
            relative = member_target(name)
            if relative is None or name.endswith("/"):
                continue
            if stat.S_ISLNK(attributes >> 16):
                raise SourceFailed(f"unsafe archive entry {name!r}: a symlink; refusing to extract")
            yield name, relative
    except SourceFailed as failure:
        raise StageError(f"{archive}: {failure.reason}; nothing was extracted") from None
    except (OSError, struct.error, ValueError) as error:
        raise StageError(
            f"{archive}: not a readable zip archive ({error}); delete it and download again"
        ) from None


def _central_directory(archive: Path) -> Iterator[tuple[str, int]]:
    """(name, external attributes) of each entry of the zip's central directory."""
    with open(archive, "rb", buffering=1 << 20) as handle:
        count, offset = _directory_start(handle)
        handle.seek(offset)
        for _ in range(count):
            head = handle.read(46)
            if head[:4] != _ENTRY:
                raise ValueError("the central directory is damaged")
            (flags,) = struct.unpack_from("<H", head, 8)
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", head, 28)
            (attributes,) = struct.unpack_from("<I", head, 38)
            name = handle.read(name_len)
            handle.seek(extra_len + comment_len, 1)
            yield name.decode("utf-8" if flags & 0x800 else "cp437"), attributes


def _directory_start(handle: Any) -> tuple[int, int]:
    """(entries, offset) of the central directory, from the end record (zip64 too)."""
    size = handle.seek(0, 2)
    handle.seek(max(0, size - (1 << 16) - 22))
    tail = handle.read()
    at = tail.rfind(_EOCD)
    if at < 0:
        raise ValueError("no end of central directory record")
    (count,) = struct.unpack_from("<H", tail, at + 10)
    (offset,) = struct.unpack_from("<I", tail, at + 16)
    locator = tail.rfind(_LOCATOR64, 0, at)
    if locator >= 0 and (count == 0xFFFF or offset == 0xFFFFFFFF):
        (where,) = struct.unpack_from("<Q", tail, locator + 8)
        handle.seek(where)
        record = handle.read(56)
        if record[:4] != _EOCD64:
            raise ValueError("the zip64 end record is damaged")
        (count,) = struct.unpack_from("<Q", record, 32)
        (offset,) = struct.unpack_from("<Q", record, 48)
    return count, offset
