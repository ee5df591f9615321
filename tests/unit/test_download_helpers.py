"""The download stage's small pure helpers: the layout check, the known-hash record, local
sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.archives import check_layout
from tasks.config import parse_config
from tasks.errors import SourceFailed, StageError
from tasks.http_fetch import local_source
from tasks.paths import DatasetPaths
from tasks.steps.download import expected_hash
from tests.datagen import tiny_params


def _dataset(**layout):
    raw = tiny_params({"cats_vs_dogs": "file:///x.zip"})
    raw["datasets"]["cats_vs_dogs"]["layout"].update(layout)
    return parse_config(raw).dataset("cats_vs_dogs")


def test_check_layout_names_the_missing_folders():
    folders = {"cats_and_dogs_filtered/train"}
    check_layout(folders, _dataset(validation="train"))
    with pytest.raises(StageError, match="no cats_and_dogs_filtered/validation/ .*found: "):
        check_layout(folders, _dataset())
    with pytest.raises(StageError, match="no other/train/ or other/validation/ .*cats_and_dogs"):
        check_layout(folders, _dataset(root="other"))


def test_known_hash_record_is_read_and_a_malformed_one_is_named(tmp_path):
    ds = _dataset()
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    assert expected_hash(ds, paths) is None
    paths.known_hashes.parent.mkdir(parents=True)
    paths.known_hashes.write_text("A" * 64 + "  cats_vs_dogs.zip\n# trusted on first use\n")
    got = expected_hash(ds, paths)
    assert got is not None and got.sha256 == "a" * 64 and not got.pinned
    paths.known_hashes.write_text("not-a-hash  cats_vs_dogs.zip\n")
    with pytest.raises(StageError, match=f"{paths.known_hashes}.*not a sha256.*delete"):
        expected_hash(ds, paths)
    pinned = parse_config(
        tiny_params({"cats_vs_dogs": "file:///x.zip"}),
        ["datasets.cats_vs_dogs.sha256=" + "b" * 64],
    ).dataset("cats_vs_dogs")
    got = expected_hash(pinned, paths)  # a pin wins over the (broken) record
    assert got is not None and got.sha256 == "b" * 64 and got.pinned


def test_local_sources():
    assert local_source("https://example.com/a.zip") is None
    assert local_source("file:///srv/my%20data/a.zip") == Path("/srv/my data/a.zip")
    assert local_source("data/a.zip") == Path("data/a.zip")
    with pytest.raises(SourceFailed, match="host"):
        local_source("file://server/share/a.zip")
