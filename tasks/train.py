"""The two transfer-learning phases, one stage each.

``train_frozen`` (phase 1, stage ``train``): the backbone is frozen and called
with ``training=False``; only the head trains (``train.optimizer`` at
``train.learning_rate``), with early stopping on validation loss and the best
weights restored. Writes ``models/<ds>/frozen.keras`` and the phase's history
(``reports/<ds>/history/train.csv`` and ``train.png``).

``finetune`` (phase 2, stage ``finetune``): loads ``frozen.keras``, unfreezes
the backbone's named top blocks (``finetune.unfreeze_from`` or the registry's
boundary; every BatchNormalization layer stays frozen and in inference mode),
recompiles at a low rate and trains with augmentation (``finetune.augment``).
Writes ``models/<ds>/finetuned.keras``, the history of both phases
(``reports/<ds>/history.csv``, epochs numbered globally, and
``reports/<ds>/history/curves.png``) and ``models/<ds>/candidate.json``: the
better of the two models on validation loss, with both scores and the reason.
When fine-tuning does not help, it says so and the frozen model is the candidate.

Feature cache (phase 1). With the base frozen and no augmentation, the
backbone maps each image to the same features every epoch, so running it on
every step is wasted work: with ``train.feature_cache`` ``auto`` (or ``on``)
and ``train.augment`` false, the features of the training and validation
images are computed once and the ``head`` Sequential is fitted on them; the
saved model is still the same end-to-end model (it shares that head), and with
the same seed the head learns what end-to-end training would (same batches,
same order). The trade-off: features are held in memory
(images x feature size x 4 bytes: 2,000 MobileNetV2 160 px images take about
250 MB), and augmentation cannot be used, since it changes the features every
epoch. ``auto`` falls back to end-to-end training when augmenting or when the
features would exceed ``FEATURE_CACHE_LIMIT`` bytes; ``off`` always trains end
to end, the tutorial way (the backbone runs on every step).

Every run goes to MLflow (``tasks.tracking.phase_run``): params with the same
names for every backbone (backbone, image_size, weights_source, epochs,
learning_rate, augment, unfreeze_from, trainable/total params, ...), metrics
``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` per global epoch, the
weights' sha256 and the model file's md5 as tags, and the history CSV and curves
as artifacts. The model itself is logged by the ``register`` stage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.atomic import write_json, write_text
from tasks.config import AugmentationConfig, Config, TrainConfig
from tasks.errors import StageError
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd
    import tensorflow as tf

log = logging.getLogger(__name__)

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
HISTORY_COLUMNS = ("phase", "epoch", *METRICS)
FEATURE_CACHE_LIMIT = 4 << 30


@dataclass(frozen=True)
class TrainResult:
    """What a phase did (printed by the CLI)."""

    phase: str
    dataset: str
    model: Path
    backbone: str
    image_size: int
    epochs_run: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    trainable_params: int
    total_params: int
    seconds: float
    run_id: str
    feature_cache: bool = False
    unfrozen_layers: int = 0
    candidate: str | None = None
    note: str = ""

    def __str__(self) -> str:
        label = {"train": "phase 1 (frozen base)", "finetune": "phase 2 (fine-tuning)"}
        lines = [
            f"{self.dataset}: {label.get(self.phase, self.phase)} with {self.backbone} at "
            f"{self.image_size} px -> {self.model}",
            f"  epochs run {self.epochs_run} (best: global epoch {self.best_epoch}), "
            f"val_loss {self.val_loss:.4f}, val_accuracy {self.val_accuracy:.4f}",
            f"  trainable parameters {self.trainable_params:,} of {self.total_params:,}"
            + (
                f" ({self.unfrozen_layers} backbone layers unfrozen)"
                if self.unfrozen_layers
                else ""
            )
            + (", head trained on cached features" if self.feature_cache else ""),
            f"  {self.seconds:.1f} s, MLflow run {self.run_id}",
        ]
        if self.candidate:
            lines.append(f"  candidate: {self.candidate} ({self.note})")
        return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def use_feature_cache(train: TrainConfig, feature_bytes: int) -> bool:
    """Whether phase 1 fits the head on cached features (see the module docstring)."""
    if train.feature_cache == "off":
        return False
    if train.augment:
        if train.feature_cache == "on":
            raise StageError(
                "train.feature_cache=on needs train.augment=false (augmented images give new "
                "features every epoch); set feature_cache to auto or off, or augment to false"
            )
        return False
    if train.feature_cache == "auto" and feature_bytes > FEATURE_CACHE_LIMIT:
        log.info("features would take %.1f GB; training end to end instead", feature_bytes / 1e9)
        return False
    return True


def epoch_logger(phase: str, offset: int) -> keras.callbacks.Callback:
    """A Keras callback that logs ``METRICS`` to MLflow per epoch (step = global epoch)
    and keeps them as history rows in ``.rows``; ``offset`` is the epochs of earlier phases.

    Our own callback, not ``mlflow.tensorflow.autolog`` (which needs TensorBoard
    and logs different names per setup).
    """
    import keras
    import mlflow

    class EpochLogger(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, Any]] = []

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = logs or {}
            step = offset + epoch + 1
            values = {name: float(logs[name]) for name in METRICS if name in logs}
            self.rows.append({"phase": phase, "epoch": step, **values})
            mlflow.log_metrics(values, step=step)

    return EpochLogger()


def _callbacks(patience: int, logger: Any) -> list[Any]:
    import keras

    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )
    return [stop, logger]


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda row: row.get("val_loss", float("inf")))


def _history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in HISTORY_COLUMNS:
        if column not in frame:
            frame[column] = float("nan")
    return frame[list(HISTORY_COLUMNS)]


def _write_history(frame: pd.DataFrame, csv: Path, png: Path) -> None:
    from tasks import plots
    from tasks.atomic import atomic_path

    write_text(csv, frame.to_csv(index=False))
    with atomic_path(png, suffix=".png") as tmp:
        plots.training_curves(frame, tmp)


def _features(extractor: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    features = extractor.predict(dataset, verbose=0)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    return features, labels


def _feature_dataset(
    features: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int
) -> tf.data.Dataset:
    """Batches of cached features, shuffled exactly like ``make_dataset`` shuffles images."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((features, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _relative(paths: DatasetPaths, file: Path) -> str:
    try:
        return file.resolve().relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        return str(file)


