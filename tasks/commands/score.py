"""``score``: a drop of new images through the registered model, tested for drift.

``python -m tasks score <dataset> <folder | file.zip | https://…zip | s3://bucket/prefix>``

1. the drop is brought to a local folder and every file checked as ``validate``
   checks the dataset (:mod:`tasks.scoring.drop`); bad files are quarantined,
   named with their reason, and not scored;
2. the registered version (``scoring.model``: ``@champion`` by default, or
   ``--model``) scores the rest in batches (``tf.data`` reads and decodes ahead
   of the model), giving each image's probabilities and its embedding;
3. the drop is compared with the version's drift reference (:mod:`tasks.ml.drift`);
   a labelled drop (folder per class) also gets the live accuracy;
4. ``reports/<ds>/scoring/<drop>/`` gets ``predictions.parquet``, ``drift.json``,
   ``plots/`` and ``scored.json``, all at once (a failed run leaves the previous
   folder as it was), after an MLflow run in the dataset's experiment has logged
   them (tags ``scoring.model``/``scoring.model_version``, the drop as a dataset
   input, the metrics linked to the version's logged model); the version's model
   card is refreshed.

A drop already scored by the same version (same content) is not scored again:
the command says so and changes nothing. Another version scores it anew.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.config import Config
from tasks.errors import StageError
from tasks.io import write_json, write_text
from tasks.ml.drift import DriftSettings
from tasks.paths import DatasetPaths
from tasks.scoring.drop import DROP_SPLIT, Drop, check_drop, drop_name, local_drop

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

MARK = "scored.json"


@dataclass
class ScoreResult:
    dataset: str
    drop: str
    model: str
    version: str
    scored: bool
    drift: bool | None
    images: int
    quarantined: int
    run_id: str | None
    reports: str
    summary: dict[str, Any] = field(default_factory=dict)
    live: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Where the time went: check, load (waiting for the model), predict, drift, write."""
    message: str = ""

    def __str__(self) -> str:
        return self.message


def scoring_folder(paths: DatasetPaths, drop: str) -> Path:
    return paths.reports / "scoring" / drop


def run(
    cfg: Config,
    paths: DatasetPaths,
    source: str,
    *,
    model: str | None = None,
    drop: str | None = None,
    result_json: str | None = None,
) -> ScoreResult:
    """Score the drop at ``source`` (see the module's docs); returns what was done."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.tracking.registry import registered_model_name
    from tasks.tracking.store import server_errors, tracking_uri

    name = registered_model_name(cfg, paths.dataset)
    drop = drop or drop_name(source)
    out = scoring_folder(paths, drop)
    uri = tracking_uri(cfg, paths.root)
    rerun = f"python -m tasks score {paths.dataset} {source}"
    with server_errors(uri, rerun):
        mlflow.set_tracking_uri(uri)  # the model and reference downloads use it too
        client = MlflowClient(uri)
        version = resolve_version(client, name, model or cfg.scoring.model, paths.dataset)
        with local_drop(source, cfg.download) as folder, ThreadPoolExecutor(1) as loader:
            # the model loads while the checks run (in their own processes), unless this
            # version scored a drop of this name already: then it may be nothing to do
            loading = None if _marked(out, version) else loader.submit(_load, version)
            clock = _Clock()
            checked = check_drop(drop, source, folder, cfg.dataset(paths.dataset).classes,
                                 cfg.validate_)  # fmt: skip
            clock.lap("check")
            done = _already_scored(out, checked, version)
            if done is None:
                loaded = loading.result() if loading else _load(version)
                clock.lap("load")
                result = _score(cfg, paths, client, version, checked, out, loaded, clock)
            else:
                result = done
    _emit(result, result_json)
    return result


def resolve_version(client: MlflowClient, name: str, which: str, dataset: str) -> ModelVersion:
    """``which``: a version number or an alias of registered model ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        if which.isdigit():
            return client.get_model_version(name, which)
        return client.get_model_version_by_alias(name, which)
    except MlflowException:
        label = f"version {which}" if which.isdigit() else f"@{which}"
        raise StageError(
            f"registered model {name} has no {label}; run the pipeline (or `python -m tasks "
            f"register {dataset}`) first, or pass --model with an existing alias or version"
        ) from None


def _load(version: ModelVersion) -> tuple[Any, dict[str, Any]]:
    from tasks.tracking.models import load_logged_model

    return load_logged_model(f"models:/{version.name}/{version.version}")


def _marked(out: Path, version: ModelVersion) -> bool:
    mark = out / MARK
    return mark.is_file() and str(json.loads(mark.read_text()).get("version")) == str(
        version.version
    )


def _already_scored(out: Path, drop: Drop, version: ModelVersion) -> ScoreResult | None:
    mark = out / MARK
    if not mark.is_file():
        return None
    previous = json.loads(mark.read_text())
    if previous.get("digest") != drop.digest or str(previous.get("version")) != str(
        version.version
    ):
        return None
    result = ScoreResult(**{k: previous[k] for k in _RESULT_KEYS if k in previous})
    result.scored = False
    result.message = (
        f"score: drop {drop.name} was already scored by {version.name} v{version.version} "
        f"(run {previous.get('run_id')}); nothing to do. Results: {result.reports}"
    )
    return result


