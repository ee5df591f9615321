"""A Keras model file as the backbone (``train.backbone: <path>.keras``): what is built
from it, with which weights, at which size, and how a bad file or setting is reported."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tasks.config import parse_config
from tasks.dev.alexnet import write_alexnet
from tasks.errors import ConfigError, StageError
from tasks.ml.backbone_file import backbone_entry, default_boundary, model_file_input_size
from tasks.ml.backbones import WeightsSource, build_backbone, resolve_weights, unfreeze_top_blocks
from tasks.ml.model import ModelSpec, build_model
from tests.conftest import REPO
from tests.model.test_structure import loaded_without_the_project, raw_images

SIZE = 64
FILE = "models/backbones/net.keras"


def config(*sets: str):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return parse_config(
        raw,
        [
            f"train.backbone={FILE}",
            "train.backbone_file.cut_at=fc7",
            "train.backbone_file.unfreeze_from=conv5",
            "train.backbone_file.preprocess=torch",
            *sets,
        ],
    )


@pytest.fixture
def alexnet_file(tmp_path):
    return write_alexnet(tmp_path / FILE, image_size=SIZE, width=0.05, seed=3)


def dynamic_file(path):
    """A small fully convolutional model that takes any input size."""
    import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(5, name="logits")(x))
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model


def test_the_backbone_is_the_files_graph_cut_at_the_layer_with_its_weights(tmp_path, alexnet_file):
    import keras

    cfg = config()
    entry = backbone_entry(cfg.train, tmp_path)
    assert (entry.name, entry.image_size, entry.fixed_size) == ("net", SIZE, True)
    weights = resolve_weights(cfg.train.weights, entry, SIZE, tmp_path)
    assert weights.kind == "model_file" and weights.path == alexnet_file.resolve()
    base = build_backbone(entry, SIZE, weights)
    names = [layer.name for layer in base.layers]
    assert names[-1] == "fc7" and "fc8" not in names
    # the file's own weights: the same features as the file's model read at fc7
    original = keras.saving.load_model(alexnet_file)
    reference = keras.Model(original.inputs[0], original.get_layer("fc7").output)
    images = raw_images(SIZE, count=2, seed=1)
    np.testing.assert_allclose(base(images), reference(images), rtol=1e-5, atol=1e-5)
    # weights: none rebuilds the same graph with fresh weights
    fresh = build_backbone(entry, SIZE, WeightsSource("none"))
    assert [w.shape for w in fresh.weights] == [w.shape for w in base.weights]
    assert not np.allclose(fresh.get_layer("conv1").kernel, base.get_layer("conv1").kernel)


@pytest.mark.slow
def test_the_classifier_reads_fc7_and_saves_self_contained(tmp_path, alexnet_file):
    cfg = config()
    entry = backbone_entry(cfg.train, tmp_path)
    head = entry.head_spec(cfg.train.head.model_copy(update={"dense_units": 0, "dropout": 0}))
    model = build_model(ModelSpec(entry, SIZE, head, 2), resolve_weights("imagenet", entry, SIZE))
    assert model.name == "net_file_classifier"
    # fc7 gives one vector per image: no pooling, straight to the output layer
    assert [type(layer).__name__ for layer in model.get_layer("head").layers] == ["Dense"]
    assert [layer.name for layer in model.get_layer("preprocess").layers] == [
        "to_0_1",
        "imagenet_mean_std",
    ]
    assert not model.get_layer("backbone").trainable_weights
    # fine-tuning from the configured boundary: conv5 and the dense layers after it
    boundary = default_boundary(cfg.train.backbone, cfg.train)
    assert boundary == "conv5"
    assert unfreeze_top_blocks(model.get_layer("backbone"), boundary) == ["conv5", "fc6", "fc7"]
    assert loaded_without_the_project(model, SIZE, tmp_path) == ["sigmoid", "(2,", "1)"]


def test_a_file_that_takes_any_size_is_built_at_the_runs_size(tmp_path):
    import keras

    original = dynamic_file(tmp_path / FILE)
    cfg = config("train.backbone_file.cut_at=gap", "train.backbone_file.preprocess=tf")
    entry = backbone_entry(cfg.train, tmp_path)
    assert (entry.fixed_size, entry.resolve_size(None), entry.resolve_size(40)) == (False, 224, 40)
    weights = resolve_weights("imagenet", entry, 40, tmp_path)
    base = build_backbone(entry, 40, weights)
    assert base.input.shape[1:] == (40, 40, 3)
    images = raw_images(40, count=2, seed=2)
    reference = keras.Model(original.inputs[0], original.get_layer("gap").output)
    np.testing.assert_allclose(base(images), reference(images), rtol=1e-5, atol=1e-5)
    # a .weights.h5 saved from the cut backbone loads into it
    trained = build_backbone(entry, 40, WeightsSource("none"))
    trained.save_weights(tmp_path / "b.weights.h5")
    loaded = build_backbone(entry, 40, resolve_weights("b.weights.h5", entry, 40, tmp_path))
    np.testing.assert_allclose(loaded(images), trained(images), rtol=1e-6, atol=1e-6)
    # BatchNorm stays frozen when fine-tuning unfreezes everything
    assert unfreeze_top_blocks(base, "all") == ["conv_a", "conv_b"]


def test_file_problems_are_one_line_with_the_fix(tmp_path, alexnet_file):
    cfg = config()
    with pytest.raises(StageError, match=r"model file models/backbones/none.keras not found"):
        backbone_entry(config("train.backbone=models/backbones/none.keras").train, tmp_path)
    with pytest.raises(ConfigError, match=rf"takes {SIZE} px inputs only .* set train.image_size"):
        backbone_entry(cfg.train, tmp_path).resolve_size(SIZE * 2)
    entry = backbone_entry(config("train.backbone_file.cut_at=fc9").train, tmp_path)
    with pytest.raises(StageError, match=r"cut_at: no layer 'fc9' in net.keras; nearby .*fc8"):
        build_backbone(entry, SIZE, WeightsSource("none"))
    (tmp_path / "bad.keras").write_text("not a zip")
    with pytest.raises(StageError, match=r"bad.keras is not a Keras 3 .keras file"):
        model_file_input_size(tmp_path / "bad.keras")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.backbone_file.preprocess=null"], r"backbone_file.preprocess is required"),
        (["train.backbone_file.unfreeze_from=null"], r"backbone_file.unfreeze_from is required"),
        (["train.weights=x_notop.h5"], r"is a keras.applications file"),
        (["train.backbone=vgg16"], r"backbone_file \(cut_at, unfreeze_from, preprocess\) applies"),
        (["train.backbone=net.onnx"], r"or a path to a .keras model file"),
    ],
)
def test_file_settings_are_checked_with_the_config(sets, message):
    with pytest.raises(ConfigError, match=message):
        config(*sets)
