"""Faulty and unusual image files for the manifest and validation tests (generated, tiny)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from tasks.config import Config, parse_config
from tasks.paths import DatasetPaths
from tests.datagen import LAYOUTS, make_image, make_tree, tiny_params


def jpeg_bytes(seed: int = 1, size: int = 48) -> bytes:
    buffer = io.BytesIO()
    make_image(0, size, seed=seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_truncated_jpeg(path: Path) -> None:
    data = jpeg_bytes(seed=7)
    path.write_bytes(data[: len(data) // 2])


def write_converted(path: Path, mode: str, fmt: str = "JPEG") -> None:
    """A usable image that needs converting: ``mode`` L, CMYK, RGBA, P… saved as ``fmt``."""
    make_image(1, 48, seed=11).convert(mode).save(path, fmt)


def write_blank(path: Path, width: int, height: int, fmt: str = "PNG") -> None:
    """A flat image of any size (a bomb compresses to a few kB as PNG)."""
    Image.new("L", (width, height)).save(path, fmt)


def config_for(
    dataset: str = "cats_vs_dogs",
    counts: dict[str, int] | None = None,
    per_class: dict[str, dict[str, int]] | None = None,
    **validate: Any,
) -> Config:
    """The tiny test params for ``dataset``; ``validate`` overrides keys of ``validate:``.

    ``per_class`` sets expected counts class by class: {split: {class: n}}.
    """
    params = tiny_params({dataset: "file:///nowhere/archive.zip"}, counts=counts)
    params["validate"].update(validate)
    if per_class:
        params["datasets"][dataset]["counts"] = per_class
    return parse_config(params)


def make_raw(root: Path, dataset: str = "cats_vs_dogs", seed: int = 0) -> tuple[DatasetPaths, Path]:
    """A clean extracted archive (6 train and 3 validation images per class) under ``root``.

    Returns the paths and the layout root (``data/raw/<ds>/<layout.root>``).
    """
    paths = DatasetPaths.of(dataset, root)
    top = make_tree(paths.raw, dataset, seed=seed)
    return paths, top


def split_dir(top: Path, dataset: str, split: str) -> Path:
    return top / LAYOUTS[dataset][split]


def copy_over(source: Path, target: Path) -> None:
    """Replace ``target``'s bytes with ``source``'s (counts stay the same)."""
    shutil.copyfile(source, target)
