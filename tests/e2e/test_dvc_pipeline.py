"""`dvc repro` end to end, in a temporary git copy of the project.

Both datasets, generated archives served from 127.0.0.1, tiny params. The first
repro traces every stage process's imports: each stage's dvc.yaml deps must
cover every project module it ran. Then: a no-op repro, a code edit that
reruns exactly the stages running that code, a fine-tuning param change that
reruns exactly finetune onward, and `dvc push` → fresh clone → `dvc pull`
restoring the models byte for byte.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PIPELINE_FILES, REPO, copy_project
from tests.datagen import learnable_train, make_archive, tiny_params
from tests.deploy.stack import Process, base_env, http_ok, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# What dvc repro needs of the project (the DAG copies, less the DAGs)
PROJECT_FILES = [item for item in PIPELINE_FILES if item != "dags"]
DATASETS = ("cats_vs_dogs", "ants_vs_bees")
STAGES = ("download", "validate", "train", "finetune", "evaluate", "register")
# The gate's floor, and what each model must score on its 2 test images: both right. A model
# that predicts one class scores 0.5 (what random weights gave: log loss ln 2, every image one
# class). With offline-made weights and 15 head epochs both datasets score 1.0 here (test log
# loss 0.02 and 0.12); on 200 fresh generated images the same models score 0.80-0.83.
FLOOR = 0.75


# Loaded by every Python process of the first repro (PYTHONPATH): a stage process
# (`python -m tasks ...`) writes the project modules it imported when it exits.
TRACER = """\
import atexit, json, os, sys

def _write_imports():
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None or spec.name != "tasks.__main__":
        return
    root = os.getcwd()
    files = sorted(
        os.path.relpath(module.__file__, root)
        for module in list(sys.modules.values())
        if (getattr(module, "__name__", "") or "").split(".")[0] == "tasks"
        and getattr(module, "__file__", None)
    )
    out = os.path.join(os.environ["TASKS_IMPORT_TRACE"], f"{os.getpid()}.json")
    with open(out, "w") as handle:
        json.dump({"argv": sys.argv[1:], "modules": files}, handle)

if os.environ.get("TASKS_IMPORT_TRACE"):
    atexit.register(_write_imports)
"""


def _no_code(path: Path) -> bool:
    """A package ``__init__.py`` holding at most a docstring (nothing runs)."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def uncovered(modules: list[str], deps: list[str], root: Path) -> set[str]:
    """The project modules a stage ran that none of its deps (file or folder) covers."""
    missing = set()
    for module in modules:
        path = Path(module)
        if path.name == "__init__.py" and _no_code(root / path):
            continue
        if not any(path == Path(dep) or Path(dep) in path.parents for dep in deps):
            missing.add(module)
    return missing


def stage_deps(root: Path, stage: str, dataset: str) -> list[str]:
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    deps = spec["stages"][stage]["do"]["deps"]
    return [str(dep).replace("${key}", dataset) for dep in deps]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIRFLOW_CTX"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def dvc(cwd: Path, *args: str) -> str:
    proc = sh(cwd, sys.executable, "-m", "dvc", *args)
    return proc.stdout + proc.stderr


def dvc_json(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args).stdout


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@]+)'", output))


def skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '([\w@]+)' didn't change, skipping", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory, archive_server, offline_weights) -> Path:
    base = tmp_path_factory.mktemp("dvc-e2e")
    sources = {}
    for index, name in enumerate(DATASETS):
        archive = make_archive(
            base / "served" / f"{name}.zip", name, {"train": 8, "validation": 4}, 40, seed=index
        )
        sources[name] = archive_server.add(f"/{name}.zip", archive.read_bytes())
    repo = copy_project(base / "repo", PROJECT_FILES)
    params = tiny_params(
        sources,
        {"train": 8, "validation": 4},
        # Frozen-base features are cached: 15 head epochs take seconds.
        train=learnable_train(offline_weights),
        finetune={"epochs": 1},
        evaluate={"gradcam_images": 1, "mistakes": 4},
        register={"floor": FLOOR, "promote_if": "not_worse"},
    )
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in params.items():
        full[section] = values if section == "datasets" else {**full[section], **values}
    (repo / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "ci@example.com")
    sh(repo, "git", "config", "user.name", "CI")
    remote = base / "remote"
    dvc(repo, "remote", "add", "-d", "-f", "local", str(remote))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project")
    return repo


