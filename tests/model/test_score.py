"""``score`` against a real MLflow registry holding a trained tiny model (with its drift
reference), on generated drops: the drift table, bad files, reruns, labels, sources."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import ImageFilter, ImageOps

from tasks.cli import main
from tasks.commands import score
from tasks.config import parse_config
from tasks.errors import StageError
from tasks.ml.drift import DriftSettings, drift_report
from tests.datagen import make_image, tiny_params
from tests.tinymodel import register_champion, tiny_models

pytestmark = pytest.mark.slow  # a registry with a trained tiny model: seconds per test

NAME = "cats_vs_dogs-classifier"
TRAIN = 60  # training images per class: the version's drift reference holds 120


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    models = tiny_models(tmp_path_factory.mktemp("tiny"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.delenv("TASKS_PARENT_RUN_ID", raising=False)
        paths = register_champion(root, models["good"], validation=30, train=TRAIN)
        yield paths
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.fixture
def paths(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.root}/mlflow.db")
    return store


def config(*overrides: str):
    return parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}),
        ["tracking.artifact_location=artifacts", *overrides],
    )


def write_drop(folder: Path, count: int, seed: int, kind: str = "same", labelled=False) -> Path:
    """``count`` generated images like the training set's (JPEG, 48 px), or shifted."""
    for n in range(count):
        label = 0 if kind == "one_class" else 2 if kind == "unseen" else n % 2
        image = make_image(label, 48, seed=seed + n)
        if kind == "inverted":
            image = ImageOps.invert(image)
        elif kind == "blurred":
            image = image.filter(ImageFilter.GaussianBlur(3))
        target = folder / (["cats", "dogs"][label] if labelled else "") / f"{kind}-{n}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, quality=90)
    return folder


def scoring_runs(paths, drop: str):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("cats_vs_dogs")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`scoring.drop` = '{drop}'"
    )


def test_drift_table_on_generated_drops(paths, tmp_path, capsys):
    """In-distribution drops are flagged at most at alpha; each shift by its test."""
    from mlflow import MlflowClient

    from tasks.scoring.drop import check_drop
    from tasks.scoring.reference import embed_rows, load_reference
    from tasks.tracking.models import load_logged_model

    cfg = config()
    version = MlflowClient().get_model_version_by_alias(NAME, "champion")
    model, _ = load_logged_model(f"models:/{NAME}/{version.version}")
    reference = load_reference(version.run_id, version.version, NAME)
    settings = DriftSettings(**cfg.scoring.drift.model_dump())

    def report(kind: str, seed: int) -> dict:
        folder = write_drop(tmp_path / f"{kind}-{seed}", 40, seed, kind)
        drop = check_drop(folder.name, str(folder), folder, ["cats", "dogs"], cfg.validate_)
        rows = drop.ok.assign(label="cats")
        probabilities, embeddings = embed_rows(model, rows, folder, ["cats", "dogs"], 32)
        return drift_report(reference, embeddings, probabilities, settings)

    draws = [report("same", 100_000 + 1_000 * k) for k in range(20)]
    false_alarms = sum(r["drift"] for r in draws)
    shifted = {kind: report(kind, 500_000) for kind in ("inverted", "blurred", "one_class",
                                                          "unseen")}  # fmt: skip
    with capsys.disabled():
        print(f"\nin-distribution: {false_alarms} of {len(draws)} drops flagged (alpha 0.05)")
        for kind, r in shifted.items():
            ps = ", ".join(f"{t} p={v['p_value']:.3f}" for t, v in r["tests"].items())
            print(f"{kind:>10}: drift={r['drift']} flagged={r['flagged']} ({ps})")
    assert false_alarms <= 1  # at most alpha = 0.05 of 20 draws
    assert {"domain", "mmd"} <= set(shifted["inverted"]["flagged"])
    assert {"domain", "mmd"} & set(shifted["blurred"]["flagged"])
    assert "classes" in shifted["one_class"]["flagged"]
    assert {"domain", "mmd"} & set(shifted["unseen"]["flagged"])


