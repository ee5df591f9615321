"""The registry gate against a real MLflow SQLite store under tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import parse_config
from tasks.steps import register
from tasks.tracking import read_record, registered_model_name
from tests.datagen import tiny_params
from tests.tinymodel import make_workspace, swap_validation_labels, tiny_models, use_candidate

NAME = "cats_vs_dogs-classifier"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
    return make_workspace(tmp_path)


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


def test_first_model_passing_the_floor_becomes_champion(paths, models, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    # A scheduled run: the version names the DVC experiment that restores it.
    monkeypatch.setenv("TASKS_EXPERIMENT", "cats_vs_dogs-scheduled__2026-11-30T00-00-00-00-00")
    decision = gate(paths, models["good"])
    assert decision.promoted and decision.alias == "champion"
    assert decision.candidate_score >= 0.9
    assert decision.champion_version is None
    assert "no champion yet" in decision.reason
    assert "-> @champion (PROMOTED)" in str(decision)
    assert aliases() == {"champion": "1"}

    client = MlflowClient()
    version = client.get_model_version(NAME, "1")
    record = read_record(paths, "register")
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
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion")
    requirements = (__import__("pathlib").Path(local) / "requirements.txt").read_text()
    assert f"keras=={__import__('keras').__version__}" in requirements
    assert (__import__("pathlib").Path(local) / "input_example.json").exists()

    report = json.loads(paths.gate.read_text())
    assert report["promoted"] == 1 and report["version"] == "1"
    assert report["candidate_score"] == pytest.approx(decision.candidate_score)
    assert report["champion_score"] is None
    assert report["experiment"] == decision.experiment


def test_better_candidate_is_promoted_and_the_old_champion_kept_as_previous(paths, models):
    first = gate(paths, models["constant"], "register.floor=0.4")
    assert first.promoted and first.candidate_score == pytest.approx(0.5)

    second = gate(paths, models["good"], "register.floor=0.4")
    assert second.promoted
    assert second.champion_version == "1"
    assert second.champion_score == pytest.approx(0.5)
    assert aliases() == {"champion": "2", "previous": "1"}
    assert "v1 keeps @previous" in str(second)


def test_worse_candidate_beyond_tolerance_stays_challenger_with_the_reason(paths, models):
    from mlflow import MlflowClient

    gate(paths, models["good"], "register.floor=0.0")
    worse = gate(paths, models["constant"], "register.floor=0.0", "register.tolerance=0.2")
    assert not worse.promoted and worse.alias == "challenger"
    assert "worse than champion v1's 1.0000" in worse.reason
    assert "by more than the tolerance 0.2000" in worse.reason
    assert aliases() == {"champion": "1", "challenger": "2"}
    assert MlflowClient().get_model_version(NAME, "2").tags["gate.reason"] == worse.reason
    report = json.loads(paths.gate.read_text())
    assert (report["promoted"], report["champion_score"]) == (0, pytest.approx(1.0))
    assert report["reason"] == worse.reason


def test_below_the_floor_stays_challenger_even_without_a_champion(paths, models):
    from mlflow import MlflowClient

    decision = gate(paths, models["constant"], "register.floor=0.8", "register.metric=f1_macro")
    assert not decision.promoted
    assert decision.metric == "f1_macro"
    assert decision.reason.startswith("f1_macro 0.3333 is below the floor 0.8000")
    assert aliases() == {"challenger": "1"}
    assert MlflowClient().get_model_version(NAME, "1").tags["gate.decision"] == "rejected"
    assert "NOT PROMOTED" in str(decision)


def test_the_champion_is_rescored_on_the_current_validation_data(paths, models):
    """Its stored score (1.0) is stale: on today's labels it is wrong on every image.

    Trusting the stored number would keep it (0.5 is far below 1.0); re-scoring
    shows 0.0, so the candidate wins.
    """
    from mlflow import MlflowClient

    old = gate(paths, models["good"], "register.floor=0.4")
    assert old.promoted and old.candidate_score == pytest.approx(1.0)
    assert float(MlflowClient().get_model_version(NAME, "1").tags["gate.candidate_score"]) == 1.0

    swap_validation_labels(paths, ["cats", "dogs"])
    new = gate(paths, models["constant"], "register.floor=0.4")
    assert new.champion_version == "1"
    assert new.champion_score == pytest.approx(0.0)
    assert new.promoted, new.reason
    assert aliases() == {"champion": "2", "previous": "1"}
    assert json.loads(paths.gate.read_text())["champion_score"] == pytest.approx(0.0)


def test_the_registered_name_carries_the_experiment_prefix():
    cfg = config("tracking.experiment_prefix=team_")
    assert registered_model_name(cfg, "ants_vs_bees") == "team_ants_vs_bees-classifier"
