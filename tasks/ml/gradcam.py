"""Grad-CAM: where the backbone's features drove the predicted class.

Works on the end-to-end model ``tasks.ml.model`` builds (preprocessing layers,
then the ``backbone`` sub-model, then the ``head``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.errors import StageError
from tasks.ml.metrics import class_probabilities

if TYPE_CHECKING:
    import keras


def model_pieces(model: keras.Model) -> tuple[list[Any], Any, list[Any]]:
    """The layers before the ``backbone`` sub-model, the backbone, and the layers after it.

    A ``Sequential`` after the backbone (the ``head``) is opened into its layers.
    """
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in layers]
    if "backbone" not in names:
        raise StageError(
            f"the model has no layer named 'backbone' (layers: {names}); Grad-CAM needs "
            "the model built by tasks.model"
        )
    index = names.index("backbone")
    after: list[Any] = []
    for layer in layers[index + 1 :]:
        after.extend(layer.layers if isinstance(layer, keras.Sequential) else [layer])
    return layers[:index], layers[index], after


def _class_logits(layers: list[Any], features: Any) -> tuple[Any, str]:
    """Run the head on ``features``; return its pre-activation output and the activation.

    Grad-CAM differentiates the class score before the sigmoid/softmax, so a
    confident (saturated) prediction still has a gradient.
    """
    import keras

    y = features
    for layer in layers[:-1]:
        y = layer(y, training=False)
    last = layers[-1]
    activation = getattr(last, "activation", None)
    kind = getattr(activation, "__name__", "")
    if isinstance(last, keras.layers.Dense) and kind in ("sigmoid", "softmax"):
        z = keras.ops.matmul(y, last.kernel)
        if last.use_bias:
            z = z + last.bias
        return z, kind
    return last(y, training=False), "probabilities"


def gradcam(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Grad-CAM heatmaps (images, H, W) in [0, 1] for each image's predicted class.

    Runs the model in pieces (preprocessing → backbone → head) so the gradient
    of the predicted class's score (its logit where the head ends in a sigmoid
    or softmax Dense) can be taken with respect to the backbone's output feature
    map. Also returns the (images, classes) probabilities; heatmaps are None when
    the backbone's output is not a spatial map.
    """
    import tensorflow as tf

    before, backbone, after = model_pieces(model)
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    for layer in before:
        x = layer(x, training=False)
    with tf.GradientTape() as tape:
        features = backbone(x, training=False)
        tape.watch(features)
        z, kind = _class_logits(after, features)
        z = tf.cast(z, tf.float32)
        if kind == "sigmoid":
            outputs = tf.sigmoid(z)
        elif kind == "softmax":
            outputs = tf.nn.softmax(z, axis=-1)
        else:
            outputs = z
        if outputs.shape[-1] == 1:
            predicted = tf.cast(outputs[:, 0] >= 0.5, tf.int32)
            score = tf.where(
                predicted == 1, z[:, 0], -z[:, 0] if kind == "sigmoid" else 1 - z[:, 0]
            )
        else:
            predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
            score = tf.gather(z, predicted, batch_dims=1)
    probs = class_probabilities(outputs.numpy(), max(2, int(outputs.shape[-1])))
    if len(features.shape) != 4:
        return None, probs
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
    cam = tf.image.resize(cam[..., None], np.asarray(images).shape[1:3], method="bilinear")
    return np.clip(cam[..., 0].numpy(), 0.0, 1.0), probs


def feature_map_size(model: keras.Model) -> tuple[int, int] | None:
    """(height, width) of the backbone's output map, or None when it is not spatial."""
    shape = model_pieces(model)[1].output.shape
    return (int(shape[1]), int(shape[2])) if len(shape) == 4 and shape[1] and shape[2] else None