_RESULT_KEYS = ("dataset", "drop", "model", "version", "scored", "drift", "images",
                "quarantined", "run_id", "reports", "summary", "live", "seconds")  # fmt: skip


def _score(
    cfg: Config,
    paths: DatasetPaths,
    client: MlflowClient,
    version: ModelVersion,
    drop: Drop,
    out: Path,
    loaded: tuple[Any, dict[str, Any]],
    clock: _Clock,
) -> ScoreResult:
    from tasks.io import atomic_path
    from tasks.ml.drift import drift_report
    from tasks.scoring.reference import embed_rows, load_reference

    classes = list(cfg.dataset(paths.dataset).classes)
    ok = drop.ok
    if ok.empty:
        raise StageError(
            f"drop {drop.name} has no usable image ({len(drop.frame)} quarantined, e.g. "
            f"{drop.frame['path'].iloc[0]}: {drop.frame['reason'].iloc[0]}); fix the files "
            "and score again"
        )
    keras_model, metadata = loaded
    if list(metadata.get("classes") or classes) != classes:
        raise StageError(
            f"{version.name} v{version.version} predicts {metadata.get('classes')}, not "
            f"{classes}; score with a version trained on this dataset"
        )
    rows = ok.assign(split=DROP_SPLIT, label=ok["label"].where(ok["label"] != "", classes[0]))
    probabilities, embeddings = embed_rows(
        keras_model, rows, drop.folder, classes, cfg.scoring.batch_size
    )
    clock.lap("predict")
    try:
        reference = load_reference(version.run_id, str(version.version), version.name)
        report = drift_report(
            reference, embeddings, probabilities, DriftSettings(**cfg.scoring.drift.model_dump())
        )
    except StageError as missing:
        reference, report = None, {"drift": False, "checked": False, "reason": str(missing)}
    clock.lap("drift")
    live = _live_metrics(drop, ok, probabilities, classes)
    table = predictions_table(drop, ok, probabilities, embeddings, classes, version)
    with atomic_path(out) as staging:
        staging.mkdir(parents=True)
        table.to_parquet(staging / "predictions.parquet", index=False)
        write_json(staging / "drift.json", {**report, "drop": drop.name, "live": live})
        _plots(staging / "plots", drop.name, probabilities, embeddings, reference, classes)
        run_id = _log_run(cfg, paths, client, version, drop, staging, report, live)
        result = _result(paths, drop, version, report, live, run_id, out)
        result.seconds = {**clock.laps, "write": clock.lap("write")}
        write_json(staging / MARK, {**asdict(result), "digest": drop.digest})
    return result


class _Clock:
    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = self._now()
        self.laps[name] = round(now - self._last, 3)
        self._last = now
        return self.laps[name]


def _live_metrics(
    drop: Drop, ok: pd.DataFrame, probabilities: np.ndarray, classes: list[str]
) -> dict[str, float]:
    """A labelled drop's metrics (as evaluate's), prefixed ``live.``; {} for an unlabelled one."""
    if not drop.labelled:
        return {}
    from tasks.ml.metrics import classification_metrics, flat_metrics

    labels = ok["label"].map({name: i for i, name in enumerate(classes)}).to_numpy()
    metrics = flat_metrics(classification_metrics(labels, probabilities, classes))
    return {f"live.{key}": value for key, value in metrics.items()}


def predictions_table(
    drop: Drop,
    ok: pd.DataFrame,
    probabilities: np.ndarray,
    embeddings: np.ndarray,
    classes: list[str],
    version: ModelVersion,
) -> pd.DataFrame:
    """One row per file of the drop: scored ones with their class, probabilities and
    embedding; quarantined ones with their reason."""
    import pandas as pd

    scored = pd.DataFrame(
        {
            "file": ok["path"].astype(str),
            "sha256": ok["sha256"].astype(str),
            "status": "ok",
            "reason": "",
            "label": ok["label"].astype(str),
            "predicted": [classes[i] for i in probabilities.argmax(axis=1)],
            "confidence": probabilities.max(axis=1).astype(np.float32),
            **{f"prob_{c}": probabilities[:, i].astype(np.float32) for i, c in enumerate(classes)},
            "embedding": list(embeddings.astype(np.float32)),
        }
    )
    bad = drop.quarantined
    skipped = pd.DataFrame(
        {
            "file": bad["path"].astype(str),
            "sha256": bad["sha256"].astype(str),
            "status": "quarantined",
            "reason": bad["reason"].astype(str),
            "label": bad["label"].astype(str),
        }
    )
    table = pd.concat([scored, skipped], ignore_index=True).sort_values("file", ignore_index=True)
    table["predicted"] = table["predicted"].fillna("")
    table["embedding"] = [e if isinstance(e, np.ndarray) else None for e in table["embedding"]]
    return table.assign(model_name=version.name, model_version=str(version.version))


