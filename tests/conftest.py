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
