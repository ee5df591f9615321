"""Both phases on generated data with offline-made weights, tracked in a temporary MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.contract import RunRecord
from tasks.errors import StageError
from tasks.io import file_md5, sha256_file
from tasks.ml.training import METRICS, choose_candidate
from tasks.paths import DatasetPaths
from tasks.steps import finetune, train
from tests.model.conftest import load_images, make_workspace, model_config

pytestmark = pytest.mark.slow


def _runs(tracking_uri: str) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("cats_vs_dogs")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return {run.data.tags.get("phase", "parent"): run for run in runs}  # the latest per phase


def test_train_then_finetune_learns_and_is_tracked(tmp_path, offline_weights, tracking):
    from mlflow.tracking import MlflowClient

    paths = make_workspace(tmp_path, {"train": 24, "validation": 12})
    cfg = model_config(
        "train.epochs=15",
        "train.optimizer=adam",
        "train.learning_rate=0.003",
        "finetune.epochs=2",
        train={"weights": str(offline_weights)},
    )

    frozen = train.run(cfg, paths)
    assert frozen.feature_cache
    assert frozen.val_accuracy >= 0.8, frozen
    assert paths.frozen_model.is_file()
    head_params = frozen.trainable_params
    assert 0 < head_params < frozen.total_params / 100

    tuned = finetune.run(cfg, paths)
    assert tuned.trainable_params > head_params
    assert paths.finetuned_model.is_file()

    # candidate: the phase with the lower validation loss, both scores recorded
    record = json.loads(paths.candidate.read_text())
    better = "finetune" if record["finetune"]["val_loss"] < record["train"]["val_loss"] else "train"
    assert record["phase"] == better
    expected_file = paths.finetuned_model if better == "finetune" else paths.frozen_model
    assert (paths.root / record["path"]).resolve() == expected_file.resolve()
    assert record["val_loss"] == record[better]["val_loss"]
    assert record["reason"]

    # history of both phases, epochs numbered globally
    history = pd.read_csv(paths.history)
    assert list(history.columns) == ["phase", "epoch", *METRICS]
    assert list(history["phase"]) == ["train"] * frozen.epochs_run + ["finetune"] * 2
    assert list(history["epoch"]) == list(range(1, frozen.epochs_run + 3))
    assert pd.read_csv(paths.phase_history("train")).shape[0] == frozen.epochs_run
    assert (paths.reports / "history" / "train.png").read_bytes()[:4] == b"\x89PNG"
    assert (paths.reports / "history" / "curves.png").is_file()

    # MLflow: one parent, two children, same param and metric names, lineage tags
    runs = _runs(tracking)
    client = MlflowClient(tracking)
    parent, train_run, tune_run = runs["parent"], runs["train"], runs["finetune"]
    for child in (train_run, tune_run):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["weights.sha256"] == sha256_file(offline_weights)
        assert child.data.params["backbone"] == "mobilenet_v2"
        assert child.data.params["image_size"] == "32"
        assert str(offline_weights) in child.data.params["weights_source"]
        assert set(METRICS) <= set(child.data.metrics)
    assert RunRecord.read(paths.run_record("finetune")).parent_run_id == parent.info.run_id

    # the device policy on this CPU, recorded with the same names as on a GPU
    for child in (train_run, tune_run):
        policy = {k: child.data.params[k] for k in ("precision", "jit_compile", "distribute")}
        assert policy == {"precision": "float32", "jit_compile": "False", "distribute": "none"}
        assert child.data.params["replicas"] == "1"
        assert child.data.params["global_batch_size"] == child.data.params["batch_size"]
        assert child.data.tags["resumed_after_epoch"] == "0"
    assert not paths.checkpoint("train").exists() and not paths.checkpoint("finetune").exists()

    p = train_run.data.params
    assert p["trainable_params"] == str(head_params)
    assert p["feature_cache"] == "True"
    assert p["learning_rate"] == "0.003"
    assert train_run.data.tags["model.md5"] == file_md5(paths.frozen_model)
    steps = [m.step for m in client.get_metric_history(train_run.info.run_id, "val_accuracy")]
    assert sorted(steps) == list(range(1, frozen.epochs_run + 1))
    train_artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id, "history")}
    assert train_artifacts == {"history/train.csv", "history/train.png"}

    q = tune_run.data.params
    assert q["unfreeze_from"] == "block_11_expand_relu"
    assert q["trainable_params"] == str(tuned.trainable_params)
    assert q["learning_rate"] == "1e-05"
    assert q["augment"] == "False"
    assert q["feature_cache"] == "True"  # the default: the top blocks train on cached activations
    assert tune_run.data.tags["model.md5"] == file_md5(paths.finetuned_model)
    assert tune_run.data.tags["candidate.phase"] == record["phase"]
    assert tune_run.data.metrics["finetune_improved"] == float(record["phase"] == "finetune")
    steps = [m.step for m in client.get_metric_history(tune_run.info.run_id, "val_loss")]
    assert sorted(steps) == [frozen.epochs_run + 1, frozen.epochs_run + 2]

    # fine-tuning that makes things worse is reported, and the frozen model stays the candidate
    wrecked = finetune.run(
        model_config(
            "finetune.epochs=1",
            "finetune.optimizer=sgd",
            "finetune.learning_rate=3.0",
            "finetune.early_stopping_patience=0",
            train={"weights": str(offline_weights)},
        ),
        paths,
    )
    record = json.loads(paths.candidate.read_text())
    assert record["phase"] == "train", record
    assert record["path"] == "models/cats_vs_dogs/frozen.keras"
    assert "did not beat the frozen model" in record["reason"]
    assert "did not beat" in str(wrecked)
    latest = _runs(tracking)["finetune"]
    assert latest.data.tags["finetune.improved"] == "false"


def test_a_killed_stage_resumes_at_its_last_finished_epoch(tmp_path, offline_weights, tracking):
    """SIGKILL of ``python -m tasks train`` mid-phase; the next attempt resumes, not restarts."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.datagen import tiny_params

    paths = make_workspace(tmp_path / "killed", {"train": 24, "validation": 12})
    reference = DatasetPaths.of("cats_vs_dogs", tmp_path / "reference")
    shutil.copytree(paths.root, reference.root)
    params = tmp_path / "params.yaml"
    train_section = {"weights": str(offline_weights), "feature_cache": "off", "epochs": 12}
    train_section |= {"early_stopping_patience": 12, "optimizer": "adam", "learning_rate": 0.003}
    params.write_text(
        yaml.safe_dump(
            tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/x.zip"}, train=train_section)
        )
    )

    def command(root):
        return [sys.executable, "-m", "tasks", "train", "cats_vs_dogs", "--params", str(params),
                "--root", str(root)]  # fmt: skip

    done = subprocess.run(command(reference.root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    state = paths.checkpoint("train") / "state.json"
    victim = subprocess.Popen(command(paths.root), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and victim.poll() is None:
        try:
            if len(json.loads(state.read_text())["finished"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = len(json.loads(state.read_text())["finished"])
    assert 3 <= killed_at < 12, "the phase must be killed mid-way"
    assert not paths.frozen_model.exists()  # nothing half-written where DVC looks

    resumed = subprocess.run(command(paths.root), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"phase 1 resumes after epoch {killed_at} of 12" in resumed.stderr
    assert not paths.checkpoint("train").exists()  # a completed phase removes its checkpoint

    mine = pd.read_csv(paths.phase_history("train"))
    theirs = pd.read_csv(reference.phase_history("train"))
    assert list(mine["epoch"]) == list(theirs["epoch"]) == list(range(1, 13))
    # the epochs before the kill are the uninterrupted run's (same seed, same order) ...
    np.testing.assert_allclose(
        mine[list(METRICS)].to_numpy()[:killed_at],
        theirs[list(METRICS)].to_numpy()[:killed_at],
        rtol=1e-3,
        atol=1e-4,
    )
    # ... and the resumed epochs learn as well (the shuffle order after a resume is a new draw)
    assert mine["val_accuracy"].max() >= 0.8
    assert abs(mine["val_accuracy"].iloc[-1] - theirs["val_accuracy"].iloc[-1]) <= 0.2
    run = _runs(tracking)["train"]
    assert run.data.tags["resumed_after_epoch"] == str(killed_at)
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(tracking).get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 13))  # the retry's run holds the whole history


def test_cached_features_train_the_same_model_as_end_to_end(tmp_path, offline_weights, tracking):
    """Phase 1 on cached features = phase 1 through the backbone on every step."""
    import keras

    from tasks.artifacts import load_model

    paths = make_workspace(tmp_path, {"train": 12, "validation": 6})
    settings = dict(
        train={"weights": str(offline_weights), "head": {"dropout": 0.0}},
    )
    common = ("train.epochs=3", "train.optimizer=adam", "train.learning_rate=0.003")
    cached = train.run(model_config(*common, "train.feature_cache=on", **settings), paths)
    cached_model = load_model(paths.frozen_model)
    direct = train.run(model_config(*common, "train.feature_cache=off", **settings), paths)
    direct_model = load_model(paths.frozen_model)
    assert cached.feature_cache and not direct.feature_cache

    images = load_images(paths, "validation", 32)
    # the same end-to-end model type: raw images in, the head on backbone features out
    for model in (cached_model, direct_model):
        assert [layer.name for layer in model.layers] == [
            "image",
            "preprocess",
            "backbone",
            "head",
        ]
        assert isinstance(model.get_layer("head"), keras.Sequential)
    features = cached_model.get_layer("backbone")(
        cached_model.get_layer("preprocess")(images), training=False
    )
    by_parts = cached_model.get_layer("head")(features, training=False)
    np.testing.assert_allclose(cached_model.predict(images, verbose=0), by_parts, atol=1e-6)
    # same seed, same batches in the same order: the same head weights
    for a, b in zip(
        cached_model.get_layer("head").get_weights(),
        direct_model.get_layer("head").get_weights(),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(
        cached_model.predict(images, verbose=0), direct_model.predict(images, verbose=0), atol=1e-4
    )


def test_fine_tuning_on_boundary_activations_trains_the_same_model(
    tmp_path, offline_weights, tracking
):
    """Phase 2 on activations cached at the fine-tune boundary = phase 2 on images.

    MobileNetV2's boundary (``block_11_expand_relu``) is crossed by two tensors
    (the expanded activations and the block's residual input), so this also
    covers a cut with several inputs.
    """
    from tasks.artifacts import load_model

    paths = make_workspace(tmp_path, {"train": 12, "validation": 6})
    settings = dict(train={"weights": str(offline_weights), "head": {"dropout": 0.0}})
    common = ("train.epochs=2", "finetune.epochs=3", "finetune.augment=false")
    common += ("finetune.optimizer=adam", "finetune.learning_rate=0.001")
    train.run(model_config(*common, **settings), paths)
    models, results = {}, {}
    for mode in ("on", "off"):
        results[mode] = finetune.run(
            model_config(*common, f"finetune.feature_cache={mode}", **settings), paths
        )
        models[mode] = load_model(paths.finetuned_model)
    assert results["on"].feature_cache and not results["off"].feature_cache
    assert "top blocks trained on cached activations" in str(results["on"])
    assert results["on"].trainable_params == results["off"].trainable_params

    frozen = load_model(paths.frozen_model)
    changed = [  # the unfrozen layers did train
        not np.allclose(a, b)
        for a, b in zip(models["on"].get_weights(), frozen.get_weights(), strict=True)
    ]
    assert any(changed)
    for a, b in zip(models["on"].get_weights(), models["off"].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)
    images = load_images(paths, "validation", 32)
    np.testing.assert_allclose(
        models["on"].predict(images, verbose=0), models["off"].predict(images, verbose=0), atol=1e-4
    )
    run = _runs(tracking)["finetune"]  # the latest: off
    assert run.data.params["feature_cache"] == "False"


def test_a_tiny_cache_budget_reads_from_disk_and_trains_the_same_models(
    tmp_path, offline_weights, tracking, caplog
):
    """``train.cache_budget_mb=0``: every per-image cache is read from disk, batch by
    batch, and both phases train exactly the models they train with the caches in RAM.
    Phase 2 trains on the boundary activations phase 1 kept: it reads no image."""
    import logging
    import shutil

    from tasks.artifacts import load_model

    paths = make_workspace(tmp_path, {"train": 12, "validation": 6})
    settings = dict(train={"weights": str(offline_weights), "head": {"dropout": 0.0}})
    common = ("train.epochs=2", "finetune.epochs=2", "finetune.optimizer=adam")
    weights, where = {}, {}
    for budget in ("auto", "0"):
        cfg = model_config(*common, f"train.cache_budget_mb={budget}", **settings)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tasks.ml.arrays"):
            train.run(cfg, paths)
            kept = paths.array_cache("boundary")
            assert sorted(p.name for p in kept.iterdir()) == ["train", "validation"]
            assert not paths.array_cache("features").exists()  # phase 1's own, removed
            if budget == "0":
                shutil.move(paths.raw, tmp_path / "elsewhere")  # phase 2 needs no image
            tuned = finetune.run(cfg, paths)
        assert tuned.feature_cache
        assert not kept.exists()  # phase 2 removed them once its model was saved
        where[budget] = [
            r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records if r.name == "tasks.ml.arrays"
        ]
        weights[budget] = [
            *load_model(paths.frozen_model).get_weights(),
            *load_model(paths.finetuned_model).get_weights(),
        ]
    # features + boundary activations, train and validation: RAM, then disk
    assert where == {"auto": ["RAM"] * 4, "0": ["disk"] * 4}
    for a, b in zip(weights["auto"], weights["0"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_head_on_cached_features_trains_until_early_stopping_ends_it(
    tmp_path, offline_weights, tracking
):
    """``train.cached_epochs``: epochs on cached features cost next to nothing, so the head
    trains past ``train.epochs`` until validation loss stops improving."""
    paths = make_workspace(tmp_path, {"train": 12, "validation": 6})
    cfg = model_config(
        "train.epochs=2", "train.cached_epochs=60", "train.early_stopping_patience=2",
        "train.optimizer=adam", "train.learning_rate=0.003",
        train={"weights": str(offline_weights)},
    )  # fmt: skip
    frozen = train.run(cfg, paths)
    assert frozen.feature_cache
    # ran past train.epochs, and stopped two epochs after the best one, before 60
    assert 2 < frozen.epochs_run < 60
    assert frozen.epochs_run == frozen.best_epoch + 2
    assert _runs(tracking)["train"].data.params["epochs"] == "60"


def test_boundary_cache_needs_augmentation_off(tmp_path, offline_weights, tracking):
    paths = make_workspace(tmp_path, {"train": 12, "validation": 6})
    settings = dict(train={"weights": str(offline_weights)})
    train.run(model_config("train.epochs=1", **settings), paths)
    with pytest.raises(StageError) as error:
        finetune.run(
            model_config("finetune.augment=true", "finetune.feature_cache=on", **settings), paths
        )
    assert str(error.value) == (
        "finetune.feature_cache=on needs finetune.augment=false (augmented images give new "
        "features every epoch); set feature_cache to auto or off, or augment to false"
    )


def test_choose_candidate_prefers_the_lower_validation_loss():
    frozen = {"val_loss": 0.40, "val_accuracy": 0.85}
    assert choose_candidate(frozen, {"val_loss": 0.30, "val_accuracy": 0.9})[0] == "finetune"
    phase, reason = choose_candidate(frozen, {"val_loss": 0.45, "val_accuracy": 0.9})
    assert phase == "train" and "did not beat" in reason
    assert choose_candidate(frozen, {"val_loss": float("nan"), "val_accuracy": 0.5})[0] == "train"
    assert choose_candidate(frozen, None)[0] == "train"


def test_finetune_without_frozen_model_says_run_train_first(tmp_path, tracking):
    paths = make_workspace(tmp_path, {"train": 2, "validation": 2})
    with pytest.raises(StageError, match=r"frozen\.keras not found; run `python -m tasks train"):
        finetune.run(model_config(), paths)


def test_missing_manifest_says_run_validate_first(tmp_path, tracking):
    from tasks.paths import DatasetPaths

    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    with pytest.raises(StageError, match=r"run `python -m tasks validate cats_vs_dogs` first"):
        train.run(model_config(), paths)
    assert not paths.frozen_model.exists()


def test_imagenet_weights_missing_offline_names_the_file(tmp_path, tracking, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    paths = make_workspace(tmp_path, {"train": 2, "validation": 2})
    cfg = model_config(
        train={"backbone": "inception_v3", "image_size": None, "weights": "imagenet"}
    )
    with pytest.raises(StageError) as error:
        train.run(cfg, paths)
    message = str(error.value)
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras" / "models") in message
    assert "python -m tasks fetch-weights inception_v3" in message
    assert "\n" not in message
    assert not paths.frozen_model.exists()


def test_feature_cache_on_with_augmentation_is_a_one_line_error_naming_both_settings():
    from tasks.ml.training import use_feature_cache

    with pytest.raises(StageError) as error:
        use_feature_cache(model_config("train.feature_cache=on", "train.augment=true").train, 1)
    assert str(error.value) == (
        "train.feature_cache=on needs train.augment=false (augmented images give new features "
        "every epoch); set feature_cache to auto or off, or augment to false"
    )
    # The two ways out it names are accepted: auto trains end to end, no augmentation caches.
    assert not use_feature_cache(model_config("train.augment=true").train, 1)
    assert use_feature_cache(model_config("train.feature_cache=on", "train.augment=false").train, 1)


def test_finetune_on_a_frozen_model_with_other_classes_says_rerun_train(tmp_path, tracking):
    from tests.tinymodel import build_tiny_model

    paths = make_workspace(tmp_path, {"train": 2, "validation": 2})
    paths.frozen_model.parent.mkdir(parents=True, exist_ok=True)
    build_tiny_model(n_classes=3).save(paths.frozen_model)
    with pytest.raises(StageError) as error:
        finetune.run(model_config(), paths)
    assert str(error.value) == (
        f"{paths.frozen_model} predicts 3 classes but the dataset has 2; "
        "rerun `python -m tasks train cats_vs_dogs`"
    )
    assert not paths.finetuned_model.exists() and not paths.candidate.exists()
