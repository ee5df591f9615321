"""Per backbone (random weights, smallest allowed input): what each phase trains, BatchNorm
left alone by fine-tuning, and a saved model that reloads to identical predictions.

Everything runs eagerly (``run_eagerly=True``, direct calls), so no test pays for
tracing a graph of a large network.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tasks.artifacts import load_model, save_model
from tasks.ml.backbones import BACKBONES, is_batch_norm, unfreeze_top_blocks
from tasks.ml.model import ModelSpec, build_model

SIZES = {
    "mobilenet_v2": 32,
    "inception_v3": 75,
    "vgg16": 32,
    "xception": 71,
    "resnet50": 32,
    "efficientnet_b0": 32,
}


def top_block(backbone: str, names: list[str]) -> set[str]:
    """The layers fine-tuning should unfreeze, written out independently of the registry."""
    if backbone == "mobilenet_v2":  # the TensorFlow tutorial's fine_tune_at = 100
        return set(names[100:])
    if backbone == "inception_v3":  # the mixed7 block: after mixed6, up to the cut
        return set(names[names.index("mixed6") + 1 :])
    prefixes = {
        "vgg16": ("block5_",),
        "xception": ("block14_",),
        "resnet50": ("conv5_",),
        "efficientnet_b0": ("block7", "top_"),
    }[backbone]
    return {name for name in names if name.startswith(prefixes)}


def paths_of(weights) -> set[str]:
    return {w.path for w in weights}


def raw_images(size: int, count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_phases_train_the_right_weights_and_the_model_round_trips(name, tmp_path):
    import keras

    entry = BACKBONES[name]
    size = SIZES[name]
    assert size == entry.min_size or name in ("mobilenet_v2", "vgg16", "resnet50")
    keras.utils.set_random_seed(0)
    model = build_model(ModelSpec(name, size, entry.head, 2))
    head = model.get_layer("head")

    # phase 1: exactly the head's weights train
    assert paths_of(model.trainable_weights) == paths_of(head.trainable_weights)
    assert len(head.trainable_weights) > 0
    assert model.output_shape == (None, 1)

    # the saved model reloads and predicts the same on raw 0-255 images
    images = raw_images(size)
    before = np.asarray(model(images, training=False))
    target = save_model(model, tmp_path / "frozen.keras")
    loaded = load_model(target)
    np.testing.assert_array_equal(np.asarray(loaded(images, training=False)), before)
    assert [layer.name for layer in loaded.layers] == ["image", "preprocess", "backbone", "head"]

    # phase 2: the head plus the named top blocks, BatchNorm excepted
    base = loaded.get_layer("backbone")
    names = [layer.name for layer in base.layers]
    unfrozen = unfreeze_top_blocks(base, entry.unfreeze_from)
    expected = {
        layer.name
        for layer in base.layers
        if layer.name in top_block(name, names) and layer.weights and not is_batch_norm(layer)
    }
    assert set(unfrozen) == expected and expected
    want = paths_of(loaded.get_layer("head").trainable_weights)
    for layer in base.layers:
        if layer.name in expected:
            want |= paths_of(layer.trainable_weights)
    assert paths_of(loaded.trainable_weights) == want

    # one fine-tuning step: unfrozen kernels move, BatchNorm statistics and frozen layers do not
    batch_norm = [layer for layer in base.layers if is_batch_norm(layer)]
    stats = [np.array(w) for layer in batch_norm for w in layer.non_trainable_weights]
    frozen = [np.array(w) for w in loaded.non_trainable_weights if "moving" not in w.path]
    tuned = [np.array(w) for w in loaded.trainable_weights]
    # Adam with a tiny epsilon moves every weight that gets any gradient by about the
    # learning rate, however small the gradient through random (collapsed) features is
    loaded.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-30),
        loss="binary_crossentropy",
        run_eagerly=True,
    )
    loaded.train_on_batch(images, np.array([0, 1, 1]))
    after_stats = [np.array(w) for layer in batch_norm for w in layer.non_trainable_weights]
    for a, b in zip(stats, after_stats, strict=True):
        np.testing.assert_array_equal(a, b)
    after_frozen = [np.array(w) for w in loaded.non_trainable_weights if "moving" not in w.path]
    for a, b in zip(frozen, after_frozen, strict=True):
        np.testing.assert_array_equal(a, b)
    moved = [
        not np.array_equal(a, np.array(w))
        for a, w in zip(tuned, loaded.trainable_weights, strict=True)
    ]
    assert all(moved)


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch"])
def test_preprocessing_is_keras_applications_preprocess_input(mode):
    from keras.applications import imagenet_utils

    from tasks.ml.model import preprocess_layer

    images = raw_images(8, count=4, seed=7)
    want = imagenet_utils.preprocess_input(images.copy(), mode=mode)
    got = np.asarray(preprocess_layer(mode)(images))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert not preprocess_layer(mode).trainable_weights


FRESH_PYTHON = """
import sys
sys.modules["tasks"] = None  # the project is not importable here, as on a serving host
import numpy as np, keras
folder = sys.argv[1]
model = keras.saving.load_model(folder + "/m.keras")
got = np.asarray(model(np.load(folder + "/x.npy"), training=False))
np.testing.assert_allclose(got, np.load(folder + "/y.npy"), rtol=1e-6, atol=1e-7)
print(model.get_layer("head").layers[-1].activation.__name__, got.shape)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), [("vgg16", 32), ("mobilenet_v2", 32)])
def test_a_saved_model_loads_without_the_project(name, size, tmp_path):
    """caffe (channel flip, ImageNet mean) and tf ([-1, 1]) preprocessing, no project code."""
    import keras

    keras.utils.set_random_seed(1)
    model = build_model(ModelSpec(name, size, BACKBONES[name].head, 3))
    assert loaded_without_the_project(model, size, tmp_path) == ["softmax", "(2,", "3)"]


def loaded_without_the_project(model, size: int, folder) -> list[str]:
    """Save ``model``, load it in a fresh interpreter that cannot import this project and
    check it gives the same probabilities on two images; (output activation, shape)."""
    images = raw_images(size, count=2, seed=4)
    np.save(folder / "x.npy", images)
    np.save(folder / "y.npy", np.asarray(model(images, training=False)))
    save_model(model, folder / "m.keras")
    done = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PYTHON, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-3:]
