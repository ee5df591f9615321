"""A tiny model that follows the saved-model contract, and a workspace to score it in.

Contract (see tasks.ml.model): one end-to-end Keras model, raw 0-255 RGB in, the
``preprocess`` Sequential, a nested functional sub-model named ``backbone`` called
with ``training=False``, then a ``keras.Sequential`` named ``head``; two classes
give ``Dense(1, sigmoid)`` = P(classes[1]). Only the backbone is a tiny conv
net here, so the tests train in seconds.

Trained models are cached per test session (``tiny_models``), so each test
module pays for training at most once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.paths import DatasetPaths
from tests.datagen import LAYOUTS, make_image, make_tree

IMAGE_SIZE = 32
_CACHE: dict[str, dict[str, Path]] = {}


def build_tiny_model(image_size: int = IMAGE_SIZE, n_classes: int = 2, seed: int = 0):
    import keras

    from tasks.ml.model import preprocess_layer

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocess_layer("tf")(inputs)  # the project's preprocessing, as trained models have
    base_in = keras.Input((image_size, image_size, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(base_in)
    y = keras.layers.MaxPooling2D()(y)
    y = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(y)
    backbone = keras.Model(base_in, y, name="backbone")
    x = backbone(x, training=False)
    top = (
        keras.layers.Dense(1, activation="sigmoid")
        if n_classes == 2
        else keras.layers.Dense(n_classes, activation="softmax")
    )
    head = keras.Sequential([keras.layers.GlobalAveragePooling2D(), top], name="head")
    return keras.Model(inputs, head(x), name="tiny")


def training_arrays(per_class: int = 24, image_size: int = IMAGE_SIZE, n_classes: int = 2):
    images, labels = [], []
    for label in range(n_classes):
        for n in range(per_class):
            images.append(np.asarray(make_image(label, image_size, seed=9_000 + 97 * label + n)))
            labels.append(label)
    return np.stack(images).astype(np.float32), np.array(labels)


def train_tiny_model(n_classes: int = 2, epochs: int = 6, seed: int = 0):
    import keras

    model = build_tiny_model(n_classes=n_classes, seed=seed)
    x, y = training_arrays(n_classes=n_classes)
    loss = "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(0.004), loss=loss, metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, shuffle=True)
    return model


def random_model(seed: int = 7):
    """Random weights after one epoch at a negligible learning rate: a far worse model."""
    import keras

    model = build_tiny_model(seed=seed)
    x, y = training_arrays()
    model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    return model


def _last_dense(model):
    return model.get_layer("head").layers[-1]


def inverted(model):
    """The same model with the sigmoid's logit negated: P becomes 1 - P.

    It scores about 0 wherever the original scored about 1.
    """
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    dense = _last_dense(clone)
    kernel, bias = dense.get_weights()
    dense.set_weights([-kernel, -bias])
    return clone


def constant(model, p: float = 0.6):
    """Always P(classes[1]) = p: half right on balanced data, ROC AUC 0.5."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    dense = _last_dense(clone)
    kernel, _ = dense.get_weights()
    dense.set_weights([np.zeros_like(kernel), np.full((1,), np.log(p / (1 - p)), np.float32)])
    return clone


def tiny_models(folder: Path) -> dict[str, Path]:
    """.keras files made once per session: ``good`` (trained), ``retrain`` (trained the
    same way from another seed: equally good), ``random`` (random weights, one epoch at a
    negligible rate: near chance), ``inverted`` and ``constant``."""
    if "binary" not in _CACHE:
        folder.mkdir(parents=True, exist_ok=True)
        good = train_tiny_model()
        files = {}
        for name, model in (
            ("good", good),
            ("retrain", train_tiny_model(seed=1)),
            ("random", random_model()),
            ("inverted", inverted(good)),
            ("constant", constant(good)),
        ):
            files[name] = folder / f"{name}.keras"
            model.save(files[name])
        _CACHE["binary"] = files
    return _CACHE["binary"]


