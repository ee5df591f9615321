"""The evaluate stage on a tiny trained model: metrics, predictions, plots, MLflow run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.config import parse_config
from tasks.contract import RunRecord
from tasks.errors import StageError
from tasks.ml.gradcam import gradcam
from tasks.ml.images import read_image
from tasks.steps import evaluate
from tests.datagen import make_image, tiny_params
from tests.tinymodel import make_workspace, tiny_models, use_candidate, write_history

PLOTS = (
    "confusion_matrix",
    "roc_curve",
    "pr_curve",
    "reliability",
    "per_class",
    "training_curves",
    "mistakes",
    "gradcam",
)
"""Every figure a reviewer of an evaluate run looks at."""

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def cfg():
    return parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}),
        ["evaluate.gradcam_images=3", "evaluate.mistakes=4"],
    )


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
    # 20 validation images per class, one quarantined: the test split holds 4 + 4 of them
    return make_workspace(tmp_path, counts={"train": 2, "validation": 20}, quarantine=1)


@pytest.mark.slow
def test_evaluate_scores_the_test_split_and_logs_the_same_numbers(cfg, workspace, models):
    from mlflow.tracking import MlflowClient

    from tasks.artifacts import load_model

    paths = workspace
    use_candidate(paths, models["good"])
    write_history(paths)
    result = evaluate.run(cfg, paths)

    metrics = json.loads(paths.metrics.read_text())
    assert (metrics["split"], metrics["images"]) == ("test", 8)
    assert (metrics["validation"]["split"], metrics["validation"]["images"]) == ("validation", 31)
    assert metrics["model"] == "models/cats_vs_dogs/finetune-good.keras"
    assert metrics["accuracy"] >= 0.9
    assert metrics["roc_auc"] >= 0.9
    assert metrics["average_precision"] >= 0.9
    assert metrics["per_class"]["cats"]["support"] == 4
    assert metrics["per_class"]["dogs"]["support"] == 4
    assert np.array(metrics["confusion_matrix"]["matrix"]).sum() == 8
    assert metrics["validation"]["per_class"]["cats"]["support"] == 15  # 19 ok - 4 held out
    text = str(result)
    assert text.startswith("evaluate cats_vs_dogs: models/cats_vs_dogs/finetune-good.keras")
    assert "test (held out), 8 images:" in text
    assert "validation (used for early stopping and the candidate choice), 31 images:" in text

    predictions = pd.read_csv(paths.predictions)
    manifest = pd.read_parquet(paths.manifest)
    expected = manifest[(manifest.split == "test") & (manifest.status == "ok")]
    assert sorted(predictions["path"]) == sorted(expected["path"])
    model = load_model(models["good"])
    images = np.stack([read_image(paths.raw / p, (32, 32)) for p in predictions["path"]])
    direct = model.predict(images.astype(np.float32), verbose=0)[:, 0]
    # evaluate reads through the training pipeline (TF resize), predict through Pillow
    np.testing.assert_allclose(predictions["prob_dogs"], direct, atol=5e-3)
    assert (predictions["actual"] == predictions["predicted"]).mean() == metrics["accuracy"]
    # ECE by hand: 10 equal-width bins of the top probability, (b/10, (b+1)/10]
    top = predictions[["prob_cats", "prob_dogs"]].max(axis=1).to_numpy()
    right = (predictions["actual"] == predictions["predicted"]).to_numpy()
    bins = np.clip(np.ceil(top * 10).astype(int) - 1, 0, 9)
    ece = sum(abs(right[bins == b].mean() - top[bins == b].mean()) * (bins == b).mean()
              for b in np.unique(bins))  # fmt: skip
    assert metrics["ece"] == pytest.approx(ece, abs=1e-3)  # the CSV rounds the probabilities

    for name in PLOTS:
        png = paths.plots / f"{name}.png"
        assert png.read_bytes()[:8] == PNG, name
        assert png.stat().st_size > 5_000, name

    run = MlflowClient().get_run(RunRecord.read(paths.run_record("evaluate")).run_id)
    assert run.info.run_id == result.run_id
    assert run.data.tags["phase"] == "evaluate"
    assert "mlflow.parentRunId" in run.data.tags
    for key in ("accuracy", "f1_macro", "roc_auc", "average_precision", "log_loss", "ece"):
        assert run.data.metrics[f"test.{key}"] == pytest.approx(metrics[key])
        assert run.data.metrics[f"validation.{key}"] == pytest.approx(metrics["validation"][key])
    assert run.data.metrics["test.support.dogs"] == 4
    assert run.data.metrics["validation.support.dogs"] == 16
    assert not any(key in run.data.metrics for key in ("accuracy", "images"))  # all labelled
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "predictions.csv", "plots"} <= artifacts
    logged_plots = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert logged_plots == {f"plots/{name}.png" for name in PLOTS}


@pytest.mark.slow
def test_a_wrong_model_fills_the_mistakes_grid(cfg, workspace, models):
    paths = workspace
    use_candidate(paths, models["inverted"])
    result = evaluate.run(cfg, paths)  # no history.csv: the curves figure says so, no failure
    assert result.metrics["accuracy"] <= 0.1
    assert result.metrics["log_loss"] > 0.7
    predictions = pd.read_csv(paths.predictions)
    assert (predictions["actual"] != predictions["predicted"]).sum() >= 7
    assert set(result.plots) == {f"{name}.png" for name in PLOTS}


@pytest.mark.slow
def test_gradcam_runs_the_model_in_pieces_and_finds_the_pattern(models):
    """A class pattern pasted in one quadrant of a grey image lights up that quadrant."""
    from tasks.artifacts import load_model

    model = load_model(models["good"])
    images, quadrants = [], []
    for label in (0, 1):
        for quadrant in range(4):
            image = np.full((32, 32, 3), 128, np.uint8)
            row, col = divmod(quadrant, 2)
            image[row * 16 : row * 16 + 16, col * 16 : col * 16 + 16] = make_image(
                label, 16, seed=70 + quadrant
            )
            images.append(image)
            quadrants.append((row, col))
    images = np.stack(images)
    heatmaps, probs = gradcam(model, images)

    direct = model.predict(images.astype(np.float32), verbose=0)[:, 0]
    np.testing.assert_allclose(probs[:, 1], direct, atol=1e-5)
    assert heatmaps.shape == (8, 32, 32)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    for heat, (row, col) in zip(heatmaps, quadrants, strict=True):
        inside = heat[row * 16 : row * 16 + 16, col * 16 : col * 16 + 16].mean()
        outside = (heat.sum() - inside * 256) / (32 * 32 - 256)
        assert inside > 3 * outside


def test_missing_inputs_are_named_with_the_stage_to_run(cfg, tmp_path):
    paths = make_workspace(tmp_path)
    paths.metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.metrics.write_text('{"accuracy": 0.5}\n')
    with pytest.raises(
        StageError, match=r"candidate.json not found; run `python -m tasks finetune"
    ):
        evaluate.run(cfg, paths)
    paths.models.mkdir(parents=True)
    paths.candidate.write_text('{"path": "models/cats_vs_dogs/gone.keras", "phase": "finetune"}')
    with pytest.raises(StageError, match="gone.keras .* is missing"):
        evaluate.run(cfg, paths)
    paths.candidate.write_text('{"phase": "finetune"}')
    with pytest.raises(StageError, match="not a candidate record with a 'path'"):
        evaluate.run(cfg, paths)
    (paths.models / "finetuned.keras").write_bytes(b"not read: the manifest check comes first")
    paths.candidate.write_text('{"path": "models/cats_vs_dogs/finetuned.keras"}')
    paths.manifest.unlink()
    with pytest.raises(StageError, match="run `python -m tasks validate cats_vs_dogs` first"):
        evaluate.run(cfg, paths)
    assert paths.metrics.read_text() == '{"accuracy": 0.5}\n'  # the old output is untouched
    assert not paths.plots.exists()


@pytest.mark.slow
def test_a_manifest_without_a_test_split_is_refused_with_the_fix(cfg, tmp_path, models):
    paths = make_workspace(tmp_path)
    use_candidate(paths, models["good"])
    manifest = pd.read_parquet(paths.manifest)
    manifest.loc[manifest["split"] == "test", "split"] = "validation"  # an old manifest
    manifest.to_parquet(paths.manifest, index=False)
    with pytest.raises(StageError, match="no usable 'test' images .*rerun validate"):
        evaluate.run(cfg, paths)
    assert not paths.metrics.exists()
