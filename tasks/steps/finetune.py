"""``finetune``: phase 2 of the recipe, the top blocks at a low learning rate.

Loads ``frozen.keras``, unfreezes the backbone's named top blocks
(``finetune.unfreeze_from`` or the registry's boundary; every
BatchNormalization layer stays frozen and in inference mode), recompiles at a
low rate. Without augmentation (``finetune.augment: false``, the default) the
frozen layers below the boundary run once and the top blocks train on their
cached activations (``finetune.feature_cache``); with it, on augmented images.

Writes ``models/<ds>/finetuned.keras``, the history of both phases
(``reports/<ds>/history.csv``, epochs numbered globally, and
``reports/<ds>/history/curves.png``) and ``models/<ds>/candidate.json``: the
better of the two models on validation loss, with both scores and the reason.
When fine-tuning does not help, it says so and the frozen model is the candidate.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from tasks.artifacts import (
    history_frame,
    load_model,
    read_manifest,
    read_phase_history,
    relative,
    save_model,
    write_history,
)
from tasks.config import Config
from tasks.errors import StageError
from tasks.io import file_md5, write_json
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras

    from tasks.ml.training import TrainResult

log = logging.getLogger(__name__)


def run(cfg: Config, paths: DatasetPaths) -> TrainResult:
    """Phase 2: unfreeze the top blocks, train at a low rate; write the candidate record."""
    import keras
    import mlflow

    from tasks.ml.backbones import default_boundary, unfreeze_top_blocks
    from tasks.ml.devices import device_policy, strategy
    from tasks.ml.model import (
        backbone_name,
        compile_model,
        parameter_counts,
        split_at,
        with_precision,
    )
    from tasks.ml.pipeline import count_rows, phase_datasets
    from tasks.ml.training import (
        PhaseCheckpoint,
        TrainResult,
        best_epoch,
        feature_bytes,
        fit_on_activations,
        use_feature_cache,
        validation_scores,
    )
    from tasks.tracking.callback import EpochLogger
    from tasks.tracking.runs import log_headline, log_resume, phase_run

    # Load the frozen-base model under the device policy; score it before anything changes
    started = time.perf_counter()
    tune = cfg.finetune
    classes = cfg.dataset(paths.dataset).classes
    manifest = read_manifest(paths)
    policy = device_policy(cfg.train.precision, cfg.train.jit_compile, cfg.train.distribute)
    devices = strategy(policy)
    keras.utils.set_random_seed(cfg.train.seed)
    with devices.scope():
        model = with_precision(_frozen_model(paths, len(classes)), policy.precision)
    backbone = backbone_name(model, default=cfg.train.backbone)
    size = int(model.input_shape[1])
    boundary = tune.unfreeze_from or default_boundary(backbone, cfg.train)
    augment = cfg.augmentation if tune.augment else None
    weights_description, weights_sha = _weights_record(cfg, backbone, size, paths)
    batch = policy.global_batch(cfg.train.batch_size)
    rate = policy.learning_rate(tune.learning_rate)
    with devices.scope():
        split = split_at(model, boundary)
    images = count_rows(manifest, "train") + count_rows(manifest, "validation")
    cached = split is not None and use_feature_cache(
        tune, feature_bytes(split[0], images, layer=None), "finetune"
    )
    train_images, val_images = phase_datasets(
        manifest, paths.raw, classes, size, cfg.train, shuffle=not cached, augment=augment,
        batch_size=batch,
    )  # fmt: skip
    with devices.scope():
        compile_model(model, tune.optimizer, rate, len(classes), policy.jit_compile, tune.momentum)
        frozen_scores = validation_scores(model, val_images)

        # Unfreeze the top blocks (BatchNorm stays frozen) and recompile
        unfrozen = unfreeze_top_blocks(model.get_layer("backbone"), boundary)
        compile_model(model, tune.optimizer, rate, len(classes), policy.jit_compile, tune.momentum)
    counts = parameter_counts(model)
    checkpoint = PhaseCheckpoint(
        paths.checkpoint("finetune"),
        {
            "phase": "finetune",
            "finetune": tune.model_dump(),
            "augmentation": cfg.augmentation.model_dump(),
            "batch_size": cfg.train.batch_size,
            "seed": cfg.train.seed,
            "manifest": file_md5(paths.manifest),
            "frozen_model": file_md5(paths.frozen_model),
            "policy": policy.params(),
        },
    )
    previous = read_phase_history(paths, "train")
    offset = int(previous["epoch"].max()) if len(previous) else 0
    params = {
        "backbone": backbone,
        "image_size": size,
        "weights_source": weights_description,
        "epochs": tune.epochs,
        "optimizer": tune.optimizer,
        "learning_rate": tune.learning_rate,
        "batch_size": cfg.train.batch_size,
        "augment": bool(augment),
        "feature_cache": cached,
        "unfreeze_from": boundary,
        "unfrozen_layers": len(unfrozen),
        "train_images": count_rows(manifest, "train"),
        "validation_images": count_rows(manifest, "validation"),
        "global_batch_size": batch,
        "scaled_learning_rate": rate,
        **policy.params(),
        **counts,
    }
    tags = {
        "frozen_model.md5": file_md5(paths.frozen_model),
        "weights.sha256": weights_sha,
        "weights.description": weights_description,
        "unfreeze_from": boundary,
    }

    with phase_run(cfg, paths, "finetune") as run:
        # Fit (resuming a killed attempt), save, choose the candidate, record
        mlflow.log_params(params)
        mlflow.set_tags(tags)
        log_resume(checkpoint, "phase 2", tune.epochs)
        logger = EpochLogger(
            "finetune",
            offset=offset,
            images=count_rows(manifest, "train"),
            restored=checkpoint.finished,
        )
        finetuned_scores = None
        if tune.epochs:
            callbacks = [*checkpoint.callbacks(tune.early_stopping_patience), logger]
            with devices.scope():
                if cached and split is not None:
                    # the layers below the boundary run once; the top blocks train
                    fit_on_activations(
                        *split,
                        train_images,
                        val_images,
                        optimizer=tune.optimizer,
                        momentum=tune.momentum,
                        learning_rate=rate,
                        jit_compile=policy.jit_compile,
                        batch_size=batch,
                        seed=cfg.train.seed,
                        epochs=tune.epochs,
                        callbacks=callbacks,
                    )
                    compile_model(
                        model, tune.optimizer, rate, len(classes), policy.jit_compile, tune.momentum
                    )
                else:
                    model.fit(
                        train_images,
                        validation_data=val_images,
                        epochs=tune.epochs,
                        callbacks=callbacks,
                        verbose=0,
                        shuffle=False,
                    )
                finetuned_scores = validation_scores(model, val_images)
        save_model(with_precision(model, "float32"), paths.finetuned_model)
        checkpoint.remove()
        record = _write_candidate(paths, frozen_scores, finetuned_scores)
        _record_phase(paths, previous.to_dict("records") + logger.rows, record)
        final = finetuned_scores or frozen_scores
        headline = {
            "finetuned.val_accuracy": final["val_accuracy"],
            "finetune.seconds": time.perf_counter() - started,
            "finetune.improved": float(record["phase"] == "finetune"),
        }
        if logger.images_per_second():
            headline["finetune.images_per_second"] = logger.images_per_second()
        log_headline(headline, tags={"candidate.phase": record["phase"]})
    return TrainResult(
        phase="finetune",
        dataset=paths.dataset,
        model=paths.finetuned_model,
        backbone=backbone,
        image_size=size,
        epochs_run=len(logger.rows),
        best_epoch=int(best_epoch(logger.rows)["epoch"]) if logger.rows else offset,
        val_loss=final["val_loss"],
        val_accuracy=final["val_accuracy"],
        trainable_params=counts["trainable_params"],
        total_params=counts["total_params"],
        seconds=time.perf_counter() - started,
        run_id=run.info.run_id,
        unfrozen_layers=len(unfrozen),
        feature_cache=cached,
        candidate=f"{record['path']} ({record['phase']})",
        note=record["reason"],
    )


def _frozen_model(paths: DatasetPaths, n_classes: int) -> keras.Model:
    """Phase 1's model, checked to predict this dataset's classes."""
    from tasks.ml.model import n_outputs

    if not paths.frozen_model.is_file():
        raise StageError(
            f"{paths.frozen_model} not found; run `python -m tasks train {paths.dataset}` first"
        )
    model = load_model(paths.frozen_model)
    if n_outputs(model) != n_classes:
        raise StageError(
            f"{paths.frozen_model} predicts {n_outputs(model)} classes but the dataset has "
            f"{n_classes}; rerun `python -m tasks train {paths.dataset}`"
        )
    return model


def _weights_record(cfg: Config, backbone: str, size: int, paths: DatasetPaths) -> tuple[str, str]:
    """The phase-1 weights source and sha256, where they can still be found (else 'unavailable')."""
    from tasks.ml.backbones import backbone_entry, resolve_weights

    try:
        entry = (
            backbone_entry(cfg.train, paths.root) if backbone == cfg.train.backbone else backbone
        )
        source = resolve_weights(cfg.train.weights, entry, size, paths.root)
    except StageError:
        return f"{cfg.train.weights} (not found at fine-tuning time)", "unavailable"
    return source.description, source.sha256


def _write_candidate(
    paths: DatasetPaths, frozen: dict[str, float], finetuned: dict[str, float] | None
) -> dict[str, Any]:
    """Choose the better phase's model and write ``candidate.json`` saying which and why."""
    from tasks.ml.training import choose_candidate

    phase, reason = choose_candidate(frozen, finetuned)
    chosen = paths.finetuned_model if phase == "finetune" else paths.frozen_model
    if phase == "train":
        log.warning("%s", reason)
    record = {
        "path": relative(paths, chosen),
        "phase": phase,
        "reason": reason,
        "train": {"path": relative(paths, paths.frozen_model), **frozen},
        "finetune": {
            "path": relative(paths, paths.finetuned_model),
            **(finetuned or {"val_loss": None, "val_accuracy": None}),
        },
        **(finetuned if phase == "finetune" and finetuned else frozen),
    }
    write_json(paths.candidate, record)
    return record


def _record_phase(paths: DatasetPaths, rows: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Both phases' history and curves; the candidate choice and the model's lineage in MLflow."""
    import mlflow

    png = paths.reports / "history" / "curves.png"
    write_history(history_frame(rows), paths.history, png)
    phase = record["phase"]
    frozen = {k: v for k, v in record["train"].items() if k != "path"}
    finetuned = {k: v for k, v in record["finetune"].items() if k != "path" and v is not None}
    metrics = {f"frozen_{k}": v for k, v in frozen.items()}
    metrics |= {f"finetuned_{k}": v for k, v in finetuned.items()}
    metrics["finetune_improved"] = float(phase == "finetune")
    mlflow.log_metrics(metrics)
    mlflow.set_tags(
        {
            "model.path": relative(paths, paths.finetuned_model),
            "model.md5": file_md5(paths.finetuned_model),
            "candidate.phase": phase,
            "candidate.path": record["path"],
            "candidate.reason": record["reason"],
            "finetune.improved": str(phase == "finetune").lower(),
        }
    )
    mlflow.log_artifact(str(paths.history), artifact_path="history")
    mlflow.log_artifact(str(png), artifact_path="history")
    mlflow.log_artifact(str(paths.candidate))
