"""Backbone weights made without a network: a stand-in for ImageNet in tests and the demo.

:func:`make_offline_weights` pretrains a backbone on a generated source task
(oriented stripe and checker patterns in random colours), with BatchNorm
momentum lowered so the moving statistics settle, and saves a ``.weights.h5``:
a real, transferable weights file (``train.weights: path/to.weights.h5``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.io import atomic_path
from tasks.ml.backbones import build_backbone, get_backbone, is_batch_norm
from tasks.ml.model import preprocess_layer

log = logging.getLogger(__name__)


def source_task(count: int, image_size: int, seed: int = 0) -> tuple[Any, Any]:
    """A generated pretraining task: 4 pattern classes (horizontal, vertical and diagonal
    stripes, checkerboard) in random colours, periods and phases, with noise.

    Returns (images float32 0-255 of shape (count, size, size, 3), labels int).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    axis = np.arange(image_size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    images = np.empty((count, image_size, image_size, 3), np.float32)
    labels = np.arange(count) % 4
    rng.shuffle(labels)
    for n, label in enumerate(labels):
        period = rng.uniform(3, max(4.0, image_size / 4))
        phase = rng.uniform(0, 2 * np.pi)
        coord = {0: yy, 1: xx, 2: (xx + yy) / np.sqrt(2)}.get(int(label))
        if coord is None:
            wave = np.sign(
                np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period)
            )
            wave = 0.5 + 0.5 * wave
        else:
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + phase)
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = low + wave[..., None] * (high - low) + rng.normal(0, 10, (image_size,) * 2 + (3,))
        images[n] = np.clip(image, 0, 255)
    return images, labels


def make_offline_weights(
    backbone: str,
    path: str | Path,
    *,
    image_size: int | None = None,
    images: int = 768,
    epochs: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    bn_momentum: float = 0.6,
) -> Path:
    """Pretrain ``backbone`` on :func:`source_task` and save its weights to ``path``.

    No network: a stand-in for ImageNet weights that gives real (not collapsed)
    features, so a frozen-base head can learn. ``path`` must end in
    ``.weights.h5``; use it as ``train.weights`` at any input size the backbone
    accepts. Written atomically.
    """
    import keras

    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"{path}: offline weights must be saved as a .weights.h5 file")
    spec = get_backbone(backbone)
    size = spec.resolve_size(image_size or max(spec.min_size, 32))
    keras.utils.set_random_seed(seed)
    base = build_backbone(backbone, size)
    for layer in base.layers:
        if is_batch_norm(layer):
            layer.momentum = bn_momentum
    inputs = keras.Input((size, size, 3))
    x = base(preprocess_layer(spec.preprocess)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x_train, y_train = source_task(images, size, seed=seed)
    history = model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=0)
    log.info(
        "offline weights for %s at %d px: source-task accuracy %.2f after %d epochs",
        backbone,
        size,
        history.history["accuracy"][-1],
        epochs,
    )
    with atomic_path(path, suffix=".weights.h5") as tmp:
        base.save_weights(str(tmp))
    return path
