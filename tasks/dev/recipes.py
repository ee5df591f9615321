"""``make recipes``: every preset (tasks/recipes) through train → finetune → evaluate on one
dataset, compared in one table and one MLflow run.

It runs the sweep DAG (``airflow dags test transfer_learning__sweep``) with
``{"recipes": [...], "datasets": [<dataset>]}`` in its own state folder
(``.recipes/``: Airflow home, MLflow store, workspaces, DVC remote): each preset is a
lane with its own workspace, DVC experiment and MLflow parent run, and the
``compare`` task writes ``reports/sweep/<id>/comparison.md`` (recipe, backbone, size,
seconds and images/s per phase, validation and test accuracy, and what each
recipe's walkthrough reported beside ours) and logs it on a run of the ``sweeps``
experiment. The best lane goes through the registry gate.

The data is generated in the real layout and served from 127.0.0.1: by default as
many images as cats_and_dogs_filtered (1000 + 500 per class, 160 px), which takes
the presets' own sizes and epochs (a GPU machine); ``--tiny`` shrinks everything
(24 + 12 images per class, 75 px models, 2 + 1 epochs) to run in minutes on a
laptop. ``--weights imagenet`` loads the real ImageNet weights (needs the
internet); the default makes each backbone's weights offline.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.config import parse_config, recipe_names, recipe_values
from tasks.dev.airflow_local import LocalAirflow, run_sweep, sweep_results
from tasks.dev.alexnet import write_alexnet
from tasks.dev.demo import offline_weights, serve_folder
from tasks.dev.synthetic import LAYOUTS, make_archive, tiny_params
from tasks.errors import ConfigError, StageError
from tasks.orchestration.project import Project

FULL = {"counts": {"train": 1000, "validation": 500}, "side": 160, "set": {}}
TINY = {
    "counts": {"train": 24, "validation": 12},
    "side": 48,
    # 75 px: the smallest InceptionV3 and Xception build at; every other key is the recipe's
    "set": {
        "train.image_size": 75,
        "train.epochs": 2,
        "train.batch_size": 8,
        "finetune.epochs": 1,
        "evaluate.gradcam_images": 1,
        "evaluate.mistakes": 2,
    },
}


def recipes_params(dataset: str, archive: Path, url: str, counts: dict[str, int]) -> dict:
    """A params file with the served dataset and nothing that overrides a recipe's keys."""
    params = tiny_params({dataset: url}, counts)
    params["datasets"][dataset]["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
    params["datasets"][dataset]["size"] = archive.stat().st_size
    params.pop("train", None)  # the recipes' own backbone, size, head, optimizers, epochs
    params.pop("finetune", None)
    params["register"] = {"floor": 0.0, "promote_if": "not_worse"}
    return params


def recipes_conf(
    dataset: str, recipes: list[str], sets: dict[str, Any], weights: str, folder: Path
) -> dict[str, Any]:
    """The sweep DAG's conf: one lane per recipe, each on its backbone's weights.

    A recipe whose backbone is a model file (``hymenoptera_alexnet``) gets an AlexNet
    file written here at the lane's size (pretrained offline unless ``weights`` is
    none), and uses the weights in it.
    """
    side = sets.get("train.image_size")
    per_recipe: dict[str, dict[str, str]] = {}
    for name in recipes:
        train = recipe_values(name)["train"]
        backbone, size = train["backbone"], side or train.get("image_size") or 224
        if backbone.endswith(".keras"):
            file = model_file(folder, backbone, size, pretrain=weights == "offline")
            own = "none" if weights == "none" else "imagenet"
            per_recipe[name] = {"train.backbone": str(file), "train.weights": own}
            continue
        chosen = weights if weights != "offline" else offline_weights(folder, backbone, size)
        per_recipe[name] = {"train.weights": chosen}
    return {"recipes": recipes, "datasets": [dataset], "set": sets, "per_recipe": per_recipe}


def model_file(folder: Path, backbone: str, size: int, pretrain: bool) -> Path:
    """The AlexNet file a model-file recipe runs on here, made once per size."""
    stem = Path(backbone).stem
    if stem != "alexnet":
        raise ConfigError(
            f"recipes: {backbone}: only an AlexNet file can be made here; put the file "
            "there and run the recipe with `python -m tasks` instead"
        )
    path = folder / f"{stem}_{size}{'_pretrained' if pretrain else ''}.keras"
    if not path.exists():
        write_alexnet(path, image_size=size, pretrain=pretrain)
    return path


def run_recipes(
    root: Path, state: Path, dataset: str, recipes: list[str], tiny: bool, weights: str
) -> int:
    size = TINY if tiny else FULL
    state.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts = size["counts"]
    archive = state / "archives" / f"{dataset}-{counts['train']}x{counts['validation']}.zip"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        make_archive(archive, dataset, counts, size["side"], seed=3)
    project = Project(
        root=root, params=state / "params.yaml", state=state, remote=str(state / "dvc-remote")
    )
    airflow = LocalAirflow(project, state / "airflow")
    with serve_folder(archive.parent) as base:
        params = recipes_params(dataset, archive, f"{base}/{archive.name}", counts)
        parse_config(params, source="recipes params")
        project.params.write_text(yaml.safe_dump(params, sort_keys=False))
        conf = recipes_conf(dataset, recipes, size["set"], weights, state / "weights")
        print(f"recipes: {', '.join(recipes)} on {dataset} ({'tiny' if tiny else 'full'})")
        timings = run_sweep(airflow, conf)
    print(sweep_results(project))
    print(
        f"sweep DAG {timings['sweep']['total']:.0f} s; recipes finished in "
        f"{time.perf_counter() - start:.0f} s. MLflow: {state / 'mlflow'} (experiment sweeps)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.dev.recipes", description=__doc__)
    parser.add_argument("--dataset", default="cats_vs_dogs", choices=sorted(LAYOUTS))
    parser.add_argument(
        "--recipes", default="all", help="comma-separated presets (default: all of them)"
    )
    parser.add_argument("--tiny", action="store_true", help="minutes on a laptop, not hours")
    parser.add_argument(
        "--weights", default="offline", help="offline (made here), imagenet, or none"
    )
    parser.add_argument("--state", default=".recipes", help="where everything is kept")
    args = parser.parse_args(argv)
    known = recipe_names()
    recipes = known if args.recipes == "all" else [r.strip() for r in args.recipes.split(",")]
    unknown = [r for r in recipes if r not in known]
    if unknown:
        print(f"error: --recipes: unknown {unknown}; use some of {known}", file=sys.stderr)
        return 2
    root = Path.cwd().resolve()
    try:
        return run_recipes(
            root, (root / args.state).resolve(), args.dataset, recipes, args.tiny, args.weights
        )
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
