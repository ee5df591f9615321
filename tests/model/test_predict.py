"""Batch prediction from a .keras file and from the registry agrees with model.predict."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tasks.cli import main
from tasks.commands import predict
from tasks.errors import StageError
from tasks.ml.images import read_image
from tests.datagen import tiny_params
from tests.tinymodel import register_champion, tiny_models

# every test here uses a registry holding a trained tiny model: seconds each
pytestmark = pytest.mark.slow

URI = "models:/cats_vs_dogs-classifier@champion"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A workspace whose registry holds the good tiny model as @champion."""
    root = tmp_path_factory.mktemp("predict")
    models = tiny_models(tmp_path_factory.mktemp("tiny"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.delenv("TASKS_PARENT_RUN_ID", raising=False)
        paths = register_champion(root, models["good"], validation=4)
        yield paths, models
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.fixture
def registry(store, monkeypatch):
    paths, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{paths.root}/mlflow.db")
    return store


@pytest.fixture
def images(store):
    paths, _ = store
    folder = paths.raw / "cats_and_dogs_filtered" / "validation"
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 8
    return folder, files


@pytest.fixture
def keras_model(store, tmp_path):
    """The good model as a .keras file with classes.json beside it."""
    _, models = store
    target = tmp_path / "model" / "good.keras"
    target.parent.mkdir()
    shutil.copy(models["good"], target)
    (target.parent / "classes.json").write_text(json.dumps({"classes": ["cats", "dogs"]}))
    return target


def direct_probabilities(model_file, files):
    from tasks.artifacts import load_model

    model = load_model(model_file)
    batch = np.stack([read_image(f, (32, 32)) for f in files]).astype(np.float32)
    return model.predict(batch, verbose=0)[:, 0]


def test_predict_from_a_keras_file_agrees_with_model_predict(keras_model, images, tmp_path):
    folder, files = images
    out = tmp_path / "out" / "predictions.csv"
    assert predict.run(str(keras_model), [str(folder)], out=str(out), batch_size=3) is None
    table = pd.read_csv(out)
    assert list(table.columns) == [
        "path",
        "status",
        "predicted",
        "confidence",
        "prob_cats",
        "prob_dogs",
        "error",
    ]
    assert table["path"].tolist() == [str(f) for f in files]
    assert (table["status"] == "ok").all()
    np.testing.assert_allclose(
        table["prob_dogs"], direct_probabilities(keras_model, files), atol=1e-5
    )
    np.testing.assert_allclose(table["prob_cats"] + table["prob_dogs"], 1.0, atol=1e-5)
    actual = [f.parent.name for f in files]
    assert table["predicted"].tolist() == actual


def test_predict_from_the_registry_agrees_with_the_keras_file(
    registry, keras_model, images, tmp_path
):
    _, files = images
    out = tmp_path / "registry.csv"
    predict.run(URI, [str(f) for f in files], out=str(out), batch_size=32)
    table = pd.read_csv(out)
    assert {"prob_cats", "prob_dogs"} <= set(table.columns)  # class names from the model's metadata
    np.testing.assert_allclose(
        table["prob_dogs"], direct_probabilities(keras_model, files), atol=1e-5
    )


def test_pyfunc_round_trip_gives_the_same_probabilities(registry, keras_model, images):
    import mlflow

    _, files = images
    pyfunc = mlflow.pyfunc.load_model(URI)
    batch = np.stack([read_image(f, (32, 32)) for f in files])  # uint8, as the signature says
    probs = np.asarray(pyfunc.predict(batch))
    assert probs.shape == (8, 2)
    expected = direct_probabilities(keras_model, files)
    np.testing.assert_allclose(probs[:, 1], expected, atol=1e-5)
    np.testing.assert_allclose(probs[:, 0], 1 - expected, atol=1e-5)
    assert pyfunc.metadata.metadata["classes"] == ["cats", "dogs"]


def test_unreadable_files_are_reported_and_the_rest_predicted(store, images, tmp_path, capsys):
    _, models = store
    _, files = images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    missing = tmp_path / "missing.png"
    argv = ["predict", str(models["good"]), str(files[0]), str(broken), str(missing)]
    assert main([*argv, str(files[-1]), "--classes", "cats,dogs", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(io.StringIO(captured.out), keep_default_na=False)
    assert table["status"].tolist() == ["ok", "error", "error", "ok"]
    assert table["predicted"].tolist() == ["cats", "", "", "dogs"]
    assert "UnidentifiedImageError" in table["error"][1]
    assert table["error"][2] == "no such file"
    assert "2 unreadable" in captured.err


def test_class_names_of_a_keras_file_come_from_params_or_are_indices(
    store, images, tmp_path, monkeypatch, write_params, capsys
):
    _, models = store
    _, files = images
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "models" / "cats_vs_dogs" / "finetuned.keras"
    model.parent.mkdir(parents=True)
    shutil.copy(models["good"], model)

    predict.run(str(model), [str(files[0])], out="indices.csv")
    assert {"prob_class_0", "prob_class_1"} <= set(pd.read_csv("indices.csv").columns)
    assert "no class names" in capsys.readouterr().err

    write_params(tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}))
    predict.run(str(model), [str(files[0])], out="named.csv")
    assert pd.read_csv("named.csv")["predicted"].tolist() == ["cats"]


def test_bad_arguments_are_one_line_errors(registry, images, tmp_path):
    _, models = registry
    folder, files = images
    with pytest.raises(StageError, match="--batch-size must be at least 1"):
        predict.run(str(models["good"]), [str(folder)], batch_size=0)
    with pytest.raises(StageError, match="predicts 2 classes but 3 class names"):
        predict.run(str(models["good"]), [str(folder)], classes="a,b,c")
    with pytest.raises(StageError, match="model nothere.keras not found"):
        predict.run("nothere.keras", [str(folder)])
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(StageError, match="cannot load model .*broken.keras"):
        predict.run(str(tmp_path / "broken.keras"), [str(folder)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no images .* under folder"):
        predict.run(str(models["good"]), [str(tmp_path / "empty")])
    with pytest.raises(StageError, match="cannot load MLflow model models:/nope@champion"):
        predict.run("models:/nope@champion", [str(files[0])])
