"""``python -m tasks export``: serving formats written atomically, each read back with its own
runtime and compared with the Keras model, and logged on the registered version's run."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from tasks import cli
from tasks.cli import main
from tasks.commands import export
from tasks.config import parse_config
from tasks.errors import StageError
from tasks.ml.export import FORMATS, TOLERANCE, Parity, max_abs_diff
from tasks.ml.images import read_image
from tests.datagen import tiny_params
from tests.tinymodel import make_workspace, register_champion, tiny_models

DS = "cats_vs_dogs"
NAME = f"{DS}-classifier"
ALL = ("saved_model", "litert", "onnx")
OVERRIDES = ["tracking.artifact_location=artifacts"]


def config():
    return parse_config(tiny_params({DS: "http://127.0.0.1:1/c.zip"}), OVERRIDES)


def write_params(root: Path) -> Path:
    params = tiny_params({DS: "http://127.0.0.1:1/c.zip"})
    params["tracking"] = {"artifact_location": "artifacts"}
    target = root / "params.yaml"
    target.write_text(yaml.safe_dump(params))
    return target


def split_images(paths) -> tuple[np.ndarray, int]:
    """The workspace's test-split images (Pillow-decoded here, independently of the step)."""
    manifest = pd.read_parquet(paths.manifest)
    rows = manifest[(manifest["split"] == "test") & (manifest["status"] == "ok")]
    images = np.stack([read_image(paths.raw / p, (32, 32)) for p in sorted(rows["path"])])
    return images.astype(np.float32), len(rows)


def keras_probabilities(model_file: Path, images: np.ndarray) -> np.ndarray:
    """[P(cats), P(dogs)] from the .keras file itself."""
    from tasks.artifacts import load_model

    p = np.asarray(load_model(model_file).predict(images, verbose=0))[:, 0]
    return np.stack([1 - p, p], axis=1)


@keras.saving.register_keras_serializable(package="tests")
class Jitter(keras.layers.Layer):
    """Adds fresh uniform noise to every output, every call: no export can reproduce it."""

    def call(self, inputs):
        import tensorflow as tf

        return inputs + tf.random.uniform(tf.shape(inputs), -0.05, 0.05)


def jittery_model(file: Path) -> Path:
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1, activation="sigmoid")(x)
    keras.Model(inputs, Jitter()(x)).save(file)
    return file


