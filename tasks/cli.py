"""``python -m tasks <command>``: the one command behind each DVC stage and Airflow task.

Each pipeline stage is the module of the same name in ``tasks.steps``, called
through its ``run(cfg, paths)``. A command imports its step module only when
it runs, so ``tasks --help`` stays instant and a stage process loads only the
code that stage runs (which is what its ``dvc.yaml`` deps list).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.config import Config, load_config, load_stage_config
from tasks.contract import PARAMS_ENV, PARENT_ENV, ROOT_ENV
from tasks.errors import ConfigError, StageError, WorkerLost
from tasks.io import storage_error
from tasks.paths import DatasetPaths
from tasks.tf_logging import quiet_tensorflow_startup

StageCommand = Callable[[Config, DatasetPaths, argparse.Namespace], Any]


# ---------------------------------------------------------------- the stages


def download(cfg: Config, paths: DatasetPaths, args: argparse.Namespace) -> Any:
    """fetch, verify and extract the dataset archive"""
    from tasks.steps import download

    return download.run(cfg, paths, offline=args.offline)


def validate(cfg: Config, paths: DatasetPaths, args: argparse.Namespace) -> Any:
    """build the image manifest and run the expectations"""
    from tasks.steps import validate

    return validate.run(cfg, paths)


def train(cfg: Config, paths: DatasetPaths, args: argparse.Namespace) -> Any:
    """phase 1: train the head on a frozen backbone"""
    from tasks.steps import train

    return train.run(cfg, paths)


def finetune(cfg: Config, paths: DatasetPaths, args: argparse.Namespace) -> Any:
    """phase 2: fine-tune the top blocks at a low rate"""
    from tasks.steps import finetune

    return finetune.run(cfg, paths)


def evaluate(cfg: Config, paths: DatasetPaths, args: argparse.Namespace) -> Any:
    """score the candidate on the held-out test split; draw the plots"""
    from tasks.steps import evaluate

    return evaluate.run(cfg, paths)


def register(cfg: Config, paths: DatasetPaths, args: argparse.Namespace) -> Any:
    """log, register and gate the model against @champion on the test split"""
    from tasks.steps import register

    return register.run(cfg, paths)


STAGES: tuple[StageCommand, ...] = (download, validate, train, finetune, evaluate, register)
"""The pipeline's stages in order; each command's name is its step module's (and DVC stage's)."""
DEVICE_STAGES = frozenset({"train", "finetune", "evaluate", "register"})
"""The stages that run models: on a shared GPU worker each claims its own GPUs first."""


# ---------------------------------------------------------------- other commands


def predict(args: argparse.Namespace) -> Any:
    from tasks.commands import predict

    return predict.run(
        args.model, args.inputs, out=args.out, batch_size=args.batch_size, classes=args.classes
    )


def score(args: argparse.Namespace) -> Any:
    """Score a drop of new images with the champion; test it for drift (docs/scoring.md)."""
    from tasks.commands import score

    cfg, paths = _dataset_args(args)
    result = score.run(
        cfg, paths, args.source, model=args.model, drop=args.drop, result_json=args.result_json
    )
    if args.result_json != "-":
        return result
    print(result, file=sys.stderr)  # stdout holds the JSON
    return None


def feedback(args: argparse.Namespace) -> Any:
    """Add a labelled drop to the dataset as a new DVC-versioned data version."""
    from tasks.commands import feedback

    cfg, paths = _dataset_args(args)
    return feedback.run(cfg, paths, args.drop)


def card(args: argparse.Namespace) -> Any:
    """A registered version's model card (markdown)."""
    from tasks.commands import card

    cfg, paths = _dataset_args(args)
    return card.run(cfg, paths, version=args.version)


def export(args: argparse.Namespace) -> Any:
    """The champion (or --model) as SavedModel / LiteRT / ONNX, each checked against Keras."""
    from tasks.commands import export

    cfg, paths = _dataset_args(args)
    return export.run(cfg, paths, args.formats, model=args.model)


EXPORT_FORMATS = ("saved_model", "litert", "onnx")
"""``export --format`` choices (``tasks.ml.export.FORMATS``, named here so parsing stays light)."""


def sweep_report(args: argparse.Namespace) -> Any:
    """A sweep's comparison table, Pareto plot and MLflow run, from its rows.json."""
    from tasks.commands import sweep_report

    return sweep_report.run(load_config(args.params), Path(args.folder))


def approve(args: argparse.Namespace) -> Any:
    """A person's decision on the candidate awaiting approval (register.approval: human)."""
    import getpass

    from tasks.commands import approve

    cfg, paths = _dataset_args(args)
    return approve.run(
        cfg,
        paths,
        approve=args.reject is None,
        by=args.by or getpass.getuser(),
        reason=args.reject if args.reject is not None else args.note,
        version=args.version,
    )


