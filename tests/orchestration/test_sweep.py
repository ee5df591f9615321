"""The sweep's plan (conf validation, one combination per dataset × backbone × rate),
its comparison rows read from each lane's workspace, and the choice of the best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.contract import WORKSPACE_RECORD
from tasks.errors import ConfigError
from tasks.orchestration.project import Project
from tasks.orchestration.runconf import resolve_run_config
from tasks.orchestration.sweep import (
    Combination,
    lane_row,
    plan_sweep,
    sweep_id,
)
from tests.conftest import REPO


@pytest.fixture
def project(tmp_path) -> Project:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    return Project.from_env(tmp_path, environ={})


def test_plan_is_every_dataset_backbone_and_rate_with_its_own_conf(project):
    conf = {
        "backbones": ["mobilenet_v2", "vgg16"],
        "learning_rates": [0.001, 0.0001],
        "set": {"train.epochs": 3},
        "per_backbone": {"vgg16": {"train.batch_size": 16}},
    }
    combos = plan_sweep(project, conf, "manual__2026-12-01T07:00:00+00:00")
    assert [c.key for c in combos] == [
        f"{ds}--{b}--lr{r}"
        for ds in ("cats_vs_dogs", "ants_vs_bees")
        for b in ("mobilenet_v2", "vgg16")
        for r in ("0.001", "0.0001")
    ]
    assert {c.sweep for c in combos} == {"manual__2026-12-01T07-00-00-00-00"}
    vgg = next(c for c in combos if c.key == "ants_vs_bees--vgg16--lr0.0001")
    cfg = resolve_run_config(project, vgg.dataset, vgg.conf)
    assert (cfg.train.backbone, cfg.train.learning_rate) == ("vgg16", 0.0001)
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 16)
    mobile = resolve_run_config(project, "cats_vs_dogs", combos[0].conf)
    assert (mobile.train.backbone, mobile.train.batch_size) == ("mobilenet_v2", 32)
    # the combination travels through XCom and back unchanged
    assert Combination.from_xcom(json.loads(json.dumps(vgg.xcom()))) == vgg
    lane = vgg.project(project).workspace("ants_vs_bees")
    assert lane == project.workspaces / "sweeps" / vgg.sweep / vgg.key
    assert project.workspace("ants_vs_bees") == project.workspaces / "ants_vs_bees"


def test_plan_without_rates_or_datasets_keeps_the_params_value(project):
    combos = plan_sweep(project, {"backbones": ["xception"], "datasets": ["ants_vs_bees"]}, None)
    assert [(c.key, c.learning_rate, c.sweep) for c in combos] == [
        ("ants_vs_bees--xception", None, "manual")
    ]


def test_recipe_lanes_run_each_preset_beside_the_backbone_lanes(project):
    conf = {
        "backbones": ["efficientnet_b0"],
        "recipes": ["inception_mixed7", "xception_guide"],
        "datasets": ["cats_vs_dogs"],
        "set": {"train.epochs": 2},
        "per_recipe": {"xception_guide": {"train.batch_size": 8}},
    }
    combos = plan_sweep(project, conf, "r1")
    assert [(c.key, c.backbone, c.recipe) for c in combos] == [
        ("cats_vs_dogs--efficientnet_b0", "efficientnet_b0", None),
        ("cats_vs_dogs--inception_mixed7", "inception_v3", "inception_mixed7"),
        ("cats_vs_dogs--xception_guide", "xception", "xception_guide"),
    ]
    inception = resolve_run_config(project, "cats_vs_dogs", combos[1].conf)
    assert (inception.recipe, inception.train.image_size) == ("inception_mixed7", 150)
    assert (inception.train.optimizer, inception.train.epochs) == ("rmsprop", 2)  # set wins
    assert inception.train.head.pooling == "flatten"
    xception = resolve_run_config(project, "cats_vs_dogs", combos[2].conf)
    assert (xception.train.batch_size, xception.finetune.unfreeze_from) == (8, "all")
    # the lane's row names its recipe
    assert Combination.from_xcom(json.loads(json.dumps(combos[1].xcom()))) == combos[1]
    assert lane_row(project, combos[1])["recipe"] == "inception_mixed7"


@pytest.mark.parametrize(
    ("conf", "words"),
    [
        (None, 'name the backbones or recipes to compare, e.g. {"backbones"'),
        ({"backbone": "vgg16"}, "name the backbones or recipes to compare"),
        ({"backbones": []}, '"backbones" must be a non-empty list of names'),
        ({"backbones": ["resnet"]}, "\"backbones\" has unknown ['resnet']; use some of"),
        ({"backbones": ["vgg16", "vgg16"]}, "lists a name twice"),
        ({"backbones": ["vgg16"], "datasets": ["dogs"]}, "\"datasets\" has unknown ['dogs']"),
        ({"backbones": ["vgg16"], "learning_rates": ["fast"]}, "list of numbers"),
        ({"backbones": ["vgg16"], "epochs": 3}, "unknown key 'epochs'; use some of"),
        ({"backbones": ["vgg16"], "per_backbone": {"xception": {}}}, '"backbones" does not list'),
        ({"recipes": ["xception"]}, "\"recipes\" has unknown ['xception']; use some of"),
        ({"recipes": ["xception_guide"], "per_recipe": {"vgg16_block5": {}}}, '"recipes" does'),
        ({"recipes": ["xception_guide"], "per_recipe": ["x"]}, '"per_recipe" maps a name to'),
        (
            {"backbones": ["vgg16"], "set": {"train.epochs": -1}},
            "sweep combination cats_vs_dogs--vgg16: run conf: train.epochs",
        ),
    ],
)
def test_a_bad_sweep_conf_is_one_line_naming_the_fix(project, conf, words):
    with pytest.raises(ConfigError) as error:
        plan_sweep(project, conf, "r1")
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def _lane(
    project,
    key,
    backbone,
    accuracy,
    seconds,
    stages=("download", "validate", "train", "finetune", "evaluate"),
):
    combo = Combination("s1", key, "cats_vs_dogs", backbone, None, {"set": []})
    ws = combo.project(project).workspace("cats_vs_dogs")
    (ws / "reports" / "cats_vs_dogs").mkdir(parents=True)
    record = {
        "parent_run_id": f"p-{backbone}",
        "experiment": f"cats_vs_dogs-r1--{key}",
        "stages": {s: {"ran": True, "seconds": seconds / 2} for s in stages},
        "experiment_rev": "abc123" if "evaluate" in stages else None,
    }
    (ws / WORKSPACE_RECORD).write_text(json.dumps(record))
    runs = ws / "reports" / "cats_vs_dogs" / "runs"
    runs.mkdir()
    for stage in ("train", "finetune"):
        (runs / f"{stage}.json").write_text(json.dumps({"run_id": f"run-{stage}-{backbone}"}))
    if accuracy is not None:
        metrics = {"accuracy": accuracy, "f1_macro": accuracy, "roc_auc": 0.9, "images": 4}
        metrics["validation"] = {"accuracy": 0.8}
        (ws / "reports" / "cats_vs_dogs" / "metrics.json").write_text(json.dumps(metrics))
    return combo


def test_rows_come_from_each_lanes_workspace(project):
    fast = _lane(project, "cats_vs_dogs--mobilenet_v2", "mobilenet_v2", 0.9, 10.0)
    slow = _lane(project, "cats_vs_dogs--vgg16", "vgg16", 0.9, 40.0)
    worse = _lane(project, "cats_vs_dogs--xception", "xception", 0.7, 5.0)
    broken = _lane(
        project, "cats_vs_dogs--resnet50", "resnet50", None, 4.0, ("download", "validate")
    )
    rows = [lane_row(project, c) for c in (fast, slow, worse, broken)]
    assert rows[0]["test_accuracy"] == 0.9 and rows[0]["training_seconds"] == 10.0
    assert rows[0]["train_seconds"] == 5.0 and rows[0]["validation_accuracy"] == 0.8
    assert rows[0]["parent_run_id"] == "p-mobilenet_v2"
    assert (rows[3]["status"], rows[3]["failed_stage"]) == ("failed", "train")
    # evaluated but not recorded as a DVC experiment: not reproducible, so not a result
    record = json.loads((Path(rows[2]["workspace"]) / WORKSPACE_RECORD).read_text())
    (Path(rows[2]["workspace"]) / WORKSPACE_RECORD).write_text(
        json.dumps({**record, "experiment_rev": None})
    )
    unrecorded = lane_row(project, worse)
    assert (unrecorded["status"], unrecorded["failed_stage"]) == ("failed", "record")
    # the MLflow runs of the phases (read by sweep-report for their seconds)
    assert rows[0]["train_run_id"] == "run-train-mobilenet_v2" and rows[0]["restored"] == []


def test_a_lane_that_never_started_is_a_failed_row(project):
    combo = Combination("s1", "ants_vs_bees--vgg16", "ants_vs_bees", "vgg16", None, {"set": []})
    row = lane_row(project, combo)
    assert row["status"] == "failed" and "test_accuracy" not in row


def test_sweep_id_is_safe_for_folders_and_git_refs():
    assert (
        sweep_id("manual__2026-12-01T07:00:00.123+00:00") == "manual__2026-12-01T07-00-00.123-00-00"
    )
    assert sweep_id(None) == "manual"
    assert yaml.safe_load(sweep_id("a b/c")) == "a-b-c"
