"""``register``: log the candidate as an MLflow model and promote it only if it earns it.

The candidate (``models/<ds>/candidate.json``) is logged inside the ``register``
child run as an MLflow model (TensorFlow flavor) and registered as
``<prefix><ds>-classifier``. It takes the alias ``@champion`` only if, on
``register.metric``,

1. it reaches the absolute floor ``register.floor``, and
2. it is not worse than the current champion by more than ``register.tolerance``,
   the champion being **re-scored now on the same validation manifest** (a
   number stored when it was promoted may come from other data).

On promotion the old champion keeps ``@previous``. Otherwise the new version
gets ``@challenger`` and the tag ``gate.reason``. The decision, both scores and
the reason go to ``reports/<ds>/gate.json`` (DVC metrics), to the run and to the
version's tags.

The logged model takes uint8 RGB images (batch, H, W, 3) and returns one
probability per class, in the order of its metadata's ``classes``; it loads with
``mlflow.pyfunc.load_model`` (so ``mlflow models serve`` serves it) and with
``mlflow.tensorflow.load_model``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import labelled_rows, load_model, read_candidate
from tasks.config import Config
from tasks.errors import StageError
from tasks.io import file_md5, write_json
from tasks.paths import DatasetPaths
from tasks.tracking import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    current_experiment,
    registered_model_name,
)

if TYPE_CHECKING:
    import keras
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


ARTIFACT = "model"
_PINNED = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "pillow")
_SLACK = 1e-9


def pinned_requirements() -> list[str]:
    """The installed versions of what the model needs (skips MLflow's slow inference)."""
    pins = []
    for name in _PINNED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def gate_verdict(
    metric: str,
    candidate: float,
    champion: float | None,
    floor: float,
    tolerance: float,
    champion_version: str | None = None,
) -> tuple[bool, str]:
    """Whether the candidate becomes champion, and why (one line)."""
    if candidate + _SLACK < floor:
        return False, f"{metric} {candidate:.4f} is below the floor {floor:.4f}"
    if champion is None:
        return True, f"{metric} {candidate:.4f} reaches the floor {floor:.4f}; no champion yet"
    who = f"champion v{champion_version}" if champion_version else "the champion"
    if candidate + tolerance + _SLACK < champion:
        return False, (
            f"{metric} {candidate:.4f} is worse than {who}'s {champion:.4f} (re-scored on the "
            f"current validation data) by more than the tolerance {tolerance:.4f}"
        )
    return True, (
        f"{metric} {candidate:.4f} reaches the floor {floor:.4f} and is within {tolerance:.4f} "
        f"of (or better than) {who}'s {champion:.4f} on the current validation data"
    )


@dataclass(frozen=True)
class GateDecision:
    model_name: str
    version: str
    promoted: bool
    alias: str
    metric: str
    candidate_score: float
    champion_version: str | None
    champion_score: float | None
    floor: float
    tolerance: float
    reason: str
    run_id: str
    experiment: str | None = None
    """The DVC experiment that restores this version's data and model (scheduled runs)."""

    def __str__(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        lines = [
            f"register: {self.model_name} v{self.version} -> @{self.alias} ({verdict})",
            f"  candidate {self.metric}: {self.candidate_score:.4f}",
        ]
        if self.champion_version is None:
            lines.append("  champion: none yet")
        else:
            score = "n/a" if self.champion_score is None else f"{self.champion_score:.4f}"
            lines.append(
                f"  champion v{self.champion_version} {self.metric}: {score} "
                "(re-scored now on the same validation data)"
            )
            if self.promoted:
                lines.append(f"  v{self.champion_version} keeps @{PREVIOUS}")
        lines.append(f"  floor {self.floor:.4f}, tolerance {self.tolerance:.4f}")
        lines.append(f"  reason: {self.reason}")
        if self.experiment:
            lines.append(f"  DVC experiment: {self.experiment} (dvc exp apply restores it)")
        return "\n".join(lines)


def serving_model(model: keras.Model, n_classes: int) -> keras.Model:
    """``model`` with one probability per class as output (two-class sigmoids get [1-p, p])."""
    import keras

    inputs = keras.Input(model.input_shape[1:], name="image")
    p = model(inputs)
    if model.output_shape[-1] == 1 and n_classes == 2:
        complement = keras.layers.Rescaling(-1.0, offset=1.0, name="complement")(p)
        p = keras.layers.Concatenate(name="probabilities")([complement, p])
    # A list of one input: MLflow's pyfunc wrapper feeds a list, our own code an array.
    return keras.Model([inputs], p, name="classifier")


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
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from tasks.ml.model import model_image_size

    height, width = model_image_size(model)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)), "probabilities")]),
    )
    interactive = keras.utils.is_interactive_logging_enabled()
    keras.utils.disable_interactive_logging()  # no progress bar from MLflow's example check
    try:
        info = mlflow.tensorflow.log_model(
            serving_model(model, len(classes)),
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


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _score(
    model: keras.Model, frame: pd.DataFrame, paths: DatasetPaths, classes: list[str], batch: int
) -> dict[str, Any]:
    from tasks.ml.metrics import classification_metrics
    from tasks.ml.model import predict_rows

    probs = predict_rows(model, frame, paths.raw, classes, batch)
    return classification_metrics(frame["label_index"].to_numpy(), probs, classes)


def _rescore_champion(
    champion: ModelVersion,
    name: str,
    frame: pd.DataFrame,
    paths: DatasetPaths,
    classes: list[str],
    metric: str,
    batch: int,
) -> tuple[float | None, str]:
    """The champion's score on the current validation rows (None, note) if it cannot be compared."""
    from tasks.tracking import load_logged_model

    uri = f"models:/{name}/{champion.version}"
    try:
        model, stored = load_logged_model(uri)
    except StageError as error:
        raise StageError(
            f"cannot re-score the current champion: {error}; restore its artifacts or move "
            "the alias with `mlflow` before registering"
        ) from None
    if list(stored.get("classes", classes)) != list(classes):
        return None, (
            f"champion v{champion.version} predicts {stored.get('classes')}, not {classes}; "
            "it cannot be compared, so only the floor applies"
        )
    value = _score(model, frame, paths, classes, batch)[metric]
    return (None if value is None else float(value)), ""


def run(cfg: Config, paths: DatasetPaths) -> GateDecision:
    """Log and register the candidate; move ``@champion`` only if it passes the gate."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.ml.images import read_image
    from tasks.ml.model import model_image_size
    from tasks.tracking import phase_run

    # Score the candidate on the validation rows
    classes = list(cfg.dataset(paths.dataset).classes)
    gate = cfg.gate
    name = registered_model_name(cfg, paths.dataset)
    model_path, record = read_candidate(paths)
    frame = labelled_rows(paths, "validation", classes)
    model = load_model(model_path)
    batch = cfg.train.batch_size
    candidate_metrics = _score(model, frame, paths, classes, batch)
    candidate_score = candidate_metrics[gate.metric]
    if candidate_score is None:
        raise StageError(
            f"register.metric {gate.metric} is undefined on this validation data (one class "
            "only?); pick accuracy or f1_macro in params.yaml"
        )
    source = {
        "path": model_path.relative_to(paths.root).as_posix(),
        "md5": file_md5(model_path),
        "phase": str(record.get("phase")),
    }

    with phase_run(cfg, paths, "register", last=True) as run:
        # Re-score the champion on the same rows, log the candidate, decide
        client = MlflowClient()
        champion = current_champion(client, name)
        champion_score, note = None, ""
        if champion is not None:
            champion_score, note = _rescore_champion(
                champion, name, frame, paths, classes, gate.metric, batch
            )
        example = read_image(paths.raw / frame["path"].iloc[0], model_image_size(model))[None]
        version = log_classifier(
            model,
            classes,
            example,
            name,
            metadata={
                "dataset": paths.dataset,
                "source": source["path"],
                "source_md5": source["md5"],
            },
        )
        promoted, reason = gate_verdict(
            gate.metric,
            float(candidate_score),
            champion_score,
            gate.floor,
            gate.tolerance,
            champion.version if champion is not None else None,
        )
        decision = GateDecision(
            model_name=name,
            version=str(version.version),
            promoted=promoted,
            alias=CHAMPION if promoted else CHALLENGER,
            metric=gate.metric,
            candidate_score=float(candidate_score),
            champion_version=None if champion is None else str(champion.version),
            champion_score=champion_score,
            floor=gate.floor,
            tolerance=gate.tolerance,
            reason=f"{reason}; {note}" if note else reason,
            run_id=run.info.run_id,
            experiment=current_experiment(),
        )

        # Move the aliases and record the decision everywhere it is looked for
        _move_aliases(client, decision)
        _record_decision(client, decision, source, candidate_metrics)
        write_json(paths.gate, _gate_report(decision))
        mlflow.log_artifact(str(paths.gate))
    return decision


def _move_aliases(client: MlflowClient, decision: GateDecision) -> None:
    """Promoted: the old champion becomes ``@previous``; else the version is ``@challenger``."""
    name, version = decision.model_name, decision.version
    if decision.promoted:
        if decision.champion_version is not None:
            client.set_registered_model_alias(name, PREVIOUS, decision.champion_version)
        client.set_registered_model_alias(name, CHAMPION, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)


def _record_decision(
    client: MlflowClient,
    decision: GateDecision,
    source: dict[str, str],
    candidate_metrics: dict[str, Any],
) -> None:
    """The gate's tags on the model version and the run, its numbers as run metrics."""
    import mlflow

    from tasks.ml.metrics import flat_metrics

    champion_score = decision.champion_score
    tags = {
        "gate.decision": "promoted" if decision.promoted else "rejected",
        "gate.metric": decision.metric,
        "gate.candidate_score": f"{decision.candidate_score:.6f}",
        "gate.champion_version": decision.champion_version or "",
        "gate.champion_score": "" if champion_score is None else f"{champion_score:.6f}",
        "gate.floor": str(decision.floor),
        "gate.tolerance": str(decision.tolerance),
        "gate.reason": decision.reason,
        **{f"source.{key}": value for key, value in source.items()},
    }
    if decision.experiment:
        tags["dvc.exp_name"] = decision.experiment
    for key, value in tags.items():
        client.set_model_version_tag(decision.model_name, decision.version, key, value)
    mlflow.set_tags({**tags, "registered.version": decision.version})
    scores = {f"candidate.{k}": v for k, v in flat_metrics(candidate_metrics).items()}
    scores["gate.candidate_score"] = decision.candidate_score
    if champion_score is not None:
        scores["gate.champion_score"] = champion_score
    scores["gate.promoted"] = float(decision.promoted)
    mlflow.log_metrics(scores)


def _gate_report(decision: GateDecision) -> dict[str, Any]:
    report = asdict(decision)
    report["promoted"] = int(decision.promoted)
    report.pop("run_id")
    return report
