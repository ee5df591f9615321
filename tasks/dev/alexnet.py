"""Write an AlexNet as a Keras model file, for ``train.backbone: <path>.keras``.

``keras.applications`` has no AlexNet; recipe ``hymenoptera_alexnet`` (the AlexNet
half of the PyTorch ants/bees walkthrough) runs on a model file instead. This
tool writes torchvision's AlexNet layout in Keras's own layers, with fresh
weights or with weights pretrained offline on :func:`tasks.dev.offline_weights.source_task`
(no network; a stand-in, like the other backbones' offline weights)::

    python -m tasks.dev.alexnet models/backbones/alexnet.keras [--image-size 224]
        [--width 1.0] [--pretrain]

Layer names follow the Caffe original: ``conv1``..``conv5``, ``pool1``/``pool2``/
``pool5``, ``fc6``, ``fc7`` (Dense + ReLU) and ``fc8`` (the 1000 ImageNet
classes). The walkthrough replaces ``fc8``: cut at ``fc7``. torchvision's
pretrained weights are PyTorch tensors; converting them needs PyTorch, which
this project does not install, so a real ImageNet AlexNet file must be made
on a machine that has it (same layer names, kernels transposed to Keras's
(height, width, in, out) and (in, out) layouts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.io import atomic_path

if TYPE_CHECKING:
    import keras

MIN_SIZE = 63
"""The smallest input for which pool5 still has one cell."""


def alexnet(image_size: int = 224, width: float = 1.0, classes: int = 1000) -> keras.Model:
    """torchvision's AlexNet (the one-GPU "OWT" variant) at ``image_size`` px, its channel
    and unit counts scaled by ``width`` (1.0: the real network, 61 M weights)."""
    import keras

    if image_size < MIN_SIZE:
        raise ValueError(f"AlexNet needs at least {MIN_SIZE} px inputs, got {image_size}")

    def n(count: int) -> int:
        return max(1, round(count * width))

    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.ZeroPadding2D(2, name="pad1")(inputs)
    x = layers.Conv2D(n(64), 11, strides=4, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = layers.ZeroPadding2D(2, name="pad2")(x)
    x = layers.Conv2D(n(192), 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    x = layers.Conv2D(n(384), 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(n(256), 3, padding="same", activation="relu", name="conv4")(x)
    x = layers.Conv2D(n(256), 3, padding="same", activation="relu", name="conv5")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="drop6")(x)
    x = layers.Dense(n(4096), activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="drop7")(x)
    x = layers.Dense(n(4096), activation="relu", name="fc7")(x)
    outputs = layers.Dense(classes, name="fc8")(x)
    return keras.Model(inputs, outputs, name="alexnet")


def write_alexnet(
    path: Path | str,
    image_size: int = 224,
    width: float = 1.0,
    seed: int = 0,
    pretrain: bool = False,
) -> Path:
    """Save :func:`alexnet` to ``path`` (a ``.keras`` file), written atomically.

    ``pretrain``: fit it first on the offline source task (4 classes of synthetic
    shapes, a few epochs), so its features are not random.
    """
    import keras

    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a backbone model file must end in .keras")
    keras.utils.set_random_seed(seed)
    model = alexnet(image_size, width)
    if pretrain:
        _pretrain(model, image_size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
    return path


def _pretrain(model: keras.Model, image_size: int, seed: int) -> None:
    import keras

    from tasks.dev.offline_weights import source_task
    from tasks.ml.model import preprocess_layer

    inputs = keras.Input((image_size, image_size, 3))
    features = model.get_layer("fc7").output
    extractor = keras.Model(model.inputs, features)
    x = extractor(preprocess_layer("torch")(inputs))
    trainer = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    x_train, y_train = source_task(768, image_size, seed=seed)
    trainer.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.dev.alexnet", description=__doc__)
    parser.add_argument("path", help="where to write the .keras file")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0, help="scale of channels and units")
    parser.add_argument("--pretrain", action="store_true", help="fit on the offline source task")
    args = parser.parse_args(argv)
    try:
        path = write_alexnet(args.path, args.image_size, args.width, pretrain=args.pretrain)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{path}: AlexNet at {args.image_size} px (width {args.width:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
