from __future__ import annotations

import pytest

# A tiny Keras fit with the epoch callback, in its own process so that its standard
# output can be a terminal (a pty) or a pipe, as under a shell or an Airflow worker.
_FIT = """
import logging, mlflow, numpy as np, keras
from tasks.tracking.callback import EpochLogger
logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the stage commands do
mlflow.set_tracking_uri("sqlite:///" + __import__("sys").argv[1])
x = np.random.default_rng(0).normal(size=(24, 3)).astype("float32")
y = (x[:, 0] > 0).astype("float32")
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
with mlflow.start_run():
    model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=4, verbose=0,
              callbacks=[EpochLogger("train", 0, images=24)])
"""


def _fit_output(tmp_path, terminal: bool) -> str:
    import os
    import pty
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    args = [sys.executable, "-c", _FIT, str(tmp_path / "mlflow.db")]
    if not terminal:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr
    main, child = pty.openpty()
    proc = subprocess.Popen(args, env=env, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=300) == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_each_epoch_prints_one_line_and_a_progress_bar_only_on_a_terminal(tmp_path):
    piped = _fit_output(tmp_path, terminal=False)
    lines = [line for line in piped.splitlines() if " epoch " in line]
    assert len(lines) == 2, piped[-2000:]
    for n, line in enumerate(lines, 1):
        assert f"train epoch {n}/2: loss " in line
        assert "accuracy" in line and "val_loss" in line and "val_accuracy" in line
        assert "images/s" in line and "s left)" in line
    assert "6/6" not in piped  # no progress bar in a log

    shown = _fit_output(tmp_path, terminal=True)
    # Keras' bar: the batch count of the 6 batches, the running loss, then our epoch line.
    assert "6/6" in shown and "━" in shown, shown[-2000:]
    assert shown.index("6/6") < shown.index("train epoch 1/2: loss ")
    assert "train epoch 2/2: loss " in shown
