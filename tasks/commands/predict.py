"""``predict``: batch prediction with a saved or registered model (a command, not a DVC stage).

``python -m tasks predict MODEL IMAGE_OR_FOLDER... [--out FILE] [--batch-size N] [--classes A,B]``

``MODEL`` is either

- a ``.keras`` file (e.g. ``models/cats_vs_dogs/finetuned.keras``): class names
  come from ``--classes``, else ``classes.json`` beside the model (a JSON list,
  or ``{"classes": [...]}``), else ``datasets.<ds>.classes`` of ``params.yaml``
  (``$TASKS_PARAMS``) when the model lies in a folder named after dataset
  ``<ds>``, else they are reported as ``class_0``, ``class_1``...;
- an MLflow model URI: ``models:/cats_vs_dogs-classifier@champion``,
  ``models:/NAME/3``, ``runs:/RUN_ID/model`` or a local MLflow model folder.
  Class names are the ``classes`` entry of the model's metadata (the register
  stage writes them). ``models:/`` and ``runs:/`` resolve against
  ``$MLFLOW_TRACKING_URI`` (and ``$MLFLOW_REGISTRY_URI``); when it is unset, the
  project's store named by ``params.yaml`` in the current folder
  (``tracking.uri``, else ``sqlite:///mlflow/mlflow.db``).

Folders are searched recursively for images. The CSV (to stdout, or written
atomically to ``--out``) has one row per file: ``path, status, predicted,
confidence, prob_<class>..., error``. A file that cannot be read gets
``status=error`` and the reason; the rest of the batch is still predicted.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.contract import PARAMS_ENV, ROOT_ENV
from tasks.errors import ConfigError, StageError
from tasks.ml.images import IMAGE_SUFFIXES, read_image

if TYPE_CHECKING:
    import pandas as pd

KERAS_SUFFIXES = {".keras", ".h5"}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named directly (whatever their suffix) plus images found under folders.

    A path that does not exist is kept, so it is reported as an error row.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise StageError(
                    f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under folder {path}"
                )
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise StageError("no input images given; pass image files or folders")
    return files


@dataclass(frozen=True)
class Classifier:
    """A loaded model: uint8 image batches in, one probability per class out."""

    predict_batch: Callable[[np.ndarray], np.ndarray]
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    source: str

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        from tasks.ml.metrics import class_probabilities

        return class_probabilities(self.predict_batch(images), len(self.classes))


def is_mlflow_uri(model: str) -> bool:
    """MLflow URIs and local MLflow model folders, as opposed to .keras files."""
    path = Path(model)
    if path.suffix.lower() in KERAS_SUFFIXES:
        return False
    if (path / "MLmodel").is_file():
        return True
    return bool(_URI.match(model))


def _keras_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    def predict(images: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(np.asarray(images, np.float32)))

    return predict


def _output_width(model) -> int:
    shape = model.output_shape
    return int(shape[-1]) if shape and shape[-1] else 1


def _classes_beside(path: Path) -> list[str] | None:
    sidecar = path.parent / "classes.json"
    if not sidecar.exists():
        return None
    try:
        payload = json.loads(sidecar.read_text())
    except ValueError:
        raise StageError(f"{sidecar} is not valid JSON; write a list of class names") from None
    names = payload.get("classes") if isinstance(payload, dict) else payload
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise StageError(f"{sidecar} must hold a list of class names, or {{'classes': [...]}}")
    return names


def _classes_from_params(path: Path) -> list[str] | None:
    """``datasets.<ds>.classes`` from params.yaml for a model under ``models/<ds>/``."""
    from tasks.config import load_config

    params = Path(os.environ.get(PARAMS_ENV, "params.yaml"))
    if not params.is_file():
        return None
    try:
        datasets = load_config(params).datasets
    except ConfigError:
        return None
    dataset = datasets.get(path.resolve().parent.name)
    return list(dataset.classes) if dataset else None


def _load_mlflow(uri: str) -> tuple[object, dict]:
    import mlflow

    from tasks.tracking.models import load_logged_model
    from tasks.tracking.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(None, os.environ.get(ROOT_ENV, ".")))
    return load_logged_model(uri)


def load_classifier(model: str, classes: Sequence[str] | None = None) -> Classifier:
    """Load ``model`` (a .keras path or an MLflow URI) with its class names."""
    from tasks.artifacts import load_model
    from tasks.ml.model import model_image_size

    if is_mlflow_uri(model):
        keras_model, metadata = _load_mlflow(model)
        names = list(classes or metadata.get("classes") or [])
    else:
        path = Path(model)
        if not path.is_file():
            raise StageError(
                f"model {model} not found; pass a .keras file or an MLflow URI such as "
                "models:/cats_vs_dogs-classifier@champion"
            )
        keras_model = load_model(path)
        names = list(classes or _classes_beside(path) or _classes_from_params(path) or [])
    width = _output_width(keras_model)
    if not names:
        count = 2 if width == 1 else width
        names = [f"class_{i}" for i in range(count)]
        print(
            f"note: no class names for {model}; reporting {', '.join(names)} "
            "(pass --classes, or put classes.json beside the model)",
            file=sys.stderr,
        )
    expected = 2 if width == 1 else width
    if len(names) != expected:
        raise StageError(
            f"{model} predicts {expected} classes but {len(names)} class names were given "
            f"({', '.join(names)})"
        )
    return Classifier(
        predict_batch=_keras_predictor(keras_model),
        classes=tuple(names),
        image_size=model_image_size(keras_model),
        source=model,
    )


def predict_files(
    classifier: Classifier, files: Sequence[Path], batch_size: int = 32
) -> pd.DataFrame:
    """One row per file: path, status (ok|error), predicted, confidence, prob_<class>..., error."""
    import pandas as pd

    if batch_size < 1:
        raise StageError(f"--batch-size must be at least 1 (got {batch_size})")
    classes = classifier.classes
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, readable = [], []
        for path in chunk:
            row = {"path": str(path), "status": "ok", "predicted": "", "confidence": np.nan}
            row.update({f"prob_{name}": np.nan for name in classes})
            row["error"] = ""
            try:
                images.append(read_image(path, classifier.image_size))
                readable.append(row)
            except FileNotFoundError:
                row.update(status="error", error="no such file")
            except Exception as error:  # noqa: BLE001 - any undecodable file is one error row
                row.update(status="error", error=f"{type(error).__name__}: {error}")
            rows.append(row)
        if images:
            probs = classifier.probabilities(np.stack(images))
            for row, p in zip(readable, probs, strict=True):
                row["predicted"] = classes[int(p.argmax())]
                row["confidence"] = round(float(p.max()), 6)
                for name, value in zip(classes, p, strict=True):
                    row[f"prob_{name}"] = round(float(value), 6)
    columns = ["path", "status", "predicted", "confidence"]
    columns += [f"prob_{name}" for name in classes] + ["error"]
    return pd.DataFrame(rows, columns=columns)


def run(
    model: str,
    inputs: list[str],
    out: str | None = None,
    batch_size: int = 32,
    classes: Sequence[str] | str | None = None,
) -> int | None:
    """The ``predict`` CLI: write the CSV to ``out`` (atomically) or stdout.

    A one-line summary goes to stderr. Returns None (unreadable files are rows
    in the CSV, not a failure of the command).
    """
    from tasks.io import write_text

    if batch_size < 1:
        raise StageError(f"--batch-size must be at least 1 (got {batch_size})")
    if isinstance(classes, str):
        classes = [name.strip() for name in classes.split(",") if name.strip()]
    files = collect_images(inputs)
    classifier = load_classifier(model, classes)
    table = predict_files(classifier, files, batch_size)
    text = table.to_csv(index=False)
    if out:
        write_text(out, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    failed = int((table["status"] != "ok").sum())
    where = out or "stdout"
    print(
        f"predicted {len(table) - failed} images with {model}"
        + (f"; {failed} unreadable (status=error)" if failed else "")
        + f" -> {where}",
        file=sys.stderr,
    )
    return None
