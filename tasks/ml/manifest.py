"""Scan the extracted archive and decode every image into a manifest (one row per file).

The manifest is the contract between ``validate`` and the input pipeline:

========  ==============================================================
path      file path relative to ``data/raw/<ds>/`` (POSIX separators)
split     ``train``, ``validation`` or ``test`` (the logical name, not the folder)
label     the class folder the file sits in ("" when directly in a split)
bytes     file size
sha256    hex digest of the file's bytes
format    what Pillow says the file is (``JPEG``, ``PNG``…), not its suffix
mode      Pillow mode (``RGB``, ``L``, ``CMYK``, ``RGBA``, ``P``…)
width     pixels (null when the header cannot be read)
height    pixels (null when the header cannot be read)
status    ``ok`` or ``quarantined``
reason    why a file is quarantined; "" when ok
source    "" for the archive's files; for a fed-back drop (``python -m tasks
          feedback``), the drop's name: its rows are ``train`` rows, their
          ``path`` relative to ``data/raw/<ds>/`` too (``../../feedback/...``)
========  ==============================================================

Policy: a file is ``ok`` when the input pipeline can use it, even if it needs
converting to RGB (grayscale, CMYK, RGBA, palette, a PNG named ``.jpg``).
Everything else is quarantined with a reason and never trained on; it stays
in ``data/raw`` untouched. Hidden and junk files (dotfiles, ``.DS_Store``,
``Thumbs.db``, ``__MACOSX/``) are not part of the dataset and get no row.

Each image is fully decoded (``img.load()``) under a decompression-bomb pixel
limit, in a process pool. The files are read from the extracted tree, or, for a
dataset stored as shards, straight from the kept archive (:func:`scan_raw`'s
``archive``): the paths, and so the manifest, are the same either way.

The ``test`` split is held out: training, early stopping and the choice
between the frozen and fine-tuned model never read it; ``evaluate`` and the
registry gate score on it. It is the archive's own test folder where the
layout names one, otherwise :func:`carve_test_split` moves a deterministic,
class-stratified share of the ok validation images into it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import DatasetConfig, ValidateConfig, carve_count
from tasks.errors import StageError

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = (
    "path",
    "split",
    "label",
    "bytes",
    "sha256",
    "format",
    "mode",
    "width",
    "height",
    "status",
    "reason",
    "source",
)
OK = "ok"
QUARANTINED = "quarantined"

# What the input pipeline decodes (tf.io.decode_image's formats); any Pillow mode
# of these converts to RGB there.
USABLE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP"})
JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})


class Reason:
    """The first words of each quarantine reason (the rest says the particulars)."""

    EMPTY = "empty file"
    UNREADABLE = "unreadable file"
    NOT_IMAGE = "not an image"
    CORRUPT = "truncated or corrupt image"
    UNSUPPORTED = "unsupported image format"
    TOO_SMALL = "smaller than min_side"
    TOO_MANY_PIXELS = "over the pixel limit"
    NO_CLASS = "not inside a class folder"


@dataclass(frozen=True)
class FoundFile:
    path: str
    """Relative to the raw folder, POSIX separators."""
    split: str
    label: str
    source: str = ""
    """The fed-back drop the file came from; "" for the archive's files."""


@dataclass(frozen=True)
class Scan:
    """What is on disk under ``data/raw/<ds>/<layout.root>/``."""

    raw: Path
    files: list[FoundFile]
    class_folders: dict[str, list[str]] = field(default_factory=dict)
    """split -> class folder names found there; a split whose folder is missing is absent."""
    archive: Path | None = None
    """The zip the files are read from (stored as shards), else None: the extracted tree."""
    members: dict[str, str] = field(default_factory=dict)
    """With ``archive``: each file's path -> its entry name in the zip."""

    def source(self, path: str) -> str | tuple[str, str]:
        """What :func:`read_source` reads ``path`` from: the file, or (zip, entry)."""
        if self.archive is None:
            return str(self.raw / path)
        return str(self.archive), self.members[path]


