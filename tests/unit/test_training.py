"""Resumable phases (tasks.ml.training.PhaseCheckpoint) on a tiny model trained in-process.

With data in a fixed order and no dropout, training is deterministic, so a
phase interrupted after some epochs and resumed must end exactly where the
uninterrupted phase ends: same epochs, same history, same early stop, same
weights. That holds only if the weights, the optimizer's state, the epoch
count and the early-stopping counters all come back.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from tasks.ml.training import METRICS, PhaseCheckpoint

EPOCHS = 12


class Interrupt(keras.callbacks.Callback):
    """Stands in for a kill: the process dies as epoch ``at`` (0-based) begins."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("float32")
    vx = rng.normal(size=(32, 4)).astype("float32")
    vy = (vx[:, 0] - vx[:, 1] > 0).astype("float32")  # another rule: val_loss falls, then rises
    return x, y, vx, vy


def fit(checkpoint: PhaseCheckpoint, patience: int, interrupt: int | None = None):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1, "sigmoid")]
    )
    model.compile(keras.optimizers.Adam(0.02), "binary_crossentropy", metrics=["accuracy"])
    x, y, vx, vy = data()
    callbacks = checkpoint.callbacks(patience)
    if interrupt is not None:
        callbacks.append(Interrupt(interrupt))
    history = model.fit(
        x, y, validation_data=(vx, vy), epochs=EPOCHS, batch_size=16, shuffle=False,
        callbacks=callbacks, verbose=0,
    )  # fmt: skip
    return model, history


def rows(checkpoint: PhaseCheckpoint) -> list[dict]:
    return [{k: row[k] for k in ("epoch", *METRICS)} for row in checkpoint.finished]


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [2, 4])  # before and after the best epoch (3)
def test_an_interrupted_phase_resumes_to_the_uninterrupted_result(tmp_path, interrupt):
    reference = PhaseCheckpoint(tmp_path / "reference", {"phase": "train"})
    ref_model, ref_history = fit(reference, patience=2)
    stopped = len(ref_history.history["loss"])
    assert interrupt < stopped < EPOCHS  # early stopping ends it, after the interruption

    first = PhaseCheckpoint(tmp_path / "run", {"phase": "train"})
    with pytest.raises(KeyboardInterrupt):
        fit(first, patience=2, interrupt=interrupt)
    assert first.resumed_epochs == interrupt

    again = PhaseCheckpoint(tmp_path / "run", {"phase": "train"})
    assert again.resumed_epochs == interrupt
    assert rows(again) == rows(first)
    model, history = fit(again, patience=2)
    assert len(history.history["loss"]) == stopped - interrupt  # only the epochs left ran
    assert [row["epoch"] for row in again.finished] == list(range(stopped))
    for mine, theirs in zip(rows(again), rows(reference), strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    for mine, theirs in zip(model.get_weights(), ref_model.get_weights(), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)  # best weights restored


@pytest.mark.slow
def test_a_checkpoint_of_other_params_is_discarded_not_resumed(tmp_path, caplog):
    first = PhaseCheckpoint(tmp_path / "run", {"phase": "train", "learning_rate": 0.1})
    with pytest.raises(KeyboardInterrupt):
        fit(first, patience=20, interrupt=2)
    other = PhaseCheckpoint(tmp_path / "run", {"phase": "train", "learning_rate": 0.2})
    assert other.resumed_epochs == 0
    assert not (tmp_path / "run").exists()
    assert "made with other params or inputs" in caplog.text


@pytest.mark.slow
def test_a_finished_early_stop_is_not_trained_again(tmp_path):
    first = PhaseCheckpoint(tmp_path / "run", {"phase": "train"})
    _, history = fit(first, patience=1)
    done = len(history.history["loss"])
    assert done < EPOCHS
    assert json.loads((tmp_path / "run" / "state.json").read_text())["early_stopping"][
        "stopped_epoch"
    ]
    again = PhaseCheckpoint(tmp_path / "run", {"phase": "train"})  # killed before the save
    _, history = fit(again, patience=1)
    assert history.history == {}  # no epoch left to run
    again.remove()
    assert not (tmp_path / "run").exists()
