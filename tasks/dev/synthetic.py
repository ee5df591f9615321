"""Tiny generated image datasets in the real archives' layouts (no network).

Two learnable classes: the first is warm with horizontal stripes, the second
cool with vertical stripes; phase, stripe width and noise vary per image, so a
model must learn the pattern, not memorise pixels.

Used by ``make demo`` (``tasks.dev.demo``), ``make bench-scale`` (:func:`generate_tree`,
many images) and, through ``tests/datagen.py``, by the tests.
"""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Real layouts, small counts: {split_folder: {class: count}}.
LAYOUTS: dict[str, dict[str, Any]] = {
    "cats_vs_dogs": {
        "root": "cats_and_dogs_filtered",
        "train": "train",
        "validation": "validation",
        "classes": ["cats", "dogs"],
    },
    "ants_vs_bees": {
        "root": "hymenoptera_data",
        "train": "train",
        "validation": "val",
        "classes": ["ants", "bees"],
    },
}


def make_image(label_index: int, size: int = 48, seed: int = 0) -> Image.Image:
    """One RGB image of class ``label_index`` (0 or 1; more classes rotate hues)."""
    rng = np.random.default_rng(seed)
    period = rng.uniform(4, 9)
    phase = rng.uniform(0, 2 * np.pi)
    axis = np.arange(size, dtype=np.float32)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * axis / period + phase)
    pattern = (
        np.tile(wave[:, None], (1, size)) if label_index % 2 == 0 else np.tile(wave, (size, 1))
    )
    hue = np.array([[0.9, 0.45, 0.2], [0.2, 0.45, 0.9], [0.3, 0.85, 0.3]][label_index % 3])
    img = pattern[..., None] * hue * 200 + 30 + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_tree(
    root: Path,
    dataset: str = "cats_vs_dogs",
    counts: dict[str, int] | None = None,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """Write ``<root>/<layout root>/<split>/<class>/*.jpg``; returns the layout root.

    ``counts`` gives images per class for each split key ``train``/``validation``.
    """
    layout = LAYOUTS[dataset]
    counts = counts or {"train": 6, "validation": 3}
    top = Path(root) / layout["root"]
    serial = seed * 100_000
    for split in ("train", "validation"):
        for index, label in enumerate(layout["classes"]):
            folder = top / layout[split] / label
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(counts[split]):
                serial += 1
                make_image(index, size, seed=serial).save(folder / f"{label}.{n}.jpg", quality=90)
    return top


def make_archive(
    zip_path: Path,
    dataset: str = "cats_vs_dogs",
    counts: dict[str, int] | None = None,
    size: int = 48,
    seed: int = 0,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A zip shaped like the real download (plus ``extra`` raw entries, e.g. __MACOSX/)."""
    staging = zip_path.parent / f".{zip_path.stem}-tree"
    make_tree(staging, dataset, counts, size, seed)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(staging.rglob("*")):
            arcname = path.relative_to(staging).as_posix()
            if path.is_dir():
                archive.writestr(arcname + "/", b"")
            else:
                archive.write(path, arcname)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return zip_path


def tiny_params(
    sources: dict[str, str], counts: dict[str, int] | None = None, **sections: Any
) -> dict[str, Any]:
    """A params.yaml mapping for the generated datasets at ``sources`` (name -> url/path).

    ``sections`` replace or extend top-level sections, e.g. ``train={...}``.
    """
    counts = counts or {"train": 6, "validation": 3}
    datasets = {}
    for name, url in sources.items():
        layout = LAYOUTS[name]
        datasets[name] = {
            "url": url,
            "sha256": None,
            "size": None,
            "mirrors": [],
            "layout": {k: layout[k] for k in ("root", "train", "validation")},
            "classes": list(layout["classes"]),
            "counts": {
                split: {label: counts[split] for label in layout["classes"]}
                for split in ("train", "validation")
            },
        }
    params: dict[str, Any] = {
        "datasets": datasets,
        "download": {
            "retries": 3,
            "backoff_seconds": 0.01,
            "max_backoff_seconds": 0.05,
            "timeout_seconds": 5,
        },
        "validate": {"min_side": 16, "workers": 1},
        # the tests count epochs: exactly train.epochs on cached features too
        "train": {
            "image_size": 32,
            "weights": "none",
            "batch_size": 8,
            "epochs": 2,
            "cached_epochs": None,
        },  # fmt: skip
        "finetune": {"epochs": 1},
    }
    for key, value in sections.items():
        params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
    return params


def _write_image(job: tuple[str, int, int, int, int]) -> None:
    path, label_index, width, height, seed = job
    image = make_image(label_index, width, seed=seed).crop((0, 0, width, height))
    image.save(path, "JPEG", quality=90)


def generate_tree(
    raw: Path, dataset: str, counts: dict[str, dict[str, int]], side: int, workers: int
) -> None:
    """Many distinct JPEGs (``side`` px high, 9/8 of it wide) under ``raw``
    (``<layout root>/<split folder>/<class>/*.jpg``), made by ``workers`` processes."""
    layout = LAYOUTS[dataset]
    jobs = []
    for split, per_class in counts.items():
        for index, (label, count) in enumerate(per_class.items()):
            folder = raw / layout["root"] / layout[split] / label
            folder.mkdir(parents=True, exist_ok=True)
            seed = 1_000_000 * (2 * index + (split == "validation"))
            jobs += [
                (str(folder / f"{label}.{n}.jpg"), index, side * 9 // 8, side, seed + n)
                for n in range(count)
            ]
    with ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(_write_image, jobs, chunksize=256):
            pass


def zip_tree(tree: Path, bundle: Path) -> None:
    """Zip the files under ``tree`` into ``bundle``, stored (JPEGs do not compress)."""
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_STORED) as out:
        for folder, dirs, names in os.walk(tree):
            dirs.sort()
            for name in sorted(names):
                path = Path(folder) / name
                out.write(path, path.relative_to(tree).as_posix())
