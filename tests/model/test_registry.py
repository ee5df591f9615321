"""The registry gate against a real MLflow SQLite store under tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.cli import main
from tasks.config import parse_config
from tasks.contract import RunRecord
from tasks.errors import StageError
from tasks.steps import register
from tasks.tracking.registry import registered_model_name
from tests.datagen import tiny_params
from tests.tinymodel import make_workspace, swap_validation_labels, tiny_models, use_candidate

NAME = "cats_vs_dogs-classifier"
TEST_IMAGES = 24  # 60 validation images per class; the test split holds 20% of them


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
    return make_workspace(tmp_path, counts={"train": 2, "validation": 60})


def config(*overrides: str):
    return parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}),
        ["tracking.artifact_location=artifacts", *overrides],
    )


def gate(paths, model_file, *overrides: str):
    use_candidate(paths, model_file)
    return register.run(config(*overrides), paths)


def aliases():
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model(NAME).aliases.items()}


@pytest.mark.slow
def test_first_model_passing_the_floor_becomes_champion(paths, models, monkeypatch, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    # A scheduled run: the version names the DVC experiment that restores it.
    monkeypatch.setenv("TASKS_EXPERIMENT", "cats_vs_dogs-scheduled__2026-11-30T00-00-00-00-00")
    decision = gate(paths, models["good"])
    assert decision.promoted and decision.alias == "champion"
    assert decision.candidate_score >= 0.9
    assert decision.champion_version is None
    assert "no champion yet" in decision.reason
    assert "-> @champion (PROMOTED: first)" in str(decision)
    assert aliases() == {"champion": "1"}

    client = MlflowClient()
    version = client.get_model_version(NAME, "1")
    record = RunRecord.read(paths.run_record("register"))
    assert version.run_id == record.run_id  # the version links to the run that logged it
    assert client.get_run(record.run_id).data.tags["phase"] == "register"
    assert version.tags["gate.decision"] == "promoted"
    assert version.tags["dvc.exp_name"] == decision.experiment
    assert decision.experiment == "cats_vs_dogs-scheduled__2026-11-30T00-00-00-00-00"
    assert f"DVC experiment: {decision.experiment}" in str(decision)
    assert float(version.tags["gate.candidate_score"]) == pytest.approx(decision.candidate_score)

    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.metadata["classes"] == ["cats", "dogs"]
    inputs, outputs = info.signature.inputs.inputs[0], info.signature.outputs.inputs[0]
    assert (inputs.type, inputs.shape) == (np.dtype("uint8"), (-1, 32, 32, 3))
    assert (outputs.type, outputs.shape) == (np.dtype("float32"), (-1, 2))
    local = mlflow.artifacts.download_artifacts(
        f"models:/{NAME}@champion", dst_path=str(tmp_path / "champion")
    )
    requirements = (__import__("pathlib").Path(local) / "requirements.txt").read_text()
    assert f"keras=={__import__('keras').__version__}" in requirements
    assert (__import__("pathlib").Path(local) / "input_example.json").exists()

    report = json.loads(paths.gate.read_text())
    assert report["promoted"] == 1 and report["version"] == "1"
    assert (report["status"], report["verdict"], report["split"]) == ("promoted", "first", "test")
    assert report["images"] == TEST_IMAGES
    assert report["candidate_score"] == pytest.approx(decision.candidate_score)
    assert report["champion_score"] is None
    assert report["experiment"] == decision.experiment


@pytest.mark.slow
def test_better_candidate_is_promoted_and_the_old_champion_kept_as_previous(paths, models):
    first = gate(paths, models["constant"], "register.floor=0.4")
    assert first.promoted and first.candidate_score == pytest.approx(0.5)

    second = gate(paths, models["good"], "register.floor=0.4")
    assert second.promoted and second.verdict == "better"
    assert second.champion_version == "1"
    assert second.champion_score == pytest.approx(0.5)
    assert second.comparison["champion_only"] == 0
    assert second.comparison["candidate_only"] == TEST_IMAGES // 2
    assert aliases() == {"champion": "2", "previous": "1"}
    assert "v1 keeps @previous" in str(second)
    assert second.reason.startswith("significantly better than champion v1 by McNemar's exact test")


@pytest.mark.slow
def test_far_worse_challenger_is_refused_as_significantly_worse(paths, models):
    """Random weights, one epoch: the paired test on the same test images refuses it."""
    from mlflow import MlflowClient

    gate(paths, models["good"])
    worse = gate(paths, models["random"])
    assert not worse.promoted and (worse.status, worse.alias) == ("rejected", "challenger")
    assert worse.verdict == "worse"
    assert worse.reason.startswith("test accuracy 0.5000 is below the floor 0.8000; and ")
    assert "significantly worse than champion v1 by McNemar's exact test" in worse.reason
    assert f"on {TEST_IMAGES} test images" in worse.reason
    assert aliases() == {"champion": "1", "challenger": "2"}
    version = MlflowClient().get_model_version(NAME, "2")
    assert version.tags["gate.reason"] == worse.reason
    assert version.tags["gate.verdict"] == "worse"
    report = json.loads(paths.gate.read_text())
    assert (report["status"], report["verdict"], report["images"]) == ("rejected", "worse", 24)
    assert report["p_value"] < 0.05 and report["difference"] < 0 and report["ci_high"] < 0
    assert report["champion_only"] > report["candidate_only"]
    assert report["champion_score"] == pytest.approx(1.0)
    text = str(worse)
    assert "NOT PROMOTED: worse" in text and "McNemar exact p=" in text and "95% CI" in text


@pytest.mark.slow
def test_an_equally_good_retrain_is_equivalent_and_keeps_the_champion(paths, models):
    gate(paths, models["good"])
    again = gate(paths, models["retrain"])
    assert again.verdict == "equivalent" and not again.promoted
    assert again.comparison["p_value"] > 0.05
    assert again.comparison["low"] <= 0 <= again.comparison["high"]
    assert "so champion v1 stays (register.promote_if: better)" in again.reason
    assert aliases() == {"champion": "1", "challenger": "2"}


@pytest.mark.slow
def test_not_worse_rule_lets_an_equivalent_retrain_take_over(paths, models):
    gate(paths, models["good"])
    again = gate(paths, models["retrain"], "register.promote_if=not_worse")
    assert again.verdict == "equivalent" and again.promoted
    assert "takes over (register.promote_if: not_worse)" in again.reason
    assert aliases() == {"champion": "2", "previous": "1"}


@pytest.mark.slow
def test_bootstrap_method_decides_on_the_interval(paths, models):
    gate(paths, models["good"], "register.floor=0.0")
    worse = gate(
        paths,
        models["constant"],
        "register.floor=0.0",
        "register.method=bootstrap",
        "register.metric=f1_macro",
    )
    assert worse.verdict == "worse" and worse.method == "bootstrap"
    assert worse.comparison["high"] < 0
    assert "by the paired bootstrap interval" in worse.reason


@pytest.mark.slow
def test_below_the_floor_stays_challenger_even_without_a_champion(paths, models):
    from mlflow import MlflowClient

    decision = gate(
        paths,
        models["constant"],
        "register.floor=0.8",
        "register.metric=f1_macro",
        "register.method=bootstrap",
    )
    assert not decision.promoted and decision.verdict == "below_floor"
    assert decision.metric == "f1_macro"
    assert decision.reason.startswith("test f1_macro 0.3333 is below the floor 0.8000")
    assert aliases() == {"challenger": "1"}
    assert MlflowClient().get_model_version(NAME, "1").tags["gate.decision"] == "rejected"
    assert "NOT PROMOTED" in str(decision)


@pytest.mark.slow
def test_the_champion_is_rescored_on_the_current_test_data(paths, models):
    """Its stored score (1.0) is stale: on today's labels it is wrong on every image.

    Trusting the stored number would keep it; re-scoring shows 0.0, so the
    candidate is significantly better.
    """
    from mlflow import MlflowClient

    old = gate(paths, models["good"], "register.floor=0.4")
    assert old.promoted and old.candidate_score == pytest.approx(1.0)
    assert float(MlflowClient().get_model_version(NAME, "1").tags["gate.candidate_score"]) == 1.0

    swap_validation_labels(paths, ["cats", "dogs"])
    new = gate(paths, models["constant"], "register.floor=0.4")
    assert new.champion_version == "1"
    assert new.champion_score == pytest.approx(0.0)
    assert new.promoted and new.verdict == "better", new.reason
    assert aliases() == {"champion": "2", "previous": "1"}
    assert json.loads(paths.gate.read_text())["champion_score"] == pytest.approx(0.0)


@pytest.mark.slow
def test_a_champion_that_cannot_be_loaded_stops_the_gate_in_one_line(paths, models):
    """Its files are gone from the artifact store: no silent promotion over it."""
    import shutil
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    from mlflow import MlflowClient

    assert gate(paths, models["good"], "register.floor=0.4").promoted
    client = MlflowClient()
    store = client.get_experiment_by_name("cats_vs_dogs").artifact_location
    shutil.rmtree(Path(unquote(urlparse(store).path)))
    with pytest.raises(StageError) as error:
        gate(paths, models["retrain"], "register.floor=0.4")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"cannot re-score the current champion: cannot load MLflow model models:/{NAME}/1: "
    )
    assert message.endswith(
        "; restore its artifacts or move the alias with `mlflow` before registering"
    )
    assert aliases() == {"champion": "1"}  # nothing registered, no alias moved
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]


@pytest.mark.slow
def test_a_metric_undefined_on_the_test_data_is_a_one_line_error(paths, models):
    """ROC AUC needs both classes in the test split; here it holds cats only."""
    manifest = pd.read_parquet(paths.manifest)
    dogs = (manifest["split"] == "test") & (manifest["label"] == "dogs")
    manifest[~dogs].to_parquet(paths.manifest, index=False)
    with pytest.raises(StageError) as error:
        gate(paths, models["good"], "register.metric=roc_auc", "register.method=bootstrap")
    assert str(error.value) == (
        "register.metric roc_auc is undefined on this test data (one class only?); "
        "pick accuracy or f1_macro in params.yaml"
    )
    assert not paths.gate.exists()


@pytest.mark.slow
def test_the_gate_scores_only_the_held_out_test_rows(paths, models):
    """Labels of the validation rows are swapped: a gate reading them would see 0.0."""
    manifest = pd.read_parquet(paths.manifest)
    rows = manifest["split"] == "validation"
    manifest.loc[rows, "label"] = manifest.loc[rows, "label"].map({"cats": "dogs", "dogs": "cats"})
    manifest.to_parquet(paths.manifest, index=False)
    decision = gate(paths, models["good"])
    assert decision.candidate_score == pytest.approx(1.0) and decision.images == TEST_IMAGES


@pytest.mark.slow
def test_human_approval_waits_at_challenger_then_approve_promotes(paths, models, capsys):
    from mlflow import MlflowClient

    gate(paths, models["constant"], "register.floor=0.4")
    waiting = gate(paths, models["good"], "register.floor=0.4", "register.approval=human")
    assert (waiting.status, waiting.alias, waiting.verdict) == (
        "awaiting_approval",
        "challenger",
        "better",
    )
    assert aliases() == {"champion": "1", "challenger": "2"}
    assert "AWAITING APPROVAL" in str(waiting)
    assert json.loads(paths.gate.read_text())["status"] == "awaiting_approval"

    params = write_params(paths, "register.approval=human")
    argv = ["--params", str(params), "--root", str(paths.root)]
    assert main(["approve", "cats_vs_dogs", "--by", "ada", "--note", "looks right", *argv]) == 0
    assert "v2 -> @champion (approved by ada); v1 keeps @previous" in capsys.readouterr().out
    assert aliases() == {"champion": "2", "previous": "1"}
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert (tags["gate.decision"], tags["gate.reviewed_by"]) == ("approved", "ada")
    # nothing is awaiting any more
    assert main(["approve", "cats_vs_dogs", "--version", "2", *argv]) == 2
    assert "is not awaiting approval (gate.decision: approved)" in capsys.readouterr().err


@pytest.mark.slow
def test_human_rejection_keeps_challenger_with_the_reason(paths, models, capsys):
    from mlflow import MlflowClient

    gate(paths, models["constant"], "register.floor=0.4")
    gate(paths, models["good"], "register.floor=0.4", "register.approval=human")
    params = write_params(paths, "register.approval=human")
    argv = ["--params", str(params), "--root", str(paths.root)]
    assert main(["approve", "cats_vs_dogs", "--reject", "", *argv]) == 2
    assert "a rejection needs a reason" in capsys.readouterr().err
    reject = ["approve", "cats_vs_dogs", "--reject", "bees in the cat folder", "--by", "bo"]
    assert main([*reject, *argv]) == 0
    assert "stays @challenger (rejected by bo)" in capsys.readouterr().out
    assert aliases() == {"champion": "1", "challenger": "2"}
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert tags["gate.decision"] == "rejected"
    assert tags["gate.review_reason"] == "bees in the cat folder"


@pytest.mark.slow
def test_approval_is_refused_when_the_champion_moved_since_the_gate(paths, models, capsys):
    from mlflow import MlflowClient

    gate(paths, models["constant"], "register.floor=0.4")
    gate(paths, models["good"], "register.floor=0.4", "register.approval=human")
    MlflowClient().set_registered_model_alias(NAME, "champion", "2")  # someone moved it by hand
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    gate(paths, models["inverted"], "register.floor=0.0")  # v3 is refused, v1 still champion
    MlflowClient().set_registered_model_alias(NAME, "champion", "3")
    params = write_params(paths, "register.approval=human")
    code = main(
        [
            "approve",
            "cats_vs_dogs",
            "--version",
            "2",
            "--params",
            str(params),
            "--root",
            str(paths.root),
        ]
    )
    assert code == 2
    assert "@champion moved since the gate ran (it compared v2 with v1, now v3)" in (
        capsys.readouterr().err
    )
    assert aliases()["champion"] == "3"


@pytest.mark.slow
def test_history_lists_every_alias_move_and_who_was_champion_when(paths, models, capsys):
    gate(paths, models["constant"], "register.floor=0.4")  # v1 champion
    gate(paths, models["good"], "register.floor=0.4")  # v2 champion, v1 previous
    gate(paths, models["random"], "register.floor=0.4")  # v3 refused
    params = write_params(paths)
    assert (
        main(["history", "cats_vs_dogs", "--params", str(params), "--root", str(paths.root)]) == 0
    )
    out = capsys.readouterr().out
    moves = [line for line in out.splitlines() if " -> @" in line and line.startswith("  20")]
    assert [m.split("  ")[2] for m in moves] == [
        "v1 -> @champion",
        "v2 -> @champion",
        "v3 -> @challenger",
    ]
    assert "promoted [first]" in moves[0]
    assert "promoted [better], previous champion v1" in moves[1]
    assert "rejected [" in moves[2]
    tenures = out.split("@champion, who held it when:")[1].strip().splitlines()
    assert len(tenures) == 2
    assert tenures[0].strip().startswith("v1  ") and not tenures[0].endswith("-> now")
    assert tenures[1].strip().startswith("v2  ") and tenures[1].endswith("-> now")


def write_params(paths, *overrides: str):
    import yaml

    params = tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"})
    params["tracking"] = {"artifact_location": "artifacts"}
    for item in overrides:
        key, value = item.split("=")
        section, name = key.split(".")
        params.setdefault(section, {})[name] = value
    target = paths.root / "params.yaml"
    target.write_text(yaml.safe_dump(params))
    return target


def test_the_registered_name_carries_the_experiment_prefix():
    cfg = config("tracking.experiment_prefix=team_")
    assert registered_model_name(cfg, "ants_vs_bees") == "team_ants_vs_bees-classifier"
