"""A dataset stored as shards: download keeps the archive whole, validate writes TFRecord
shards, and every reader sees the same images as from the extracted files.

One generated archive goes through ``download`` and ``validate`` twice, as
``format: files`` and as ``format: shards`` (shards of a few kB, so each split
spans several); the tests compare the two workspaces.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tasks.artifacts import image_root, read_manifest
from tasks.config import parse_config
from tasks.errors import StageError
from tasks.ml.inputs import decoded_batches
from tasks.ml.manifest import COLUMNS, QUARANTINED
from tasks.ml.shards import INDEX, image_file, read_index, read_record, shard_records
from tasks.paths import DatasetPaths
from tasks.steps import download, validate
from tests.data.images import jpeg_bytes
from tests.datagen import LAYOUTS, make_archive, tiny_params

DS = "cats_vs_dogs"
CLASSES = list(LAYOUTS[DS]["classes"])
SPLITS = ("train", "validation", "test")


def config(stored_as: str, **validate_settings):
    params = tiny_params({DS: "file:///nowhere/archive.zip"})
    params["datasets"][DS]["format"] = stored_as
    params["validate"].update({"shard_mb": 0.004, "quarantine_budget": 0.1, **validate_settings})
    return parse_config(params)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The generated archive, with one truncated JPEG that validate must quarantine."""
    base = tmp_path_factory.mktemp("archive")
    broken = jpeg_bytes(seed=5)[:300]
    top = LAYOUTS[DS]
    entry = f"{top['root']}/{top['train']}/cats/broken.jpg"
    return make_archive(base / "cats.zip", DS, extra={entry: broken})


def prepared(root, archive, stored_as):
    """``root`` after download (offline, from the archive) and validate as ``stored_as``."""
    paths = DatasetPaths.of(DS, root)
    paths.archive.parent.mkdir(parents=True)
    shutil.copyfile(archive, paths.archive)
    cfg = config(stored_as)
    said = str(download.run(cfg, paths, offline=True))
    assert ("kept whole in" in said, "extracted to" in said) == (
        stored_as == "shards",
        stored_as == "files",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        validate.run(cfg, paths)
    return paths


@pytest.fixture(scope="module")
def both(archive, tmp_path_factory):
    files = prepared(tmp_path_factory.mktemp("files"), archive, "files")
    shards = prepared(tmp_path_factory.mktemp("shards"), archive, "shards")
    return files, shards


def test_the_archive_is_kept_whole_and_the_images_written_as_a_few_shards(both):
    files, shards = both
    assert [p.name for p in shards.raw.iterdir()] == ["archive.zip"]
    assert shards.raw_archive.read_bytes() == shards.archive.read_bytes()
    assert json.loads(shards.download_record.read_text())["format"] == "shards"
    index = read_index(shards.shards)
    names = sorted(p.name for p in shards.shards.glob("*.tfrecord"))
    assert sorted(index["shards"]) == names
    per_split = {s: [n for n in names if n.startswith(f"{s}-")] for s in SPLITS}
    assert all(len(per_split[s]) >= 2 for s in ("train", "validation")), names
    # files: the tree extracted, and an index that says so (the DVC out of validate)
    assert (files.raw / LAYOUTS[DS]["root"]).is_dir()
    assert sorted(p.name for p in files.shards.iterdir()) == [INDEX]
    assert read_index(files.shards) == {"format": "files"}


def test_both_ways_give_the_same_manifest_and_each_record_is_its_file(both):
    files, shards = both
    by_files, by_shards = read_manifest(files), read_manifest(shards)
    pd.testing.assert_frame_equal(by_files[list(COLUMNS)], by_shards[list(COLUMNS)])
    quarantined = by_shards[by_shards["status"] == QUARANTINED]
    assert list(quarantined["path"].str.rsplit("/", n=1).str[-1]) == ["broken.jpg"]
    assert quarantined["shard"].isna().all() and quarantined["offset"].isna().all()
    ok = by_shards[by_shards["status"] == "ok"]
    index = read_index(shards.shards)
    assert index["shards"] and sum(s["records"] for s in index["shards"].values()) == len(ok)
    for _, row in ok.iterrows():
        data = read_record(shards.shards / row["shard"], int(row["offset"]))
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert data == (files.raw / row["path"]).read_bytes()
        assert image_file(shards.shards, row).read() == data


@pytest.mark.parametrize("split", SPLITS)
def test_shards_and_files_decode_to_identical_batches(both, split):
    files, shards = both
    got = {}
    for paths in (files, shards):
        frame = read_manifest(paths)
        ds = decoded_batches(frame, image_root(paths, frame), split, CLASSES, 24, 4)
        got[paths] = [(x.numpy(), y.numpy()) for x, y in ds]
    assert len(got[files]) == len(got[shards]) > 0
    for (x_files, y_files), (x_shards, y_shards) in zip(got[files], got[shards], strict=True):
        np.testing.assert_array_equal(x_files, x_shards)
        np.testing.assert_array_equal(y_files, y_shards)


def test_a_subset_of_rows_reads_just_those_records_in_order(both):
    _, shards = both
    frame = read_manifest(shards)
    rows = frame[(frame["split"] == "train") & (frame["status"] == "ok")].iloc[::3]
    got = [record.numpy() for record in shard_records(shards.shards, rows)]
    want = [read_record(shards.shards / r["shard"], int(r["offset"])) for _, r in rows.iterrows()]
    assert len(got) == len(rows) >= 3 and got == want
    with pytest.raises(StageError, match="manifest order"):
        shard_records(shards.shards, rows.iloc[::-1])


def test_a_manifest_from_another_run_than_the_shards_is_refused(both, tmp_path):
    _, shards = both
    copy = DatasetPaths.of(DS, tmp_path)
    shutil.copytree(shards.shards, copy.shards)
    copy.manifest.parent.mkdir(parents=True)
    frame = read_manifest(shards)
    first = frame["offset"].first_valid_index()
    frame.loc[first, "offset"] += 1
    frame.to_parquet(copy.manifest, index=False)
    with pytest.raises(StageError, match="were not written with the manifest") as error:
        read_manifest(copy)
    assert "rerun `python -m tasks validate cats_vs_dogs`" in str(error.value)


def test_a_format_other_than_what_download_stored_is_a_one_line_error(both):
    files, _ = both
    with pytest.raises(StageError, match="format is shards but .* holds the dataset as files"):
        validate.run(config("shards"), files)
