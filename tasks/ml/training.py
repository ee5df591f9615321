"""The two-phase recipe's building blocks: Keras models and datasets in, fitted models out.

Phase 1 trains the head on a frozen backbone, on cached backbone features when
the images do not change between epochs (:func:`use_feature_cache`); phase 2
unfreezes the top blocks (``tasks.ml.backbones.unfreeze_top_blocks``) and
trains end to end at a low rate. :func:`choose_candidate` then keeps whichever
phase's model did better on validation.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import weakref
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import FinetuneConfig, TrainConfig
from tasks.errors import StageError
from tasks.io import atomic_path, human_size, write_json
from tasks.ml.arrays import ArrayStore, StoreWriter

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
"""What every epoch records, in both phases."""


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

    @property
    def _cached_part(self) -> str:
        return "top blocks" if self.phase == "finetune" else "head"

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
            + (f", {self._cached_part} trained on cached activations" * self.feature_cache),
            f"  {self.seconds:.1f} s, MLflow run {self.run_id}",
        ]
        if self.candidate:
            lines.append(f"  candidate: {self.candidate} ({self.note})")
        return "\n".join(lines)


@dataclass(frozen=True)
class WorkerResult:
    """What a worker other than the chief did: trained its part of the phase."""

    phase: str
    dataset: str
    worker: str
    seconds: float

    def __str__(self) -> str:
        label = {"train": "phase 1 (frozen base)", "finetune": "phase 2 (fine-tuning)"}
        return (
            f"{self.dataset}: {label.get(self.phase, self.phase)} trained as {self.worker} in "
            f"{self.seconds:.1f} s; worker 0 wrote the model, the reports and the MLflow run"
        )


def use_feature_cache(
    section: TrainConfig | FinetuneConfig,
    feature_bytes: int,
    name: str = "train",
    free_bytes: float = float("inf"),
) -> bool:
    """Whether a phase trains on activations computed once instead of on images.

    Phase 1 (``name`` train): the frozen backbone's features. Phase 2 (finetune):
    the activations the unfrozen top blocks read (:func:`tasks.ml.model.split_at`),
    since the frozen layers below the fine-tune boundary give the same ones every
    epoch. Without augmentation the images do not change between epochs, so
    they are computed once (held in RAM within the cache budget, the rest read
    from disk). ``auto`` falls back to training on images when augmenting or
    when they would not fit in the disk's ``free_bytes``; ``off`` always trains
    on images, the tutorial way.
    """
    if section.feature_cache == "off":
        return False
    if section.augment:
        if section.feature_cache == "on":
            raise StageError(
                f"{name}.feature_cache=on needs {name}.augment=false (augmented images give new "
                "features every epoch); set feature_cache to auto or off, or augment to false"
            )
        return False
    if section.feature_cache == "auto" and feature_bytes > free_bytes:
        log.warning(
            "cached activations would take %s, more than the %s free on disk; training on "
            "images instead", human_size(feature_bytes), human_size(free_bytes),
        )  # fmt: skip
        return False
    return True


def feature_bytes(model: keras.Model, images: int, layer: str | None = "backbone") -> int:
    """Memory the float32 outputs of ``layer`` (None: the model's own) for ``images`` images."""
    outputs = model.get_layer(layer).output if layer else model.output
    per_image = 0
    for output in outputs if isinstance(outputs, list | tuple) else [outputs]:
        size = 4
        for dim in output.shape[1:]:
            size *= int(dim)
        per_image += size
    return images * per_image


def early_stopping(
    patience: int, checkpoint: PhaseCheckpoint | None = None
) -> keras.callbacks.Callback:
    """Stop when validation loss stops improving, and keep the best epoch's weights.

    With a ``checkpoint`` that resumes a killed phase, the counters and best
    weights are those it saved, so the resumed phase stops where the
    uninterrupted one would.
    """
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            super().on_train_begin(logs)
            if checkpoint is not None:
                checkpoint.restore_stopping(self)

    return ResumableEarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


class PhaseCheckpoint:
    """A phase's training state after every epoch, so a killed phase resumes where it was.

    ``directory`` (outside the stage's DVC outputs) holds Keras's
    ``BackupAndRestore`` state (weights, optimizer, epoch) and, written after
    it as the epoch's commit point, ``state.json``: each finished epoch's logs
    (:attr:`finished`, replayed into the phase's history) and the
    early-stopping counters, with the best weights beside it. ``fingerprint``
    names what the phase trains (params, inputs); a checkpoint of another
    fingerprint is discarded rather than resumed. :meth:`remove` deletes it
    once the phase's model is saved.

    With a ``scratch`` folder (a worker other than the chief, under ``multi_worker``)
    it resumes from the chief's checkpoint in the shared ``directory``, as the chief
    does, but never writes or removes it: it saves its weights into ``scratch``
    when the chief saves, since saving takes part in the workers' collective ops.
    """

    def __init__(
        self, directory: Path, fingerprint: dict[str, Any], scratch: Path | None = None
    ) -> None:
        self.directory = Path(directory)
        self.scratch = scratch
        self.writes = scratch is None
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        state = _read_json(self.directory / _STATE)
        if state is not None and state.get("fingerprint") != self.fingerprint:
            log.warning(
                "discarding the checkpoint in %s: it was made with other params or inputs",
                self.directory,
            )
            state = None
        if state is None:
            self.remove()  # nothing (usable) to resume: start clean
        state = state or {}
        self.finished: list[dict[str, Any]] = list(state.get("finished", []))
        self._stopping: dict[str, Any] | None = state.get("early_stopping")

    @property
    def resumed_epochs(self) -> int:
        """Epochs finished before this attempt (0: a fresh start)."""
        return len(self.finished)

    def callbacks(self, patience: int) -> list[keras.callbacks.Callback]:
        """Early stopping, then the backup that saves the whole state at each epoch's end."""
        import keras
        import numpy as np

        stopping = early_stopping(patience, self)
        checkpoint = self

        class Backup(keras.callbacks.BackupAndRestore):
            def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
                super().on_train_begin(logs)
                # state.json is the commit point: resume after the epochs it records
                self.model._initial_epoch = max(
                    checkpoint.resumed_epochs,
                    self.params["epochs"] if checkpoint.stopped else 0,
                )

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                values = {k: float(v) for k, v in (logs or {}).items() if k in METRICS}
                checkpoint.finished.append({"epoch": epoch, **values})
                if checkpoint.scratch is not None:  # the chief's save, matched
                    checkpoint.scratch.mkdir(parents=True, exist_ok=True)
                    self.model.save_weights(checkpoint.scratch / _WEIGHTS, overwrite=True)
                    return
                super().on_epoch_end(epoch, logs)
                best = stopping.best_weights
                if best is not None and stopping.best_epoch == epoch:
                    with atomic_path(checkpoint.directory / _BEST) as tmp, open(tmp, "wb") as out:
                        np.savez(out, *best)
                checkpoint._stopping = {
                    "wait": stopping.wait,
                    "best": None if stopping.best is None else float(stopping.best),
                    "best_epoch": stopping.best_epoch,
                    "stopped_epoch": stopping.stopped_epoch,
                }
                write_json(checkpoint.directory / _STATE, checkpoint.state())

        return [stopping, Backup(str(self.directory / "keras"), delete_checkpoint=False)]

    @property
    def stopped(self) -> bool:
        """Whether early stopping had ended the phase before it was killed."""
        return bool(self._stopping and self._stopping.get("stopped_epoch"))

    def state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "finished": self.finished,
            "early_stopping": self._stopping,
        }

    def restore_stopping(self, callback: keras.callbacks.EarlyStopping) -> None:
        """Give a fresh early-stopping callback the counters and best weights saved here."""
        import numpy as np

        if not self._stopping:
            return
        callback.wait, callback.best = self._stopping["wait"], self._stopping["best"]
        callback.best_epoch = self._stopping["best_epoch"]
        callback.stopped_epoch = self._stopping["stopped_epoch"]
        if (self.directory / _BEST).is_file():
            with np.load(self.directory / _BEST) as arrays:
                callback.best_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]

    def remove(self) -> None:
        if self.writes:
            shutil.rmtree(self.directory, ignore_errors=True)