def history(args: argparse.Namespace) -> Any:
    """Every alias move of the dataset's registered model, and who was @champion when."""
    from mlflow import MlflowClient

    from tasks.tracking.registry import alias_history, format_history, registered_model_name
    from tasks.tracking.store import store_exists, tracking_uri

    cfg, paths = _dataset_args(args)
    name = registered_model_name(cfg, paths.dataset)
    uri = tracking_uri(cfg, paths.root)
    if not store_exists(uri):
        raise StageError(f"no MLflow store at {uri}; run the pipeline (or register) first")
    return format_history(name, alias_history(MlflowClient(uri), name))


def _dataset_args(args: argparse.Namespace) -> tuple[Config, DatasetPaths]:
    cfg = load_stage_config(args.params, args.overrides)
    cfg.dataset(args.dataset)
    return cfg, DatasetPaths.of(args.dataset, Path(args.root))


def datasets(args: argparse.Namespace) -> Any:
    return "\n".join(load_config(args.params).datasets)


def fetch_weights(args: argparse.Namespace) -> Any:
    from tasks.ml.backbones import fetch_weights

    return fetch_weights(args.backbone)


def pipeline_run(args: argparse.Namespace) -> Any:
    """Start or end the MLflow parent run of one pipeline execution (the DAG's first and
    last tasks call this in the dataset's workspace)."""
    from tasks.tracking.runs import end_pipeline_run, start_pipeline_run

    cfg = load_stage_config(args.params)
    paths = DatasetPaths.of(args.dataset, Path(args.root))
    if args.action == "start":
        return start_pipeline_run(cfg, paths)
    if not args.run_id:
        raise ConfigError(f"pipeline-run end: no run id; pass --run-id or set ${PARENT_ENV}")
    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"pipeline-run end: --tag {item!r}: write it as key=value")
        tags[key] = value
    end_pipeline_run(cfg, paths, args.run_id, args.status, tags)
    return None


def dvc_stage(args: argparse.Namespace) -> Any:
    from tasks.orchestration.dvc import stage_command

    return stage_command(args.stage, args.dataset, result_json=args.result_json, lane=args.lane)