def _plots(
    folder: Path,
    drop: str,
    probabilities: np.ndarray,
    embeddings: np.ndarray,
    reference: Any,
    classes: list[str],
) -> None:
    from tasks.ml import drift_plots

    folder.mkdir(parents=True)
    if reference is None:
        return
    drift_plots.class_shares(probabilities, reference.prior, classes, drop,
                             folder / "class_share.png")  # fmt: skip
    drift_plots.confidence_histogram(
        probabilities.max(axis=1), reference.test_confidence, len(classes), drop,
        folder / "confidence.png",
    )  # fmt: skip
    drift_plots.embedding_projection(
        reference.embeddings, embeddings, drop, folder / "embeddings.png"
    )


def _log_run(
    cfg: Config,
    paths: DatasetPaths,
    client: MlflowClient,
    version: ModelVersion,
    drop: Drop,
    staging: Path,
    report: dict[str, Any],
    live: dict[str, float],
) -> str:
    """The scoring run in the dataset's experiment: linked to the version, the drop as its
    input, the drift statistics and live metrics; the version's card refreshed."""
    import mlflow

    from tasks.tracking.card import SCORING_MODEL_TAG, SCORING_VERSION_TAG, refresh_card
    from tasks.tracking.lineage import quiet_datasets
    from tasks.tracking.runs import use_experiment

    experiment = use_experiment(cfg, paths)
    tests = report.get("tests") or {}
    metrics = {"images": float(len(drop.ok)), "quarantined": float(len(drop.quarantined))}
    for test, values in tests.items():
        metrics[f"drift.{test}.statistic"] = values["statistic"]
        metrics[f"drift.{test}.p_value"] = values["p_value"]
    metrics["drift"] = float(bool(report.get("drift")))
    metrics.update(live)
    with mlflow.start_run(experiment_id=experiment, run_name=f"score {drop.name}") as run:
        mlflow.set_tags({
            "phase": "score",
            SCORING_MODEL_TAG: version.name,
            SCORING_VERSION_TAG: str(version.version),
            "scoring.drop": drop.name,
            "scoring.source": drop.source,
            "scoring.digest": drop.digest,
            "drift": str(bool(report.get("drift"))).lower(),
            "drift.checked": str(bool(report.get("checked"))).lower(),
            "drift.flagged": ",".join(report.get("flagged") or []),
            "dataset": paths.dataset,
        })  # fmt: skip
        with quiet_datasets():
            dataset = mlflow.data.from_pandas(
                drop.frame[["path", "sha256", "status", "label"]].astype(str),
                source=drop.source,
                name=drop.name,
                digest=drop.digest[:32],
            )
            mlflow.log_input(dataset, context="scoring")
        mlflow.log_metrics(metrics, model_id=getattr(version, "model_id", None) or None)
        mlflow.log_artifacts(str(staging), artifact_path="scoring")
        refresh_card(client, version.name, str(version.version), run_id=run.info.run_id)
    return run.info.run_id


def _result(
    paths: DatasetPaths,
    drop: Drop,
    version: ModelVersion,
    report: dict[str, Any],
    live: dict[str, float],
    run_id: str,
    out: Path,
) -> ScoreResult:
    tests = report.get("tests") or {}
    summary = {
        name: {k: test[k] for k in ("statistic", "p_value", "threshold", "drift")}
        for name, test in tests.items()
    }
    drift = bool(report.get("drift")) if report.get("checked") else None
    lines = [
        f"score: {drop.name}: {len(drop.ok)} image(s) scored by {version.name} "
        f"v{version.version}; {len(drop.quarantined)} quarantined"
    ]
    for _, row in drop.quarantined.iterrows():
        lines.append(f"  quarantined {row['path']}: {row['reason']}")
    if drift is None:
        lines.append(f"  drift: not tested ({report.get('reason')})")
    else:
        verdict = "DRIFT" if drift else "no drift"
        flagged = f" (flagged by {', '.join(report['flagged'])})" if drift else ""
        lines.append(f"  {verdict}{flagged}")
        for name, test in summary.items():
            mark = "  <- drift" if test["drift"] else ""
            lines.append(
                f"    {name:<10} statistic {test['statistic']:.4f}  p {test['p_value']:.4f}  "
                f"(threshold {test['threshold']:.4g}){mark}"
            )
    if live:
        accuracy = live.get("live.accuracy", float("nan"))
        lines.append(f"  live accuracy {accuracy:.4f} (labelled drop)")
    reports = out.relative_to(paths.root).as_posix() if out.is_relative_to(paths.root) else str(out)
    lines.append(f"  -> {reports}/ (MLflow run {run_id})")
    return ScoreResult(
        dataset=paths.dataset, drop=drop.name, model=version.name, version=str(version.version),
        scored=True, drift=drift, images=len(drop.ok), quarantined=len(drop.quarantined),
        run_id=run_id, reports=reports, summary=summary, live=live, message="\n".join(lines),
    )  # fmt: skip


def _emit(result: ScoreResult, result_json: str | None) -> None:
    if not result_json:
        return
    payload = {k: v for k, v in asdict(result).items() if k != "message"}
    if result_json == "-":
        print(json.dumps(payload), file=sys.stdout)
    else:
        write_text(result_json, json.dumps(payload, indent=2))
