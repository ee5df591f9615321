"""The input pipeline: validated manifest rows -> batched ``tf.data`` of (images, labels).

Images are float32 0-255 RGB of shape (size, size, 3) (the model preprocesses
them itself); labels are class indices (position in ``classes``). Any format
the manifest accepted decodes to RGB: grayscale, RGBA, palette, 16-bit, PNG
files named .jpg (TensorFlow sniffs the content), and, through Pillow, what
TensorFlow cannot decode (CMYK JPEGs, TIFF, WebP, ...). Decoded images are
resized (bilinear, antialiased, like Pillow's resize at prediction time) and
rounded to uint8; a phase that reads them every epoch decodes them once into an
:class:`tasks.ml.arrays.ArrayStore` (in RAM within the budget, else on disk).
Augmentation (flip, rotation, zoom, width/height shift, shear) runs on training batches only,
seeded: the same seed gives the same batches, each epoch a fresh draw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import AugmentationConfig
from tasks.errors import StageError
from tasks.ml.shards import is_sharded, shard_records

if TYPE_CHECKING:
    import pandas as pd
    import tensorflow as tf

SHUFFLE_BUFFER = 4096
_TF_FORMATS = {"JPEG", "PNG", "GIF", "BMP"}
_TF_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX"}


def usable_rows(manifest: pd.DataFrame, split: str, classes: Sequence[str]) -> pd.DataFrame:
    """The ``ok`` rows of ``split``; an error if there are none or a label is not a class."""
    rows = manifest[(manifest["split"] == split) & (manifest["status"] == "ok")]
    if rows.empty:
        hint = (
            " (a manifest from before the held-out test split has no test rows)"
            if split == "test"
            else ""
        )
        raise StageError(
            f"the manifest has no usable {split!r} images (status ok){hint}; check the data "
            "and rerun validate"
        )
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise StageError(
            f"manifest labels {unknown} are not in the dataset's classes {list(classes)}; fix "
            "datasets.<name>.classes in params.yaml or rerun validate"
        )
    return rows


def worker_rows(manifest: pd.DataFrame, index: int, workers: int) -> pd.DataFrame:
    """Worker ``index`` of ``workers``'s part of ``manifest``: of each split's ``ok`` rows,
    in manifest order, the ``index``-th of ``workers`` runs as equal as can be (their
    sizes differ by one at most). The runs follow manifest order, so with shards each
    worker reads its own shards (and at most one it shares with a neighbour).

    One worker: ``manifest`` itself. A split with fewer rows than workers is an error.
    """
    import numpy as np

    if workers == 1:
        return manifest
    ok = (manifest["status"] == "ok").to_numpy()
    splits = manifest["split"].to_numpy()
    keep = np.zeros(len(manifest), dtype=bool)
    for split in dict.fromkeys(splits[ok]):
        where = np.flatnonzero(ok & (splits == split))
        n = len(where)
        if n < workers:
            raise StageError(
                f"the {split!r} split has {n} usable image(s) for {workers} workers; "
                "each worker needs one at least: lower train.workers or add images"
            )
        keep[where[index * n // workers : (index + 1) * n // workers]] = True
    return manifest[keep]


def row_labels(rows: pd.DataFrame, classes: Sequence[str]) -> list[int]:
    """The class index of each row's label."""
    index = {name: i for i, name in enumerate(classes)}
    return [index[label] for label in rows["label"]]


def needs_pillow(rows: pd.DataFrame) -> list[bool]:
    """Per row: True where TensorFlow would fail or differ from Pillow (by the manifest's
    format and mode; a missing or empty one says nothing). Column-wise: no object per row."""
    import pandas as pd

    empty = pd.Series("", index=rows.index, dtype="string")
    fmt = rows["format"].astype("string") if "format" in rows else empty
    mode = rows["mode"].astype("string") if "mode" in rows else empty
    odd_format = fmt.fillna("").ne("") & ~fmt.fillna("").str.upper().isin(_TF_FORMATS)
    odd_mode = mode.fillna("").ne("") & ~mode.fillna("").isin(_TF_MODES)
    return (odd_format | odd_mode).astype(bool).tolist()


def _pillow_decode(contents: bytes) -> Any:
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(contents)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(contents: tf.Tensor, pillow: tf.Tensor) -> tf.Tensor:
    """One file's bytes -> uint8 RGB (H, W, 3), with TensorFlow or (``pillow`` true) Pillow."""
    import tensorflow as tf

    def with_tf() -> tf.Tensor:
        return tf.cond(
            tf.io.is_jpeg(contents),
            # the accurate IDCT, as Pillow (and so prediction) decodes
            lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(
                contents, channels=3, dtype=tf.uint8, expand_animations=False
            ),
        )

    def with_pillow() -> tf.Tensor:
        return tf.numpy_function(_pillow_decode, [contents], tf.uint8, stateful=False)

    image = tf.cond(pillow, with_pillow, with_tf)
    return tf.ensure_shape(image, [None, None, 3])


