"""What ``register`` keeps with each new model version so it can be scored and explained
later: its drift reference (:mod:`.reference`) and its model card's facts
(:mod:`tasks.tracking.card`)."""

from __future__ import annotations

import json
import platform
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import image_root, read_manifest
from tasks.config import Config
from tasks.io import file_md5
from tasks.paths import DatasetPaths
from tasks.scoring.reference import build_reference, log_reference

if TYPE_CHECKING:
    import keras
    import pandas as pd

THROUGHPUT_IMAGES = 64


def describe_version(
    cfg: Config,
    paths: DatasetPaths,
    model: keras.Model,
    test: pd.DataFrame,
    probabilities: np.ndarray,
    gate: dict[str, Any],
) -> str:
    """Log the version's drift reference in the active run and publish its model card.

    ``test``/``probabilities``: the held-out test rows and the version's scores on them;
    ``gate``: the gate's report (``gate.json``). Returns the card's markdown.
    """
    import mlflow
    from mlflow import MlflowClient

    from tasks.ml.metrics import classification_metrics, metric_intervals
    from tasks.tracking.card import publish_card

    reference = build_reference(cfg, paths, model, probabilities)
    log_reference(reference)
    classes = list(cfg.dataset(paths.dataset).classes)
    labels = test["label_index"].to_numpy()
    metrics = classification_metrics(labels, probabilities, classes)
    facts = {
        "dataset": paths.dataset,
        "classes": classes,
        "experiment_id": mlflow.active_run().info.experiment_id,
        "data": data_facts(paths),
        "recipe": recipe_facts(cfg),
        "test": {
            "images": len(test),
            **{k: metrics.get(k) for k in ("accuracy", "f1_macro", "roc_auc", "ece", "log_loss")},
            "intervals": metric_intervals(labels, probabilities),
        },
        "gate": {k: gate.get(k) for k in GATE_KEYS},
        "reference": reference.summary(),
        "drift_settings": cfg.scoring.drift.model_dump(),
        "throughput": cpu_throughput(model, test, paths, classes),
    }
    return publish_card(MlflowClient(), gate["model_name"], str(gate["version"]), facts)


GATE_KEYS = ("status", "verdict", "metric", "candidate_score", "champion_version", "reason")


def data_facts(paths: DatasetPaths) -> dict[str, Any]:
    """Manifest md5, usable images per split and class, validation verdict, fed-back drops."""
    manifest = read_manifest(paths)
    usable = manifest[manifest["status"] == "ok"]
    counts = {
        str(split): {str(k): int(v) for k, v in rows["label"].value_counts().sort_index().items()}
        for split, rows in usable.groupby("split", sort=True)
    }
    facts: dict[str, Any] = {"manifest_md5": file_md5(paths.manifest), "counts": counts}
    if paths.validation_summary.is_file():
        summary = json.loads(paths.validation_summary.read_text())
        checks = summary.get("expectations") or {}
        passed = sum(1 for check in checks.values() if check.get("success"))
        facts["validation"] = (
            f"{'passed' if summary.get('passed') else 'FAILED'}, {passed} of {len(checks)} "
            f"expectations met, {summary.get('quarantined', 0)} file(s) quarantined"
        )
    if "source" in manifest.columns:
        drops = sorted({str(s) for s in manifest["source"].dropna() if str(s)})
        facts["feedback_drops"] = drops
    return facts


def recipe_facts(cfg: Config) -> dict[str, Any]:
    train, finetune = cfg.train, cfg.finetune
    return {
        "recipe": cfg.recipe,
        "backbone": train.backbone,
        "weights": train.weights,
        "image_size": train.image_size,
        "batch_size": train.batch_size,
        "head epochs": train.epochs,
        "head learning_rate": train.learning_rate,
        "fine-tune from": finetune.unfreeze_from,
        "fine-tune epochs": finetune.epochs,
        "fine-tune learning_rate": finetune.learning_rate,
        "seed": train.seed,
    }


def cpu_throughput(
    model: keras.Model, test: pd.DataFrame, paths: DatasetPaths, classes: list[str]
) -> dict[str, Any]:
    """Images/s of the model on this machine's CPU, on up to 64 test images (batch 32),
    decoded beforehand: the model alone, after one warm-up batch."""
    import tensorflow as tf

    from tasks.ml.model import image_batches

    rows = test.head(THROUGHPUT_IMAGES)
    batch = 32
    batches = image_batches(model, rows, image_root(paths, rows), classes, batch)
    images = np.concatenate(list(batches))
    with tf.device("/CPU:0"):
        model.predict_on_batch(images[:batch])
        start = time.perf_counter()
        for first in range(0, len(images), batch):
            model.predict_on_batch(images[first : first + batch])
        seconds = time.perf_counter() - start
    return {
        "images_per_second": round(len(images) / max(seconds, 1e-9), 1),
        "images": int(len(images)),
        "batch": batch,
        "cpu": platform.processor() or platform.machine(),
    }
