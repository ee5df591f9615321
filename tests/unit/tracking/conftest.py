"""The tracking tests' config: tiny params, three training epochs."""

from __future__ import annotations

import pytest

from tasks.config import parse_config
from tests.datagen import tiny_params


@pytest.fixture
def cfg():
    return parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}), ["train.epochs=3"]
    )
