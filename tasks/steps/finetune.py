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
from typing import TYPE_CHECKING, Any

from tasks.artifacts import (
    history_frame,
    load_model,
    read_phase_history,
    relative,
    write_history,
)
from tasks.config import Config
from tasks.errors import StageError
from tasks.io import file_md5, write_json
from tasks.paths import DatasetPaths
from tasks.phase import Phase

if TYPE_CHECKING:
    import keras

    from tasks.ml.training import TrainResult, WorkerResult

log = logging.getLogger(__name__)


def run(cfg: Config, paths: DatasetPaths) -> TrainResult | WorkerResult:
    """Phase 2: unfreeze the top blocks, train at a low rate; write the candidate record."""
    from tasks.ml.model import backbone_name, split_at, with_precision
    from tasks.ml.training import best_epoch, validation_scores

    # Load the frozen-base model under the device policy
    phase = Phase.start("finetune", cfg, paths)
    with phase.devices.scope():
        model = with_precision(_frozen_model(paths, len(phase.classes)), phase.policy.precision)
        boundary = phase.boundary(model)
        split = split_at(model, boundary)
    backbone = backbone_name(model, default=cfg.train.backbone)
    size = int(model.input_shape[1])

    # The layers below the boundary run once (phase 1 kept their activations) unless augmenting
    cached = split is not None and phase.use_cache(split.lower, layer=None)
    data = phase.boundary_data(split) if cached and split else phase.datasets(size)
    scorer = split.upper if cached and split else model  # the model as the data reaches it

    frozen_scores, unfrozen = _unfreeze(phase, model, boundary, scorer, data[1])

    # Resume, params and lineage of the phase
    checkpoint = phase.checkpoint(
        batch_size=cfg.train.batch_size, seed=cfg.train.seed,
        frozen_model=file_md5(paths.frozen_model),
    )  # fmt: skip
    previous = read_phase_history(paths, "train")  # epochs number on from phase 1's
    offset = int(previous["epoch"].max()) if len(previous) else 0
    tags = _lineage_tags(cfg, paths, backbone, size, boundary)
    params = phase.params(
        model, size, cached,
        backbone=backbone, weights_source=tags["weights.description"],
        unfreeze_from=boundary, unfrozen_layers=len(unfrozen),
    )  # fmt: skip

    # Fit (resuming a killed attempt), save, choose the candidate, record
    with phase.tracked(params, tags, checkpoint, offset=offset) as (run, logger, callbacks):
        finetuned_scores = None
        if cfg.finetune.epochs:
            phase.fit(model, data, callbacks, scorer if cached else None)
            with phase.devices.scope():
                finetuned_scores = validation_scores(scorer, data[1])
        if not phase.save(model, paths.finetuned_model, checkpoint):  # not the chief
            return phase.followed()
        record = _write_candidate(paths, frozen_scores, finetuned_scores)
        _record_phase(paths, previous.to_dict("records") + logger.rows, record)
        final = finetuned_scores or frozen_scores
        improved = {"finetune.improved": float(record["phase"] == "finetune")}
        phase.headline(
            final["val_accuracy"], logger, improved, tags={"candidate.phase": record["phase"]}
        )
    return phase.result(
        model, run,
        model=paths.finetuned_model, backbone=backbone, image_size=size,
        epochs_run=len(logger.rows),
        best_epoch=int(best_epoch(logger.rows)["epoch"]) if logger.rows else offset,
        val_loss=final["val_loss"], val_accuracy=final["val_accuracy"],
        unfrozen_layers=len(unfrozen), feature_cache=cached,
        candidate=f"{record['path']} ({record['phase']})", note=record["reason"],
    )  # fmt: skip


def _unfreeze(
    phase: Phase, model: keras.Model, boundary: str, scorer: keras.Model, validation: Any
) -> tuple[dict[str, float], list[str]]:
    """Score the frozen model (through ``scorer``, which reads ``validation``: the model
    itself on images, or its part above the boundary on cached activations), then
    unfreeze the top blocks from ``boundary`` (BatchNorm stays frozen) and recompile: the
    frozen scores and the unfrozen layers."""
    from tasks.ml.backbones import unfreeze_top_blocks
    from tasks.ml.training import validation_scores

    phase.compile(scorer)
    with phase.devices.scope():
        frozen_scores = validation_scores(scorer, validation)
        unfrozen = unfreeze_top_blocks(model.get_layer("backbone"), boundary)
    phase.compile(model)
    return frozen_scores, unfrozen


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


def _lineage_tags(
    cfg: Config, paths: DatasetPaths, backbone: str, size: int, boundary: str
) -> dict[str, str]:
    """What the fine-tuned model comes from: the frozen model, the weights, the boundary."""
    description, sha256 = _weights_record(cfg, backbone, size, paths)
    return {
        "frozen_model.md5": file_md5(paths.frozen_model),
        "weights.sha256": sha256,
        "weights.description": description,
        "unfreeze_from": boundary,
    }


def _weights_record(cfg: Config, backbone: str, size: int, paths: DatasetPaths) -> tuple[str, str]:
    """The phase-1 weights source and sha256, where they can still be found (else 'unavailable')."""
    from tasks.ml.backbone_file import backbone_entry
    from tasks.ml.backbones import resolve_weights

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