def is_junk(name: str) -> bool:
    """Hidden files, OS litter and macOS resource forks are not dataset files."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


def scan_raw(raw: Path, dataset: DatasetConfig, archive: Path | None = None) -> Scan:
    """List every non-junk file under each split folder, with its split and class label.

    ``archive``: the zip kept whole in ``raw`` (a dataset stored as shards); its
    entries are listed instead of a tree. Raises StageError when ``raw`` or its
    layout root is missing. A missing split folder is not an error here: the
    expectations report it.
    """
    raw = Path(raw)
    if archive is not None:
        return _scan_archive(raw, Path(archive), dataset)
    if not raw.is_dir():
        raise StageError(f"{raw} not found: run `python -m tasks download {dataset.name}` first")
    top = raw / dataset.layout.root
    if not top.is_dir():
        raise StageError(
            f"{raw} has no {dataset.layout.root}/ folder (datasets.{dataset.name}.layout.root); "
            f"check the layout in params.yaml or re-run `python -m tasks download {dataset.name}`"
        )
    files: list[FoundFile] = []
    folders: dict[str, list[str]] = {}
    for split in dataset.folder_splits:
        split_dir = top / dataset.split_folder(split)
        if not split_dir.is_dir():
            continue
        folders[split] = []
        for entry in sorted(split_dir.iterdir(), key=lambda p: p.name):
            if is_junk(entry.name):
                continue
            if entry.is_dir():
                folders[split].append(entry.name)
                files.extend(
                    FoundFile(_rel(path, raw), split, entry.name) for path in _walk_files(entry)
                )
            elif entry.is_file():
                files.append(FoundFile(_rel(entry, raw), split, ""))
    return Scan(raw=raw, files=files, class_folders=folders)


def _scan_archive(raw: Path, archive: Path, dataset: DatasetConfig) -> Scan:
    """:func:`scan_raw` over the entries of ``archive`` (paths as if extracted into ``raw``)."""
    from tasks.archives import archive_files

    members = archive_files(archive)
    wanted = {dataset.split_folder(split): split for split in dataset.folder_splits}
    root = dataset.layout.root
    files: list[FoundFile] = []
    folders: dict[str, set[str]] = {}
    for path in sorted(members):
        parts = path.split("/")
        if len(parts) < 3 or parts[0] != root or parts[1] not in wanted:
            continue
        if any(is_junk(part) for part in parts[2:]):
            continue
        split = wanted[parts[1]]
        folders.setdefault(split, set())
        label = parts[2] if len(parts) > 3 else ""
        if label:
            folders[split].add(label)
        files.append(FoundFile(path, split, label))
    return Scan(
        raw=raw,
        files=files,
        class_folders={split: sorted(names) for split, names in folders.items()},
        archive=archive,
        members=members,
    )


@dataclass(frozen=True)
class ClassTree:
    """What a folder laid out ``<folder>/<class>/<image>`` holds (a labelled drop)."""

    files: list[FoundFile]
    """Every file in a class folder (at any depth), labelled with that folder's name."""
    classes: list[str]
    """The class folders found."""
    loose: list[str]
    """Files directly in the folder, in no class folder."""


def scan_class_tree(
    folder: Path, base: Path | None = None, split: str = "train", source: str = ""
) -> ClassTree:
    """List every non-junk file of ``folder/<class>/`` as a ``split`` file of that class;
    paths relative to ``base`` (default ``folder``; ``..`` where ``base`` is elsewhere)."""
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    files: list[FoundFile] = []
    classes: list[str] = []
    loose: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_junk(entry.name):
            continue
        if entry.is_dir():
            classes.append(entry.name)
            files += [
                FoundFile(_relpath(path, base), split, entry.name, source)
                for path in _walk_files(entry)
            ]
        elif entry.is_file():
            loose.append(_relpath(entry, base))
    return ClassTree(files=files, classes=classes, loose=loose)


def _relpath(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _walk_files(folder: Path) -> Iterable[Path]:
    for current, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_junk(d))
        for name in sorted(names):
            if not is_junk(name):
                yield Path(current) / name


def _rel(path: Path, raw: Path) -> str:
    return path.relative_to(raw).as_posix()


def read_source(source: str | Path | tuple[str, str]) -> bytes:
    """The bytes of a file, or of an entry ``(zip, name)`` of an archive (each process
    keeps the archives it reads open)."""
    if isinstance(source, tuple):
        return _open_zip(source[0]).read(source[1])
    return Path(source).read_bytes()


@functools.lru_cache(maxsize=4)
def _open_zip(archive: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)


def inspect_image(
    source: str | Path | tuple[str, str], max_pixels: int, min_side: int
) -> dict[str, Any]:
    """Read (:func:`read_source`), hash and fully decode one file; return its manifest
    facts with status/reason.

    Pillow's decompression-bomb guard runs with ``max_pixels`` as its limit and
    its warning is treated as an error, so anything over the limit is refused
    before its pixels are decoded.
    """
    facts: dict[str, Any] = {
        "bytes": 0,
        "sha256": "",
        "format": "",
        "mode": "",
        "width": None,
        "height": None,
        "status": OK,
        "reason": "",
    }
    try:
        data = read_source(source)
    except (OSError, zipfile.BadZipFile, zlib.error) as error:
        detail = getattr(error, "strerror", None) or error
        return _quarantined(facts, f"{Reason.UNREADABLE}: {detail}")
    facts.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if not data:
        return _quarantined(facts, f"{Reason.EMPTY} (0 bytes)")
    problem = _decode(data, facts, max_pixels)
    if problem is None and min(facts["width"], facts["height"]) < min_side:
        problem = f"{Reason.TOO_SMALL} {min_side}: {facts['width']}x{facts['height']} px"
    return _quarantined(facts, problem) if problem else facts