# ---------------------------------------------------------------- parsing


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default=os.environ.get(PARAMS_ENV, "params.yaml"),
        help=f"parameter file (default: params.yaml, or ${PARAMS_ENV})",
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
        default=os.environ.get(ROOT_ENV, "."),
        help="workspace holding data/, models/, reports/ (default: current folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasks", description="Transfer-learning pipeline stages (one per DVC stage)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        text = (stage.__doc__ or "").strip()
        command = sub.add_parser(stage.__name__, help=text, description=text)
        command.add_argument("dataset", help="a dataset name from params.yaml")
        _common(command)
        command.set_defaults(stage_fn=stage)
        if stage is download:
            command.add_argument(
                "--offline",
                action="store_true",
                help="use only what is already on disk; never touch the network",
            )

    command = sub.add_parser("predict", help="classify images with a saved or registered model")
    command.add_argument("model", help="a .keras file or an MLflow URI (models:/NAME@champion)")
    command.add_argument("inputs", nargs="+", help="image files or folders")
    command.add_argument("--out", help="write the CSV here instead of stdout")
    command.add_argument("--batch-size", type=int, default=32)
    command.add_argument(
        "--classes",
        help="comma-separated class names for a .keras file (default: classes.json beside it)",
    )
    command.set_defaults(command_fn=predict)

    command = sub.add_parser(
        "score",
        help="score a drop of new images with the champion and test it for drift",
        description="Check, score and drift-test a drop of new images (a folder, a .zip, an "
        "https:// URL of a zip, or an s3:// prefix) with the dataset's registered model; "
        "writes reports/<dataset>/scoring/<drop>/ and an MLflow run. A drop already scored by "
        "the same model version is not scored again.",
    )
    command.add_argument("dataset")
    command.add_argument(
        "source", help="folder | file.zip | https://.../drop.zip | s3://bucket/prefix"
    )
    _common(command)
    command.add_argument(
        "--model", help="registry alias or version (default: scoring.model, i.e. champion)"
    )
    command.add_argument("--drop", help="the drop's name (default: the source's last part)")
    command.add_argument("--result-json", help="write the result here ('-': print it)")
    command.set_defaults(command_fn=score)

    command = sub.add_parser(
        "feedback",
        help="add a labelled drop (a folder per class) to the dataset for the next training run",
    )
    command.add_argument("dataset")
    command.add_argument(
        "drop", help="a drop's folder (or its name under scoring.inbox/<dataset>/)"
    )
    _common(command)
    command.set_defaults(command_fn=feedback)

    command = sub.add_parser("card", help="print a registered model version's model card")
    command.add_argument("dataset")
    _common(command)
    command.add_argument("--version", help="the model version (default: the @champion)")
    command.set_defaults(command_fn=card)

    command = sub.add_parser(
        "approve",
        help="approve (or --reject) the candidate awaiting approval",
        description="Settle the candidate the gate passed when register.approval is human: "
        "approve moves @champion to it; --reject leaves it @challenger with your reason.",
    )
    command.add_argument("dataset")
    _common(command)
    command.add_argument("--version", help="the model version (default: the @challenger)")
    command.add_argument("--reject", metavar="REASON", help="reject it, saying why")
    command.add_argument("--note", default="", help="a note recorded with an approval")
    command.add_argument("--by", help="who decides (default: the current user)")
    command.set_defaults(command_fn=approve)

    command = sub.add_parser(
        "export",
        help="write the champion (or --model) as SavedModel, LiteRT or ONNX, checked against Keras",
        description="Export the dataset's @champion (or --model) to models/<dataset>/export/"
        "<format>/ with a report in export.json. Each format is read back with its own runtime "
        "and must match the Keras model's probabilities on the test images to 1e-4, or it is "
        "refused and nothing is written for it.",
    )
    command.add_argument("dataset")
    _common(command)
    command.add_argument(
        "--format",
        dest="formats",
        action="extend",
        nargs="+",
        choices=EXPORT_FORMATS,
        metavar="FORMAT",
        help=f"one or more of {', '.join(EXPORT_FORMATS)} (default: saved_model; repeatable)",
    )
    command.add_argument(
        "--model",
        help="a .keras file or an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS) "
        "instead of the champion",
    )
    command.set_defaults(command_fn=export)

    command = sub.add_parser(
        "sweep-report",
        help="a sweep's comparison: table, Pareto plot and MLflow run (the sweep DAG runs it)",
    )
    command.add_argument("folder", help="reports/sweep/<sweep id>, holding rows.json")
    command.add_argument("--params", default=os.environ.get(PARAMS_ENV, "params.yaml"))
    command.set_defaults(command_fn=sweep_report)

    command = sub.add_parser(
        "history", help="who was @champion when: every alias move of a dataset's model"
    )
    command.add_argument("dataset")
    _common(command)
    command.set_defaults(command_fn=history)

    command = sub.add_parser("datasets", help="print the dataset names in params.yaml")
    command.add_argument("--params", default=os.environ.get(PARAMS_ENV, "params.yaml"))
    command.set_defaults(command_fn=datasets)

    command = sub.add_parser(
        "fetch-weights", help="pre-seed the Keras cache with a backbone's ImageNet weights"
    )
    command.add_argument("backbone")
    command.set_defaults(command_fn=fetch_weights)

    command = sub.add_parser(
        "pipeline-run", help="start or end the MLflow parent run of a pipeline execution"
    )
    command.add_argument("action", choices=["start", "end"])
    command.add_argument("dataset")
    _common(command)
    command.add_argument(
        "--run-id", default=os.environ.get(PARENT_ENV), help="the parent run to end"
    )
    command.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    command.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    command.set_defaults(command_fn=pipeline_run)

    command = sub.add_parser(
        "dvc-stage",
        help="run one DVC stage in the dataset's Airflow workspace (what a GPU pod runs)",
    )
    command.add_argument("stage")
    command.add_argument("dataset")
    command.add_argument("--result-json", help="write the XCom result here ('-': print it)")
    command.add_argument(
        "--lane", help="SWEEP/COMBINATION: run in that sweep lane's workspace instead"
    )
    command.set_defaults(command_fn=dvc_stage)
    return parser


def run(argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` and run the command; returns the step's result object."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stage: StageCommand | None = getattr(args, "stage_fn", None)
    if stage is None:
        return args.command_fn(args)
    cfg = load_stage_config(args.params, args.overrides)
    cfg.dataset(args.dataset)
    if stage.__name__ in DEVICE_STAGES:
        from tasks.gpus import claim_gpus

        claim_gpus()
    return stage(cfg, DatasetPaths.of(args.dataset, Path(args.root)), args)


def main(argv: Sequence[str] | None = None) -> int:
    # Before any command imports TensorFlow (commands import their modules when they run).
    # Our own messages are Python logging and stderr prints, which this leaves alone.
    quiet_tensorflow_startup()
    try:
        result = run(argv)
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; previous outputs were left in place", file=sys.stderr)
        return 130
    except WorkerLost as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from tasks.tracking.store import access_error

        # An authenticating MLflow server that refused the login or the request; a full
        # disk (or a quota, or a file-size limit) where no step said more: the outputs are
        # written atomically, so the previous ones are still there.
        message = access_error(error) or (
            storage_error(error) if isinstance(error, OSError) else None
        )
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    if result is not None and not isinstance(result, int | bool):
        print(result)
    return 0