# ---------------------------------------------------------------- from the registry


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A workspace whose registry holds the good tiny model as @champion (v1), exported in
    every format with ``python -m tasks export`` as a user types it."""
    root = tmp_path_factory.mktemp("export")
    models = tiny_models(tmp_path_factory.mktemp("tiny"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.delenv("TASKS_PARENT_RUN_ID", raising=False)
        paths = register_champion(root, models["good"], validation=20)
        params = write_params(root)
        out = io.StringIO()
        argv = ["export", DS, "--format", *ALL, "--params", str(params), "--root", str(root)]
        with contextlib.redirect_stdout(out):
            code = main(argv)
        assert code == 0
        yield paths, models, out.getvalue()
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.fixture
def registry(champion, monkeypatch):
    paths, _, _ = champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{paths.root}/mlflow.db")
    monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
    return champion


@pytest.mark.slow
def test_every_format_is_written_and_reported_within_the_tolerance(champion):
    paths, _, printed = champion
    folder = paths.models / "export"
    assert (folder / "saved_model" / "saved_model.pb").is_file()
    assert (folder / "saved_model" / "variables").is_dir()
    assert (folder / "litert" / "model.tflite").is_file()
    assert (folder / "onnx" / "model.onnx").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", *sorted(ALL)]

    _, test_count = split_images(paths)
    report = json.loads((folder / "export.json").read_text())
    assert report["dataset"] == DS and sorted(report["formats"]) == sorted(ALL)
    for name, entry in report["formats"].items():
        here = paths.root / entry["path"]
        assert entry["path"] == f"models/{DS}/export/{name}"
        assert entry["size_bytes"] == sum(f.stat().st_size for f in here.rglob("*") if f.is_file())
        assert entry["size_bytes"] > 1000
        assert 0 <= entry["max_abs_diff"] <= TOLERANCE
        assert entry["images"] == test_count == 8
        assert entry["classes"] == ["cats", "dogs"]
        assert entry["source"] == {
            "model": f"models:/{NAME}/1",
            "registered_model": NAME,
            "version": "1",
            "alias": "champion",
            "run_id": entry["source"]["run_id"],
        }
        assert f"{name:<12} models/{DS}/export/{name}  {entry['size_bytes']:,} bytes" in printed
    assert printed.startswith(f"export: {DS} from models:/{NAME}/1 (@champion)\n")


@pytest.mark.slow
def test_each_exported_file_gives_the_champions_probabilities(champion):
    """Read back here with each runtime, on images decoded independently of the step."""
    import onnxruntime
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    paths, models, _ = champion
    images, _ = split_images(paths)
    expected = keras_probabilities(models["good"], images)
    folder = paths.models / "export"

    saved = tf.saved_model.load(str(folder / "saved_model"))
    outputs = saved.signatures["serving_default"](image=tf.constant(images))
    (probabilities,) = outputs.values()
    np.testing.assert_allclose(probabilities.numpy(), expected, atol=TOLERANCE)

    session = onnxruntime.InferenceSession(str(folder / "onnx" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["image"]
    (probabilities,) = session.run(None, {"image": images})
    np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE)

    interpreter = Interpreter(model_path=str(folder / "litert" / "model.tflite"))
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images)
    interpreter.invoke()
    probabilities = interpreter.get_tensor(target["index"])
    assert probabilities.shape == (len(images), 2)
    np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_the_exports_are_logged_on_the_registered_versions_run(registry, tmp_path):
    from mlflow import MlflowClient

    paths, _, _ = registry
    client = MlflowClient()
    version = client.get_model_version(NAME, "1")
    logged = {a.path: a for a in client.list_artifacts(version.run_id, "export")}
    assert sorted(logged) == [f"export/{name}" for name in ("export.json", *sorted(ALL))]
    (onnx,) = client.list_artifacts(version.run_id, "export/onnx")
    local = paths.models / "export" / "onnx" / "model.onnx"
    assert (onnx.path, onnx.file_size) == ("export/onnx/model.onnx", local.stat().st_size)
    saved = {a.path for a in client.list_artifacts(version.run_id, "export/saved_model")}
    assert "export/saved_model/saved_model.pb" in saved

    import mlflow

    copy = mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="export", dst_path=str(tmp_path / "logged")
    )
    logged_report = json.loads((Path(copy) / "export.json").read_text())
    report = json.loads((paths.models / "export" / "export.json").read_text())
    assert logged_report == report  # every format there came from this version

    for name in ALL:
        entry = report["formats"][name]
        assert entry["source"]["run_id"] == version.run_id
        tags = version.tags
        assert float(tags[f"export.{name}.max_abs_diff"]) <= TOLERANCE
        assert float(tags[f"export.{name}.max_abs_diff"]) == pytest.approx(
            entry["max_abs_diff"], rel=1e-2, abs=1e-12
        )
        assert int(tags[f"export.{name}.size_bytes"]) == entry["size_bytes"]
        assert int(tags[f"export.{name}.images"]) == entry["images"]
        # the model card's parity table (the version's description) has the format's row
        row = f"| {name} | {tags[f'export.{name}.max_abs_diff']} | {entry['images']} |"
        assert row in version.description


@pytest.mark.slow
def test_a_registered_version_by_uri_pins_that_version(registry):
    """``--model models:/NAME/1``: the report names version 1 and its run, without an alias."""
    from mlflow import MlflowClient

    paths, _, _ = registry
    result = export.run(config(), paths, ["saved_model"], model=f"models:/{NAME}/1")
    run_id = MlflowClient().get_model_version(NAME, "1").run_id
    assert (result.source.version, result.source.alias, result.source.run_id) == ("1", None, run_id)
    entry = json.loads(result.report.read_text())["formats"]["saved_model"]
    assert entry["source"] == {
        "model": f"models:/{NAME}/1",
        "registered_model": NAME,
        "version": "1",
        "run_id": run_id,
    }
    assert entry["max_abs_diff"] <= TOLERANCE


def test_without_a_store_the_command_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = write_params(tmp_path)
    make_workspace(tmp_path, counts={"train": 1, "validation": 2})
    code = main(["export", DS, "--params", str(params), "--root", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: no MLflow store at sqlite:///{tmp_path.resolve()}/mlflow/")
    assert err.endswith("run the pipeline (or register) first, or pass --model FILE.keras\n")
    assert not (tmp_path / "models" / DS / "export").exists()


def test_without_a_champion_the_command_says_what_to_run(tmp_path, monkeypatch, capsys):
    """The store and the registered model exist, but no version was promoted."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
    MlflowClient(uri).create_registered_model(NAME)
    params = write_params(tmp_path)
    code = main(["export", DS, "--params", str(params), "--root", str(tmp_path)])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert errors == [
        f"error: registered model {NAME} has no @champion in sqlite:///{tmp_path}/mlflow.db; "
        f"run register (python -m tasks register {DS}) or pass --model FILE.keras"
    ]


