"""Models in MLflow: logging them, registering them, loading them back.

The evaluated model is logged as an *external* model of the pipeline execution
(DVC versions the file; :func:`log_evaluated_model`); the ``register`` stage
logs the candidate as an MLflow model (TensorFlow flavor) and registers it
(:func:`log_classifier`); :func:`load_logged_model` loads any of them back.

The logged model takes uint8 RGB images (batch, H, W, 3) and returns one
probability per class, in the order of its metadata's ``classes``; it loads with
``mlflow.pyfunc.load_model`` (so ``mlflow models serve`` serves it) and with
``mlflow.tensorflow.load_model``.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import Config
from tasks.errors import StageError
from tasks.io import file_md5
from tasks.paths import DatasetPaths
from tasks.tracking.lineage import dvc_cache_path, flat_params, manifest_dataset, quiet_datasets
from tasks.tracking.runs import PARENT_RUN_TAG

if TYPE_CHECKING:
    import keras
    import numpy as np
    from mlflow.entities.model_registry import ModelVersion

ARTIFACT = "model"
_PINNED = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "pillow")


def pinned_requirements() -> list[str]:
    """The installed versions of what the model needs (skips MLflow's slow inference)."""
    pins = []
    for name in _PINNED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def log_classifier(
    model: keras.Model,
    classes: list[str],
    example: np.ndarray,
    name: str,
    metadata: dict[str, Any] | None = None,
) -> ModelVersion:
    """Log ``model`` in the active run and register it as ``name``.

    Logged with a signature (uint8 images in, class probabilities out), an input
    example, pinned requirements and ``classes`` in its metadata.
    """
    import keras
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from tasks.ml.model import model_image_size, probability_model

    height, width = model_image_size(model)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)), "probabilities")]),
    )
    interactive = keras.utils.is_interactive_logging_enabled()
    keras.utils.disable_interactive_logging()  # no progress bar from MLflow's example check
    try:
        info = mlflow.tensorflow.log_model(
            probability_model(model, len(classes), list_input=True),
            name=ARTIFACT,
            signature=signature,
            input_example=np.asarray(example, np.uint8)[:1],
            pip_requirements=pinned_requirements(),
            metadata={"classes": list(classes), "image_size": [height, width], **(metadata or {})},
            registered_model_name=name,
        )
    finally:
        if interactive:
            keras.utils.enable_interactive_logging()
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, str(info.registered_model_version))


def log_evaluated_model(
    cfg: Config,
    paths: DatasetPaths,
    model_path: Path,
    test_metrics: dict[str, float],
    phase: str | None,
) -> str:
    """Record the evaluated model as an MLflow logged model of the pipeline execution.

    The file itself is versioned by DVC, so the logged model is *external*: its
    tags say where DVC keeps it (path, md5); its test metrics are linked to it
    and to the manifest dataset (logged by the active evaluate run). Its source
    run is the pipeline's parent run, the row of the runs table (MLflow 3.17's
    Models column lists the models whose source run is the row), and it is an
    output of both runs, so the model page shows its lineage. Returns the model id.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput

    active = mlflow.active_run()
    client = mlflow.MlflowClient()
    parent = client.get_run(active.info.run_id).data.tags.get(PARENT_RUN_TAG)
    md5 = file_md5(model_path)
    model = mlflow.create_external_model(
        name=f"{paths.dataset}-{cfg.train.backbone_name}",
        source_run_id=parent or active.info.run_id,
        model_type="keras",
        params={key: str(value) for key, value in flat_params(cfg, paths.dataset).items()},
        tags={
            "dvc.path": model_path.relative_to(paths.root).as_posix(),
            "dvc.md5": md5,
            "dvc.cache": str(dvc_cache_path(paths.root, md5) or ""),
            "model.phase": str(phase),
            "backbone": cfg.train.backbone,
            "dataset": paths.dataset,
        },
    )
    with quiet_datasets():
        dataset = manifest_dataset(cfg, paths)
        mlflow.log_metrics(test_metrics, model_id=model.model_id, dataset=dataset)
    for run_id in dict.fromkeys([active.info.run_id, parent or active.info.run_id]):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id


def load_logged_model(uri: str) -> tuple[keras.Model, dict[str, Any]]:
    """Download and load the Keras model logged at ``uri`` (``models:/``, ``runs:/``, a folder).

    Returns the model and its MLmodel ``metadata`` (``classes``, ``image_size``...).
    A model that cannot be fetched or loaded is a StageError naming the store.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    import tasks.ml.model  # noqa: F401 - registers the custom layers the model may use

    # a folder of ours: without one MLflow downloads into a temp folder it never removes
    try:
        with tempfile.TemporaryDirectory(prefix="tasks-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            metadata = Model.load(str(local / "MLmodel")).metadata or {}
            model = mlflow.tensorflow.load_model(str(local))
    except (MlflowException, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageError(
            f"cannot load MLflow model {uri}: {first} (tracking store: "
            f"{mlflow.get_tracking_uri()}; set MLFLOW_TRACKING_URI to the right one)"
        ) from None
    return model, dict(metadata)
