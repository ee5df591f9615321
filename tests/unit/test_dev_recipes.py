"""``make recipes`` (tasks/dev/recipes.py): its params leave every recipe key to the recipe,
and its sweep conf plans one lane per preset, each resolving to that preset's backbone."""

from __future__ import annotations

import yaml

from tasks.config import parse_config, recipe_names, recipe_values
from tasks.dev.recipes import TINY, main, recipes_conf, recipes_params
from tasks.orchestration.project import Project
from tasks.orchestration.runconf import resolve_run_config
from tasks.orchestration.sweep import plan_sweep
from tests.conftest import REPO
from tests.datagen import make_archive


def test_every_preset_is_a_lane_with_its_own_backbone_and_the_tiny_overrides(tmp_path):
    archive = make_archive(tmp_path / "a.zip", "cats_vs_dogs", {"train": 2, "validation": 1}, 40)
    params = recipes_params("cats_vs_dogs", archive, "http://127.0.0.1:1/a.zip", TINY["counts"])
    assert "train" not in params and "finetune" not in params  # nothing beats a recipe's key
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    project = Project.from_env(tmp_path, environ={})
    recipes = recipe_names()
    conf = recipes_conf("cats_vs_dogs", recipes, TINY["set"], "none", tmp_path / "w")
    alexnet = (
        tmp_path / "w" / "alexnet_75.keras"
    )  # the model-file recipe's, made at the lane's size
    assert conf["per_recipe"] == {
        name: {"train.weights": "none"}
        | ({"train.backbone": str(alexnet)} if name == "hymenoptera_alexnet" else {})
        for name in recipes
    }
    assert alexnet.is_file()
    combos = plan_sweep(project, conf, "r1")
    assert [c.recipe for c in combos] == recipes
    for combo in combos:
        cfg = resolve_run_config(project, "cats_vs_dogs", combo.conf)
        own = recipe_values(combo.recipe)["train"]
        backbone = own["backbone"] if combo.recipe != "hymenoptera_alexnet" else str(alexnet)
        assert (cfg.recipe, cfg.train.backbone) == (combo.recipe, backbone)
        assert cfg.train.optimizer == own["optimizer"]  # the recipe's, not a params file's
        assert (cfg.train.image_size, cfg.train.epochs, cfg.finetune.epochs) == (75, 2, 1)
    parse_config(params)  # the params file itself is valid


def test_an_unknown_recipe_is_a_one_line_error(capsys):
    assert main(["--recipes", "xception_guide,alexnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --recipes: unknown ['alexnet']") and "\n" not in err
