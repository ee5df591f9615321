"""``register``: log the candidate as an MLflow model and promote it only if it earns it.

The candidate (``models/<ds>/candidate.json``) is logged inside the ``register``
child run as an MLflow model (TensorFlow flavor) and registered as
``<prefix><ds>-classifier``. The gate runs on the **held-out test split** (never
seen by training, early stopping or the frozen/fine-tuned choice), with the
current champion **re-scored now on the same test images** (a number stored
when it was promoted may come from other data). It becomes ``@champion`` only if

1. it reaches ``register.floor`` on ``register.metric``, and
2. a paired test on those images (``register.method``: McNemar's exact test, or
   a paired bootstrap interval of the difference; :mod:`tasks.ml.paired_test`)
   finds it significantly ``better`` than the champion, or (with
   ``register.promote_if: not_worse``) not significantly ``worse``. An
   ``equivalent`` retrain does not churn ``@champion`` under the default rule.

On promotion the old champion keeps ``@previous``. Otherwise the new version
gets ``@challenger`` and the tag ``gate.reason``. With ``register.approval:
human`` a candidate that passes the gate is left ``@challenger``, awaiting
approval: ``python -m tasks approve <ds>`` (or the Airflow approval task)
promotes it. The verdict, the difference with its interval, the p-value and the
number of images go to ``reports/<ds>/gate.json`` (DVC metrics), stdout, the run
and the version's tags; every alias move is appended to the registered model's
history (``python -m tasks history <ds>``).

What the logged model takes and returns: :mod:`tasks.tracking.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import image_root, labelled_rows, load_model, read_candidate
from tasks.config import Config, RegisterConfig
from tasks.contract import AWAITING_APPROVAL, PROMOTED, REJECTED
from tasks.errors import StageError
from tasks.io import file_md5, write_json
from tasks.ml.gate import Verdict, decide
from tasks.ml.paired_test import Comparison, compare
from tasks.paths import DatasetPaths
from tasks.scoring.version import describe_version
from tasks.tracking.lineage import current_experiment
from tasks.tracking.registry import CHALLENGER, CHAMPION, PREVIOUS, registered_model_name
from tasks.tracking.runs import log_headline

if TYPE_CHECKING:
    import keras
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


@dataclass(frozen=True)
class GateDecision:
    model_name: str
    version: str
    status: str
    """``promoted``, ``rejected`` or ``awaiting_approval``."""
    alias: str
    verdict: str
    """``better``/``equivalent``/``worse`` against the champion; ``first``,
    ``below_floor`` or ``incomparable`` when no comparison decided."""
    metric: str
    candidate_score: float
    champion_version: str | None
    champion_score: float | None
    floor: float
    method: str
    alpha: float
    promote_if: str
    approval: str
    images: int
    reason: str
    run_id: str
    comparison: dict[str, Any] | None = None
    experiment: str | None = None
    """The DVC experiment that restores this version's data and model (scheduled runs)."""

    @property
    def promoted(self) -> bool:
        return self.status == PROMOTED

    def __str__(self) -> str:
        label = {
            PROMOTED: "PROMOTED",
            REJECTED: "NOT PROMOTED",
            AWAITING_APPROVAL: "AWAITING APPROVAL",
        }
        lines = [
            f"register: {self.model_name} v{self.version} -> @{self.alias} "
            f"({label[self.status]}: {self.verdict})",
            f"  candidate test {self.metric}: {self.candidate_score:.4f} on {self.images} "
            "held-out test images",
        ]
        if self.champion_version is None:
            lines.append("  champion: none yet")
        else:
            score = "n/a" if self.champion_score is None else f"{self.champion_score:.4f}"
            lines.append(
                f"  champion v{self.champion_version} test {self.metric}: {score} "
                "(re-scored now on the same images)"
            )
        c = self.comparison
        if c:
            lines.append(
                f"  difference {c['difference']:+.4f}, {c['confidence']:.0%} CI "
                f"{c['low']:+.4f} to {c['high']:+.4f} (paired bootstrap, "
                f"{c['resamples']} resamples)"
            )
            lines.append(
                f"  McNemar exact p={c['p_value']:.4g}: {c['candidate_only']} images right only "
                f"for the candidate, {c['champion_only']} only for the champion"
            )
        rule = "significantly better" if self.promote_if == "better" else "not significantly worse"
        lines.append(
            f"  rule: floor {self.floor:.4f}; promote if {rule} (alpha {self.alpha:g}, "
            f"{self.method}); approval {self.approval}"
        )
        lines.append(f"  reason: {self.reason}")
        if self.promoted and self.champion_version is not None:
            lines.append(f"  v{self.champion_version} keeps @{PREVIOUS}")
        if self.status == AWAITING_APPROVAL:
            lines.append(
                f"  approve: python -m tasks approve {self.model_name.removesuffix('-classifier')} "
                f"--version {self.version}  (or --reject REASON)"
            )
        if self.experiment:
            lines.append(f"  DVC experiment: {self.experiment} (dvc exp apply restores it)")
        return "\n".join(lines)


