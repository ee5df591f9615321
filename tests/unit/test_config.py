from __future__ import annotations

import pytest
import yaml

from tasks.config import (
    BACKBONES,
    RECIPES,
    AugmentationConfig,
    Config,
    load_config,
    parse_config,
    recipe_names,
    recipe_reference,
)
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
    assert "epochs" not in raw["train"], "overrides must not touch the caller's mapping"


def test_a_stage_records_a_scheduled_runs_overrides_without_applying_them(
    raw, tmp_path, monkeypatch
):
    """The workspace's params.yaml already holds the run's values: $TASKS_RUN_OVERRIDES
    names them for the record; $TASKS_SET and --set still apply, in that order."""
    from tasks.config import load_stage_config

    raw["train"]["epochs"] = 7  # as prepare wrote it for {"epochs": 7}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("TASKS_RUN_OVERRIDES", '["train.epochs=7"]')
    monkeypatch.setenv("TASKS_SET", '["train.batch_size=4"]')
    cfg = load_stage_config(params, ["train.learning_rate=0.01"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == (7, 4, 0.01)
    assert cfg.overrides == ("train.epochs=7", "train.batch_size=4", "train.learning_rate=0.01")
    monkeypatch.setenv("TASKS_RUN_OVERRIDES", '"train.epochs=7"')
    with pytest.raises(ConfigError, match=r"^\$TASKS_RUN_OVERRIDES: must be a JSON list"):
        load_stage_config(params)


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


# --- recipes: presets layered under the file's own keys -----------------------------

PRESETS = [
    "inception_mixed7",
    "vgg16_block5",
    "hymenoptera_vgg16",
    "hymenoptera_alexnet",
    "xception_guide",
    "mobilenet_v2_tutorial",
]


def recipe_file(name: str) -> dict:
    """The preset's parameter values (its ``reference:`` is what the walkthrough reported)."""
    values = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    values.pop("reference")
    return values


@pytest.mark.parametrize("name", PRESETS)
def test_a_recipe_names_what_its_walkthrough_reported_and_parses_without_it(raw, name):
    reference = recipe_reference(name)
    assert set(reference) == {"dataset", "reported"}
    if name == "default":
        assert reference == {"dataset": None, "reported": None}
    else:
        assert reference["dataset"] in raw["datasets"]
    assert not hasattr(parse_config(raw, [f"recipe={name}"]), "reference")


def key_paths(mapping: dict, prefix: str = "") -> set[str]:
    """Every leaf key of ``mapping`` as a dotted path (``train.head.dropout``)."""
    paths = set()
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            paths |= key_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def test_the_known_recipes_are_the_shipped_files():
    assert recipe_names() == sorted(["default", *PRESETS])


def test_the_checked_in_params_pin_no_key_a_recipe_sets(raw):
    """A key written in params.yaml wins over the recipe's, so writing one there would make
    every recipe silently keep the default's value for it."""
    assert raw["recipe"] == "default"
    settable = key_paths(recipe_file("default"))
    assert not settable & key_paths(raw)
    for name in PRESETS:
        assert key_paths(recipe_file(name)) <= settable, f"{name} sets a key default.yaml lacks"


def test_the_default_recipe_restates_the_field_defaults_and_the_old_params(raw):
    cfg = parse_config(raw)
    defaults = Config(datasets=cfg.datasets)
    assert cfg.recipe == "default"
    assert cfg.model_dump(exclude={"datasets"}) == defaults.model_dump(exclude={"datasets"})
    # the values params.yaml wrote before recipes existed
    assert (cfg.train.backbone, cfg.train.batch_size, cfg.train.epochs) == ("mobilenet_v2", 32, 10)
    assert (cfg.train.optimizer, cfg.train.learning_rate, cfg.train.augment) == (
        "rmsprop",
        1e-4,
        False,
    )
    assert (cfg.finetune.epochs, cfg.finetune.learning_rate, cfg.finetune.augment) == (
        10,
        1e-5,
        False,
    )
    assert cfg.augmentation.shifts == (0.1, 0.1) and cfg.augmentation.shear == 0.0


@pytest.mark.parametrize("name", PRESETS)
def test_a_recipe_resolves_to_its_files_values(raw, name):
    cfg = parse_config(raw, [f"recipe={name}"])
    assert cfg.recipe == name
    for path in key_paths(recipe_file(name)):
        node: object = cfg
        for part in path.split("."):
            node = getattr(node, part)
        expected = recipe_file(name)
        for part in path.split("."):
            expected = expected[part]
        assert node == expected, path


def test_params_keys_win_over_the_recipe_and_set_wins_over_both(raw):
    raw["recipe"] = "xception_guide"
    raw["train"]["batch_size"] = 8
    raw["train"]["head"] = {"dropout": 0.3}
    cfg = parse_config(raw)
    # the recipe's values where params.yaml writes nothing (not the fields' defaults)
    assert (cfg.train.backbone, cfg.train.epochs, cfg.train.optimizer) == ("xception", 20, "adam")
    assert cfg.finetune.unfreeze_from == "all" and cfg.augmentation.rotation == 0.1
    # the keys params.yaml writes, a nested one merged into the recipe's section
    assert cfg.train.batch_size == 8
    assert (cfg.train.head.pooling, cfg.train.head.dense_units, cfg.train.head.dropout) == (
        "avg",
        0,
        0.3,
    )
    # --set wins over both, and can pick the recipe
    cfg = parse_config(raw, ["train.batch_size=16", "recipe=vgg16_block5"])
    assert (cfg.recipe, cfg.train.backbone, cfg.train.batch_size) == ("vgg16_block5", "vgg16", 16)
    assert cfg.train.head.dropout == 0.3 and cfg.train.head.dense_units == 512


def test_a_key_written_with_the_fields_default_value_still_wins(raw):
    raw["recipe"] = "inception_mixed7"
    raw["train"]["batch_size"] = 32  # TrainConfig's default, written on purpose
    raw["finetune"]["epochs"] = 10
    cfg = parse_config(raw)
    assert cfg.train.batch_size == 32 and cfg.finetune.epochs == 10
    assert cfg.train.epochs == 20  # not written: the recipe's


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("xception", "recipe: 'xception' is not a known recipe (did you mean xception_guide?)"),
        ("mobilenet_v2", "(did you mean mobilenet_v2_tutorial?)"),
        ("resnet", "recipe: 'resnet' is not a known recipe; use one of: default, "),
        ("null", "recipe: None is not a known recipe"),
    ],
)
def test_an_unknown_recipe_is_one_line_naming_the_known_ones(raw, value, message):
    with pytest.raises(ConfigError) as error:
        parse_config(raw, [f"recipe={value}"], source="params.yaml")
    text = str(error.value)
    assert text.startswith("params.yaml: ") and message in text
    assert ", ".join(sorted(["default", *PRESETS])) in text
    assert "\n" not in text


