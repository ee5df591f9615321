"""``python -m tasks feedback``: a labelled drop checked, copied, versioned, and trained on.

Real files, real ``dvc`` and ``git`` in temporary folders, generated images; no mocks.
The checks run on a manifest built without Great Expectations; the acceptance check, which
runs ``dvc repro`` of download and validate, is marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.cli import main
from tasks.commands import feedback
from tasks.errors import StageError
from tasks.ml.manifest import build_manifest, carve_test_split, scan_raw
from tasks.paths import DatasetPaths
from tests.conftest import REPO, copy_project
from tests.data.images import config_for, make_raw, write_truncated_jpeg
from tests.datagen import make_archive, make_image, tiny_params

DS = "cats_vs_dogs"


def write_manifest(paths: DatasetPaths, cfg) -> pd.DataFrame:
    """The manifest validate would write for the raw tree (without running the suite)."""
    manifest = build_manifest(scan_raw(paths.raw, cfg.dataset(DS)), cfg.validate_)
    manifest = carve_test_split(manifest, cfg.evaluate.test_fraction)
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(paths.manifest, index=False)
    return manifest


def make_drop(folder: Path, per_class: dict[str, list[int]]) -> Path:
    """``folder/<class>/<seed>.jpg``, one generated image per seed (distinct bytes)."""
    for index, (label, seeds) in enumerate(per_class.items()):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            make_image(index % 2, 48, seed=seed).save(folder / label / f"{seed}.jpg", quality=90)
    return folder


@pytest.fixture
def project(tmp_path):
    """A dataset's raw tree and its manifest under ``tmp_path/project`` (no DVC, no git)."""
    cfg = config_for(DS)
    paths, _ = make_raw(tmp_path / "project", DS)
    manifest = write_manifest(paths, cfg)
    return cfg, paths, manifest


@pytest.fixture
def drop(tmp_path) -> Path:
    return make_drop(tmp_path / "inbox-elsewhere" / "drop1", {"cats": [501, 502], "dogs": [601]})


def sh(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def git_dvc(root: Path) -> None:
    """Make ``root`` a git checkout and a DVC project, with the project's .gitignore."""
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "ci@example.com")
    sh(root, "git", "config", "user.name", "CI")
    sh(root, sys.executable, "-m", "dvc", "init", "-q")
    sh(root, "git", "add", ".gitignore", ".dvc")
    sh(root, "git", "commit", "-qm", "project")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- what goes in ---------------------------------------------------------------


def test_a_clean_drop_is_copied_with_its_record(project, drop):
    cfg, paths, _ = project
    result = feedback.run(cfg, paths, str(drop))
    assert result.added == {"cats": 2, "dogs": 1} and result.skipped == []
    target = paths.feedback_drop("drop1")
    for image in drop.rglob("*.jpg"):
        assert (target / image.relative_to(drop)).read_bytes() == image.read_bytes()
    record = json.loads(paths.feedback_record("drop1").read_text())
    assert record["name"] == "drop1" and record["source"] == str(drop.resolve())
    assert record["counts"] == {"cats": 2, "dogs": 1} and record["images"] == 3
    assert (
        record["files"]["cats/501.jpg"]
        == hashlib.sha256((drop / "cats" / "501.jpg").read_bytes()).hexdigest()
    )
    assert not [p for p in paths.feedback.iterdir() if p.name.startswith(".")]  # no staging left
    assert "not a DVC project" in str(result) and "dvc add data/feedback/cats_vs_dogs/drop1" in (
        str(result)
    )


def test_a_drop_is_found_by_name_in_the_inbox(project):
    cfg, paths, _ = project
    make_drop(paths.root / "inbox" / DS / "monday", {"dogs": [701]})
    result = feedback.run(cfg, paths, "monday")
    assert result.added == {"dogs": 1}
    assert (paths.feedback_drop("monday") / "dogs" / "701.jpg").is_file()


