"""What a person sees from a stage process: our lines, not TensorFlow's start-up noise.

The stage commands run as ``python -m tasks <command>`` processes (DVC runs
them, Airflow logs them), so they are run here as processes too, with the
environment a user's shell would give them (no ``TF_CPP_MIN_LOG_LEVEL``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.cli import main
from tests.conftest import REPO
from tests.datagen import make_archive, make_image, tiny_params

DS = "cats_vs_dogs"

# TensorFlow's C++ log lines ("I0000 00:00:1796065982.564101  1141 cpu_feature_guard.cc:227]
# ...") and the lines printed with them at start-up.
NATIVE_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]")
STARTUP_NOISE = ("cpu_feature_guard", "oneDNN custom operations", "absl::InitializeLog")


def stage_process(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m tasks ARGS`` in ``cwd`` with the caller's environment minus our test
    defaults for TensorFlow's logging (tests/conftest.py sets one), plus ``env``."""
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "tasks", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def native_noise(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if NATIVE_LINE.match(line) or any(noise in line for noise in STARTUP_NOISE)
    ]


@pytest.fixture
def unloadable_model(tmp_path) -> Path:
    """A folder with an image and a ``.keras`` file Keras cannot load: ``predict`` on it
    imports TensorFlow (through Keras), then fails with our one-line error."""
    make_image(0, 32).save(tmp_path / "cat.jpg")
    (tmp_path / "model.keras").write_bytes(b"not a keras archive")
    return tmp_path


@pytest.mark.slow
def test_a_command_that_loads_tensorflow_prints_none_of_its_startup_lines(unloadable_model):
    proc = stage_process(unloadable_model, "predict", "model.keras", "cat.jpg")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert native_noise(proc.stderr) == []
    # Our own error is kept: one line, naming the file.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load model model.keras" in errors[0]


@pytest.mark.slow
def test_a_log_level_the_user_set_wins(unloadable_model):
    """Also the premise of the test above: this command does start TensorFlow's logging."""
    proc = stage_process(
        unloadable_model, "predict", "model.keras", "cat.jpg", TF_CPP_MIN_LOG_LEVEL="0"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert any(NATIVE_LINE.match(line) for line in proc.stderr.splitlines()), proc.stderr[-3000:]


def test_a_stage_process_still_prints_our_warnings(tmp_path):
    """Quieting TensorFlow leaves Python logging alone: the download stage's warning shows."""
    archive = make_archive(tmp_path / "cats.zip", DS, {"train": 2, "validation": 1}, size=16)
    params = tiny_params({DS: str(archive)}, {"train": 2, "validation": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = stage_process(tmp_path, "download", DS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if " WARNING tasks." in line]
    assert len(warnings) == 1
    assert "WARNING tasks.steps.download: cats_vs_dogs: no sha256 pinned; trusting" in warnings[0]
    assert native_noise(proc.stderr) == []


@pytest.mark.parametrize("value", ["train.epochs=3", '{"train.epochs": 3}', "[3]"])
def test_a_bad_tasks_set_is_a_one_line_error(tmp_path, monkeypatch, capsys, value):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params({DS: "file:///nowhere.zip"})))
    monkeypatch.setenv("TASKS_SET", value)
    code = main(["download", DS, "--params", str(params), "--root", str(tmp_path / "ws")])
    assert code == 2
    assert (
        capsys.readouterr().err == 'error: $TASKS_SET: must be a JSON list of "key=value" strings\n'
    )
    assert not (tmp_path / "ws").exists()  # refused before the stage ran
