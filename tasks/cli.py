"""``python -m tasks <stage> <dataset>``: the one command behind each DVC stage and Airflow task.

The CLI parses, loads the config (with ``--set`` overrides) and calls a typed
step function; step modules are imported only when their command runs, so
``tasks --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, load_config
from tasks.errors import StageError
from tasks.paths import DatasetPaths

# stage -> (module, function, help). The function is called as fn(cfg, paths, **options).
DATASET_STAGES: dict[str, tuple[str, str, str]] = {
    "download": ("tasks.download", "download", "fetch, verify and extract the dataset archive"),
    "validate": ("tasks.validate", "validate", "build the image manifest and run the expectations"),
    "train": ("tasks.train", "train_frozen", "phase 1: train the head on a frozen backbone"),
    "finetune": ("tasks.train", "finetune", "phase 2: fine-tune the top blocks at a low rate"),
    "evaluate": ("tasks.evaluate", "evaluate", "score the candidate model and draw the plots"),
    "register": ("tasks.registry", "register", "log, register and gate the model (@champion)"),
}


def _stage_options(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "download":
        parser.add_argument(
            "--offline",
            action="store_true",
            help="use only what is already on disk; never touch the network",
        )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default=os.environ.get("TASKS_PARAMS", "params.yaml"),
        help="parameter file (default: params.yaml, or $TASKS_PARAMS)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter for this run, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("TASKS_ROOT", "."),
        help="workspace holding data/, models/, reports/ (default: current folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasks", description="Transfer-learning pipeline stages (one per DVC stage)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, text) in DATASET_STAGES.items():
        stage = sub.add_parser(name, help=text, description=text)
        stage.add_argument("dataset", help="a dataset name from params.yaml")
        _common(stage)
        _stage_options(name, stage)

    predict = sub.add_parser("predict", help="classify images with a saved or registered model")
    predict.add_argument("model", help="a .keras file or an MLflow URI (models:/NAME@champion)")
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--out", help="write the CSV here instead of stdout")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument(
        "--classes",
        help="comma-separated class names for a .keras file (default: classes.json beside it)",
    )

    datasets = sub.add_parser("datasets", help="print the dataset names in params.yaml")
    datasets.add_argument("--params", default=os.environ.get("TASKS_PARAMS", "params.yaml"))

    weights = sub.add_parser(
        "fetch-weights", help="pre-seed the Keras cache with a backbone's ImageNet weights"
    )
    weights.add_argument("backbone")

    stage = sub.add_parser(
        "dvc-stage",
        help="run one DVC stage in the dataset's Airflow workspace (what a GPU pod runs)",
    )
    stage.add_argument("stage")
    stage.add_argument("dataset")
    stage.add_argument("--result-json", help="write the XCom result here ('-': print it)")
    return parser


def env_overrides() -> list[str]:
    """``$TASKS_SET``: a JSON list of KEY=VALUE overrides applied before ``--set``.

    The Airflow DAGs set it for a run's conf overrides (already written into the
    workspace's params.yaml), so every stage records them in MLflow.
    """
    text = os.environ.get("TASKS_SET", "").strip()
    if not text:
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError('$TASKS_SET: must be a JSON list of "key=value" strings')
    return items


def _call(module: str, function: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(module), function)


def run(argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` and run the command; returns the step's result object."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command in DATASET_STAGES:
        module, function, _ = DATASET_STAGES[args.command]
        cfg = load_config(args.params, [*env_overrides(), *args.overrides])
        cfg.dataset(args.dataset)
        paths = DatasetPaths.of(args.dataset, Path(args.root))
        options = {"offline": True} if getattr(args, "offline", False) else {}
        return _call(module, function)(cfg, paths, **options)
    if args.command == "predict":
        return _call("tasks.predict", "predict_command")(
            args.model,
            args.inputs,
            out=args.out,
            batch_size=args.batch_size,
            classes=args.classes,
        )
    if args.command == "datasets":
        return "\n".join(load_config(args.params).datasets)
    if args.command == "dvc-stage":
        return _call("tasks.workspace", "stage_command")(
            args.stage, args.dataset, result_json=args.result_json
        )
    if args.command == "fetch-weights":
        return _call("tasks.backbones", "fetch_weights")(args.backbone)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        result = run(argv)
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; previous outputs were left in place", file=sys.stderr)
        return 130
    if result is not None and not isinstance(result, int | bool):
        print(result)
    return 0