def test_a_drop_with_bad_files_is_scored_with_them_quarantined_and_named(paths, tmp_path, capsys):
    drop = write_drop(tmp_path / "inbox" / "monday", 30, 700_000)
    (drop / "broken.jpg").write_bytes(b"not an image at all")
    (drop / "empty.png").write_bytes(b"")
    make_image(0, 4, seed=1).save(drop / "tiny.jpg")
    (drop / "zz-copy.jpg").write_bytes((drop / "same-0.jpg").read_bytes())
    (drop / ".DS_Store").write_bytes(b"junk")

    code = main(["score", "cats_vs_dogs", str(drop), "--root", str(paths.root),
                 "--params", str(write_params(paths)), "--result-json", "-"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert (result["drop"], result["scored"], result["images"], result["quarantined"]) == (
        "monday", True, 30, 4,
    )  # fmt: skip
    assert result["drift"] is False and result["version"] == "1"
    assert "quarantined broken.jpg: not an image" in err
    assert "quarantined empty.png: empty file (0 bytes)" in err
    assert "quarantined tiny.jpg: smaller than min_side" in err
    assert "quarantined zz-copy.jpg: duplicate of same-0.jpg" in err

    folder = paths.root / "reports" / "cats_vs_dogs" / "scoring" / "monday"
    table = pd.read_parquet(folder / "predictions.parquet")
    assert len(table) == 34 and ".DS_Store" not in set(table["file"])
    scored = table[table["status"] == "ok"]
    assert set(scored["predicted"]) <= {"cats", "dogs"}
    assert np.allclose(scored["prob_cats"] + scored["prob_dogs"], 1.0, atol=1e-5)
    assert scored["embedding"].map(len).eq(16).all()
    assert (scored["model_version"] == "1").all()
    truth = scored["file"].str.extract(r"same-(\d+)")[0].astype(int) % 2
    assert (scored["predicted"] == truth.map({0: "cats", 1: "dogs"})).mean() >= 0.9
    bad = table[table["status"] == "quarantined"].set_index("file")["reason"]
    assert bad["zz-copy.jpg"] == "duplicate of same-0.jpg"
    drift = json.loads((folder / "drift.json").read_text())
    assert drift["checked"] and set(drift["tests"]) == {"domain", "mmd", "classes", "confidence"}
    assert sorted(p.name for p in (folder / "plots").iterdir()) == [
        "class_share.png", "confidence.png", "embeddings.png",
    ]  # fmt: skip

    (run,) = scoring_runs(paths, "monday")
    assert run.info.status == "FINISHED" and run.info.run_id == result["run_id"]
    assert run.data.tags["scoring.model_version"] == "1" and run.data.tags["drift"] == "false"
    assert run.data.metrics["images"] == 30 and run.data.metrics["quarantined"] == 4
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["monday"]

    # the same drop again: nothing scored, nothing rewritten, no second run
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    again = score.run(config(), paths, str(drop))
    assert again.scored is False and "already scored by" in str(again)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert len(scoring_runs(paths, "monday")) == 1


def test_a_labelled_drop_records_live_accuracy_and_the_card_lists_it(paths, tmp_path, capsys):
    from mlflow import MlflowClient

    drop = write_drop(tmp_path / "labelled", 30, 800_000, labelled=True)
    result = score.run(config(), paths, str(drop))
    assert result.live["live.accuracy"] >= 0.9
    (run,) = scoring_runs(paths, "labelled")
    assert run.data.metrics["live.accuracy"] == pytest.approx(result.live["live.accuracy"])

    description = MlflowClient().get_model_version(NAME, "1").description
    assert description.startswith(f"# {NAME} v1")
    for heading in ("## Intended use", "## Known limits", "## Data", "## Recipe",
                    "## Test metrics", "## Gate", "## Drift reference", "## Export parity",
                    "## CPU throughput", "## Scoring history"):  # fmt: skip
        assert heading in description
    row = next(line for line in description.splitlines() if line.startswith("| labelled |"))
    assert f"{result.live['live.accuracy']:.4f}" in row
    assert f"{2 * TRAIN} training images embedded" in description

    assert main(["card", "cats_vs_dogs", "--root", str(paths.root),
                 "--params", str(write_params(paths))]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.strip() == description.strip()


def test_zip_and_url_drops_are_scored_like_folders(paths, tmp_path, archive_server):
    drop = write_drop(tmp_path / "files", 24, 900_000)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for file in sorted(drop.iterdir()):
            bundle.write(file, f"batch/{file.name}")
    archive = tmp_path / "tuesday.zip"
    archive.write_bytes(buffer.getvalue())
    zipped = score.run(config(), paths, str(archive))
    assert (zipped.drop, zipped.images, zipped.quarantined) == ("tuesday", 24, 0)

    url = archive_server.add("/drops/wednesday.zip", buffer.getvalue())
    fetched = score.run(config(), paths, url)
    assert (fetched.drop, fetched.images) == ("wednesday", 24)
    assert fetched.summary["mmd"]["p_value"] == zipped.summary["mmd"]["p_value"]


def test_errors_name_the_problem_and_the_fix(paths, tmp_path):
    with pytest.raises(StageError, match="drop .*nowhere not found: pass a folder of images"):
        score.run(config(), paths, str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"junk")
    with pytest.raises(StageError, match="drop bad has no usable image .*a.jpg: not an image"):
        score.run(config(), paths, str(bad))
    assert not (paths.root / "reports" / "cats_vs_dogs" / "scoring" / "bad").exists()
    with pytest.raises(StageError, match="has no @challenger; run the pipeline"):
        score.run(config("scoring.model=challenger"), paths, str(bad))
    with pytest.raises(StageError, match="has no version 7"):
        score.run(config(), paths, str(bad), model="7")


def write_params(paths) -> Path:
    import yaml

    params = tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"})
    params["tracking"] = {"artifact_location": "artifacts"}
    target = paths.root / "params.yaml"
    target.write_text(yaml.safe_dump(params))
    return target


def test_an_s3_prefix_drop_is_read_object_by_object(paths, tmp_path, monkeypatch):
    import boto3

    from tests.deploy.stack import start_moto

    server, url = start_moto(tmp_path / "moto.log")
    try:
        for key, value in {"AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"
                           }.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="drops")
        drop = write_drop(tmp_path / "thursday", 22, 950_000, labelled=True)
        for file in sorted(drop.rglob("*.jpg")):
            s3.upload_file(str(file), "drops", f"inbox/cats_vs_dogs/thursday/"
                           f"{file.relative_to(drop).as_posix()}")  # fmt: skip
        result = score.run(config(), paths, "s3://drops/inbox/cats_vs_dogs/thursday")
        assert (result.drop, result.images, result.quarantined) == ("thursday", 22, 0)
        assert result.live["live.accuracy"] >= 0.9  # the class folders came across
        with pytest.raises(StageError, match="no objects under s3://drops/inbox/nothing"):
            score.run(config(), paths, "s3://drops/inbox/nothing")
    finally:
        server.stop()


def test_a_version_without_a_drift_reference_is_scored_without_drift_tests(paths, tmp_path):
    import mlflow

    from tasks.artifacts import load_model
    from tasks.tracking.models import log_classifier

    experiment = mlflow.get_experiment_by_name("cats_vs_dogs")  # artifacts under tmp, not ./
    with mlflow.start_run(experiment_id=experiment.experiment_id):  # no reference kept
        model = load_model(next(paths.models.glob("*.keras")))
        log_classifier(model, ["cats", "dogs"], np.zeros((1, 32, 32, 3), np.uint8), NAME)
    drop = write_drop(tmp_path / "friday", 25, 990_000)
    result = score.run(config(), paths, str(drop), model="2")
    assert (result.version, result.images, result.drift) == ("2", 25, None)
    assert "drift: not tested (cats_vs_dogs-classifier v2 has no drift reference" in str(result)
    report = json.loads((Path(paths.root) / result.reports / "drift.json").read_text())
    assert report["checked"] is False and "register a new version" in report["reason"]