@pytest.fixture(scope="module")
def import_traces(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("import-trace")
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(TRACER)
    (folder / "out").mkdir()
    return folder


@pytest.fixture(scope="module")
def first_repro(project, import_traces):
    env = {
        "PYTHONPATH": str(import_traces / "site"),
        "TASKS_IMPORT_TRACE": str(import_traces / "out"),
    }
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        env={**_env(), **env},
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise AssertionError(f"dvc repro failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr, time.perf_counter() - start


def test_repro_runs_every_stage_for_both_datasets(project, first_repro):
    output, seconds = first_repro
    assert ran(output) == {f"{s}@{d}" for s in STAGES for d in DATASETS}
    for ds in DATASETS:
        assert (project / "data" / "manifests" / f"{ds}.parquet").exists()
        assert (project / "models" / ds / "frozen.keras").stat().st_size > 0
        assert (project / "models" / ds / "finetuned.keras").stat().st_size > 0
        metrics = yaml.safe_load((project / "reports" / ds / "metrics.json").read_text())
        assert metrics["accuracy"] >= FLOOR, metrics  # it learned: a one-class model gets 0.5
        assert (metrics["split"], metrics["images"]) == ("test", 2)  # 20% of 4 + 4
        assert metrics["validation"]["images"] == 6
        assert (project / "reports" / ds / "plots").is_dir()
        gate = json.loads((project / "reports" / ds / "gate.json").read_text())
        assert (gate["floor"], gate["status"], gate["verdict"]) == (FLOOR, "promoted", "first")
        assert gate["candidate_score"] == metrics["accuracy"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert {f"{s}@{d}" for s in STAGES for d in DATASETS} <= set(lock["stages"])
    print(f"\nwhole tiny dvc repro: {seconds:.1f} s")


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_the_mlflow_ui_gets_training_runs_one_comparable_row_each(project, first_repro, tmp_path):
    """What the experiment page reads, through the REST API of `mlflow server` on the store."""
    import hashlib

    server = Process.start(
        "mlflow",
        ["bash", str(REPO / "mlflow/serve.sh")],
        base_env(MLFLOW_EMBEDDED_DIR=str(project / "mlflow"), MLFLOW_PORT="0"),
        tmp_path / "mlflow.log",
    )
    try:
        url = f"http://127.0.0.1:{server.announced_port(90)}"
        wait_until(lambda: server.check_alive() and http_ok(f"{url}/health"), 90, "mlflow")
        ds = "cats_vs_dogs"
        experiment = _rest(url, f"experiments/get-by-name?experiment_name={ds}")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        parents = _rest(
            url,
            "runs/search",
            {
                "experiment_ids": [experiment["experiment_id"]],
                "filter": "tags.`pipeline.parent` = 'true'",
                "order_by": ["attributes.start_time ASC"],
            },
        )["runs"]
        children = _rest(
            url,
            "runs/search",
            {
                "experiment_ids": [experiment["experiment_id"]],
                "filter": f"tags.`mlflow.parentRunId` = '{parents[0]['info']['run_id']}'",
            },
        )["runs"]
        models = _rest(
            url, "logged-models/search", {"experiment_ids": [experiment["experiment_id"]]}
        )["models"]
    finally:
        server.stop()

    # the UI opens it as model training, with a description naming the data
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "127.0.0.1" in tags["mlflow.note.content"] and "cats vs dogs" in tags[
        "mlflow.note.content"
    ].replace("_", " ")
    # ?viewStateShareKey=comparison: the runs table with the headline columns, each one a
    # param, metric or tag the parent row really carries (the UI shows blank columns else)
    view = json.loads(tags["mlflow.sharedViewState.comparison"])
    carried = {
        "metrics": {m["key"] for m in parents[0]["data"]["metrics"]},
        "params": {p["key"] for p in parents[0]["data"]["params"]},
        "tags": {t["key"] for t in parents[0]["data"]["tags"]},
    }
    shown = [column.split(".", 1) for column in view["selectedColumns"]]
    assert {kind for kind, _ in shown} == {"attributes", "metrics", "params", "tags"}
    for kind, name in shown:
        if kind != "attributes":
            assert name.strip("`") in carried[kind], (kind, name)
    assert sum(kind == "metrics" for kind, _ in shown) >= 8

    # one parent row per execution, carrying the headline params, metrics and gate
    import pandas as pd

    parent = parents[0]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    run_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    report = json.loads((project / "reports" / ds / "metrics.json").read_text())
    assert metrics["test.accuracy"] == report["accuracy"]
    assert metrics["test.roc_auc"] == report["roc_auc"]
    assert metrics["validation.accuracy"] == report["validation"]["accuracy"]
    assert metrics["test.ece"] == pytest.approx(report["ece"])
    assert metrics["test.f1_macro"] == pytest.approx(report["f1_macro"])
    # the frozen headline is an epoch train's history recorded; both are above chance
    history = pd.read_csv(project / "reports" / ds / "history" / "train.csv")
    frozen = metrics["frozen.val_accuracy"]
    assert any(frozen == pytest.approx(value) for value in history["val_accuracy"]), frozen
    for key in ("frozen.val_accuracy", "finetuned.val_accuracy"):
        assert metrics[key] >= FLOOR, (key, metrics[key])  # a one-class model gets 0.5
    # each phase took real time, within the execution's
    took = (parent["info"]["end_time"] - parent["info"]["start_time"]) / 1000
    assert 1 < metrics["train.seconds"] + metrics["finetune.seconds"] < took
    assert 1 < metrics["train.images_per_second"] < 100_000
    assert params["train.backbone"] == "mobilenet_v2" and params["image_size"] == "32"
    assert params["precision"] == "float32" and "finetune.learning_rate" in params
    assert run_tags["gate.decision"] == "promoted" and metrics["gate.promoted"] == 1.0
    assert parent["info"]["end_time"] - parent["info"]["start_time"] > 1000  # not a 42 ms stub

    # the manifest as the dataset of the parent, train, finetune and evaluate runs
    manifest = project / "data" / "manifests" / f"{ds}.parquet"
    md5 = hashlib.md5(manifest.read_bytes()).hexdigest()
    cached = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    by_phase = {
        next(t["value"] for t in r["data"]["tags"] if t["key"] == "phase"): r for r in children
    }
    for run_, context in [
        (parent, "pipeline"),
        (by_phase["train"], "training"),
        (by_phase["finetune"], "training"),
        (by_phase["evaluate"], "evaluation"),
    ]:
        (entry,) = run_["inputs"]["dataset_inputs"]
        dataset = entry["dataset"]
        assert (dataset["name"], dataset["digest"]) == (f"{ds}-manifest", md5)
        assert json.loads(dataset["source"])["uri"] == cached.resolve().as_uri()
        columns = {c["name"] for c in json.loads(dataset["schema"])["mlflow_colspec"]}
        assert {"path", "split", "label", "sha256"} <= columns
        assert {t["key"]: t["value"] for t in entry["tags"]}["mlflow.data.context"] == context
    assert "dataset_inputs" not in by_phase["register"].get("inputs", {})

    # the evaluated model: a logged model of the pipeline execution (the runs table's Models
    # column lists the models whose source run is the row), an output of it and of evaluate
    (model,) = [m for m in models if m["info"]["source_run_id"] == parent["info"]["run_id"]]
    evaluate_outputs = [o["model_id"] for o in by_phase["evaluate"]["outputs"]["model_outputs"]]
    assert evaluate_outputs == [model["info"]["model_id"]]
    model_tags = {t["key"]: t["value"] for t in model["info"]["tags"]}
    evaluated = project / report["model"]
    assert model_tags["dvc.md5"] == hashlib.md5(evaluated.read_bytes()).hexdigest()
    assert model_tags["dvc.path"] == report["model"]
    linked = {m["key"]: m for m in model["data"]["metrics"]}
    assert linked["test.accuracy"]["value"] == report["accuracy"]
    assert linked["test.accuracy"]["dataset_digest"] == md5
    outputs = [o["model_id"] for o in parent["outputs"]["model_outputs"]]
    assert model["info"]["model_id"] in outputs


def test_second_repro_is_a_noop(project, first_repro):
    start = time.perf_counter()
    output = dvc(project, "repro")
    seconds = time.perf_counter() - start
    assert ran(output) == set()
    assert skipped(output) == {f"{s}@{d}" for s in STAGES for d in DATASETS}
    print(f"\nno-op dvc repro: {seconds:.1f} s")


def test_stage_deps_cover_every_module_the_stage_runs(project, first_repro, import_traces):
    traces = [json.loads(f.read_text()) for f in (import_traces / "out").glob("*.json")]
    seen = {(trace["argv"][0], trace["argv"][1]) for trace in traces}
    assert seen == {(s, d) for s in STAGES for d in DATASETS}
    for trace in traces:
        stage, dataset = trace["argv"][:2]
        assert f"tasks/steps/{stage}.py" in trace["modules"]
        missing = uncovered(trace["modules"], stage_deps(project, stage, dataset), project)
        assert not missing, (
            f"{stage}@{dataset} runs {sorted(missing)}, which its deps in dvc.yaml do not "
            "list: add them there, or `dvc repro` will serve stale results after an edit"
        )
    # The check has teeth: drop one module evaluate runs and it is named.
    evaluate = next(t for t in traces if t["argv"][0] == "evaluate")
    deps = [d for d in stage_deps(project, "evaluate", "x") if d != "tasks/ml/metrics.py"]
    assert uncovered(evaluate["modules"], deps, project) == {"tasks/ml/metrics.py"}
    # Precise: the download stage never loads the ML library.
    download = next(t for t in traces if t["argv"][0] == "download")
    assert not [m for m in download["modules"] if m.startswith("tasks/ml/")]


def test_editing_the_metric_code_reruns_only_the_stages_that_score(project, first_repro):
    metrics = project / "tasks" / "ml" / "metrics.py"
    original = metrics.read_text()
    metrics.write_text(original + "\n# an edit\n")
    try:
        status = json.loads(dvc_json(project, "status", "--json"))
    finally:
        metrics.write_text(original)
    assert set(status) == {f"{s}@{d}" for s in ("evaluate", "register") for d in DATASETS}
    assert json.loads(dvc_json(project, "status", "--json")) == {}


def test_finetune_param_reruns_exactly_finetune_onward(project, first_repro):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["learning_rate"] = 0.00002
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = dvc(project, "repro")
    assert ran(output) == {
        f"{s}@{d}" for s in ("finetune", "evaluate", "register") for d in DATASETS
    }
    assert {f"{s}@{d}" for s in ("download", "validate", "train") for d in DATASETS} <= skipped(
        output
    )


def test_push_then_pull_into_a_fresh_clone_restores_models(project, first_repro, tmp_path):
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "results")
    dvc(project, "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    dvc(clone, "pull")
    for ds in DATASETS:
        for name in ("frozen.keras", "finetuned.keras"):
            original = (project / "models" / ds / name).read_bytes()
            assert (clone / "models" / ds / name).read_bytes() == original
        assert (clone / "data" / "manifests" / f"{ds}.parquet").read_bytes() == (
            project / "data" / "manifests" / f"{ds}.parquet"
        ).read_bytes()


def test_exp_run_with_an_override_is_its_own_mlflow_parent_run(project, first_repro):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cats_vs_dogs")
    parent_filter = "tags.`pipeline.parent` = 'true'"
    before = client.search_runs([experiment.experiment_id], parent_filter)
    output = dvc(
        project, "exp", "run", "-n", "two-epochs", "-S", "train.epochs=2", "train@cats_vs_dogs"
    )
    assert "train@cats_vs_dogs" in ran(output)
    after = client.search_runs([experiment.experiment_id], parent_filter)
    new = [run for run in after if run.info.run_id not in {r.info.run_id for r in before}]
    assert len(new) == 1
    assert new[0].data.params["train.epochs"] == "2"
    assert new[0].data.tags["dvc.exp_name"] == "two-epochs"
    shown = dvc(project, "exp", "show", "--csv")
    assert "two-epochs" in shown