def test_a_scheduled_runs_params_file_keeps_the_resolved_values(raw):
    """The workspace's params.yaml (run_params) writes every resolved value and the recipe;
    reading it back re-applies the recipe under those explicit keys: the same run."""
    from tasks.orchestration.runconf import params_mapping
    from tasks.orchestration.workspace import run_params

    raw["train"]["batch_size"] = 8
    cfg = parse_config(raw, ["recipe=vgg16_block5", "train.epochs=3"])
    written = run_params(cfg, "cats_vs_dogs")
    assert written["recipe"] == "vgg16_block5"
    assert written["train"]["backbone"] == "vgg16" and written["train"]["epochs"] == 3
    assert written["train"]["batch_size"] == 8 and written["augmentation"]["shear"] == 0.2
    reread = parse_config(yaml.safe_load(yaml.safe_dump(written)))
    assert params_mapping(reread) == written
    # the recipe key cannot re-apply differently: every key it sets is written explicitly
    other = parse_config({**written, "recipe": "mobilenet_v2_tutorial"})
    assert params_mapping(other) == {**written, "recipe": "mobilenet_v2_tutorial"}


def test_width_and_height_shift_default_to_translation():
    assert AugmentationConfig().shifts == (0.1, 0.1)
    assert AugmentationConfig(translation=0.2, width_shift=0.05).shifts == (0.2, 0.05)
    assert AugmentationConfig(height_shift=0.0).shifts == (0.0, 0.1)


def test_a_bad_augmentation_value_names_the_key(raw):
    with pytest.raises(ConfigError, match="augmentation.shear: Input should be less than or eq"):
        parse_config(raw, ["augmentation.shear=2"])
    with pytest.raises(ConfigError, match="augmentation.width_shift: Input should be less than 1"):
        parse_config(raw, ["augmentation.width_shift=1.5"])
