"""``mlflow models serve`` on the registered champion, as a real server process: the
probabilities it returns over HTTP are the Keras model's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.dev.httpserver import unused_port
from tasks.ml.images import read_image
from tests.tinymodel import register_champion, tiny_models

pytestmark = pytest.mark.slow  # a registry and a server process that loads TensorFlow

NAME = "cats_vs_dogs-classifier"
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A store whose registry holds the good tiny model as @champion; the workspace and the
    model file it came from."""
    root = tmp_path_factory.mktemp("serve")
    models = tiny_models(tmp_path_factory.mktemp("tiny"))
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("TASKS_PARENT_RUN_ID", raising=False)
        paths = register_champion(root, models["good"], validation=10)
    import mlflow

    mlflow.set_tracking_uri(None)
    return uri, paths, models["good"]


def stop(process: subprocess.Popen) -> None:
    """End the server and the uvicorn process it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:  # a child that outlived its parent
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def get(url: str, timeout: float = 5) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` on a free
    loopback port, as a user starts it from the project's virtualenv; stopped afterwards."""
    uri, _, _ = registered
    port = unused_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        # an activated virtualenv: the server execs `uvicorn` from PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited {process.returncode}:\n{tail(log)}")
            try:
                if get(f"{base}/ping") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {base}/ping after {START_TIMEOUT_S} s:\n{tail(log)}")
            time.sleep(0.5)
        yield base
    finally:
        stop(process)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def split_rows(paths) -> list[str]:
    """The workspace's test-split images, in path order."""
    manifest = pd.read_parquet(paths.manifest)
    rows = manifest[(manifest["split"] == "test") & (manifest["status"] == "ok")]
    return sorted(rows["path"])


def split_images(paths) -> np.ndarray:
    return np.stack([read_image(paths.raw / p, (32, 32)) for p in split_rows(paths)])


def test_served_probabilities_are_the_keras_models(registered, server):
    from tasks.artifacts import load_model

    _, paths, model_file = registered
    images = split_images(paths)  # uint8 (n, 32, 32, 3), as the logged signature says
    assert images.dtype == np.uint8 and len(images) >= 4
    status, body = post(f"{server}/invocations", {"inputs": images.tolist()})
    assert status == 200, body
    served = np.asarray(body["predictions"], np.float64)
    assert served.shape == (len(images), 2)  # one column per class: cats, dogs

    p = np.asarray(load_model(model_file).predict(images.astype(np.float32), verbose=0))[:, 0]
    np.testing.assert_allclose(served, np.stack([1 - p, p], axis=1), atol=1e-4)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-6)
    labels = [Path(p).parent.name for p in split_rows(paths)]
    assert [["cats", "dogs"][i] for i in served.argmax(axis=1)] == labels


def test_a_request_that_breaks_the_signature_is_refused(server):
    """16x16 images where the signature says 32x32: a 400 naming the shape, no predictions."""
    wrong = np.zeros((1, 16, 16, 3), np.uint8)
    status, body = post(f"{server}/invocations", {"inputs": wrong.tolist()})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "predictions" not in body
    assert body["message"].endswith(
        "Shape of input (1, 16, 16, 3) does not match expected shape (-1, 32, 32, 3)."
    )
