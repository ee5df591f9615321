"""The saved model: ONE end-to-end Keras model, raw 0-255 RGB in, probabilities out.

Layout (what evaluate, Grad-CAM, predict and the registry rely on)::

    image (H, W, 3) 0-255  ->  "preprocess": the backbone's preprocess_input as a
                               keras.Sequential of built-in layers
                           ->  "backbone": nested functional keras.applications model,
                               called with training=False (BatchNorm in inference mode)
                           ->  "head": keras.Sequential (pooling, [Dense relu], [Dropout], Dense)

Two classes end in ``Dense(1, sigmoid)`` = P(classes[1]); more in ``Dense(n, softmax)``.

Every layer is one of Keras's own, so ``keras.saving.load_model`` works in any
Python with Keras 3, without this package (a serving host, a colleague's notebook).
Importing this module also registers ``Preprocess``, the custom layer of models
saved by earlier versions (``tasks.artifacts.load_model`` does so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import keras

from tasks.errors import StageError
from tasks.ml.backbones import (
    BACKBONES,
    Backbone,
    HeadSpec,
    WeightsSource,
    build_backbone,
    get_backbone,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("tf", "caffe", "torch", "none")


@keras.saving.register_keras_serializable(package="tasks")
class Preprocess(keras.layers.Layer):
    """The custom layer models saved before preprocessing became Keras layers carry.

    Kept registered so those files (an older champion in the registry) still load
    here; new models use :func:`preprocess_layer`, which needs no project code.
    """

    def __init__(self, mode: str = "tf", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"Preprocess mode {mode!r}; use one of {MODES}")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        from keras import ops

        x = ops.cast(inputs, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, "float32")
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, "float32")
            std = ops.convert_to_tensor(_TORCH_STD, "float32")
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def preprocess_layer(mode: str, name: str = "preprocess") -> keras.Sequential:
    """``keras.applications.<net>.preprocess_input`` built from Keras's own layers.

    ``tf``: scale to [-1, 1] (MobileNetV2, InceptionV3, Xception); ``caffe``: RGB to
    BGR (a fixed, frozen channel permutation) minus the ImageNet mean (VGG16,
    ResNet50); ``torch``: [0, 1] then the ImageNet mean/std; ``none``: the backbone
    rescales itself (EfficientNet). Only built-in layers, so a saved model loads
    wherever Keras 3 does, without this package.
    """
    if mode not in MODES:
        raise ValueError(f"preprocess mode {mode!r}; use one of {MODES}")
    layers: list[Any] = [keras.Input((None, None, 3), name="rgb")]
    if mode == "tf":
        layers.append(keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="to_minus1_1"))
    elif mode == "caffe":
        flip = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
        layers.append(
            keras.layers.Dense(
                3,
                use_bias=False,
                trainable=False,
                kernel_initializer=keras.initializers.Constant(flip),
                name="rgb_to_bgr",
            )
        )
        offset = [-mean for mean in _CAFFE_MEAN_BGR]
        layers.append(keras.layers.Rescaling(1.0, offset=offset, name="minus_imagenet_mean"))
    elif mode == "torch":
        layers.append(keras.layers.Rescaling(1 / 255.0, name="to_0_1"))
        layers.append(
            keras.layers.Normalization(
                mean=list(_TORCH_MEAN),
                variance=[std**2 for std in _TORCH_STD],
                name="imagenet_mean_std",
            )
        )
    else:
        layers.append(keras.layers.Identity(name="as_is"))
    return keras.Sequential(layers, name=name)


def build_head(spec: HeadSpec, feature_shape: tuple[int, ...], n_classes: int) -> keras.Sequential:
    """The ``head`` Sequential, built for backbone features of ``feature_shape``.

    Features that are already one vector per image (a model-file backbone cut at a
    dense layer) take no pooling.
    """
    if n_classes < 2:
        raise StageError(f"need at least 2 classes to train a classifier, got {n_classes}")
    layers: list[Any] = [keras.Input(shape=tuple(feature_shape), name="features")]
    if len(feature_shape) > 1:
        layers.append(
            keras.layers.GlobalAveragePooling2D(name="pool")
            if spec.pooling == "avg"
            else keras.layers.Flatten(name="flatten")
        )
    if spec.dense_units:
        layers.append(keras.layers.Dense(spec.dense_units, activation="relu", name="hidden"))
    if spec.dropout:
        layers.append(keras.layers.Dropout(spec.dropout, name="dropout"))
    # The output computes in float32 under any mixed precision policy (stable probabilities).
    if n_classes == 2:
        layers.append(
            keras.layers.Dense(1, activation="sigmoid", name="probability", dtype="float32")
        )
    else:
        layers.append(
            keras.layers.Dense(
                n_classes, activation="softmax", name="probabilities", dtype="float32"
            )
        )
    return keras.Sequential(layers, name="head")


@dataclass(frozen=True)
class ModelSpec:
    backbone: str | Backbone
    """A registry name, or an entry (a model-file backbone's comes from ``backbone_entry``)."""
    image_size: int
    head: HeadSpec
    n_classes: int


def build_model(spec: ModelSpec, weights: WeightsSource | None = None) -> keras.Model:
    """The end-to-end classifier with a frozen backbone (phase 1's starting point)."""
    entry = get_backbone(spec.backbone)
    inputs = keras.Input((spec.image_size, spec.image_size, 3), name="image")
    x = preprocess_layer(entry.preprocess)(inputs)
    base = build_backbone(entry, spec.image_size, weights)
    base.trainable = False
    features = base(x, training=False)
    head = build_head(spec.head, tuple(base.output.shape[1:]), spec.n_classes)
    return keras.Model(inputs, head(features), name=f"{entry.model_name}_classifier")


def probability_model(
    model: keras.Model, n_classes: int, *, list_input: bool = False
) -> keras.Model:
    """``model`` with one probability per class as output: the served and exported form.

    A two-class model with one sigmoid output gets ``[1 - p, p]``; a model that
    already has ``n_classes`` outputs is wrapped as it is. ``list_input``: a list of
    one input (MLflow's pyfunc wrapper feeds a list; our own code an array).
    """
    inputs = keras.Input(tuple(model.input_shape[1:]), name="image")
    p = model(inputs)
    width = int(p.shape[-1])
    if width == 1 and n_classes == 2:
        complement = keras.layers.Rescaling(-1.0, offset=1.0, name="complement")(p)
        p = keras.layers.Concatenate(name="probabilities")([complement, p])
    elif width != n_classes:
        raise StageError(
            f"the model outputs {width} values per image but the dataset has {n_classes} "
            "classes; use a model trained for this dataset"
        )
    return keras.Model([inputs] if list_input else inputs, p, name="classifier")


OUTPUT_LAYERS = ("probability", "probabilities")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """``model`` with the same weights computing in ``precision`` (output layer in float32).

    Returns ``model`` itself when it already computes so; otherwise an uncompiled
    copy (its layers rebuilt from their configs with the new dtype policy).
    Saved models are float32 (``with_precision(model, "float32")``) whatever the
    training policy, so any device can load and serve them.
    """
    if {layer.dtype_policy.name for layer in _leaf_layers(model)} == {precision}:
        return model
    config = _retyped(model.get_config(), precision)
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def _leaf_layers(model: keras.Model) -> list[Any]:
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.extend(_leaf_layers(layer))
        elif layer.name not in OUTPUT_LAYERS and not isinstance(layer, keras.layers.InputLayer):
            layers.append(layer)
    return layers


def _retyped(node: Any, precision: str) -> Any:
    """A model config with every layer's dtype policy set to ``precision``."""
    if isinstance(node, list):
        return [_retyped(item, precision) for item in node]
    if not isinstance(node, dict):
        return node
    inner = node.get("config")
    if node.get("class_name") == "DTypePolicy" and isinstance(inner, dict):
        if inner.get("name") in PRECISIONS:
            return {**node, "config": {**inner, "name": precision}}
        return node
    if isinstance(inner, dict) and inner.get("name") in OUTPUT_LAYERS:
        return {**node, "config": _retyped(inner, "float32")}
    return {key: _retyped(value, precision) for key, value in node.items()}


def backbone_name(model: keras.Model, default: str | None = None) -> str:
    """Which registry backbone a saved model was built on (from its name)."""
    for name in BACKBONES:
        if model.name == f"{name}_classifier":
            return name
    if default is None:
        raise StageError(f"model {model.name!r} was not built by tasks.model; retrain it")
    return default


def feature_extractor(model: keras.Model) -> keras.Model:
    """Raw images -> backbone features, sharing the end-to-end model's layers."""
    inputs = keras.Input(model.input_shape[1:], name="image")
    x = model.get_layer("preprocess")(inputs)
    return keras.Model(inputs, model.get_layer("backbone")(x, training=False), name="features")


class Split(NamedTuple):
    """The end-to-end model cut where fine-tuning starts (:func:`split_at`)."""

    lower: keras.Model
    """Raw images -> the activations crossing the boundary."""
    upper: keras.Model
    """Those activations -> the model's output (the rest of the backbone, the head)."""
    above: keras.Model
    """Those activations -> the backbone's features (the rest of the backbone alone)."""


def split_at(model: keras.Model, boundary: str) -> Split | None:
    """The end-to-end model cut where fine-tuning starts: ``lower``, ``upper``, ``above``.

    ``lower`` maps raw images to the activations that the backbone's layers from
    ``boundary`` on read from the layers below it (one tensor, or several where a
    residual or a parallel branch crosses the cut); ``upper`` maps those to the
    model's output, ``above`` to the backbone's features. All share the model's
    layers, so fitting ``upper`` trains the model itself. The backbone runs in
    inference mode in all, as in the whole model (BatchNorm keeps its statistics);
    the head's dropout trains.
    None when nothing lies below ``boundary`` (the whole backbone is unfrozen).
    """
    from tasks.ml.backbones import boundary_index

    backbone = model.get_layer("backbone")
    start = boundary_index(backbone, boundary)
    below = {id(layer) for layer in backbone.layers[:start]}
    inside = below | {id(layer) for layer in backbone.layers[start:]}
    crossing: dict[int, Any] = {}
    for layer in backbone.layers[start:]:
        for node in layer._inbound_nodes:
            tensors = node.input_tensors
            if any(id(t._keras_history.operation) not in inside for t in tensors):
                continue  # a node of another graph sharing this layer
            for tensor in tensors:
                if id(tensor._keras_history.operation) in below:
                    crossing.setdefault(id(tensor), tensor)
    cut = list(crossing.values())
    if not cut:
        return None
    one = len(cut) == 1
    lower_base = keras.Model(backbone.input, cut[0] if one else cut, name="below_boundary")
    upper_base = keras.Model(cut[0] if one else cut, backbone.output, name="above_boundary")

    image = keras.Input(model.input_shape[1:], name="image")
    lower = keras.Model(
        image, lower_base(model.get_layer("preprocess")(image), training=False), name="lower"
    )
    inputs = [keras.Input(tuple(t.shape[1:]), name=f"cut_{i}") for i, t in enumerate(cut)]
    features = upper_base(inputs[0] if one else inputs, training=False)
    upper = keras.Model(
        inputs[0] if one else inputs, model.get_layer("head")(features), name="upper"
    )
    above = keras.Model(inputs[0] if one else inputs, features, name="above")
    return Split(lower, upper, above)


def loss_for(n_classes: int) -> str:
    return "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"


def n_outputs(model: keras.Model) -> int:
    width = int(model.output_shape[-1])
    return 2 if width == 1 else width


def make_optimizer(
    name: str, learning_rate: float, momentum: float = 0.0
) -> keras.optimizers.Optimizer:
    """The optimizer ``name`` at ``learning_rate``; ``momentum`` is SGD's (the config
    refuses it for the others)."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    factories = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam}
    return factories[name](learning_rate=learning_rate)


def compile_model(
    model: keras.Model,
    optimizer: str,
    learning_rate: float,
    n_classes: int,
    jit_compile: bool | str = "auto",
    momentum: float = 0.0,
    steps_per_execution: int = 1,
) -> None:
    """Compile for training (``jit_compile``: XLA, as the device policy decides;
    ``steps_per_execution``: batches per call into the compiled step, the same updates
    with less overhead per batch, which a small model on cached activations feels)."""
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate, momentum),
        loss=loss_for(n_classes),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


def count_params(weights: list[Any]) -> int:
    return int(sum(int(keras.ops.size(w)) for w in weights))


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Trainable and total parameter counts (the numbers logged with every run)."""
    trainable = count_params(model.trainable_weights)
    total = count_params(model.weights)
    return {"trainable_params": trainable, "total_params": total}


def model_image_size(model: keras.Model) -> tuple[int, int]:
    """(height, width) of the model's image input."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[2]):
        raise StageError(f"the model's input shape {shape} is not (batch, height, width, 3)")
    return int(shape[1]), int(shape[2])


def image_batches(
    model: keras.Model,
    frame: pd.DataFrame,
    root: Path,
    classes: Sequence[str],
    batch_size: int,
) -> Any:
    """The images of ``frame``'s rows (one split) as a ``tf.data`` dataset of float32 0-255
    batches at the model's input size, decoded and resized exactly as in training
    (``tasks.ml.inputs.make_dataset``); rows keep their order."""
    from tasks.ml.inputs import make_dataset

    height, width = model_image_size(model)
    if height != width:
        raise StageError(f"the model's input is {height}x{width}; the pipeline makes square images")
    splits = sorted(set(frame["split"]))
    if len(splits) != 1:
        raise StageError(f"image_batches reads one split at a time; got rows of {splits}")
    dataset = make_dataset(
        frame,
        Path(root),
        splits[0],
        classes,
        height,
        batch_size,
        augment=None,
        shuffle=False,
        seed=0,
    )
    return dataset.map(lambda images, labels: images)


def predict_rows(
    model: keras.Model,
    frame: pd.DataFrame,
    root: Path,
    classes: Sequence[str],
    batch_size: int,
) -> np.ndarray:
    """(images, classes) probabilities for the rows of ``frame`` (images under ``root``:
    the files, or the shards),
    read by :func:`image_batches`; rows keep their order."""
    from tasks.ml.metrics import class_probabilities

    outputs = model.predict(image_batches(model, frame, root, classes, batch_size), verbose=0)
    return class_probabilities(outputs, len(classes))


def embedding_model(model: keras.Model) -> keras.Model:
    """Raw images -> ``[outputs, embedding]``: the model's own outputs (as
    :func:`tasks.ml.metrics.class_probabilities` reads them) and the backbone's features
    average-pooled to one vector per image, the embedding drift is measured on.

    ``model`` is an end-to-end model of :func:`build_model`, or a wrapper around one
    (the served :func:`probability_model`, as the registry holds it).
    """
    inner = _end_to_end(model)
    if inner is None:
        raise StageError(
            f"model {model.name!r} has no 'backbone' layer, so it has no embeddings; "
            "score with a model this pipeline trained"
        )
    image = keras.Input(inner.input_shape[1:], name="image")
    features = inner.get_layer("backbone")(inner.get_layer("preprocess")(image), training=False)
    pooled = (
        features if len(features.shape) == 2 else keras.layers.GlobalAveragePooling2D()(features)
    )
    outputs = inner.get_layer("head")(features)
    return keras.Model(image, [outputs, pooled], name="embedding")


def _end_to_end(model: keras.Model) -> keras.Model | None:
    names = {layer.name for layer in model.layers}
    if {"preprocess", "backbone", "head"} <= names:
        return model
    nested = (layer for layer in model.layers if isinstance(layer, keras.Model))
    return next(filter(None, map(_end_to_end, nested)), None)
