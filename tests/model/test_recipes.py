"""Each recipe's architecture, built at a tiny size with random weights from the resolved
config: the backbone (and where it is cut), the head's layers and widths, what trains in
each phase, the optimizers, the image and batch size, and the augmentation.

A recipe's defining detail changing (InceptionV3 no longer cut at ``mixed7``, VGG16 fine-tuning
more than block5, ...) fails here.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.config import parse_config, recipe_names
from tasks.dev.alexnet import write_alexnet
from tasks.ml.backbone_file import backbone_entry, default_boundary
from tasks.ml.backbones import is_batch_norm, unfreeze_top_blocks
from tasks.ml.inputs import augmentation_layers
from tasks.ml.model import ModelSpec, build_model, compile_model
from tests.conftest import REPO, SESSION_FOLDERS

TINY = {"inception_v3": 75, "vgg16": 32, "xception": 71, "mobilenet_v2": 32}
"""The smallest input each backbone builds at (its published size is asserted separately)."""
FILE_SIZE = 64
"""The size of the small AlexNet file the model-file recipe is built on here."""


def place_model_files(root: Path) -> Path:
    """The model files the presets name (``models/backbones/alexnet.keras``), made small."""
    write_alexnet(root / "models/backbones/alexnet.keras", image_size=FILE_SIZE, width=0.05)
    return root


@functools.cache
def model_files() -> Path:
    root = Path(tempfile.mkdtemp(prefix="recipe-files-")).resolve()
    SESSION_FOLDERS.add(root)  # made once, kept for the session (removed with its temp folder)
    return place_model_files(root)


def tiny_size(cfg) -> int:
    return FILE_SIZE if cfg.train.backbone_is_file else TINY[cfg.train.backbone]


def resolved(recipe: str):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return parse_config(raw, [f"recipe={recipe}"])


def built(recipe: str):
    """(config, model, backbone) of ``recipe`` at the tiny size, weights=none."""
    import keras

    cfg = resolved(recipe)
    entry = backbone_entry(cfg.train, model_files())
    keras.utils.set_random_seed(0)
    model = build_model(ModelSpec(entry, tiny_size(cfg), entry.head_spec(cfg.train.head), 2))
    return cfg, model, model.get_layer("backbone")


def head_layers(model) -> list[tuple]:
    """The head as (type, width or rate): the recipe's classifier, layer by layer."""
    described = []
    for layer in model.get_layer("head").layers:
        kind = type(layer).__name__
        if kind == "Dense":
            described.append((kind, layer.units, layer.activation.__name__))
        elif kind == "Dropout":
            described.append((kind, layer.rate))
        else:
            described.append((kind,))
    return described


def described(layer: tuple) -> str:
    """A :func:`head_layers` entry as the train run's ``head`` param writes it."""
    if layer[0] == "Dense" and layer[2] == "relu":
        return f"Dense({layer[1]}, relu)"
    if layer[0] == "Dropout":
        return f"Dropout({layer[1]})"
    return layer[0]


def weight_paths(weights) -> set[str]:
    return {w.path for w in weights}


def trainable_layers(base) -> set[str]:
    return {layer.name for layer in base.layers if layer.trainable and layer.trainable_weights}


def phase_two(cfg, model, base) -> set[str]:
    """Unfreeze as the finetune step does; the backbone layers with weights that now train."""
    boundary = cfg.finetune.unfreeze_from or default_boundary(cfg.train.backbone, cfg.train)
    unfrozen = set(unfreeze_top_blocks(base, boundary))
    assert unfrozen == trainable_layers(base)
    # the whole model trains exactly the head plus those layers
    expected = weight_paths(model.get_layer("head").trainable_weights) | {
        w.path for layer in base.layers if layer.name in unfrozen for w in layer.trainable_weights
    }
    assert weight_paths(model.trainable_weights) == expected
    assert not any(layer.trainable for layer in base.layers if is_batch_norm(layer))
    return unfrozen


def assert_phase_one_trains_only_the_head(model, base) -> None:
    head = model.get_layer("head")
    assert weight_paths(model.trainable_weights) == weight_paths(head.trainable_weights)
    assert head.trainable_weights and not base.trainable_weights


def optimizer_of(model, name: str, rate: float):
    compile_model(model, name, rate, 2)
    return type(model.optimizer).__name__, pytest.approx(float(model.optimizer.learning_rate))


