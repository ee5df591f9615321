"""Shared fixtures: tiny generated data, never the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Quiet, deterministic, offline defaults for every test process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@pytest.fixture
def write_params(tmp_path):
    """Write a params mapping to ``tmp_path/params.yaml``; returns its path."""

    def _write(params: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return _write


@pytest.fixture(scope="session")
def archive_server():
    """A loopback HTTP server for the whole session: ``archive_server.add(path, bytes, **faults)``.

    Returns the URL; faults and the request log are per path (see tasks/dev/httpserver.py).
    """
    from tasks.dev.httpserver import ArchiveServer

    with ArchiveServer() as server:
        yield server


@pytest.fixture(scope="session")
def offline_weights(tmp_path_factory) -> Path:
    """A MobileNetV2 ``.weights.h5`` pretrained offline at 32 px (made once per session).

    ``tasks.dev.offline_weights.make_offline_weights`` pretrains it on a generated
    source task: with random weights the frozen features are collapsed and a head
    stays at chance (the tiny pipelines then score 0.5, a one-class model), so every
    run that must learn (the model tests, the e2e and deploy pipelines) uses this
    real weights file, made without the network.
    """
    from tasks.dev.offline_weights import make_offline_weights

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_32.weights.h5"
    return make_offline_weights("mobilenet_v2", path, image_size=32)