def _predict(
    model: keras.Model, frame: pd.DataFrame, paths: DatasetPaths, classes: list[str], batch: int
) -> np.ndarray:
    from tasks.ml.model import predict_rows

    return predict_rows(model, frame, image_root(paths, frame), classes, batch)


def _rescore_champion(
    champion: ModelVersion,
    name: str,
    frame: pd.DataFrame,
    paths: DatasetPaths,
    classes: list[str],
    batch: int,
) -> tuple[np.ndarray | None, str]:
    """The champion's probabilities on the test rows, or (None, why it cannot be compared)."""
    from tasks.tracking.models import load_logged_model

    uri = f"models:/{name}/{champion.version}"
    try:
        model, stored = load_logged_model(uri)
    except StageError as error:
        raise StageError(
            f"cannot re-score the current champion: {error}; restore its artifacts or move "
            "the alias with `mlflow` before registering"
        ) from None
    if list(stored.get("classes", classes)) != list(classes):
        return None, (
            f"champion v{champion.version} predicts {stored.get('classes')}, not {classes}; "
            "it cannot be compared, so only the floor applies"
        )
    return _predict(model, frame, paths, classes, batch), ""


def run(cfg: Config, paths: DatasetPaths) -> GateDecision:
    """Log and register the candidate; move ``@champion`` only if it passes the gate."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.tracking.registry import current_alias
    from tasks.tracking.runs import phase_run

    # Score the candidate on the held-out test rows
    scored = _score_candidate(cfg, paths)
    with phase_run(cfg, paths, "register", last=True) as run:
        # Compare it with the champion, re-scored now on the same rows
        client = MlflowClient()
        champion = current_alias(client, scored.name, CHAMPION)
        champion_version = None if champion is None else str(champion.version)
        comparison, note = _compare_with_champion(cfg.register_, champion, scored, paths)

        # Decide: the floor, the paired test, the approval rule
        verdict = decide(cfg.register_, scored.score, comparison, champion_version, note)

        # Record: the model version, its aliases, the decision wherever it is looked for
        version = _log_candidate(scored, paths)
        decision = _decision(
            cfg.register_, scored, version, verdict, comparison, champion_version, run.info.run_id
        )
        _move_aliases(client, decision)
        _record_decision(client, decision, scored.source, scored.metrics)
        write_json(paths.gate, gate_report(decision))
        mlflow.log_artifact(str(paths.gate))

        # Keep with the version what scoring and its model card need
        describe_version(
            cfg, paths, scored.model, scored.frame, scored.probabilities, gate_report(decision)
        )
    return decision


@dataclass(frozen=True)
class _Scored:
    """The candidate scored on the test rows, with what the later steps need of it."""

    name: str
    classes: list[str]
    model: keras.Model
    frame: pd.DataFrame
    probabilities: np.ndarray
    metrics: dict[str, Any]
    score: float
    source: dict[str, str]
    batch: int


def _score_candidate(cfg: Config, paths: DatasetPaths) -> _Scored:
    """Load the candidate and score it on the held-out test rows by ``register.metric``."""
    from tasks.ml.metrics import classification_metrics

    classes = list(cfg.dataset(paths.dataset).classes)
    model_path, record = read_candidate(paths)
    frame = labelled_rows(paths, "test", classes)
    model = load_model(model_path)
    probabilities = _predict(model, frame, paths, classes, cfg.train.batch_size)
    metrics = classification_metrics(frame["label_index"].to_numpy(), probabilities, classes)
    score = metrics[cfg.register_.metric]
    if score is None:
        raise StageError(
            f"register.metric {cfg.register_.metric} is undefined on this test data (one class "
            "only?); pick accuracy or f1_macro in params.yaml"
        )
    source = {
        "path": model_path.relative_to(paths.root).as_posix(),
        "md5": file_md5(model_path),
        "phase": str(record.get("phase")),
    }
    name = registered_model_name(cfg, paths.dataset)
    return _Scored(
        name, classes, model, frame, probabilities, metrics, float(score), source,
        cfg.train.batch_size,
    )  # fmt: skip


def _compare_with_champion(
    gate: RegisterConfig, champion: ModelVersion | None, scored: _Scored, paths: DatasetPaths
) -> tuple[Comparison | None, str]:
    """The paired comparison on the same rows; None (and why) when there is nothing to
    compare with or the champion predicts other classes."""
    if champion is None:
        return None, ""
    champion_probs, note = _rescore_champion(
        champion, scored.name, scored.frame, paths, scored.classes, scored.batch
    )
    if champion_probs is None:
        return None, note
    comparison = compare(
        scored.frame["label_index"].to_numpy(),
        scored.probabilities,
        champion_probs,
        metric=gate.metric,
        method=gate.method,
        alpha=gate.alpha,
        resamples=gate.bootstrap_samples,
        seed=gate.seed,
    )
    return comparison, note


def _log_candidate(scored: _Scored, paths: DatasetPaths) -> str:
    """Log the candidate as an MLflow model and register it: the new version."""
    from tasks.ml.images import read_image
    from tasks.ml.model import model_image_size
    from tasks.ml.shards import image_file
    from tasks.tracking.models import log_classifier

    first = image_file(image_root(paths, scored.frame), scored.frame.iloc[0])
    example = read_image(first, model_image_size(scored.model))[None]
    metadata = {
        "dataset": paths.dataset,
        "source": scored.source["path"],
        "source_md5": scored.source["md5"],
    }
    version = log_classifier(scored.model, scored.classes, example, scored.name, metadata=metadata)
    return str(version.version)


def _decision(
    gate: RegisterConfig,
    scored: _Scored,
    version: str,
    verdict: Verdict,
    comparison: Comparison | None,
    champion_version: str | None,
    run_id: str,
) -> GateDecision:
    return GateDecision(
        model_name=scored.name,
        version=version,
        status=verdict.status,
        alias=CHAMPION if verdict.status == PROMOTED else CHALLENGER,
        verdict=verdict.verdict,
        metric=gate.metric,
        candidate_score=scored.score,
        champion_version=champion_version,
        champion_score=None if comparison is None else comparison.champion,
        floor=gate.floor,
        method=gate.method,
        alpha=gate.alpha,
        promote_if=gate.promote_if,
        approval=gate.approval,
        images=len(scored.frame),
        reason=verdict.reason,
        run_id=run_id,
        comparison=None if comparison is None else comparison.as_dict(),
        experiment=current_experiment(),
    )


def _move_aliases(client: MlflowClient, decision: GateDecision) -> None:
    """Promoted: the old champion becomes ``@previous``; else the version is ``@challenger``.

    Each move is appended to the registered model's alias history.
    """
    from tasks.tracking.registry import promote_version, record_alias_move

    name, version = decision.model_name, decision.version
    if decision.promoted:
        promote_version(client, name, version, decision.champion_version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    record_alias_move(
        client,
        name,
        {
            "version": version,
            "alias": decision.alias,
            "decision": decision.status,
            "verdict": decision.verdict,
            "previous": decision.champion_version if decision.promoted else None,
            "reason": decision.reason,
            "run_id": decision.run_id,
            "experiment": decision.experiment,
        },
    )


def _record_decision(
    client: MlflowClient,
    decision: GateDecision,
    source: dict[str, str],
    candidate_metrics: dict[str, Any],
) -> None:
    """The gate's tags on the model version and the run, its numbers as run metrics."""
    import mlflow

    from tasks.ml.metrics import flat_metrics

    champion_score = decision.champion_score
    tags = {
        "gate.decision": decision.status,
        "gate.verdict": decision.verdict,
        "gate.metric": decision.metric,
        "gate.split": "test",
        "gate.images": str(decision.images),
        "gate.candidate_score": f"{decision.candidate_score:.6f}",
        "gate.champion_version": decision.champion_version or "",
        "gate.champion_score": "" if champion_score is None else f"{champion_score:.6f}",
        "gate.floor": str(decision.floor),
        "gate.method": decision.method,
        "gate.alpha": str(decision.alpha),
        "gate.promote_if": decision.promote_if,
        "gate.approval": decision.approval,
        "gate.reason": decision.reason,
        **{f"source.{key}": value for key, value in source.items()},
    }
    if decision.experiment:
        tags["dvc.exp_name"] = decision.experiment
    for key, value in tags.items():
        client.set_model_version_tag(decision.model_name, decision.version, key, value)
    mlflow.set_tags({**tags, "registered.version": decision.version})
    scores = {f"candidate.{k}": v for k, v in flat_metrics(candidate_metrics).items()}
    scores["gate.candidate_score"] = decision.candidate_score
    if champion_score is not None:
        scores["gate.champion_score"] = champion_score
    c = decision.comparison
    if c:
        scores.update(
            {
                "gate.difference": c["difference"],
                "gate.ci_low": c["low"],
                "gate.ci_high": c["high"],
                "gate.p_value": c["p_value"],
                "gate.candidate_only": float(c["candidate_only"]),
                "gate.champion_only": float(c["champion_only"]),
            }
        )
    scores["gate.promoted"] = float(decision.promoted)
    mlflow.log_metrics(scores)
    log_headline(
        {"gate.promoted": scores["gate.promoted"]},
        tags={
            "gate.decision": decision.status,
            "gate.verdict": decision.verdict,
            "registered.version": decision.version,
        },
    )


def gate_report(decision: GateDecision) -> dict[str, Any]:
    """``gate.json``: the headline first (XCom and the approval task read the first keys)."""
    c = decision.comparison or {}
    report: dict[str, Any] = {
        "status": decision.status,
        "verdict": decision.verdict,
        "version": decision.version,
        "alias": decision.alias,
        "promoted": int(decision.promoted),
        "metric": decision.metric,
        "split": "test",
        "images": decision.images,
        "candidate_score": decision.candidate_score,
        "champion_version": decision.champion_version,
        "champion_score": decision.champion_score,
        "difference": c.get("difference"),
        "ci_low": c.get("low"),
        "ci_high": c.get("high"),
        "p_value": c.get("p_value"),
        "candidate_only": c.get("candidate_only"),
        "champion_only": c.get("champion_only"),
        "method": decision.method,
        "alpha": decision.alpha,
        "promote_if": decision.promote_if,
        "approval": decision.approval,
        "floor": decision.floor,
        "experiment": decision.experiment,
        "model_name": decision.model_name,
        "reason": decision.reason,
        "comparison": decision.comparison,
    }
    return report