def make_workspace(
    root: Path,
    dataset: str = "cats_vs_dogs",
    counts: dict[str, int] | None = None,
    seed: int = 3,
    quarantine: int = 0,
) -> DatasetPaths:
    """Images under ``data/raw/<ds>`` and their manifest, as download + validate leave them.

    The first ``quarantine`` validation rows are marked ``quarantined``.
    """
    paths = DatasetPaths.of(dataset, root)
    top = make_tree(paths.raw, dataset, counts or {"train": 4, "validation": 6}, seed=seed)
    rows = []
    for file in sorted(top.rglob("*.jpg")):
        relative = file.relative_to(paths.raw)
        split_folder, label = relative.parts[1], relative.parts[2]
        split = "train" if split_folder == LAYOUTS[dataset]["train"] else "validation"
        rows.append(
            {
                "path": relative.as_posix(),
                "split": split,
                "label": label,
                "status": "ok",
                "width": 48,
                "height": 48,
            }
        )
    manifest = pd.DataFrame(rows)
    flagged = manifest.index[manifest["split"] == "validation"][:quarantine]
    manifest.loc[flagged, "status"] = "quarantined"
    write_manifest(paths, manifest)
    return paths


def write_manifest(paths: DatasetPaths, manifest: pd.DataFrame) -> None:
    """Write the manifest, holding out the test split from validation as validate does."""
    import hashlib

    from tasks.ml.manifest import carve_test_split

    if "sha256" not in manifest.columns:
        manifest = manifest.assign(
            sha256=[
                hashlib.sha256((paths.raw / p).read_bytes()).hexdigest() for p in manifest["path"]
            ]
        )
    if not manifest["split"].eq("test").any():
        manifest = carve_test_split(manifest, 0.2)
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(paths.manifest, index=False)


def swap_validation_labels(paths: DatasetPaths, classes: list[str]) -> None:
    """Swap the labels of the validation and test rows: what was right is now wrong."""
    manifest = pd.read_parquet(paths.manifest)
    swap = {classes[0]: classes[1], classes[1]: classes[0]}
    rows = manifest["split"].isin(["validation", "test"])
    manifest.loc[rows, "label"] = manifest.loc[rows, "label"].map(swap)
    write_manifest(paths, manifest)


def use_candidate(paths: DatasetPaths, model_file: Path, phase: str = "finetune") -> Path:
    """Copy ``model_file`` into ``models/<ds>/`` and point ``candidate.json`` at it."""
    paths.models.mkdir(parents=True, exist_ok=True)
    target = paths.models / f"{phase}-{model_file.stem}.keras"
    target.write_bytes(Path(model_file).read_bytes())
    paths.candidate.write_text(
        json.dumps({"path": target.relative_to(paths.root).as_posix(), "phase": phase})
    )
    return target


def register_champion(
    root: Path, model_file: Path, validation: int, train: int = 1
) -> DatasetPaths:
    """A workspace at ``root`` whose registry holds ``model_file`` as ``@champion`` (v1).

    The store is ``sqlite:///<root>/mlflow.db`` (the caller's ``MLFLOW_TRACKING_URI`` must
    say so), its artifacts under ``<root>/artifacts``; ``validation`` and ``train`` images
    per class (the training images are the version's drift reference).
    """
    from tasks.config import parse_config
    from tasks.steps import register
    from tests.datagen import tiny_params

    paths = make_workspace(root, counts={"train": train, "validation": validation})
    use_candidate(paths, model_file)
    cfg = parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}),
        ["tracking.artifact_location=artifacts"],
    )
    assert register.run(cfg, paths).promoted
    return paths


def write_history(paths: DatasetPaths, frozen_epochs: int = 3, finetune_epochs: int = 2) -> None:
    rows = []
    for epoch in range(frozen_epochs + finetune_epochs):
        phase = "train" if epoch < frozen_epochs else "finetune"
        rows.append(
            {
                "phase": phase,
                "epoch": epoch,
                "loss": 0.7 / (epoch + 1),
                "accuracy": 0.6 + 0.08 * epoch,
                "val_loss": 0.75 / (epoch + 1) + 0.05,
                "val_accuracy": 0.55 + 0.08 * epoch,
            }
        )
    paths.history.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(paths.history, index=False)