# ---------------------------------------------------------------- phase 1


def _splits(
    manifest: Any,
    paths: DatasetPaths,
    classes: list[str],
    size: int,
    train: TrainConfig,
    *,
    shuffle: bool,
    augment: AugmentationConfig | None,
) -> tuple[Any, Any]:
    """The training and validation datasets of a phase (augmentation on training only)."""
    from tasks.data import make_dataset

    def dataset(split: str, shuffle: bool, aug: AugmentationConfig | None) -> Any:
        return make_dataset(
            manifest,
            paths.raw,
            split,
            classes,
            size,
            train.batch_size,
            augment=aug,
            shuffle=shuffle,
            seed=train.seed,
        )

    validation = dataset("validation", False, None)
    return dataset("train", shuffle, augment), validation


def train_frozen(cfg: Config, paths: DatasetPaths) -> TrainResult:
    """Phase 1: train the head on the frozen backbone; write ``frozen.keras``."""
    from tasks.backbones import get_backbone, resolve_weights
    from tasks.data import count_rows, read_manifest

    started = time.perf_counter()
    train = cfg.train
    classes = cfg.dataset(paths.dataset).classes
    manifest = read_manifest(paths)
    entry = get_backbone(train.backbone)
    size = entry.resolve_size(train.image_size)
    weights = resolve_weights(train.weights, train.backbone, size, paths.root)

    import keras
    import mlflow

    from tasks.model import (
        ModelSpec,
        build_model,
        compile_model,
        feature_extractor,
        parameter_counts,
        save_model,
    )
    from tasks.tracking import file_md5, phase_run

    keras.utils.set_random_seed(train.seed)
    head = entry.head_spec(train.head)
    model = build_model(ModelSpec(train.backbone, size, head, len(classes)), weights)
    counts = parameter_counts(model)
    head_counts = parameter_counts(model.get_layer("head"))
    feature_shape = model.get_layer("backbone").output.shape[1:]
    images = count_rows(manifest, "train") + count_rows(manifest, "validation")
    per_image = 4
    for dim in feature_shape:
        per_image *= int(dim)
    cached = use_feature_cache(train, images * per_image)
    augment = cfg.augmentation if train.augment else None

    train_images, val_images = _splits(
        manifest,
        paths,
        classes,
        size,
        train,
        shuffle=not cached,
        augment=None if cached else augment,
    )
    params = {
        "backbone": train.backbone,
        "image_size": size,
        "weights_source": weights.description,
        "head": str(head),
        "epochs": train.epochs,
        "optimizer": train.optimizer,
        "learning_rate": train.learning_rate,
        "batch_size": train.batch_size,
        "augment": bool(augment),
        "feature_cache": cached,
        "unfreeze_from": "none (frozen base)",
        "train_images": count_rows(manifest, "train"),
        "validation_images": count_rows(manifest, "validation"),
        **counts,
    }
    with phase_run(cfg, paths, "train", new_parent=True) as run:
        mlflow.log_params(params)
        mlflow.set_tags(
            {"weights.sha256": weights.sha256, "weights.description": weights.description}
        )
        logger = epoch_logger("train", offset=0)
        callbacks = _callbacks(train.early_stopping_patience, logger)
        if cached:
            extractor = feature_extractor(model)
            train_x, train_y = _features(extractor, train_images)
            val_x, val_y = _features(extractor, val_images)
            head_model = model.get_layer("head")
            compile_model(head_model, train.optimizer, train.learning_rate, len(classes))
            head_model.fit(
                _feature_dataset(train_x, train_y, train.batch_size, True, train.seed),
                validation_data=_feature_dataset(val_x, val_y, train.batch_size, False, 0),
                epochs=train.epochs,
                callbacks=callbacks,
                verbose=0,
                shuffle=False,
            )
            compile_model(model, train.optimizer, train.learning_rate, len(classes))
        else:
            compile_model(model, train.optimizer, train.learning_rate, len(classes))
            model.fit(
                train_images,
                validation_data=val_images,
                epochs=train.epochs,
                callbacks=callbacks,
                verbose=0,
                shuffle=False,
            )
        save_model(model, paths.frozen_model)
        history = _history_frame(logger.rows)
        png = paths.phase_history("train").with_suffix(".png")
        _write_history(history, paths.phase_history("train"), png)
        best = _best(logger.rows)
        mlflow.log_metrics(
            {
                "best_val_loss": best["val_loss"],
                "best_val_accuracy": best["val_accuracy"],
                "best_epoch": best["epoch"],
                "head_params": head_counts["total_params"],
            }
        )
        mlflow.set_tags(
            {
                "model.path": _relative(paths, paths.frozen_model),
                "model.md5": file_md5(paths.frozen_model),
                "feature_cache": str(cached).lower(),
            }
        )
        mlflow.log_artifact(str(paths.phase_history("train")), artifact_path="history")
        mlflow.log_artifact(str(png), artifact_path="history")
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


