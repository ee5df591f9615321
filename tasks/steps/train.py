"""``train``: phase 1 of the recipe, the head on a frozen backbone.

The backbone is frozen and called with ``training=False``; only the head
trains (``train.optimizer`` at ``train.learning_rate``), with early stopping on
validation loss and the best weights restored. With ``train.feature_cache``
``auto`` (or ``on``) and ``train.augment`` false, the backbone's features of
the training and validation images are computed once and the ``head`` is
fitted on them (``tasks.ml.training.use_feature_cache``): the saved model is
still the same end-to-end model, and with the same seed the head learns what
end-to-end training would. ``off`` always trains end to end, the tutorial way.

Writes ``models/<ds>/frozen.keras`` and the phase's history
(``reports/<ds>/history/train.csv`` and ``train.png``), and logs the ``train``
child run (params with the same names for every backbone, metrics per epoch,
the weights' sha256 and the model's md5) under a new pipeline parent run.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tasks.artifacts import history_frame, read_manifest, relative, save_model, write_history
from tasks.config import Config, TrainConfig
from tasks.io import file_md5
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras

    from tasks.ml.devices import DevicePolicy
    from tasks.ml.training import TrainResult


def run(cfg: Config, paths: DatasetPaths) -> TrainResult:
    """Phase 1: train the head on the frozen backbone; write ``frozen.keras``."""
    import keras
    import mlflow

    from tasks.ml.backbones import backbone_entry, resolve_weights
    from tasks.ml.devices import device_policy, strategy
    from tasks.ml.model import ModelSpec, build_model, parameter_counts, with_precision
    from tasks.ml.pipeline import count_rows, phase_datasets
    from tasks.ml.training import PhaseCheckpoint, TrainResult, feature_bytes, use_feature_cache
    from tasks.tracking.callback import EpochLogger
    from tasks.tracking.runs import log_headline, log_resume, phase_run

    # Build the model on the frozen backbone, under the device policy
    started = time.perf_counter()
    train = cfg.train
    classes = cfg.dataset(paths.dataset).classes
    manifest = read_manifest(paths)
    entry = backbone_entry(train, paths.root)
    size = entry.resolve_size(train.image_size)
    weights = resolve_weights(train.weights, entry, size, paths.root)
    policy = device_policy(train.precision, train.jit_compile, train.distribute)
    devices = strategy(policy)
    keras.utils.set_random_seed(train.seed)
    head = entry.head_spec(train.head)
    with devices.scope():
        model = build_model(ModelSpec(entry, size, head, len(classes)), weights)
    counts = parameter_counts(model)
    images = count_rows(manifest, "train") + count_rows(manifest, "validation")
    cached = use_feature_cache(train, feature_bytes(model, images))
    augment = cfg.augmentation if train.augment and not cached else None
    batch = policy.global_batch(train.batch_size)
    train_images, val_images = phase_datasets(
        manifest, paths.raw, classes, size, train, shuffle=not cached, augment=augment,
        batch_size=batch,
    )  # fmt: skip
    checkpoint = PhaseCheckpoint(
        paths.checkpoint("train"),
        {
            "phase": "train",
            "train": train.model_dump(),
            "augmentation": cfg.augmentation.model_dump(),
            "manifest": file_md5(paths.manifest),
            "weights": weights.sha256,
            "policy": policy.params(),
        },
    )
    params = {
        "backbone": train.backbone,
        "image_size": size,
        "weights_source": weights.description,
        "head": head.describe(pooled=len(model.get_layer("backbone").output.shape) > 2),
        "epochs": train.epochs,
        "optimizer": train.optimizer,
        "learning_rate": train.learning_rate,
        "batch_size": train.batch_size,
        "augment": bool(augment),
        "feature_cache": cached,
        "unfreeze_from": "none (frozen base)",
        "train_images": count_rows(manifest, "train"),
        "validation_images": count_rows(manifest, "validation"),
        "global_batch_size": batch,
        "scaled_learning_rate": policy.learning_rate(train.learning_rate),
        **policy.params(),
        **counts,
    }

    with phase_run(cfg, paths, "train", new_parent=True) as run:
        # Fit (resuming a killed attempt), save, record
        mlflow.log_params(params)
        mlflow.set_tags(
            {"weights.sha256": weights.sha256, "weights.description": weights.description}
        )
        log_resume(checkpoint, "phase 1", train.epochs)
        logger = EpochLogger(
            "train", offset=0, images=count_rows(manifest, "train"), restored=checkpoint.finished
        )
        callbacks = [*checkpoint.callbacks(train.early_stopping_patience), logger]
        with devices.scope():
            _fit_head(
                model, train, len(classes), train_images, val_images, cached, callbacks, policy
            )
        save_model(with_precision(model, "float32"), paths.frozen_model)
        checkpoint.remove()
        best = _record_phase(model, paths, logger.rows, cached)
        headline = {
            "frozen.val_accuracy": best["val_accuracy"],
            "train.seconds": time.perf_counter() - started,
        }
        if logger.images_per_second():
            headline["train.images_per_second"] = logger.images_per_second()
        log_headline(headline, {"image_size": size, "precision": policy.precision})
    return TrainResult(
        phase="train",
        dataset=paths.dataset,
        model=paths.frozen_model,
        backbone=train.backbone,
        image_size=size,
        epochs_run=len(logger.rows),
        best_epoch=int(best["epoch"]),
        val_loss=float(best["val_loss"]),
        val_accuracy=float(best["val_accuracy"]),
        trainable_params=counts["trainable_params"],
        total_params=counts["total_params"],
        seconds=time.perf_counter() - started,
        run_id=run.info.run_id,
        feature_cache=cached,
    )


def _fit_head(
    model: keras.Model,
    train: TrainConfig,
    n_classes: int,
    train_images: Any,
    val_images: Any,
    cached: bool,
    callbacks: list[Any],
    policy: DevicePolicy,
) -> None:
    """Train the head: on cached features (the backbone runs once), or end to end."""
    from tasks.ml.model import compile_model, feature_extractor
    from tasks.ml.training import fit_on_activations

    rate = policy.learning_rate(train.learning_rate)
    if not cached:
        compile_model(model, train.optimizer, rate, n_classes, policy.jit_compile, train.momentum)
        model.fit(
            train_images,
            validation_data=val_images,
            epochs=train.epochs,
            callbacks=callbacks,
            verbose=0,
            shuffle=False,
        )
        return
    fit_on_activations(
        feature_extractor(model),
        model.get_layer("head"),
        train_images,
        val_images,
        optimizer=train.optimizer,
        momentum=train.momentum,
        learning_rate=rate,
        jit_compile=policy.jit_compile,
        batch_size=policy.global_batch(train.batch_size),
        seed=train.seed,
        epochs=train.epochs,
        callbacks=callbacks,
    )
    compile_model(model, train.optimizer, rate, n_classes, policy.jit_compile, train.momentum)


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
