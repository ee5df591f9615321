"""The Keras callback that logs each epoch to MLflow and says how training goes.

Imports Keras and MLflow when imported: only the training stages import it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import keras
import mlflow

from tasks.ml.training import METRICS

_log = logging.getLogger(__name__)


class EpochLogger(keras.callbacks.Callback):
    """A Keras callback that logs ``loss``/``accuracy``/``val_*`` to MLflow per epoch
    (step = global epoch) and keeps them as history rows in ``.rows``; ``offset`` is
    the epochs of earlier phases.

    Each epoch also prints one line (phase, epoch n/N, the metrics, training
    images per second over ``images``, the time left at that pace); on a terminal
    (``stream`` a TTY, standard output by default) a Keras progress bar runs through
    each epoch's batches first, and logs and pipes get the lines only. ``restored``:
    the epochs a killed attempt finished (``PhaseCheckpoint.finished``), logged
    again to this attempt's run so its history is whole. ``track`` false (a worker other
    than the chief, under ``multi_worker``): the lines only, nothing logged to MLflow.

    Our own callback, not ``mlflow.tensorflow.autolog`` (which needs TensorBoard
    and logs different names per setup).
    """

    def __init__(
        self,
        phase: str,
        offset: int,
        images: int = 0,
        restored: list[dict[str, Any]] | None = None,
        stream: Any = None,
        track: bool = True,
    ) -> None:
        super().__init__()
        self.phase, self.offset, self.images = phase, offset, images
        self.track = track
        self.out = sys.stdout if stream is None else stream
        self.terminal = bool(getattr(self.out, "isatty", lambda: False)())
        self.rows: list[dict[str, Any]] = []
        self.epoch_seconds: list[float] = []  # this attempt's epochs
        self.started = time.perf_counter()
        self.bar: keras.utils.Progbar | None = None
        for logs in restored or []:
            self._record(int(logs["epoch"]), logs)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()
        if self.terminal:
            total = int(self.params.get("epochs") or 0)
            self.out.write(f"{self.phase}, epoch {epoch + 1}/{total}\n")
            self.bar = keras.utils.Progbar(self.params.get("steps"), unit_name="batch")
            self.batches, self.shown = 0, []

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.batches = batch + 1
            self.shown = [(k, float(v)) for k, v in (logs or {}).items() if k in METRICS]
            self.bar.update(self.batches, values=self.shown, finalize=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.bar is not None:  # the bar's last state (it draws at most every 50 ms)
            self.bar.update(self.batches, values=self.shown, finalize=True)
            self.bar = None
        values = self._record(epoch, logs or {})
        seconds = time.perf_counter() - self.started
        self.epoch_seconds.append(seconds)
        total = int(self.params.get("epochs") or 0)
        shown = " ".join(f"{name} {value:.4f}" for name, value in values.items())
        images = self.images
        rate = f", {images / seconds:.0f} images/s" if images and seconds > 0 else ""
        left = max(total - epoch - 1, 0) * seconds
        _log.info(
            "%s epoch %d/%d: %s (%.1f s%s, about %.0f s left)",
            self.phase, epoch + 1, total, shown, seconds, rate, left,
        )  # fmt: skip

    def images_per_second(self) -> float | None:
        """Training images per second over this attempt's epochs (None: none ran)."""
        spent, images = sum(self.epoch_seconds), self.images
        return images * len(self.epoch_seconds) / spent if images and spent > 0 else None

    def _record(self, epoch: int, logs: dict[str, Any]) -> dict[str, float]:
        step = self.offset + epoch + 1
        values = {name: float(logs[name]) for name in METRICS if name in logs}
        self.rows.append({"phase": self.phase, "epoch": step, **values})
        if self.track:
            mlflow.log_metrics(values, step=step)
        return values
