from __future__ import annotations

import pytest
import yaml

from tasks.config import BACKBONES, load_config, parse_config
from tasks.errors import ConfigError
from tests.conftest import REPO
from tests.datagen import tiny_params


@pytest.fixture
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_checked_in_params_are_valid_and_name_the_real_sources(raw):
    cfg = parse_config(raw)
    cats = cfg.dataset("cats_vs_dogs")
    assert cats.url == "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
    assert cats.size == 68_606_236
    assert cats.layout.root == "cats_and_dogs_filtered"
    assert cats.counts["train"] == {"cats": 1000, "dogs": 1000}
    assert cats.counts["validation"] == {"cats": 500, "dogs": 500}
    bees = cfg.dataset("ants_vs_bees")
    assert bees.url == "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    assert bees.split_folder("validation") == "val"
    assert sum(bees.counts["train"].values()) == 244
    assert sum(bees.counts["validation"].values()) == 153
    assert cfg.train.backbone in BACKBONES


def test_a_third_dataset_is_only_a_params_edit(raw):
    raw["datasets"]["flowers"] = {
        "url": "file:///srv/flowers.zip",
        "layout": {"root": "flowers"},
        "classes": ["daisy", "rose", "tulip"],
        "counts": {
            "train": {"daisy": 5, "rose": 5, "tulip": 5},
            "validation": {"daisy": 2, "rose": 2, "tulip": 2},
        },
    }
    cfg = parse_config(raw)
    assert cfg.dataset("flowers").name == "flowers"
    assert cfg.dataset("flowers").split_folder("train") == "train"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bakbone=vgg16", "train.bakbone: unknown key; allowed keys here: augment, backbone"),
        ("train.backbone=resnet", "train.backbone: 'resnet' is not allowed; use one of:"),
        ("train.epochs=many", "train.epochs: Input should be a valid integer"),
        ("datasets.cats_vs_dogs.url=ftp://host/x.zip", "unsupported scheme 'ftp'"),
        ("datasets.cats_vs_dogs.url=https://", "has no host"),
        ("datasets.cats_vs_dogs.sha256=abc", "datasets.cats_vs_dogs.sha256: must be 64 hex"),
        ("datasets.cats_vs_dogs.classes=[cats, cats]", "class names repeat"),
        ("train.weights=weights.bin", "train.weights: 'weights.bin' is not allowed"),
        ("validate.quarantine_budget=2", "validate.quarantine_budget:"),
        ("train.epochs", "write it as dotted.key=value"),
        ("train.epochs.max=3", "train.epochs is a value, not a section"),
        ("register.tolerance=0.01", "register: tolerance was replaced by a paired statistical"),
        ("register.metric=f1_macro", "register: method mcnemar compares accuracy, not f1_macro"),
        ("register.alpha=0.7", "register.alpha: Input should be less than 0.5"),
        ("register.approval=maybe", "register.approval: 'maybe' is not allowed"),
        ("evaluate.test_fraction=0", "evaluate.test_fraction: Input should be greater than 0"),
        ("datasets.cats_vs_dogs.counts.test={cats: 1, dogs: 1}", "counts.test needs layout.test"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(raw, override, message):
    with pytest.raises(ConfigError) as error:
        parse_config(raw, [override], source="params.yaml")
    text = str(error.value)
    assert message in text
    assert "\n" not in text


def test_unknown_dataset_lists_known_ones(raw):
    with pytest.raises(
        ConfigError, match="unknown dataset 'dogs'; known datasets: cats_vs_dogs, ants_vs_bees"
    ):
        parse_config(raw).dataset("dogs")


def test_overrides_apply_parse_yaml_and_are_recorded(raw):
    cfg = parse_config(raw, ["train.epochs=3", "datasets.ants_vs_bees.mirrors=[file:///m.zip]"])
    assert cfg.train.epochs == 3
    assert cfg.dataset("ants_vs_bees").mirrors == ["file:///m.zip"]
    assert cfg.overrides == ("train.epochs=3", "datasets.ants_vs_bees.mirrors=[file:///m.zip]")
    assert raw["train"]["epochs"] == 10, "overrides must not touch the caller's mapping"


def test_counts_must_name_exactly_the_classes(raw):
    raw["datasets"]["cats_vs_dogs"]["counts"]["train"] = {"cats": 1}
    with pytest.raises(ConfigError, match="counts.train names"):
        parse_config(raw)


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found; run from the project root"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_tiny_params_fixture_is_valid(write_params):
    path = write_params(tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}))
    cfg = load_config(path)
    assert cfg.dataset("cats_vs_dogs").counts["validation"] == {"cats": 3, "dogs": 3}


def test_the_test_split_sizes_of_the_real_datasets(raw):
    """What evaluate.test_fraction (0.2) holds out of each validation folder, per class."""
    cfg = parse_config(raw)
    assert cfg.evaluate.test_fraction == 0.2
    cats = cfg.dataset("cats_vs_dogs").expected_counts(0.2)
    assert cats["test"] == {"cats": 100, "dogs": 100}
    assert cats["validation"] == {"cats": 400, "dogs": 400}
    assert cats["train"] == {"cats": 1000, "dogs": 1000}
    bees = cfg.dataset("ants_vs_bees").expected_counts(0.2)
    assert bees["test"] == {"ants": 14, "bees": 17}  # round(70 * 0.2), round(83 * 0.2)
    assert bees["validation"] == {"ants": 56, "bees": 66}


def test_an_archive_test_folder_needs_its_counts(raw):
    cats = raw["datasets"]["cats_vs_dogs"]
    cats["layout"]["test"] = "test"
    with pytest.raises(ConfigError, match="counts.test is missing"):
        parse_config(raw)
    cats["counts"]["test"] = {"cats": 50, "dogs": 50}
    dataset = parse_config(raw).dataset("cats_vs_dogs")
    assert not dataset.test_carved and dataset.split_folder("test") == "test"
    assert dataset.expected_counts(0.2)["test"] == {"cats": 50, "dogs": 50}
    assert dataset.expected_counts(0.2)["validation"] == {"cats": 500, "dogs": 500}


@pytest.mark.parametrize(
    ("available", "share", "held"),
    [(0, 0.2, 0), (1, 0.2, 0), (2, 0.2, 1), (3, 0.2, 1), (5, 0.5, 3), (2, 0.9, 1), (83, 0.2, 17)],
)
def test_carve_count_keeps_a_class_in_both_splits(available, share, held):
    from tasks.config import carve_count

    assert carve_count(available, share) == held
