"""Fixtures for the training tests: generated workspaces (the offline-made backbone weights,
``offline_weights``, are a session fixture in tests/conftest.py, shared with the e2e tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import Config, parse_config
from tasks.paths import DatasetPaths
from tests.datagen import LAYOUTS, make_tree, tiny_params

MODEL_SIDE = 32
TEST_FRACTION = 0.2  # evaluate.test_fraction's default


def manifest_rows(raw: Path, top: Path, dataset: str) -> list[dict[str, Any]]:
    """Manifest rows (the validate stage's columns) for every image file under ``top``."""
    layout = LAYOUTS[dataset]
    rows = []
    for file in sorted(p for p in top.rglob("*") if p.is_file()):
        relative = file.relative_to(raw)
        split_folder, label = relative.parts[1], relative.parts[2]
        with Image.open(file) as image:
            facts = {
                "width": image.width,
                "height": image.height,
                "mode": image.mode,
                "format": image.format,
            }
        rows.append(
            {
                "path": relative.as_posix(),
                "split": "train" if split_folder == layout["train"] else "validation",
                "label": label,
                "status": "ok",
                **facts,
            }
        )
    return rows


def write_manifest(paths: DatasetPaths, rows: list[dict[str, Any]] | pd.DataFrame) -> None:
    """Write the manifest, holding out the test split from validation as validate does."""
    from tasks.ml.manifest import carve_test_split

    frame = pd.DataFrame(rows)
    complete = {"label", "status"} <= set(frame.columns)  # else a deliberately broken one
    if complete and "sha256" not in frame.columns:
        frame["sha256"] = [file_sha256(paths.raw / name) for name in frame["path"]]
    if complete and not frame["split"].eq("test").any():
        frame = carve_test_split(frame, TEST_FRACTION)
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(paths.manifest, index=False)


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_workspace(
    root: Path,
    counts: dict[str, int] | None = None,
    dataset: str = "cats_vs_dogs",
    seed: int = 1,
    size: int = 48,
) -> DatasetPaths:
    """Generated images under ``data/raw/<ds>`` and their manifest, as validate leaves them."""
    paths = DatasetPaths.of(dataset, root)
    top = make_tree(paths.raw, dataset, counts or {"train": 24, "validation": 12}, size, seed)
    write_manifest(paths, manifest_rows(paths.raw, top, dataset))
    return paths


def load_images(paths: DatasetPaths, split: str, size: int) -> np.ndarray:
    """The ``ok`` images of ``split`` as raw float32 0-255 RGB, resized like prediction does."""
    from tasks.ml.images import read_image

    manifest = pd.read_parquet(paths.manifest)
    rows = manifest[(manifest["split"] == split) & (manifest["status"] == "ok")]
    images = [read_image(paths.raw / name, (size, size)) for name in rows["path"]]
    return np.stack(images).astype(np.float32)


def model_config(*overrides: str, dataset: str = "cats_vs_dogs", **sections: Any) -> Config:
    """Tiny params for ``dataset`` (MobileNetV2 at 32 px by default) plus ``--set`` overrides."""
    train = {"backbone": "mobilenet_v2", "image_size": MODEL_SIDE, "weights": "none"}
    train |= sections.pop("train", {})
    params = tiny_params({dataset: "http://127.0.0.1:1/data.zip"}, train=train, **sections)
    return parse_config(params, list(overrides))


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A temporary MLflow SQLite store for this test; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
    return uri