# ---------------------------------------------------------------- phase 2


def _phase1_history(paths: DatasetPaths) -> pd.DataFrame:
    import pandas as pd

    file = paths.phase_history("train")
    if not file.is_file():
        log.warning("%s not found; fine-tuning epochs are numbered from 1", file)
        return _history_frame([])
    frame = pd.read_csv(file)
    return frame[frame["phase"] == "train"] if "phase" in frame else _history_frame([])


def choose_candidate(
    frozen: dict[str, float], finetuned: dict[str, float] | None
) -> tuple[str, str]:
    """``("finetune" | "train", reason)``: the phase whose model has the lower val_loss."""
    if finetuned is None:
        return "train", "fine-tuning ran 0 epochs (finetune.epochs=0); the frozen model is kept"
    if math.isfinite(finetuned["val_loss"]) and finetuned["val_loss"] < frozen["val_loss"]:
        return "finetune", (
            f"fine-tuning lowered val_loss from {frozen['val_loss']:.4f} to "
            f"{finetuned['val_loss']:.4f}"
        )
    return "train", (
        f"fine-tuning did not beat the frozen model on validation: val_loss "
        f"{finetuned['val_loss']:.4f} vs {frozen['val_loss']:.4f}; the frozen model is the "
        "candidate"
    )


def _scores(model: keras.Model, dataset: tf.data.Dataset) -> dict[str, float]:
    values = model.evaluate(dataset, verbose=0, return_dict=True)
    return {"val_loss": float(values["loss"]), "val_accuracy": float(values["accuracy"])}


def _weights_record(cfg: Config, backbone: str, size: int, paths: DatasetPaths) -> tuple[str, str]:
    """The phase-1 weights source and sha256, where they can still be found (else 'unavailable')."""
    from tasks.backbones import resolve_weights

    try:
        source = resolve_weights(cfg.train.weights, backbone, size, paths.root)
    except StageError:
        return f"{cfg.train.weights} (not found at fine-tuning time)", "unavailable"
    return source.description, source.sha256


