"""The backbone registry and weights resolution: no training, no network."""

from __future__ import annotations

import hashlib

import pytest

from tasks.config import BACKBONES as CONFIG_BACKBONES
from tasks.config import HeadConfig
from tasks.dev.offline_weights import source_task
from tasks.errors import ConfigError, StageError
from tasks.ml.backbones import (
    BACKBONES,
    HeadSpec,
    boundary_index,
    fetch_command,
    fetch_weights,
    get_backbone,
    keras_cache_dir,
    resolve_weights,
)


def test_one_entry_per_configurable_backbone_with_the_issue_defaults():
    assert tuple(BACKBONES) == CONFIG_BACKBONES
    sizes = {name: entry.image_size for name, entry in BACKBONES.items()}
    assert sizes == {
        "mobilenet_v2": 160,
        "inception_v3": 150,
        "vgg16": 224,
        "xception": 150,
        "resnet50": 224,
        "efficientnet_b0": 224,
    }
    assert BACKBONES["inception_v3"].cut_at == "mixed7"
    assert BACKBONES["inception_v3"].head == HeadSpec("flatten", 1024, 0.2)
    assert BACKBONES["vgg16"].head == HeadSpec("flatten", 512, 0.5)
    assert BACKBONES["mobilenet_v2"].head == HeadSpec("avg", 0, 0.2)
    assert BACKBONES["xception"].head == HeadSpec("avg", 0, 0.2)
    assert BACKBONES["mobilenet_v2"].unfreeze_from == "block_11_expand_relu"
    assert BACKBONES["vgg16"].unfreeze_from.startswith("block5_")
    assert BACKBONES["xception"].unfreeze_from.startswith("block14_")
    assert BACKBONES["resnet50"].unfreeze_from.startswith("conv5_")
    assert BACKBONES["efficientnet_b0"].unfreeze_from.startswith("block7")
    modes = {name: entry.preprocess for name, entry in BACKBONES.items()}
    assert modes["vgg16"] == modes["resnet50"] == "caffe"
    assert modes["efficientnet_b0"] == "none"
    assert modes["mobilenet_v2"] == modes["inception_v3"] == modes["xception"] == "tf"


def test_head_overrides_replace_only_the_keys_given():
    entry = BACKBONES["inception_v3"]
    assert entry.head_spec(HeadConfig()) == entry.head
    assert entry.head_spec(HeadConfig(dropout=0.4)) == HeadSpec("flatten", 1024, 0.4)
    assert entry.head_spec(HeadConfig(pooling="avg", dense_units=0)) == HeadSpec("avg", 0, 0.2)
    assert str(HeadSpec("avg", 0, 0.2)) == "GlobalAveragePooling2D -> Dropout(0.2) -> Dense"


def test_image_size_defaults_to_the_backbone_and_refuses_too_small():
    assert BACKBONES["vgg16"].resolve_size(None) == 224
    assert BACKBONES["vgg16"].resolve_size(64) == 64
    with pytest.raises(ConfigError, match="64 px is too small for inception_v3; use at least 75"):
        BACKBONES["inception_v3"].resolve_size(64)
    with pytest.raises(ConfigError, match="use one of: mobilenet_v2"):
        get_backbone("resnet")


def test_official_weights_file_names():
    assert BACKBONES["mobilenet_v2"].weights_file(160) == (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5"
    )
    assert BACKBONES["mobilenet_v2"].weights_file(32).endswith("_1.0_224_no_top.h5")
    assert BACKBONES["inception_v3"].weights_file(150) == (
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    assert BACKBONES["resnet50"].weights_file(224) == (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    assert BACKBONES["efficientnet_b0"].weights_file(224) == "efficientnetb0_notop.h5"
    assert fetch_command("mobilenet_v2", 160) == "python -m tasks fetch-weights mobilenet_v2"
    assert fetch_command("mobilenet_v2", 224) == "python -m tasks fetch-weights mobilenet_v2:224"
    assert fetch_command("vgg16", 64) == "python -m tasks fetch-weights vgg16"


def test_keras_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert keras_cache_dir() == tmp_path / "kh" / "models"
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keras_cache_dir() == tmp_path / ".keras" / "models"


def test_imagenet_missing_from_the_cache_names_file_folder_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(StageError) as error:
        resolve_weights("imagenet", "mobilenet_v2", 160)
    message = str(error.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5" in message
    assert f"in {tmp_path / 'models'}" in message
    assert "`python -m tasks fetch-weights mobilenet_v2`" in message
    assert "copy the file there" in message


def test_imagenet_in_the_cache_is_used_with_its_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    file = tmp_path / "models" / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    file.parent.mkdir()
    file.write_bytes(b"weights")
    source = resolve_weights("imagenet", "xception", 150)
    assert source.kind == "imagenet" and source.path == file
    assert source.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert "imagenet" in source.description


def test_local_files_resolve_under_the_workspace_then_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "ws" / "w").mkdir(parents=True)
    local = tmp_path / "ws" / "w" / "b.weights.h5"
    local.write_bytes(b"abc")
    source = resolve_weights("w/b.weights.h5", "vgg16", 32, root=tmp_path / "ws")
    assert source.kind == "file" and source.path == local.resolve()
    assert source.sha256 == hashlib.sha256(b"abc").hexdigest()
    monkeypatch.chdir(tmp_path / "ws")
    assert resolve_weights("w/b.weights.h5", "vgg16", 32, root=tmp_path).path == local.resolve()
    with pytest.raises(StageError, match=r"train.weights: file nope\.weights\.h5 not found"):
        resolve_weights("nope.weights.h5", "vgg16", 32, root=tmp_path)
    none = resolve_weights("none", "vgg16", 32)
    assert none.kind == "none" and none.path is None and none.sha256 == "none"


def test_unknown_fine_tune_boundary_lists_nearby_layer_names():
    import keras

    from tasks.ml.backbones import build_backbone

    base = build_backbone("vgg16", 32)
    assert isinstance(base, keras.Model) and base.name == "backbone"
    assert boundary_index(base, "block5_conv1") == 15
    assert boundary_index(base, "all") == 0
    with pytest.raises(StageError) as error:
        boundary_index(base, "block5_conv9")
    message = str(error.value)
    assert "no layer 'block5_conv9'" in message
    assert "block5_conv1" in message and "'all'" in message
    assert "\n" not in message


def test_fetch_weights_refuses_a_bad_size_spec():
    with pytest.raises(ConfigError, match="BACKBONE:SIZE"):
        fetch_weights("mobilenet_v2:big")
    with pytest.raises(ConfigError, match="too small"):
        fetch_weights("xception:32")


def test_source_task_is_balanced_and_seeded():
    images, labels = source_task(40, 24, seed=3)
    again, _ = source_task(40, 24, seed=3)
    assert images.shape == (40, 24, 24, 3) and images.min() >= 0 and images.max() <= 255
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
    assert all((labels == k).sum() == 10 for k in range(4))
    assert (images == again).all()
