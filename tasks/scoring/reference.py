"""Each registered version's drift reference: made at register, read by ``score``.

The reference (:class:`tasks.ml.drift.Reference`) is the embeddings of a seeded
sample of ``scoring.reference_size`` training images, the training split's
class prior and the version's confidences on the held-out test split. It is
logged as ``drift_reference/reference.npz`` in the run that registered the
version, so ``models:/<name>/<version>`` and its reference always travel
together (``run_id`` of the version).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.artifacts import image_root, labelled_rows
from tasks.config import Config
from tasks.errors import StageError
from tasks.ml.drift import Reference, make_reference, sample_rows
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import pandas as pd

FOLDER = "drift_reference"
FILE = "reference.npz"


def embed_rows(
    model: keras.Model, frame: pd.DataFrame, root: Path, classes: Sequence[str], batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, embeddings) of ``frame``'s images (one split), decoded as in training
    (``tf.data``: parallel reads and decoding ahead of the model)."""
    from tasks.ml.metrics import class_probabilities
    from tasks.ml.model import embedding_model, image_batches

    net = embedding_model(model)
    outputs, embeddings = net.predict(
        image_batches(model, frame, root, classes, batch).prefetch(2), verbose=0
    )
    return class_probabilities(outputs, len(classes)), np.asarray(embeddings, np.float32)


def build_reference(
    cfg: Config, paths: DatasetPaths, model: keras.Model, test_probabilities: np.ndarray
) -> Reference:
    """The version's reference: its training sample's embeddings and its test statistics."""
    classes = list(cfg.dataset(paths.dataset).classes)
    train = labelled_rows(paths, "train", classes)
    rows = sample_rows(len(train), cfg.scoring.reference_size, cfg.scoring.drift.seed)
    sample = train.iloc[rows].reset_index(drop=True)
    _, embeddings = embed_rows(
        model, sample, image_root(paths, sample), classes, cfg.train.batch_size
    )
    return make_reference(embeddings, train["label_index"].to_numpy(), test_probabilities, classes)


def log_reference(reference: Reference) -> None:
    """Log the reference in the active MLflow run (the one registering the version)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="tasks-reference-") as tmp:
        file = Path(tmp) / FILE
        np.savez_compressed(file, **reference.arrays())
        mlflow.log_artifact(str(file), FOLDER)


def load_reference(run_id: str, version: str, name: str) -> Reference:
    """The reference logged with version ``version`` of ``name`` (by run ``run_id``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # a folder of ours: without one MLflow downloads into a temp folder it never removes
    with tempfile.TemporaryDirectory(prefix="tasks-reference-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{FOLDER}/{FILE}", dst_path=tmp
            )
        except (MlflowException, OSError):
            raise StageError(
                f"{name} v{version} has no drift reference ({FOLDER}/{FILE} in run {run_id}): "
                "it was registered before scoring existed; register a new version (run the "
                "pipeline) to score drops with drift tests"
            ) from None
        with np.load(local) as arrays:
            return Reference.from_arrays(arrays)