def augmentation(cfg) -> list[tuple]:
    """The training augmentation as (layer, its factors)."""
    described = []
    for layer in augmentation_layers(cfg.augmentation, 0):
        config = layer.get_config()
        factors = {k: v for k, v in config.items() if k.endswith("factor") or k == "mode"}
        described.append((type(layer).__name__, factors))
    return described


def test_inception_mixed7():
    cfg, model, base = built("inception_mixed7")
    names = [layer.name for layer in base.layers]
    # the defining cut: the backbone ends at mixed7; nothing of mixed8 onwards is built
    assert names[-1] == "mixed7"
    assert "mixed8" not in names and not any(n.startswith("mixed8") for n in names)
    assert base.output.shape[1:] == base.get_layer("mixed7").output.shape[1:]
    assert head_layers(model) == [("Flatten",), ("Dense", 1024, "relu"), ("Dense", 1, "sigmoid")]
    assert_phase_one_trains_only_the_head(model, base)
    assert (cfg.train.image_size, cfg.train.batch_size, cfg.train.epochs) == (150, 20, 20)
    assert optimizer_of(model, cfg.train.optimizer, cfg.train.learning_rate) == ("RMSprop", 1e-4)
    assert cfg.train.augment and cfg.finetune.epochs == 0  # the head only: no phase 2
    assert augmentation(cfg) == [
        ("RandomFlip", {"mode": "horizontal"}),
        ("RandomRotation", {"factor": (-0.1111, 0.1111)}),  # 40 degrees
        ("RandomZoom", {"height_factor": 0.2, "width_factor": None}),
        ("RandomTranslation", {"height_factor": 0.2, "width_factor": 0.2}),
        ("RandomShear", {"x_factor": (-0.2, 0.2), "y_factor": (-0.0, 0.0)}),
    ]


def test_vgg16_block5():
    cfg, model, base = built("vgg16_block5")
    assert [layer.name for layer in base.layers][-1] == "block5_pool"
    assert head_layers(model) == [
        ("Flatten",),
        ("Dense", 512, "relu"),
        ("Dropout", 0.5),
        ("Dense", 1, "sigmoid"),
    ]
    assert_phase_one_trains_only_the_head(model, base)
    assert (cfg.train.image_size, cfg.train.batch_size, cfg.train.epochs) == (224, 20, 30)
    assert optimizer_of(model, cfg.train.optimizer, cfg.train.learning_rate) == ("Adam", 1e-4)
    assert phase_two(cfg, model, base) == {"block5_conv1", "block5_conv2", "block5_conv3"}
    assert cfg.finetune.epochs > 0
    assert optimizer_of(model, cfg.finetune.optimizer, cfg.finetune.learning_rate) == (
        "Adam",
        1e-5,
    )
    assert augmentation(cfg) == [
        ("RandomFlip", {"mode": "horizontal"}),
        ("RandomRotation", {"factor": (-0.0833, 0.0833)}),  # 30 degrees
        ("RandomZoom", {"height_factor": 0.2, "width_factor": None}),
        ("RandomTranslation", {"height_factor": 0.1, "width_factor": 0.1}),
        ("RandomShear", {"x_factor": (-0.2, 0.2), "y_factor": (-0.0, 0.0)}),
    ]


def test_hymenoptera_vgg16():
    cfg, model, base = built("hymenoptera_vgg16")
    assert cfg.train.backbone == "vgg16"
    assert head_layers(model) == [
        ("Flatten",),
        ("Dense", 4096, "relu"),
        ("Dropout", 0.5),
        ("Dense", 1, "sigmoid"),
    ]
    assert_phase_one_trains_only_the_head(model, base)
    assert (cfg.train.image_size, cfg.train.batch_size, cfg.train.epochs) == (224, 4, 12)
    assert optimizer_of(model, cfg.train.optimizer, cfg.train.learning_rate) == ("SGD", 0.001)
    compile_model(
        model, cfg.train.optimizer, cfg.train.learning_rate, 2, momentum=cfg.train.momentum
    )
    assert float(model.optimizer.momentum) == pytest.approx(0.9)  # the walkthrough's SGD
    assert cfg.finetune.epochs == 0  # the feature extractor stays frozen
    assert augmentation(cfg) == [("RandomFlip", {"mode": "horizontal"})]


