"""A full disk as it happens: a small tmpfs mounted where the output goes (tests/faults/disk.py).

Each test: a good run, then the file system left too small for the next write → the stage's
one ``error:`` line names the full file system and the fix, the earlier outputs are byte
for byte as they were, nothing temporary is left, no MLflow run stays RUNNING → given room,
the retry succeeds.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3

import pytest
import yaml

from tasks.paths import DatasetPaths
from tests.datagen import make_archive, tiny_params
from tests.faults.disk import SmallDisk
from tests.faults.test_faults import COUNTS, DS, LAYOUT_ROOT, one_line_error, snapshot, stage
from tests.invariants import end_open_executions

SPLITS = {"train": 4, "validation": 8}  # enough for validate to hold out a test split


@pytest.fixture
def small_disk():
    """``small_disk(path, size)``: a :class:`SmallDisk` there, unmounted after the test."""
    made: list[SmallDisk] = []

    def make(path, size: int) -> SmallDisk:
        made.append(SmallDisk(path, size))
        return made[-1]

    yield make
    for disk in made:
        disk.unmount()


def downloaded_on_small_disk(archive_server, write_params, tmp_path, small_disk, where: str):
    """A good first download into ``tmp_path/ws`` with its ``where`` folder (a DatasetPaths
    attribute's parent: ``raw``, ``archive``) on an 8 MB tmpfs; (paths, disk, kept outputs)."""
    paths = DatasetPaths.of(DS, tmp_path / "ws")
    disk = small_disk(getattr(paths, where).parent, 8_000_000)
    v1 = make_archive(tmp_path / "v1.zip", DS, COUNTS, 16).read_bytes()
    url = archive_server.add(f"/{tmp_path.name}/v1.zip", v1)
    done = stage("download", write_params(tiny_params({DS: url})), paths.root)
    assert done.returncode == 0, done.stderr[-3000:]
    return paths, disk, snapshot(paths.raw, paths.download_record)


@pytest.mark.network
def test_a_full_disk_while_extracting_keeps_the_previous_dataset_and_the_retry_extracts(
    archive_server, write_params, tmp_path, small_disk
):
    """data/raw runs out of room for files midway through extracting (the bytes fit, so the
    up-front size check passes) → `error: no inodes (room for new files) left on the device
    while extracting <zip> to data/raw/<ds>; delete files on the file system of data/raw or
    give it more inodes (N free now), then rerun; the previous tree there is kept` → the
    earlier tree and its record, byte for byte, no temporary tree → the retry extracts."""
    paths, disk, kept = downloaded_on_small_disk(
        archive_server, write_params, tmp_path, small_disk, "raw"
    )
    ws = paths.root
    listing = sorted(p.name for p in paths.raw.parent.iterdir())

    # upstream changed: 40 more small files (the tmpfs lets 10 new ones be made), or one of
    # 3 MB where the stand-in caps files at 1.5 MB
    extra = {f"{LAYOUT_ROOT}/train/cats/more{i}.bin": b"x" * 100 for i in range(40)}
    extra[f"{LAYOUT_ROOT}/train/cats/huge.bin"] = bytes(3_000_000 if not disk.mounted else 100)
    v2 = make_archive(tmp_path / "v2.zip", DS, COUNTS, 16, seed=5, extra=extra).read_bytes()
    params = write_params(tiny_params({DS: archive_server.add("/v2.zip", v2)}, COUNTS))
    disk.leave_free(4_000_000, largest_file=3_000_000, files=10)
    failed = stage("download", params, ws, fsize=disk.limit)

    message = one_line_error(failed)
    expected = disk.storage_error(
        f"extracting {paths.archive} to {paths.raw}",
        paths.raw.parent,
        "the previous tree there is kept",
        inodes=True,
    )
    assert expected.fullmatch(message), message
    assert snapshot(paths.raw, paths.download_record) == kept
    assert sorted(p.name for p in paths.raw.parent.iterdir()) == listing  # no temporary tree
    disk.resize(16_000_000)
    retry = stage("download", params, ws)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert (paths.raw / LAYOUT_ROOT / "train/cats/more39.bin").read_bytes() == b"x" * 100


@pytest.mark.network
def test_a_full_disk_while_downloading_keeps_the_dataset_and_the_retry_resumes(
    archive_server, write_params, tmp_path, small_disk
):
    """data/archives full midway through a download → `error: cats_vs_dogs: no space left on
    the device while downloading <url> to <zip>.part; free space on the file system of
    data/archives (N free now), then rerun (the download resumes there)` → the earlier dataset
    untouched; given room, the retry resumes the partial file and succeeds."""
    paths, disk, kept = downloaded_on_small_disk(
        archive_server, write_params, tmp_path, small_disk, "archive"
    )
    ws = paths.root

    noise = os.urandom(300_000)  # does not compress
    extra = {f"{LAYOUT_ROOT}/train/cats/noise.bin": noise}
    v2 = make_archive(tmp_path / "d2.zip", DS, COUNTS, 16, seed=5, extra=extra).read_bytes()
    url = archive_server.add("/d2.zip", v2)
    params = write_params(tiny_params({DS: url}, COUNTS))
    disk.leave_free(100_000, largest_file=200_000)
    failed = stage("download", params, ws, fsize=disk.limit)

    part = paths.archive.with_name(paths.archive.name + ".part")
    expected = disk.storage_error(f"downloading {url} to {part}", paths.archive.parent, "")
    message = one_line_error(failed)
    assert message.startswith(f"{DS}: ") and message.endswith(
        ", then rerun (the download resumes there)"
    ), message
    assert expected.pattern.removesuffix(";\\ ").removesuffix("\\ ") in re.escape("x") or True
    assert re.fullmatch(
        expected.pattern.removesuffix(re.escape("; ")) + re.escape(" (the download resumes there)"),
        message.removeprefix(f"{DS}: "),
    ), message
    assert snapshot(paths.raw, paths.download_record) == kept
    written = part.stat().st_size
    assert 0 < written < len(v2) and part.read_bytes() == v2[:written]

    disk.resize(8_000_000)
    retried = stage("download", params, ws)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert archive_server.requests_for("/d2.zip")[-1].header("Range") == f"bytes={written}-"
    assert paths.archive.read_bytes() == v2
    assert (paths.raw / LAYOUT_ROOT / "train/cats/noise.bin").read_bytes() == noise


@pytest.mark.network
def test_a_tree_too_big_for_the_disk_is_refused_before_a_byte_is_written(
    archive_server, write_params, tmp_path, small_disk
):
    """The new tree needs more bytes than data/raw has → refused up front, in one line naming
    the file system and the fix → the earlier tree kept, nothing written."""
    paths, disk, kept = downloaded_on_small_disk(
        archive_server, write_params, tmp_path, small_disk, "raw"
    )
    big = {f"{LAYOUT_ROOT}/train/cats/huge.bin": bytes(3_000_000)}
    v2 = make_archive(tmp_path / "v2.zip", DS, COUNTS, 16, seed=5, extra=big).read_bytes()
    params = write_params(tiny_params({DS: archive_server.add("/b2.zip", v2)}, COUNTS))
    disk.leave_free(1_000_000, largest_file=3_000_000)
    failed = stage("download", params, paths.root, fsize=disk.limit)
    message = one_line_error(failed)
    if disk.mounted:  # refused before the first byte
        assert re.fullmatch(
            re.escape(f"extracting {paths.archive} to {paths.raw} needs 3.0 MB but its file "
                      "system has ") + r"[0-9.]+ (bytes|KB|MB)"
            + re.escape(f" free; free space on the file system of {paths.raw.parent}, then "
                        "rerun; the previous tree there is kept"),
            message,
        ), message  # fmt: skip
    else:  # the stand-in stops the write instead
        doing = f"extracting {paths.archive} to {paths.raw}"
        kept_line = "the previous tree there is kept"
        assert disk.storage_error(doing, paths.raw, kept_line).fullmatch(message), message
    assert snapshot(paths.raw, paths.download_record) == kept


@pytest.mark.network
def test_a_full_disk_while_writing_the_manifest_keeps_the_previous_one_and_the_retry_writes(
    archive_server, write_params, tmp_path, small_disk
):
    """Full data/manifests while validate writes → `error: no space left on the device while
    ...` → the earlier manifest byte for byte, no temporary file → with room, the retry."""
    ws = tmp_path / "ws"
    paths = DatasetPaths.of(DS, ws)
    disk = small_disk(paths.manifest.parent, 8_000_000)
    archive = make_archive(tmp_path / "m.zip", DS, SPLITS, 40).read_bytes()
    params = write_params(tiny_params({DS: archive_server.add("/full/m.zip", archive)}, SPLITS))
    for command in ("download", "validate"):
        done = stage(command, params, ws)
        assert done.returncode == 0, done.stderr[-3000:]
    kept = snapshot(paths.manifest.parent)
    before = sorted(p.name for p in paths.manifest.parent.iterdir())

    disk.leave_free(0, largest_file=paths.manifest.stat().st_size)
    failed = stage("validate", params, ws, "--set", "validate.min_side=36", fsize=disk.limit)
    expected = disk.storage_error(
        f"writing the manifest {paths.manifest}",
        paths.manifest.parent,
        "the previous manifest there is kept",
    )
    if disk.mounted:
        message = one_line_error(failed)
        assert expected.fullmatch(message), message
    else:  # a file-size limit cannot single out the manifest: the report pages hit it first
        print("stand-in: the first write past the limit is a Great Expectations page")
        last = failed.stderr.strip().splitlines()[-1]
        assert failed.returncode == 2 and last.startswith("error: file too large while "), last
    assert snapshot(paths.manifest.parent) == kept
    assert sorted(p.name for p in paths.manifest.parent.iterdir()) == before

    disk.resize(8_000_000)
    retry = stage("validate", params, ws, "--set", "validate.min_side=36")
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert snapshot(paths.manifest) != {k: v for k, v in kept.items() if k == str(paths.manifest)}


# ----------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, offline_weights):
    """One good train run whose models/ and MLflow artifact store are each a tmpfs."""
    from tests.faults.test_faults import stage_env
    from tests.model.conftest import make_workspace

    root = tmp_path_factory.mktemp("full-train")
    paths = make_workspace(root / "ws", {"train": 4, "validation": 4}, size=32)
    disks = {
        "models": SmallDisk(paths.models, 64_000_000),
        "artifacts": SmallDisk(root / "artifacts", 64_000_000),
    }
    raw = tiny_params({DS: "http://127.0.0.1:1/x.zip"}, train={"weights": str(offline_weights)})
    raw["train"] |= {"epochs": 1, "batch_size": 8}
    raw["tracking"] = {"artifact_location": str(root / "artifacts")}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    store = root / "mlflow.db"
    env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    done = stage("train", params, paths.root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    end_open_executions(env["MLFLOW_TRACKING_URI"])  # train alone: register would end it
    yield {"paths": paths, "params": params, "env": env, "store": store, **disks}
    for disk in disks.values():
        disk.unmount()


def train_runs(store) -> dict[str, str]:
    """run name -> status of every run in the SQLite store."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        return dict(db.execute("SELECT run_uuid, status FROM runs").fetchall())


@pytest.mark.slow
def test_a_full_disk_while_saving_the_model_keeps_the_previous_model_and_ends_the_run_failed(
    trained,
):
    """models/ full when train saves → `error: no space left on the device while saving the
    model to models/<ds>/frozen.keras; free space on the file system of models/<ds> (N free
    now), then rerun; the previous model there is kept` → frozen.keras, its history and run
    record byte for byte, no temporary, the run FAILED (not RUNNING) → the retry saves."""
    paths, disk = trained["paths"], trained["models"]
    outputs = [paths.frozen_model, paths.phase_history("train"), paths.run_record("train")]
    kept = snapshot(*outputs)
    runs = train_runs(trained["store"])
    size = paths.frozen_model.stat().st_size
    disk.leave_free(size // 2, largest_file=size)
    failed = stage(
        "train", trained["params"], paths.root, "--set", "train.seed=7",
        fsize=disk.limit, env=trained["env"],
    )  # fmt: skip

    expected = disk.storage_error(
        f"saving the model to {paths.frozen_model}",
        paths.models,
        "the previous model there is kept",
    )
    message = one_line_error(failed)
    assert expected.fullmatch(message), message
    assert snapshot(*outputs) == kept
    assert [p.name for p in paths.models.iterdir()] == ["frozen.keras"]  # no temporary left
    new = {k: v for k, v in train_runs(trained["store"]).items() if k not in runs}
    assert sorted(new.values()) == ["FAILED", "FAILED"], new  # the phase's and its execution

    disk.resize(64_000_000)
    retry = stage(
        "train", trained["params"], paths.root, "--set", "train.seed=7", env=trained["env"]
    )
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert snapshot(paths.frozen_model) != {k: v for k, v in kept.items() if "frozen" in k}
    assert len(end_open_executions(trained["env"]["MLFLOW_TRACKING_URI"])) == 1


@pytest.mark.slow
def test_a_full_artifact_store_while_logging_fails_in_one_line_and_the_retry_logs(trained):
    """The MLflow artifact store (a local folder) full while train logs its history →
    `error: no space left on the device while logging artifacts to the MLflow artifact store
    <run's artifact folder>; free space on the file system of ... (N free now), then rerun
    `python -m tasks train <ds>`` → the runs end FAILED, the run record still names the last
    good run → the retry logs. (The new model and history are already in place by then, whole:
    train commits its outputs before it logs them, and dvc.lock, not updated by the failed
    stage, makes `dvc repro` run train again.)"""
    paths, disk = trained["paths"], trained["artifacts"]
    record = snapshot(paths.run_record("train"))
    runs = train_runs(trained["store"])
    disk.leave_free(0, largest_file=4096)
    failed = stage(
        "train", trained["params"], paths.root, "--set", "train.seed=8",
        fsize=disk.limit, env=trained["env"],
    )  # fmt: skip
    message = one_line_error(failed)
    new = {k: v for k, v in train_runs(trained["store"]).items() if k not in runs}
    assert sorted(new.values()) == ["FAILED", "FAILED"], new
    (store,) = [disk.path / r / "artifacts" for r in new if (disk.path / r / "artifacts").is_dir()]
    if disk.mounted:
        assert message.startswith(
            f"no space left on the device while logging artifacts to the MLflow artifact store "
            f"{store}; free space on the file system of {store} ("
        ), message
        assert message.endswith(f" free now), then rerun `python -m tasks train {DS}`"), message
    else:  # a file-size limit cannot single out the store: another write may hit it first
        print("stand-in: the first write past the limit need not be an artifact")
        assert message.startswith("file too large while "), message
    assert snapshot(paths.run_record("train")) == record

    disk.resize(64_000_000)
    retry = stage(
        "train", trained["params"], paths.root, "--set", "train.seed=8", env=trained["env"]
    )
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert len(end_open_executions(trained["env"]["MLFLOW_TRACKING_URI"])) == 1
