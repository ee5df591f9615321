"""``register``: log the candidate as an MLflow model and promote it only if it earns it.

The candidate (``models/<ds>/candidate.json``) is logged inside the ``register``
child run as an MLflow model (TensorFlow flavor) and registered as
``<prefix><ds>-classifier``. The gate runs on the **held-out test split** (never
seen by training, early stopping or the frozen/fine-tuned choice), with the
current champion **re-scored now on the same test images** (a number stored
when it was promoted may come from other data). It becomes ``@champion`` only if

1. it reaches ``register.floor`` on ``register.metric``, and
2. a paired test on those images (``register.method``: McNemar's exact test, or
   a paired bootstrap interval of the difference; :mod:`tasks.ml.comparison`)
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

from tasks.artifacts import labelled_rows, load_model, read_candidate
from tasks.config import Config, RegisterConfig
from tasks.errors import StageError
from tasks.io import file_md5, write_json
from tasks.ml.comparison import BETTER, EQUIVALENT, WORSE, Comparison, compare
from tasks.paths import DatasetPaths
from tasks.tracking.lineage import current_experiment
from tasks.tracking.registry import (
    AWAITING_APPROVAL,
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    registered_model_name,
)
from tasks.tracking.runs import log_headline

__all__ = ["BETTER", "EQUIVALENT", "WORSE", "GateDecision", "gate_verdict", "run"]

if TYPE_CHECKING:
    import keras
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


_SLACK = 1e-9


PROMOTED, REJECTED, AWAITING = "promoted", "rejected", AWAITING_APPROVAL
FIRST, BELOW_FLOOR, INCOMPARABLE = "first", "below_floor", "incomparable"


def gate_verdict(
    cfg: RegisterConfig,
    candidate: float,
    comparison: Comparison | None,
    champion_version: str | None = None,
    note: str = "",
) -> tuple[bool, str, str]:
    """(whether the gate passes, the verdict word, the reason in one line).

    The verdict is the paired comparison's (``better``/``equivalent``/``worse``);
    without one it is ``first`` (no champion), ``incomparable`` (``note`` says
    why) or, below the floor, ``below_floor``. The floor applies in every case.
    """
    metric = cfg.metric
    floor = f"test {metric} {candidate:.4f} is below the floor {cfg.floor:.4f}"
    below = candidate + _SLACK < cfg.floor
    if comparison is None:
        if below:
            return False, BELOW_FLOOR, floor
        if champion_version is None:
            why, verdict = "no champion yet", FIRST
        else:
            why = note or f"champion v{champion_version} cannot be compared"
            verdict = INCOMPARABLE
        reaches = f"test {metric} {candidate:.4f} reaches the floor {cfg.floor:.4f}"
        return True, verdict, f"{reaches}; {why}"

    who = f"champion v{champion_version}"
    test = "McNemar's exact test" if cfg.method == "mcnemar" else "the paired bootstrap interval"
    by = f"by {test} (alpha {cfg.alpha:g})"
    evidence = comparison.evidence()
    verdict = comparison.verdict
    if verdict == WORSE:
        passed, reason = False, f"significantly worse than {who} {by}: {evidence}"
    elif verdict == BETTER:
        passed, reason = True, f"significantly better than {who} {by}: {evidence}"
    elif cfg.promote_if == "not_worse":
        passed = True
        reason = (
            f"equivalent to {who} {by}: not significantly worse, so it takes over "
            f"(register.promote_if: not_worse); {evidence}"
        )
    else:
        passed = False
        reason = (
            f"equivalent to {who} {by}: no significant difference, so {who} stays "
            f"(register.promote_if: better); {evidence}"
        )
    if below:
        return False, verdict, f"{floor}; and {reason}"
    return passed, verdict, reason


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
        label = {PROMOTED: "PROMOTED", REJECTED: "NOT PROMOTED", AWAITING: "AWAITING APPROVAL"}
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
        if self.status == AWAITING:
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

    return predict_rows(model, frame, paths.raw, classes, batch)


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

    from tasks.ml.images import read_image
    from tasks.ml.metrics import classification_metrics
    from tasks.ml.model import model_image_size
    from tasks.tracking.models import log_classifier
    from tasks.tracking.registry import current_alias
    from tasks.tracking.runs import phase_run

    # Score the candidate on the held-out test rows
    classes = list(cfg.dataset(paths.dataset).classes)
    gate = cfg.gate
    name = registered_model_name(cfg, paths.dataset)
    model_path, record = read_candidate(paths)
    frame = labelled_rows(paths, "test", classes)
    y_true = frame["label_index"].to_numpy()
    model = load_model(model_path)
    batch = cfg.train.batch_size
    candidate_probs = _predict(model, frame, paths, classes, batch)
    candidate_metrics = classification_metrics(y_true, candidate_probs, classes)
    candidate_score = candidate_metrics[gate.metric]
    if candidate_score is None:
        raise StageError(
            f"register.metric {gate.metric} is undefined on this test data (one class "
            "only?); pick accuracy or f1_macro in params.yaml"
        )
    source = {
        "path": model_path.relative_to(paths.root).as_posix(),
        "md5": file_md5(model_path),
        "phase": str(record.get("phase")),
    }

    with phase_run(cfg, paths, "register", last=True) as run:
        # Re-score the champion on the same rows, log the candidate, decide
        client = MlflowClient()
        champion = current_alias(client, name, CHAMPION)
        comparison, note = None, ""
        if champion is not None:
            champion_probs, note = _rescore_champion(champion, name, frame, paths, classes, batch)
            if champion_probs is not None:
                comparison = compare(
                    y_true,
                    candidate_probs,
                    champion_probs,
                    metric=gate.metric,
                    method=gate.method,
                    alpha=gate.alpha,
                    resamples=gate.bootstrap_samples,
                    seed=gate.seed,
                )
        example = read_image(paths.raw / frame["path"].iloc[0], model_image_size(model))[None]
        version = log_classifier(
            model,
            classes,
            example,
            name,
            metadata={
                "dataset": paths.dataset,
                "source": source["path"],
                "source_md5": source["md5"],
            },
        )
        champion_version = None if champion is None else str(champion.version)
        passed, verdict, reason = gate_verdict(
            gate, float(candidate_score), comparison, champion_version, note
        )
        status = REJECTED
        if passed:
            status = AWAITING if gate.approval == "human" else PROMOTED
        if status == AWAITING:
            reason += "; it waits at @challenger for approval (register.approval: human)"
        decision = GateDecision(
            model_name=name,
            version=str(version.version),
            status=status,
            alias=CHAMPION if status == PROMOTED else CHALLENGER,
            verdict=verdict,
            metric=gate.metric,
            candidate_score=float(candidate_score),
            champion_version=champion_version,
            champion_score=None if comparison is None else comparison.champion,
            floor=gate.floor,
            method=gate.method,
            alpha=gate.alpha,
            promote_if=gate.promote_if,
            approval=gate.approval,
            images=len(frame),
            reason=reason,
            run_id=run.info.run_id,
            comparison=None if comparison is None else comparison.as_dict(),
            experiment=current_experiment(),
        )

        # Move the aliases and record the decision everywhere it is looked for
        _move_aliases(client, decision)
        _record_decision(client, decision, source, candidate_metrics)
        write_json(paths.gate, gate_report(decision))
        mlflow.log_artifact(str(paths.gate))
    return decision


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