def finetune(cfg: Config, paths: DatasetPaths) -> TrainResult:
    """Phase 2: unfreeze the top blocks, train at a low rate; write the candidate record."""
    from tasks.data import count_rows, read_manifest

    started = time.perf_counter()
    tune = cfg.finetune
    classes = cfg.dataset(paths.dataset).classes
    if not paths.frozen_model.is_file():
        raise StageError(
            f"{paths.frozen_model} not found; run `python -m tasks train {paths.dataset}` first"
        )
    manifest = read_manifest(paths)

    import keras
    import mlflow

    from tasks.backbones import get_backbone, unfreeze_top_blocks
    from tasks.model import (
        backbone_name,
        compile_model,
        load_model,
        n_outputs,
        parameter_counts,
        save_model,
    )
    from tasks.tracking import file_md5, phase_run

    keras.utils.set_random_seed(cfg.train.seed)
    model = load_model(paths.frozen_model)
    if n_outputs(model) != len(classes):
        raise StageError(
            f"{paths.frozen_model} predicts {n_outputs(model)} classes but the dataset has "
            f"{len(classes)}; rerun `python -m tasks train {paths.dataset}`"
        )
    backbone = backbone_name(model, default=cfg.train.backbone)
    size = int(model.input_shape[1])
    boundary = tune.unfreeze_from or get_backbone(backbone).unfreeze_from
    augment = cfg.augmentation if tune.augment else None

    weights_description, weights_sha = _weights_record(cfg, backbone, size, paths)
    train_images, val_images = _splits(
        manifest, paths, classes, size, cfg.train, shuffle=True, augment=augment
    )
    compile_model(model, tune.optimizer, tune.learning_rate, len(classes))
    frozen_scores = _scores(model, val_images)
    unfrozen = unfreeze_top_blocks(model.get_layer("backbone"), boundary)
    compile_model(model, tune.optimizer, tune.learning_rate, len(classes))
    counts = parameter_counts(model)
    previous = _phase1_history(paths)
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
        "feature_cache": False,
        "unfreeze_from": boundary,
        "unfrozen_layers": len(unfrozen),
        "train_images": count_rows(manifest, "train"),
        "validation_images": count_rows(manifest, "validation"),
        **counts,
    }
    with phase_run(cfg, paths, "finetune") as run:
        mlflow.log_params(params)
        mlflow.set_tags(
            {
                "frozen_model.md5": file_md5(paths.frozen_model),
                "weights.sha256": weights_sha,
                "weights.description": weights_description,
                "unfreeze_from": boundary,
            },
        )
        logger = epoch_logger("finetune", offset=offset)
        finetuned_scores = None
        if tune.epochs:
            model.fit(
                train_images,
                validation_data=val_images,
                epochs=tune.epochs,
                callbacks=_callbacks(tune.early_stopping_patience, logger),
                verbose=0,
                shuffle=False,
            )
            finetuned_scores = _scores(model, val_images)
        save_model(model, paths.finetuned_model)
        phase, reason = choose_candidate(frozen_scores, finetuned_scores)
        chosen = paths.finetuned_model if phase == "finetune" else paths.frozen_model
        if phase == "train":
            log.warning("%s", reason)
        record = {
            "path": _relative(paths, chosen),
            "phase": phase,
            "reason": reason,
            "train": {"path": _relative(paths, paths.frozen_model), **frozen_scores},
            "finetune": {
                "path": _relative(paths, paths.finetuned_model),
                **(finetuned_scores or {"val_loss": None, "val_accuracy": None}),
            },
            **(finetuned_scores if phase == "finetune" and finetuned_scores else frozen_scores),
        }
        write_json(paths.candidate, record)
        history = _history_frame([*previous.to_dict("records"), *logger.rows])
        png = paths.reports / "history" / "curves.png"
        _write_history(history, paths.history, png)
        metrics = {f"frozen_{k}": v for k, v in frozen_scores.items()}
        metrics |= {f"finetuned_{k}": v for k, v in (finetuned_scores or {}).items()}
        metrics["finetune_improved"] = float(phase == "finetune")
        mlflow.log_metrics(metrics)
        mlflow.set_tags(
            {
                "model.path": _relative(paths, paths.finetuned_model),
                "model.md5": file_md5(paths.finetuned_model),
                "candidate.phase": phase,
                "candidate.path": record["path"],
                "candidate.reason": reason,
                "finetune.improved": str(phase == "finetune").lower(),
            }
        )
        mlflow.log_artifact(str(paths.history), artifact_path="history")
        mlflow.log_artifact(str(png), artifact_path="history")
        mlflow.log_artifact(str(paths.candidate))
    final = finetuned_scores or frozen_scores
    best_epoch = int(_best(logger.rows)["epoch"]) if logger.rows else offset
    return TrainResult(
        phase="finetune",
        dataset=paths.dataset,
        model=paths.finetuned_model,
        backbone=backbone,
        image_size=size,
        epochs_run=len(logger.rows),
        best_epoch=best_epoch,
        val_loss=final["val_loss"],
        val_accuracy=final["val_accuracy"],
        trainable_params=counts["trainable_params"],
        total_params=counts["total_params"],
        seconds=time.perf_counter() - started,
        run_id=run.info.run_id,
        unfrozen_layers=len(unfrozen),
        candidate=f"{record['path']} ({phase})",
        note=reason,
    )