def test_hymenoptera_alexnet():
    cfg, model, base = built("hymenoptera_alexnet")
    assert cfg.train.backbone == "models/backbones/alexnet.keras"  # a model file: no AlexNet
    assert cfg.train.backbone_file.preprocess == "torch"  # torchvision's ImageNet mean/std
    names = [layer.name for layer in base.layers]
    # the defining cut: fc8 (ImageNet's 1000 classes) is replaced by the two-class head
    assert names[-1] == "fc7" and "fc8" not in names
    assert {"conv1", "conv5", "fc6"} <= set(names)
    assert head_layers(model) == [("Dense", 1, "sigmoid")]
    assert [layer.name for layer in model.get_layer("preprocess").layers] == [
        "to_0_1",
        "imagenet_mean_std",
    ]
    assert_phase_one_trains_only_the_head(model, base)
    assert (cfg.train.image_size, cfg.train.batch_size, cfg.train.epochs) == (224, 4, 12)
    assert optimizer_of(model, cfg.train.optimizer, cfg.train.learning_rate) == ("SGD", 0.001)
    assert cfg.train.momentum == pytest.approx(0.9)
    assert cfg.finetune.epochs == 0  # the feature extractor stays frozen
    assert augmentation(cfg) == [("RandomFlip", {"mode": "horizontal"})]


def test_xception_guide():
    cfg, model, base = built("xception_guide")
    assert head_layers(model) == [
        ("GlobalAveragePooling2D",),
        ("Dropout", 0.2),
        ("Dense", 1, "sigmoid"),
    ]
    assert_phase_one_trains_only_the_head(model, base)
    assert (cfg.train.image_size, cfg.train.batch_size, cfg.train.epochs) == (150, 64, 20)
    assert optimizer_of(model, cfg.train.optimizer, cfg.train.learning_rate) == ("Adam", 1e-3)
    # phase 2: the whole base, BatchNormalization excepted (it stays in inference mode)
    every = {layer.name for layer in base.layers if layer.weights and not is_batch_norm(layer)}
    assert phase_two(cfg, model, base) == every
    assert {"block1_conv1", "block14_sepconv2"} <= every
    assert (cfg.finetune.epochs, cfg.finetune.augment) == (10, True)
    assert optimizer_of(model, cfg.finetune.optimizer, cfg.finetune.learning_rate) == (
        "Adam",
        1e-5,
    )
    assert augmentation(cfg) == [
        ("RandomFlip", {"mode": "horizontal"}),
        ("RandomRotation", {"factor": (-0.1, 0.1)}),
    ]


def test_mobilenet_v2_tutorial():
    cfg, model, base = built("mobilenet_v2_tutorial")
    assert head_layers(model) == [
        ("GlobalAveragePooling2D",),
        ("Dropout", 0.2),
        ("Dense", 1, "sigmoid"),
    ]
    assert_phase_one_trains_only_the_head(model, base)
    assert (cfg.train.image_size, cfg.train.batch_size, cfg.train.epochs) == (160, 32, 10)
    assert optimizer_of(model, cfg.train.optimizer, cfg.train.learning_rate) == ("RMSprop", 1e-4)
    # phase 2: from layer 100 on (the tutorial's fine_tune_at = 100), BatchNorm excepted
    from_100 = {
        layer.name for layer in base.layers[100:] if layer.weights and not is_batch_norm(layer)
    }
    assert phase_two(cfg, model, base) == from_100
    assert (cfg.finetune.epochs, cfg.finetune.augment) == (10, True)
    assert optimizer_of(model, cfg.finetune.optimizer, cfg.finetune.learning_rate) == (
        "RMSprop",
        1e-5,
    )
    assert augmentation(cfg) == [
        ("RandomFlip", {"mode": "horizontal"}),
        ("RandomRotation", {"factor": (-0.2, 0.2)}),
    ]


def test_the_default_recipe_keeps_todays_augmentation_and_head():
    cfg, model, base = built("default")
    assert head_layers(model) == [
        ("GlobalAveragePooling2D",),
        ("Dropout", 0.2),
        ("Dense", 1, "sigmoid"),
    ]
    assert augmentation(cfg) == [
        ("RandomFlip", {"mode": "horizontal"}),
        ("RandomRotation", {"factor": (-0.1, 0.1)}),
        ("RandomZoom", {"height_factor": 0.1, "width_factor": None}),
        ("RandomTranslation", {"height_factor": 0.1, "width_factor": 0.1}),
    ]