def test_bad_images_and_duplicates_are_skipped_and_named(project, drop):
    cfg, paths, manifest = project
    write_truncated_jpeg(drop / "cats" / "broken.jpg")
    make_image(0, 8, seed=900).save(drop / "cats" / "tiny.jpg")  # under validate.min_side 16
    train_image = paths.raw / manifest[manifest["split"] == "train"]["path"].iloc[0]
    shutil.copy(train_image, drop / "dogs" / "old.jpg")
    shutil.copy(drop / "cats" / "501.jpg", drop / "cats" / "again.jpg")
    (drop / "notes.txt").write_text("loose")
    result = feedback.run(cfg, paths, str(drop))
    assert result.added == {"cats": 2, "dogs": 1}
    why = dict(result.skipped)
    assert why["cats/broken.jpg"].startswith("truncated or corrupt image")
    assert why["cats/tiny.jpg"].startswith("smaller than min_side 16")
    assert (
        why["dogs/old.jpg"] == f"duplicate of training image {train_image.relative_to(paths.raw)}"
    )
    # of two equal files the first in path order goes in
    assert why["cats/again.jpg"] == "duplicate of cats/501.jpg in this drop"
    assert why["notes.txt"] == "not inside a class folder"
    target = paths.feedback_drop("drop1")
    kept = {p.relative_to(target).as_posix() for p in target.rglob("*.jpg")}
    assert kept == {"cats/501.jpg", "cats/502.jpg", "dogs/601.jpg"}
    assert "cats/broken.jpg: truncated or corrupt image" in str(result)


def test_a_drop_of_earlier_drop_images_is_skipped(project, drop, tmp_path):
    cfg, paths, _ = project
    feedback.run(cfg, paths, str(drop))
    later = make_drop(tmp_path / "drop2", {"cats": [503]})
    shutil.copy(drop / "dogs" / "601.jpg", later / "cats" / "copy.jpg")
    result = feedback.run(cfg, paths, str(later))
    assert result.added == {"cats": 1}
    assert result.skipped == [
        ("cats/copy.jpg", "duplicate of drop1/dogs/601.jpg (fed back before)")
    ]


# --- refusals: one line each, nothing written -------------------------------------


def assert_nothing_written(paths: DatasetPaths) -> None:
    assert not paths.feedback.exists() or not any(paths.feedback.iterdir())