_STATE = "state.json"
_WEIGHTS = "latest.weights.h5"
_BEST = "best_weights.npz"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def extract_stores(
    images: tf.data.Dataset, chain: Sequence[tuple[keras.Model, Path, dict[str, Any]]]
) -> list[ArrayStore]:
    """One pass over ``images``: each model of ``chain`` reads the previous one's outputs
    (the first reads the images), and each model's outputs are written, with the labels,
    as an :class:`ArrayStore` in its folder under its key (float32, whatever the policy
    computed in).

    Phase 1's chain is the layers below the fine-tune boundary, then the rest of the
    backbone: the boundary activations phase 2 trains on come out on the way to the
    head's features, so the lower backbone runs once for both phases.
    """
    import numpy as np

    steps = [forward(model) for model, _, _ in chain]
    writers = [StoreWriter(directory, key) for _, directory, key in chain]
    with ExitStack() as stack:
        for writer in writers:
            stack.enter_context(writer)
        for x, y in images:
            outputs: Any = x
            for step, writer in zip(steps, writers, strict=True):
                outputs = step(outputs)
                arrays = outputs if isinstance(outputs, list | tuple) else [outputs]
                outputs = [np.asarray(a, dtype="float32") for a in arrays]
                writer.append([*outputs, y.numpy()])
                outputs = outputs[0] if len(outputs) == 1 else outputs
    return [writer.store for writer in writers]


_FORWARD: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def forward(model: keras.Model) -> Any:
    """``model`` in inference mode as one traced function for any batch size (traced once
    per model, whichever split it reads).

    Not ``predict_on_batch``: under a MirroredStrategy that hands the whole batch to
    every replica and concatenates their outputs, so each row would come back once per
    replica.
    """
    import tensorflow as tf

    if model not in _FORWARD:
        specs = [tf.TensorSpec(tensor.shape, tensor.dtype) for tensor in model.inputs]
        signature = [specs[0] if len(specs) == 1 else specs]
        ref = weakref.ref(model)  # the cache must not keep the model alive

        def call(x: Any) -> Any:
            return ref()(x, training=False)  # type: ignore[misc]

        _FORWARD[model] = tf.function(call, input_signature=signature)
    return _FORWARD[model]


def weights_digest(model: keras.Model) -> str:
    """MD5 of ``model``'s weights: what a cache of its outputs is keyed by."""
    import hashlib

    import numpy as np

    digest = hashlib.md5(usedforsecurity=False)
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()


def validation_scores(model: keras.Model, dataset: tf.data.Dataset) -> dict[str, float]:
    """``val_loss`` and ``val_accuracy`` of a compiled model on ``dataset``."""
    values = model.evaluate(dataset, verbose=0, return_dict=True)
    return {"val_loss": float(values["loss"]), "val_accuracy": float(values["accuracy"])}


def best_epoch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The history row with the lowest validation loss."""
    return min(rows, key=lambda row: row.get("val_loss", float("inf")))


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
