"""``train``: phase 1 of the recipe, the head on a frozen backbone.

The backbone is frozen and called with ``training=False``; only the head
trains (``train.optimizer`` at ``train.learning_rate``), with early stopping on
validation loss and the best weights restored. With ``train.feature_cache``
``auto`` (or ``on``) and ``train.augment`` false, the backbone's features of
the training and validation images are computed once and the ``head`` is
fitted on them (``tasks.ml.training.use_feature_cache``): the saved model is
still the same end-to-end model, and with the same seed the head learns what
end-to-end training would. ``off`` always trains end to end, the tutorial way.
When phase 2 will train on cached activations too, the images pass the layers
below its boundary and then the rest of the backbone, and the activations at
the boundary are kept for it (``.checkpoints/<ds>/arrays/``), so the lower
backbone runs once for both phases. The caches are held in RAM within
``train.cache_budget_mb`` and read from disk beyond it.

Writes ``models/<ds>/frozen.keras`` and the phase's history
(``reports/<ds>/history/train.csv`` and ``train.png``), and logs the ``train``
child run (params with the same names for every backbone, metrics per epoch,
the weights' sha256 and the model's md5) under a new pipeline parent run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.artifacts import history_frame, relative, write_history
from tasks.config import Config
from tasks.io import file_md5
from tasks.paths import DatasetPaths
from tasks.phase import Phase

if TYPE_CHECKING:
    import keras

    from tasks.ml.training import TrainResult, WorkerResult


def run(cfg: Config, paths: DatasetPaths) -> TrainResult | WorkerResult:
    """Phase 1: train the head on the frozen backbone; write ``frozen.keras``."""
    from tasks.ml.backbone_file import backbone_entry
    from tasks.ml.backbones import resolve_weights
    from tasks.ml.model import ModelSpec, build_model

    # Build the model on the frozen backbone, under the device policy
    phase = Phase.start("train", cfg, paths)
    train = cfg.train
    entry = backbone_entry(train, paths.root)
    size = entry.resolve_size(train.image_size)
    weights = resolve_weights(train.weights, entry, size, paths.root)
    head = entry.head_spec(train.head)
    with phase.devices.scope():
        model = build_model(ModelSpec(entry, size, head, len(phase.classes)), weights)
    phase.compile(model)

    # The head trains on the backbone's features computed once, unless augmenting; on the
    # way, the activations at phase 2's boundary are kept for it
    cached = phase.use_cache(model)
    if cached:
        data = phase.feature_data(model, _boundary_for_phase2(phase, model))
    else:
        data = phase.datasets(size)
    checkpoint = phase.checkpoint(weights=weights.sha256)
    pooled = len(model.get_layer("backbone").output.shape) > 2
    params = phase.params(
        model, size, cached,
        backbone=train.backbone, weights_source=weights.description,
        head=head.describe(pooled=pooled), unfreeze_from="none (frozen base)",
    )  # fmt: skip
    tags = {"weights.sha256": weights.sha256, "weights.description": weights.description}

    # Fit (resuming a killed attempt), save, record
    with phase.tracked(params, tags, checkpoint, new_parent=True) as (run, logger, callbacks):
        phase.fit(model, data, callbacks, model.get_layer("head") if cached else None)
        if not phase.save(model, paths.frozen_model, checkpoint):  # not the chief
            return phase.followed()
        best = _record_phase(model, paths, logger.rows, cached)
        phase.headline(
            best["val_accuracy"],
            logger,
            params={"image_size": size, "precision": phase.policy.precision},
        )
    return phase.result(
        model, run,
        model=paths.frozen_model, backbone=train.backbone, image_size=size,
        epochs_run=len(logger.rows), best_epoch=int(best["epoch"]),
        val_loss=float(best["val_loss"]), val_accuracy=float(best["val_accuracy"]),
        feature_cache=cached,
    )  # fmt: skip


def _boundary_for_phase2(phase: Phase, model: keras.Model) -> str | None:
    """Phase 2's boundary when it will train on cached activations there (else None)."""
    tune = phase.cfg.finetune
    if tune.epochs == 0 or tune.augment or tune.feature_cache == "off":
        return None
    return phase.boundary(model)


def _record_phase(
    model: keras.Model, paths: DatasetPaths, rows: list[dict[str, Any]], cached: bool
) -> dict[str, Any]:
    """Write the phase's history and figure; log the best epoch and the model's lineage."""
    import mlflow

    from tasks.ml.model import parameter_counts
    from tasks.ml.training import best_epoch

    csv = paths.phase_history("train")
    png = csv.with_suffix(".png")
    write_history(history_frame(rows), csv, png)
    best = best_epoch(rows)
    mlflow.log_metrics(
        {
            "best_val_loss": best["val_loss"],
            "best_val_accuracy": best["val_accuracy"],
            "best_epoch": best["epoch"],
            "head_params": parameter_counts(model.get_layer("head"))["total_params"],
        }
    )
    mlflow.set_tags(
        {
            "model.path": relative(paths, paths.frozen_model),
            "model.md5": file_md5(paths.frozen_model),
            "feature_cache": str(cached).lower(),
        }
    )
    mlflow.log_artifact(str(csv), artifact_path="history")
    mlflow.log_artifact(str(png), artifact_path="history")
    return best