def test_a_missing_drop_names_where_it_looked(project, capsys):
    cfg, paths, _ = project
    with pytest.raises(StageError) as error:
        feedback.run(cfg, paths, "nope")
    assert "drop 'nope' not found" in one_line(error)
    assert str(paths.root / "inbox" / DS / "nope") in str(error.value)
    params = paths.root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params({DS: "file:///nowhere.zip"})))
    argv = ["feedback", DS, "nope", "--params", str(params), "--root", str(paths.root)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: drop 'nope' not found") and err.count("\n") == 1


def test_a_drop_without_class_folders_is_refused(project, tmp_path):
    cfg, paths, _ = project
    flat = tmp_path / "flat"
    make_drop(flat, {"batch1": [510], "batch2": [511]})
    with pytest.raises(StageError) as error:
        feedback.run(cfg, paths, str(flat))
    message = one_line(error)
    assert "is not laid out folder-per-class: class folders found: batch1, batch2" in message
    assert "<class>/<image> with the classes of cats_vs_dogs (cats, dogs)" in message
    assert_nothing_written(paths)


def test_a_class_folder_not_in_the_dataset_is_refused(project, drop):
    cfg, paths, _ = project
    make_drop(drop, {"birds": [520]})
    with pytest.raises(StageError) as error:
        feedback.run(cfg, paths, str(drop))
    assert "class folder(s) birds that are not classes of cats_vs_dogs" in one_line(error)
    assert_nothing_written(paths)


def test_held_out_images_refuse_the_drop(project, drop):
    cfg, paths, manifest = project
    test_image = manifest[manifest["split"] == "test"]["path"].iloc[0]
    val_image = manifest[manifest["split"] == "validation"]["path"].iloc[0]
    shutil.copy(paths.raw / test_image, drop / "cats" / "from-test.jpg")
    shutil.copy(paths.raw / val_image, drop / "dogs" / "from-val.jpg")
    with pytest.raises(StageError) as error:
        feedback.run(cfg, paths, str(drop))
    message = one_line(error)
    assert "drop drop1 refused: 2 of its images are held-out images" in message
    assert f"cats/from-test.jpg: test image {test_image}" in message
    assert f"dogs/from-val.jpg: validation image {val_image}" in message
    assert "remove them from the drop" in message
    assert_nothing_written(paths)


def test_a_drop_of_nothing_usable_is_refused(project, tmp_path):
    cfg, paths, _ = project
    bad = tmp_path / "bad"
    (bad / "cats").mkdir(parents=True)
    write_truncated_jpeg(bad / "cats" / "a.jpg")
    (bad / "dogs").mkdir()
    (bad / "dogs" / "b.jpg").write_bytes(b"")
    with pytest.raises(StageError) as error:
        feedback.run(cfg, paths, str(bad))
    assert "nothing to feed back" in one_line(error) and "dogs/b.jpg: empty file" in str(
        error.value
    )
    assert_nothing_written(paths)


def test_feedback_needs_the_manifest(tmp_path, drop):
    paths, _ = make_raw(tmp_path / "fresh", DS)
    with pytest.raises(StageError) as error:
        feedback.run(config_for(DS), paths, str(drop))
    assert "run `python -m tasks validate cats_vs_dogs` first" in one_line(error)


# --- the second time ------------------------------------------------------------


def test_feeding_a_drop_back_again_is_a_noop(project, drop, tmp_path):
    cfg, paths, _ = project
    feedback.run(cfg, paths, str(drop))
    before = paths.feedback_record("drop1").read_text()
    again = feedback.run(cfg, paths, str(drop))
    assert again.noop.startswith("drop drop1 was fed back on ") and again.added == {}
    assert str(again).startswith("feedback cats_vs_dogs drop1: nothing to do")
    renamed = tmp_path / "drop1-copy"
    shutil.copytree(drop, renamed)
    other = feedback.run(cfg, paths, str(renamed))
    assert other.noop.startswith("the same images were fed back as drop drop1")
    assert not paths.feedback_drop("drop1-copy").exists()
    assert paths.feedback_record("drop1").read_text() == before


def test_another_drop_under_a_taken_name_is_refused(project, drop, tmp_path):
    cfg, paths, _ = project
    feedback.run(cfg, paths, str(drop))
    other = make_drop(tmp_path / "later" / "drop1", {"dogs": [530]})
    with pytest.raises(StageError) as error:
        feedback.run(cfg, paths, str(other))
    assert "a drop named drop1 was fed back to cats_vs_dogs on " in one_line(error)
    assert "rename the new drop's folder" in str(error.value)


# --- the data version -------------------------------------------------------------


def test_feedback_is_a_dvc_data_version_committed_to_git(project, drop):
    cfg, paths, _ = project
    git_dvc(paths.root)
    result = feedback.run(cfg, paths, str(drop))
    dvc_file = paths.feedback / "drop1.dvc"
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    assert out["path"] == "drop1" and out["md5"].endswith(".dir") and out["nfiles"] == 4
    cached = paths.root / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
    assert cached.is_file()  # the images are in the DVC cache
    log = sh(paths.root, "git", "log", "-1", "--format=%s", "--name-only").split()
    assert " ".join(log[:4]) == "feedback: cats_vs_dogs drop1 (3"
    assert sorted(log[5:]) == [
        "data/feedback/cats_vs_dogs/.gitignore",
        "data/feedback/cats_vs_dogs/drop1.dvc",
    ]
    assert sh(paths.root, "git", "status", "--porcelain", "--", "data/feedback") == ""
    assert "git commit" in str(result)
    status = sh(paths.root, sys.executable, "-m", "dvc", "status", "--json", str(dvc_file))
    assert json.loads(status) == {}


def test_a_failed_dvc_add_leaves_nothing_behind(project, drop):
    cfg, paths, _ = project
    git_dvc(paths.root)
    (paths.root / ".gitignore").write_text("/data/\n")  # the drop's .dvc file would be ignored
    with pytest.raises(StageError) as error:
        feedback.run(cfg, paths, str(drop))
    message = one_line(error)
    assert "`dvc add data/feedback/cats_vs_dogs/drop1` failed" in message
    assert "git-ignored" in message and "nothing was fed back" in message
    assert not paths.feedback_drop("drop1").exists()
    assert not (paths.feedback / "drop1.dvc").exists()


def test_a_drop_copied_but_not_yet_versioned_is_versioned_on_the_next_run(project, drop):
    """As after a run stopped during `dvc add`: the folder is there, its .dvc file is not."""
    cfg, paths, _ = project
    feedback.run(cfg, paths, str(drop))  # not a DVC project yet: copied only
    git_dvc(paths.root)
    result = feedback.run(cfg, paths, str(drop))
    assert result.noop == "" and result.added == {"cats": 2, "dogs": 1}
    assert (paths.feedback / "drop1.dvc").is_file()
    assert "feedback: cats_vs_dogs drop1 (3 images)" in sh(paths.root, "git", "log", "-1")
    assert feedback.run(cfg, paths, str(drop)).noop.startswith("drop drop1 was fed back")


def test_without_git_the_commit_commands_are_printed(project, drop):
    cfg, paths, _ = project
    sh(paths.root, sys.executable, "-m", "dvc", "init", "-q", "--no-scm")
    result = feedback.run(cfg, paths, str(drop))
    assert (paths.feedback / "drop1.dvc").is_file()
    assert (
        "git add -- data/feedback/cats_vs_dogs/drop1.dvc data/feedback/cats_vs_dogs/.gitignore"
        " && git commit -m 'feedback: cats_vs_dogs drop1 (3 images)'" in str(result)
    )


# --- validate trains on it ----------------------------------------------------------


def test_validate_adds_the_drop_as_train_rows(project, drop):
    from tasks.steps import validate

    cfg, paths, _ = project
    first = validate.run(cfg, paths)
    before = pd.read_parquet(paths.manifest)
    assert set(before["source"]) == {""} and first.passed
    feedback.run(cfg, paths, str(drop))
    result = validate.run(cfg, paths)
    manifest = pd.read_parquet(paths.manifest)
    fed = manifest[manifest["source"] == "drop1"]
    assert len(manifest) == len(before) + 3 and len(fed) == 3
    assert set(fed["split"]) == {"train"} and set(fed["status"]) == {"ok"}
    assert (paths.raw / fed["path"]).map(lambda p: p.is_file()).all()
    assert fed["path"].str.startswith("../../feedback/cats_vs_dogs/drop1/").all()
    # the test and validation rows are the archive's, exactly as before
    held = ["validation", "test"]
    pd.testing.assert_frame_equal(
        manifest[manifest["split"].isin(held)].reset_index(drop=True),
        before[before["split"].isin(held)].reset_index(drop=True),
    )
    # counts: 6 configured + what the drop adds, so the count expectation still passes
    assert result.counts["splits"]["train"]["cats"] == {"ok": 8, "quarantined": 0, "expected": 8}
    assert result.counts["feedback"] == {"drop1": {"cats": 2, "dogs": 1}}
    metrics = json.loads(paths.validation_summary.read_text())
    assert metrics["feedback"] == {"drop1": {"cats": 2, "dogs": 1}}
    assert "fed back in train: drop1: cats 2, dogs 1" in str(result)


def test_validate_names_the_fix_for_a_drop_not_checked_out(project):
    from tasks.steps import validate

    cfg, paths, _ = project
    paths.feedback.mkdir(parents=True)
    (paths.feedback / "drop9.dvc").write_text("outs:\n- path: drop9\n")
    with pytest.raises(StageError) as error:
        validate.run(cfg, paths)
    assert "drop(s) drop9 of cats_vs_dogs are recorded" in one_line(error)
    assert "run `dvc checkout -R data/feedback`" in str(error.value)


# --- the acceptance check: the next training run gets a new data version ------------


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_a_drop_fed_back_changes_the_next_training_runs_data_version(tmp_path):
    """In a git + DVC copy of the project: `dvc repro validate`, feed a drop back through the
    CLI, and validate's data dep has changed; its repro makes a manifest with the drop's
    train rows and a new md5, the train stage's input. A clone gets the drop from the
    cache with `dvc checkout -R data/feedback`."""
    archive = make_archive(tmp_path / "served" / f"{DS}.zip", DS, {"train": 6, "validation": 3})
    root = copy_project(
        tmp_path / "repo",
        ["tasks", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore", "data/feedback/README.md"],
    )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(tiny_params({DS: str(archive)}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_init(root)
    dvc(root, "repro", f"validate@{DS}")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "validated")
    manifest = root / "data" / "manifests" / f"{DS}.parquet"
    md5_before = hashlib.md5(manifest.read_bytes()).hexdigest()
    assert json.loads(dvc(root, "status", "--json", f"validate@{DS}")) == {}

    drop = make_drop(tmp_path / "inbox" / "labelled", {"cats": [540, 541], "dogs": [640]})
    proc = subprocess.run(
        [sys.executable, "-m", "tasks", "feedback", DS, str(drop)],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 images fed back (cats 2, dogs 1)" in proc.stdout
    status = json.loads(dvc(root, "status", "--json", f"validate@{DS}"))
    assert {"changed deps": {"data/feedback": "modified"}} in status[f"validate@{DS}"]

    dvc(root, "repro", f"validate@{DS}")
    rows = pd.read_parquet(manifest)
    assert sorted(rows.loc[rows["source"] == "labelled", "split"]) == ["train"] * 3
    assert hashlib.md5(manifest.read_bytes()).hexdigest() != md5_before
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][f"validate@{DS}"]
    locked = {out["path"]: out["md5"] for out in lock["outs"]}
    assert locked[f"data/manifests/{DS}.parquet"] == hashlib.md5(manifest.read_bytes()).hexdigest()

    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "validated with the drop")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(root), str(clone))
    (clone / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {root / '.dvc' / 'cache'}\n")
    assert not (clone / "data" / "feedback" / DS / "labelled").exists()
    dvc(clone, "checkout", "-R", "data/feedback")
    for image in drop.rglob("*.jpg"):
        copied = clone / "data" / "feedback" / DS / "labelled" / image.relative_to(drop)
        assert copied.read_bytes() == image.read_bytes()


def git_init(root: Path) -> None:
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "ci@example.com")
    sh(root, "git", "config", "user.name", "CI")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "project")