# ---------------------------------------------------------------- refusals


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_workspace(tmp_path / "ws", counts={"train": 1, "validation": 10})


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory.mktemp("tiny"))["good"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        f.relative_to(folder).as_posix(): f.read_bytes() for f in folder.rglob("*") if f.is_file()
    }


@pytest.mark.slow
def test_a_format_that_misses_the_tolerance_is_refused_and_the_previous_export_kept(
    workspace, good_file, tmp_path
):
    """The model's own noise cannot be reproduced by any export: the measured difference
    is far above 1e-4, so nothing is written and the earlier good export stays as it was."""
    _, test_count = split_images(workspace)
    first = export.run(config(), workspace, ["saved_model"], model=str(good_file))
    folder = workspace.models / "export"
    before = snapshot(folder)
    assert first.exported[0].max_abs_diff <= TOLERANCE
    assert "saved_model/saved_model.pb" in before and "export.json" in before

    noisy = jittery_model(tmp_path / "noisy.keras")
    with pytest.raises(StageError) as error:
        export.run(config(), workspace, ["saved_model"], model=str(noisy))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "export saved_model refused: its probabilities differ from the Keras model's by up to "
    )
    measured = float(message.split("by up to ")[1].split(" ")[0])
    assert TOLERANCE < measured <= 0.2
    assert f" on {test_count} test images (the limit is 0.0001); nothing was written for it; " in (
        message
    )
    assert snapshot(folder) == before  # the earlier export and its report, byte for byte
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "saved_model"]


@pytest.mark.slow
def test_a_format_whose_runtime_is_missing_is_refused_and_the_others_written(
    workspace, good_file, monkeypatch
):
    """onnxruntime made unimportable (as where it is not installed): onnx is refused in one
    line naming the package and the fix; saved_model, asked for with it, is written."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(StageError) as error:
        export.run(config(), workspace, ["saved_model", "onnx"], model=str(good_file))
    assert str(error.value) == (
        "export onnx refused: onnxruntime not installed (its converter and runtime); run "
        "`uv sync` to install the project's dependencies, or leave out --format onnx; "
        "nothing was written for it (saved_model written)"
    )
    folder = workspace.models / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "saved_model"]
    report = json.loads((folder / "export.json").read_text())
    assert list(report["formats"]) == ["saved_model"]
    assert report["formats"]["saved_model"]["source"] == {"model": str(good_file)}


def test_a_missing_runtime_alone_stops_before_anything_is_loaded(workspace, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    params = write_params(workspace.root)
    argv = ["export", DS, "--format", "onnx", "--model", "nowhere.keras"]
    assert main([*argv, "--params", str(params), "--root", str(workspace.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: export onnx refused: tf2onnx not installed")
    assert not (workspace.models / "export").exists()


def test_the_format_names_are_checked_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["export", DS, "--format", "tflite"])
    assert exit_.value.code == 2
    assert "argument --format: invalid choice: 'tflite'" in capsys.readouterr().err
    assert set(cli.EXPORT_FORMATS) == set(FORMATS)
    args = cli.build_parser().parse_args(
        ["export", DS, "--format", "onnx", "litert", "--format", "saved_model"]
    )
    assert args.formats == ["onnx", "litert", "saved_model"]


# ---------------------------------------------------------------- the comparison itself


def test_parity_is_the_largest_difference_over_every_batch():
    parity = Parity()
    a = np.array([[0.2, 0.8], [0.5, 0.5]])
    assert parity.add(a, a + 2e-5) == pytest.approx(2e-5)
    assert parity.add(a[:1], a[:1] - np.array([[0.0, 3e-4]])) == pytest.approx(3e-4)
    assert parity.images == 3 and parity.max_abs_diff == pytest.approx(3e-4)
    assert not parity.holds
    assert Parity(max_abs_diff=1e-4, images=1).holds
    assert not Parity().holds  # nothing compared proves nothing
    assert max_abs_diff(a, a[:, :1]) == float("inf")
    assert max_abs_diff(a, np.where(a > 0.6, np.nan, a)) == float("inf")