def augmentation_layers(aug: AugmentationConfig, seed: int) -> list[Any]:
    """The Keras preprocessing layers ``aug`` asks for, each seeded from ``seed``."""
    import keras

    layers: list[Any] = []
    if aug.flip != "none":
        layers.append(keras.layers.RandomFlip(aug.flip, seed=seed))
    if aug.rotation > 0:
        layers.append(keras.layers.RandomRotation(aug.rotation, fill_mode="reflect", seed=seed + 1))
    if aug.zoom > 0:
        layers.append(keras.layers.RandomZoom(aug.zoom, fill_mode="reflect", seed=seed + 2))
    height_shift, width_shift = aug.shifts
    if height_shift > 0 or width_shift > 0:
        layers.append(
            keras.layers.RandomTranslation(
                height_shift, width_shift, fill_mode="reflect", seed=seed + 3
            )
        )
    if aug.shear > 0:
        layers.append(
            keras.layers.RandomShear(x_factor=aug.shear, fill_mode="reflect", seed=seed + 4)
        )
    return layers


def decoded_batches(
    manifest_df: pd.DataFrame,
    root: Path,
    split: str,
    classes: Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of (uint8 RGB images (size, size, 3), int labels) of ``split``, decoded in
    parallel on every pass (nothing held); in manifest order unless ``shuffle`` (seeded,
    a new order each epoch).

    ``root``: the folder of the manifest's files, or of its shards when the manifest
    locates its images in shards (:mod:`tasks.ml.shards`; ``shuffle`` then draws from a
    buffer of ``SHUFFLE_BUFFER`` images read in order).
    """
    import tensorflow as tf

    rows = usable_rows(manifest_df, split, classes)
    labels, pillow = row_labels(rows, classes), needs_pillow(rows)
    facts = tf.data.Dataset.from_tensor_slices((tf.constant(labels, tf.int32), tf.constant(pillow)))
    if is_sharded(rows):
        ds = tf.data.Dataset.zip(shard_records(root, rows), facts)
        if shuffle:
            buffer = min(len(rows), SHUFFLE_BUFFER)
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        files = tf.data.Dataset.from_tensor_slices(tf.constant(file_paths(rows, root)))
        ds = tf.data.Dataset.zip(files, facts)
        if shuffle:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(
            lambda path, facts: (tf.io.read_file(path), facts),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def load(contents: tf.Tensor, facts: Any) -> Any:
        label, use_pillow = facts
        image = decode_image(contents, use_pillow)
        image = tf.image.resize(image, (image_size, image_size), antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image, label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size)


def file_paths(rows: pd.DataFrame, root: Path) -> list[str]:
    """The rows' files under ``root``; an error naming the fix when some are missing."""
    base = str(Path(root))
    # lexically: a fed-back drop's rows start with ../ and data/raw may be a symlink
    full = [os.path.normpath(f"{base}/{name}") for name in rows["path"].astype(str)]
    missing = [name for name in full[:1000] if not Path(name).is_file()]
    if missing:
        raise StageError(
            f"{len(missing)} manifest file(s) missing under {base}, e.g. {missing[0]}; rerun "
            "download and validate so the manifest matches data/raw"
        )
    return full


def training_batches(
    uint8_batches: tf.data.Dataset, augment: AugmentationConfig | None, seed: int
) -> tf.data.Dataset:
    """uint8 image batches as float32 0-255, through ``augment``'s random layers if any."""
    import tensorflow as tf

    ds = uint8_batches.map(
        lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    layers = augmentation_layers(augment, seed) if augment is not None else []
    if layers:

        def augment_batch(x: tf.Tensor, y: tf.Tensor) -> Any:
            for layer in layers:
                x = layer(x, training=True)
            return tf.clip_by_value(x, 0.0, 255.0), y

        # Sequential on purpose: the seeded layers draw from one generator state, and
        # parallel calls would draw in whatever order they run (unrepeatable under load).
        # Each call is a whole batch, vectorised, and prefetch overlaps it with training.
        ds = ds.map(augment_batch)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_dataset(
    manifest_df: pd.DataFrame,
    root: Path,
    split: str,
    classes: Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    augment: AugmentationConfig | None,
    shuffle: bool,
    seed: int,
) -> tf.data.Dataset:
    """Batches of (float32 0-255 RGB images (size, size, 3), int labels) of ``split``.

    Decodes on every pass and holds nothing (a phase that reads the images every
    epoch decodes them once into a budgeted :class:`tasks.ml.arrays.ArrayStore`);
    ``shuffle`` reshuffles every epoch (seeded); ``augment`` applies the
    configured random layers to each batch.
    """
    batches = decoded_batches(
        manifest_df, root, split, classes, image_size, batch_size, shuffle=shuffle, seed=seed
    )
    return training_batches(batches, augment, seed)


def count_rows(manifest_df: pd.DataFrame, split: str) -> int:
    return int(((manifest_df["split"] == split) & (manifest_df["status"] == "ok")).sum())