def test_a_training_run_records_the_drops_it_trains_on(project, drop, tmp_path, monkeypatch):
    """The tag sits where the manifest is logged as the run's dataset (lineage.log_manifest)."""
    import mlflow

    from tasks.tracking.lineage import FEEDBACK_TAG, log_manifest

    cfg, paths, manifest = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("feedback")
    plain = client.create_run(experiment).info.run_id
    log_manifest(cfg, paths, plain, "training")
    fed = manifest.copy()
    fed.loc[fed.index[:2], "source"] = ["drop1", "drop0"]  # train rows: sorted by path first
    fed.to_parquet(paths.manifest, index=False)
    trained = client.create_run(experiment).info.run_id
    log_manifest(cfg, paths, trained, "training")
    assert client.get_run(plain).data.tags[FEEDBACK_TAG] == ""
    assert client.get_run(trained).data.tags[FEEDBACK_TAG] == "drop0,drop1"
    (entry,) = client.get_run(trained).inputs.dataset_inputs
    assert entry.dataset.digest == hashlib.md5(paths.manifest.read_bytes()).hexdigest()
    for run in (plain, trained):
        client.set_terminated(run)
    mlflow.set_tracking_uri(None)


def test_a_dataset_stored_as_shards_gets_the_drop_in_its_shards(tmp_path, drop):
    """``format: shards``: validate reads the drop's files beside the kept archive and
    writes them into the train shards, where the readers find them."""
    from tasks.artifacts import read_manifest
    from tasks.config import parse_config
    from tasks.ml.shards import image_file
    from tasks.steps import download, validate

    params = tiny_params({DS: "file:///nowhere/archive.zip"})
    params["datasets"][DS]["format"] = "shards"
    cfg = parse_config(params)
    paths = DatasetPaths.of(DS, tmp_path / "sharded")
    make_archive(paths.archive, DS)
    download.run(cfg, paths, offline=True)
    validate.run(cfg, paths)
    feedback.run(cfg, paths, str(drop))
    validate.run(cfg, paths)
    manifest = read_manifest(paths)  # checks the shards were written with this manifest
    fed = manifest[manifest["source"] == "drop1"]
    assert len(fed) == 3 and fed["shard"].str.startswith("train-").all()
    for _, row in fed.iterrows():
        original = drop / row["path"].removeprefix("../../feedback/cats_vs_dogs/drop1/")
        assert image_file(paths.shards, row).read() == original.read_bytes()
