"""Serving formats: what each needs, the model they are written from, and the parity check.

A classifier is exported in the form the registry serves
(:func:`tasks.ml.model.probability_model`):
one input ``image``, float32 0-255 RGB ``(batch, H, W, 3)``, and one probability per
class as output (a two-class sigmoid becomes ``[1 - p, p]``). Each format is read
back with its own runtime (:func:`runtime`) and must give the Keras model's
probabilities on the same images to within :data:`TOLERANCE` (:class:`Parity`).

Writing the files (``keras.Model.export``) and where they go is the ``export``
step's business; this module knows no file layout and no MLflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import StageError

if TYPE_CHECKING:
    import numpy as np

TOLERANCE = 1e-4
"""The largest absolute difference in any probability an exported model may show."""


@dataclass(frozen=True)
class ExportFormat:
    name: str
    """What ``--format`` calls it."""
    keras_format: str
    """``keras.Model.export(format=...)``."""
    artifact: str
    """The file written inside the format's folder; empty: the folder itself (SavedModel)."""
    packages: tuple[tuple[str, str], ...]
    """(module, distribution) pairs the converter and the runtime need."""
    runtime: str
    """What reads it back, as a person names it."""


FORMATS: dict[str, ExportFormat] = {
    "saved_model": ExportFormat(
        "saved_model",
        "tf_saved_model",
        "",
        (("tensorflow", "tensorflow"),),
        "tf.saved_model.load, serving_default signature",
    ),
    "litert": ExportFormat(
        "litert",
        "litert",
        "model.tflite",
        (("tensorflow", "tensorflow"),),
        "LiteRT interpreter",
    ),
    "onnx": ExportFormat(
        "onnx",
        "onnx",
        "model.onnx",
        (("tf2onnx", "tf2onnx"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
        "onnxruntime, CPU",
    ),
}
"""Every format ``export`` writes, by name."""


def export_format(name: str) -> ExportFormat:
    try:
        return FORMATS[name]
    except KeyError:
        allowed = ", ".join(FORMATS)
        raise StageError(f"unknown export format {name!r}; use one of: {allowed}") from None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_packages(fmt: ExportFormat) -> list[str]:
    """The distributions ``fmt`` needs that cannot be imported here (empty: all there)."""
    missing = [dist for module, dist in fmt.packages if not _importable(module)]
    if fmt.name == "litert" and not missing and _litert_interpreter() is None:
        missing.append("ai-edge-litert")
    return missing


def _litert_interpreter() -> Any:
    """LiteRT's interpreter class: ``ai_edge_litert``'s, else TensorFlow's (deprecated)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter
    except (ImportError, AttributeError):
        return None


Predict = Callable[["np.ndarray"], "np.ndarray"]


def runtime(fmt: ExportFormat, artifact: Path) -> Predict:
    """A function that runs the exported ``artifact`` with ``fmt``'s own runtime:
    float32 image batches in, probabilities out (a NumPy array)."""
    loaders = {"saved_model": _saved_model, "litert": _litert, "onnx": _onnx}
    return loaders[fmt.name](Path(artifact))


def _saved_model(folder: Path) -> Predict:
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder))
    (name,) = loaded.signatures["serving_default"].structured_input_signature[1]

    def predict(images: np.ndarray) -> np.ndarray:
        # through ``loaded`` each time: a signature alone does not keep its variables alive
        outputs = loaded.signatures["serving_default"](**{name: tf.constant(images, tf.float32)})
        (probabilities,) = outputs.values()
        return np.asarray(probabilities)

    return predict


def _litert(file: Path) -> Predict:
    import warnings

    import numpy as np

    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
        warnings.simplefilter("ignore")
        interpreter = _litert_interpreter()(model_path=str(file))
    (source,) = interpreter.get_input_details()
    (target,) = interpreter.get_output_details()
    shape: list[tuple[int, ...]] = [()]

    def predict(images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images, np.float32)
        if shape[0] != batch.shape:
            interpreter.resize_tensor_input(source["index"], batch.shape)
            interpreter.allocate_tensors()
            shape[0] = batch.shape
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(target["index"]))

    return predict


def _onnx(file: Path) -> Predict:
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    (source,) = session.get_inputs()

    def predict(images: np.ndarray) -> np.ndarray:
        (probabilities,) = session.run(None, {source.name: np.asarray(images, np.float32)})
        return np.asarray(probabilities)

    return predict


def max_abs_diff(reference: np.ndarray, other: np.ndarray) -> float:
    """The largest absolute difference of two probability arrays of one shape.

    Infinite when the shapes differ or either holds a NaN or an infinity.
    """
    import numpy as np

    a = np.asarray(reference, np.float64)
    b = np.asarray(other, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")


@dataclass
class Parity:
    """The running comparison of an exported model with the Keras model, batch by batch."""

    max_abs_diff: float = 0.0
    images: int = 0

    def add(self, reference: np.ndarray, exported: np.ndarray) -> float:
        """Compare one batch; returns its difference."""
        diff = max_abs_diff(reference, exported)
        self.max_abs_diff = max(self.max_abs_diff, diff)
        self.images += len(reference)
        return diff

    @property
    def holds(self) -> bool:
        return self.images > 0 and self.max_abs_diff <= TOLERANCE