def _quarantined(facts: dict[str, Any], reason: str) -> dict[str, Any]:
    facts.update(status=QUARANTINED, reason=reason)
    return facts


def _decode(data: bytes, facts: dict[str, Any], max_pixels: int) -> str | None:
    """Fully decode ``data`` under the pixel limit, recording its format, mode and size in
    ``facts``; the reason to quarantine it, or None when the input pipeline can use it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as img:
            facts.update(format=img.format or "", mode=img.mode)
            facts.update(width=img.width, height=img.height)
            if img.width * img.height > max_pixels:
                return _too_many_pixels(img.width, img.height, max_pixels)
            if img.format not in USABLE_FORMATS:
                usable = ", ".join(sorted(USABLE_FORMATS))
                return f"{Reason.UNSUPPORTED} {img.format}; usable: {usable}"
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        _header_size(data, facts)
        if facts["width"] is not None:
            return _too_many_pixels(facts["width"], facts["height"], max_pixels)
        return f"{Reason.TOO_MANY_PIXELS} (max_pixels {max_pixels})"
    except UnidentifiedImageError:
        return f"{Reason.NOT_IMAGE} (Pillow cannot identify the format)"
    except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"{Reason.CORRUPT}: {message}"
    return None


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow with ``max_pixels`` as its decompression-bomb limit, its bomb warning raised
    as an error and truncated files refused; its own settings come back afterwards."""
    from PIL import Image, ImageFile

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return f"{Reason.TOO_MANY_PIXELS}: {width}x{height} = {width * height} px > {max_pixels}"


def _header_size(data: bytes, facts: dict[str, Any]) -> None:
    """Record format and size from the header alone (no pixel decoding, no limit)."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                facts.update(format=img.format or "", mode=img.mode)
                facts.update(width=img.width, height=img.height)
    except Exception:  # noqa: BLE001 - best effort: the file is quarantined either way
        pass
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def worker_count(setting: int) -> int:
    """``workers: 0`` means one process per usable core."""
    if setting:
        return setting
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_manifest(scan: Scan, settings: ValidateConfig) -> pd.DataFrame:
    """Decode every scanned file (in parallel) into the manifest frame, sorted by path."""
    import pandas as pd

    inspect = partial(inspect_image, max_pixels=settings.max_pixels, min_side=settings.min_side)
    sources = [scan.source(found.path) for found in scan.files]
    workers = min(worker_count(settings.workers), max(len(sources), 1))
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    with ExitStack() as stack:
        if workers == 1:
            facts: Iterable[dict[str, Any]] = map(inspect, sources)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            chunk = max(1, min(64, len(sources) // (workers * 8)))
            facts = pool.map(inspect, sources, chunksize=chunk)
        # column by column as the facts arrive: no list of row dicts (memory per image)
        for found, fact in zip(scan.files, facts, strict=True):
            row = {
                "path": found.path,
                "split": found.split,
                "label": found.label,
                "source": found.source,
                **fact,
            }
            if not found.label:
                row.update(status=QUARANTINED, reason=f"{Reason.NO_CLASS} (directly in the split)")
            for name, values in columns.items():
                values.append(row.get(name))
    frame = pd.DataFrame(columns)
    frame = frame.astype(
        {
            "path": "string",
            "split": "string",
            "label": "string",
            "bytes": "int64",
            "sha256": "string",
            "format": "string",
            "mode": "string",
            "width": "Int64",
            "height": "Int64",
            "status": "string",
            "reason": "string",
            "source": "string",
        }
    )
    return frame.sort_values("path", ignore_index=True)


def carve_test_split(manifest: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """Mark a class-stratified share of the ok ``validation`` rows as ``test``.

    Per class, the ok validation images are ordered by content hash (sha256)
    and the first :func:`tasks.config.carve_count` of them become ``test``: the
    same bytes always land in the same split, on any machine, whatever the
    file names or the order of the scan. Quarantined rows stay where they were.
    """
    manifest = manifest.copy()
    pool = manifest[(manifest["split"] == "validation") & (manifest["status"] == OK)]
    held: list[int] = []
    for _, rows in pool.groupby("label", sort=True):
        ordered = rows.sort_values(["sha256", "path"])
        held.extend(ordered.index[: carve_count(len(ordered), fraction)])
    manifest.loc[held, "split"] = "test"
    return manifest
