"""The input pipeline: manifest rows in, batched (images, labels) out, on real files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.artifacts import read_manifest
from tasks.config import AugmentationConfig
from tasks.errors import StageError
from tasks.ml.inputs import make_dataset
from tasks.paths import DatasetPaths
from tests.datagen import make_image
from tests.model.conftest import make_workspace, manifest_rows, write_manifest

CLASSES = ["cats", "dogs"]


def batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def dataset(paths, split="train", size=32, batch=4, augment=None, shuffle=False, seed=1):
    return make_dataset(
        read_manifest(paths),
        paths.raw,
        split,
        CLASSES,
        size,
        batch,
        augment=augment,
        shuffle=shuffle,
        seed=seed,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("data"), {"train": 5, "validation": 3})


def test_batches_are_float_rgb_with_class_indices(workspace):
    manifest = read_manifest(workspace)
    got = batches(dataset(workspace, size=40, batch=4))
    images = np.concatenate([x for x, _ in got])
    labels = np.concatenate([y for _, y in got])
    assert [x.shape[0] for x, _ in got] == [4, 4, 2]
    assert images.shape == (10, 40, 40, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255 and images.max() > 100
    rows = manifest[manifest["split"] == "train"]
    expected = [CLASSES.index(label) for label in rows["label"]]
    assert labels.tolist() == expected
    # pixels as Pillow reads them (no resize needed at the generated size)
    first = np.asarray(Image.open(workspace.raw / rows["path"].iloc[0]).convert("RGB"))
    np.testing.assert_allclose(batches(dataset(workspace, size=48))[0][0][0], first, atol=1)


def test_only_ok_rows_of_the_split(tmp_path):
    paths = make_workspace(tmp_path, {"train": 3, "validation": 3})  # 2 + 2 left after test
    manifest = pd.read_parquet(paths.manifest)
    manifest.loc[manifest.index[manifest["split"] == "validation"][:3], "status"] = "quarantined"
    write_manifest(paths, manifest)
    labels = np.concatenate([y for _, y in batches(dataset(paths, "validation", batch=8))])
    assert len(labels) == 1


@pytest.mark.parametrize(
    "mode, fmt, suffix",
    [
        ("L", "JPEG", ".jpg"),
        ("RGBA", "PNG", ".png"),
        ("P", "PNG", ".png"),
        ("CMYK", "JPEG", ".jpg"),
        ("RGB", "PNG", ".jpg"),  # a PNG named .jpg
        ("I;16", "PNG", ".png"),
        ("RGB", "TIFF", ".tif"),
        ("RGB", "WEBP", ".webp"),
    ],
)
def test_any_accepted_format_decodes_to_rgb_like_pillow(tmp_path, mode, fmt, suffix):
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    folder = paths.raw / "cats_and_dogs_filtered" / "train" / "dogs"
    folder.mkdir(parents=True)
    image = make_image(1, 40, seed=5)
    image = image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)
    file = folder / f"odd{suffix}"
    image.save(file, fmt)
    rows = manifest_rows(paths.raw, paths.raw / "cats_and_dogs_filtered", "cats_vs_dogs")
    write_manifest(paths, rows)
    ((x, y),) = batches(dataset(paths, size=40))
    expected = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32)
    assert x.shape == (1, 40, 40, 3) and y.tolist() == [1]
    np.testing.assert_allclose(x[0], expected, atol=3)


@pytest.mark.slow
def test_augmentation_changes_every_training_image_and_is_seeded(workspace):
    aug = AugmentationConfig()

    def images(ds):
        return np.concatenate([x for x, _ in batches(ds)])

    plain = images(dataset(workspace, batch=3))
    ds = dataset(workspace, batch=3, augment=aug, seed=7)
    epoch1, epoch2 = images(ds), images(ds)
    again = images(dataset(workspace, batch=3, augment=aug, seed=7))
    other = images(dataset(workspace, batch=3, augment=aug, seed=8))
    assert np.abs(epoch1 - plain).reshape(10, -1).max(axis=1).min() > 10
    np.testing.assert_array_equal(epoch1, again)  # all 4 batches
    assert not np.array_equal(epoch1, epoch2)
    assert not np.array_equal(epoch1, other)
    assert epoch1.min() >= 0 and epoch1.max() <= 255


def test_shuffle_is_seeded_and_fresh_each_epoch(workspace):
    def order(ds):
        return [int(v) for _, y in batches(ds) for v in y]

    ds = dataset(workspace, batch=10, shuffle=True, seed=3)
    first, second = order(ds), order(ds)
    unshuffled = order(dataset(workspace, batch=10))
    assert first == order(dataset(workspace, batch=10, shuffle=True, seed=3))
    assert sorted(first) == sorted(unshuffled)
    images = [batches(ds)[0][0] for _ in range(2)]
    assert first != second or not np.array_equal(images[0], images[1])
    assert first != unshuffled


def test_no_augmentation_means_the_same_pixels_every_epoch(workspace):
    ds = dataset(workspace, "validation", batch=6)
    first, second = batches(ds), batches(ds)
    np.testing.assert_array_equal(first[0][0], second[0][0])


def test_labels_outside_the_classes_are_refused(tmp_path):
    paths = make_workspace(tmp_path, {"train": 2, "validation": 1})
    manifest = pd.read_parquet(paths.manifest)
    manifest.loc[0, "label"] = "horses"
    write_manifest(paths, manifest)
    with pytest.raises(StageError, match=r"labels \['horses'\] are not in the dataset's classes"):
        dataset(paths)


def test_a_split_without_ok_images_is_refused(tmp_path):
    paths = make_workspace(tmp_path, {"train": 2, "validation": 1})
    manifest = pd.read_parquet(paths.manifest)
    manifest.loc[manifest["split"] == "validation", "status"] = "quarantined"
    write_manifest(paths, manifest)
    with pytest.raises(StageError, match="no usable 'validation' images"):
        dataset(paths, "validation")


def test_missing_files_say_rerun_download_and_validate(tmp_path):
    paths = make_workspace(tmp_path, {"train": 2, "validation": 1})
    first = pd.read_parquet(paths.manifest)["path"].iloc[0]
    (paths.raw / first).unlink()
    with pytest.raises(StageError, match="missing under .*rerun download and validate"):
        dataset(paths)


def test_missing_or_bad_manifest_says_run_validate(tmp_path):
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    with pytest.raises(StageError, match="run `python -m tasks validate cats_vs_dogs` first"):
        read_manifest(paths)
    write_manifest(paths, [{"path": "a.jpg", "split": "train"}])
    with pytest.raises(StageError, match=r"lacks columns \['label', 'status'\]"):
        read_manifest(paths)


def test_training_and_early_stopping_never_read_the_test_split(tmp_path):
    """A phase's datasets hold exactly the train and validation rows: test is held out."""
    from tasks.phase import Phase
    from tests.model.conftest import model_config

    paths = make_workspace(tmp_path, {"train": 3, "validation": 10})
    phase = Phase.start("train", model_config("train.batch_size=4"), paths)
    held_out = phase.manifest[phase.manifest["split"] == "test"]
    assert len(held_out) == 4  # 2 of each class's 10 validation images
    # give the test images a third label: any test row read into a phase would be refused
    phase.manifest.loc[held_out.index, "label"] = "held_out"
    train_ds, val_ds = phase.datasets(32)
    assert sum(len(y) for _, y in batches(train_ds)) == 6
    assert sum(len(y) for _, y in batches(val_ds)) == 16