def rows_and_columns(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Two images: one constant along each row (varies down), one constant along each column."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    by_row = np.broadcast_to(ramp[:, None, None], (size, size, 3))
    return by_row[None].copy(), np.transpose(by_row, (1, 0, 2))[None].copy()


def run_layers(cfg, images: np.ndarray) -> np.ndarray:
    out = images
    for layer in augmentation_layers(cfg.augmentation, 3):
        out = layer(out, training=True)
    return np.asarray(out)


def test_width_and_height_shifts_move_the_image_independently():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    only = ["augmentation.flip=none", "augmentation.rotation=0", "augmentation.zoom=0"]
    by_row, by_column = rows_and_columns()
    sideways = parse_config(
        raw, [*only, "augmentation.width_shift=0.4", "augmentation.height_shift=0"]
    )
    # a horizontal shift leaves an image that only varies down the rows as it is
    np.testing.assert_allclose(run_layers(sideways, by_row), by_row, atol=1e-3)
    assert not np.allclose(run_layers(sideways, by_column), by_column, atol=1.0)
    down = parse_config(raw, [*only, "augmentation.width_shift=0", "augmentation.height_shift=0.4"])
    np.testing.assert_allclose(run_layers(down, by_column), by_column, atol=1e-3)
    assert not np.allclose(run_layers(down, by_row), by_row, atol=1.0)


def test_shear_slants_the_image_and_zero_adds_no_layer():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    only = [f"augmentation.{k}=0" for k in ("rotation", "zoom", "translation")]
    plain = parse_config(raw, [*only, "augmentation.flip=none"])
    assert augmentation_layers(plain.augmentation, 0) == []
    sheared = parse_config(raw, [*only, "augmentation.flip=none", "augmentation.shear=0.5"])
    by_row, by_column = rows_and_columns()
    # x moves by a multiple of y: rows slide sideways, so columns no longer stay constant
    np.testing.assert_allclose(run_layers(sheared, by_row), by_row, atol=1e-3)
    assert not np.allclose(run_layers(sheared, by_column), by_column, atol=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipe_names())
def test_every_preset_trains_finetunes_and_evaluates_at_tiny_settings(recipe, tmp_path, tracking):
    """Each preset through the real train -> finetune -> evaluate steps (random weights, a
    tiny size, one epoch per phase): what it trains is its own architecture, end to end."""
    import json

    import mlflow

    from tasks.artifacts import load_model
    from tasks.steps import evaluate, finetune, train
    from tests.datagen import tiny_params
    from tests.model.conftest import make_workspace

    own = resolved(recipe)
    params = tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"})
    params.pop("train"), params.pop("finetune")  # every training key is the recipe's
    phase_two_epochs = min(own.finetune.epochs, 1)
    cfg = parse_config(
        params,
        [
            f"recipe={recipe}",
            f"train.image_size={tiny_size(own)}",
            "train.weights=none",
            "train.epochs=1",
            "train.batch_size=8",
            f"finetune.epochs={phase_two_epochs}",
            "evaluate.gradcam_images=1",
            "evaluate.mistakes=1",
        ],
    )
    assert (cfg.train.backbone, cfg.train.optimizer) == (own.train.backbone, own.train.optimizer)
    paths = make_workspace(tmp_path, counts={"train": 4, "validation": 6})
    place_model_files(paths.root)
    train.run(cfg, paths)
    finetune.run(cfg, paths)
    evaluate.run(cfg, paths)

    metrics = json.loads(paths.metrics.read_text())
    assert metrics["split"] == "test"
    scored = pd.read_csv(paths.predictions)  # the held-out images as the model scored them
    assert metrics["images"] == len(scored) > 0
    assert metrics["accuracy"] == pytest.approx((scored["actual"] == scored["predicted"]).mean())
    candidate = json.loads(paths.candidate.read_text())
    if not phase_two_epochs:  # a head-only recipe passes its frozen model on
        assert candidate["path"].endswith("frozen.keras")
    model = load_model(paths.root / candidate["path"])
    assert head_layers(model) == head_layers(built(recipe)[1])  # the recipe's head, trained
    # ... and the head the train run recorded in MLflow is that one
    run_id = json.loads(paths.run_record("train").read_text())["run_id"]
    logged = mlflow.MlflowClient().get_run(run_id).data.params["head"]
    assert logged == " -> ".join(described(layer) for layer in head_layers(model))
    assert model.get_layer("backbone").name == "backbone"
    if recipe == "inception_mixed7":  # the cut survives training and saving
        names = {layer.name for layer in model.get_layer("backbone").layers}
        assert "mixed7" in names and "mixed8" not in names
