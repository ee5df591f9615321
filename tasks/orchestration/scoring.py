"""The scoring DAG's work: which drops are waiting, scoring one, and what drifted.

A **drop** is one batch of new, unlabelled images for a dataset, put in the scoring
inbox (``scoring.inbox``; a relative path is under the project's state dir):

- a folder ``<inbox>/<ds>/<drop>/``, or a zip file ``<inbox>/<ds>/<drop>.zip``;
- or, for an ``s3://bucket/prefix`` inbox, the objects under ``<prefix>/<ds>/<drop>/``.

A drop being copied in is named with a leading ``.`` or ``_`` (``_incoming-0107/``,
``.part.zip``) and renamed to its final name once complete: such names are never
listed, so a half-copied drop is never scored. A drop counts as scored once
``reports/<ds>/scoring/<drop>/scored.json`` exists under the state dir.

:func:`pending_drops` lists the drops to score, :func:`score_drop` runs
``python -m tasks score`` on one of them as a process (like a stage: the project's
tracking store, the output streamed to the task log, a failure as one line), and
:func:`drift_summary` makes the drift asset event's ``extra`` from the scored drops.

Imported when Airflow parses the DAG files: standard library and base modules only
(boto3 inside the function that lists an S3 inbox).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks.config import Config
from tasks.errors import StageFailed
from tasks.orchestration.dvc import workspace_command
from tasks.orchestration.project import SCORING_DAG_PREFIX, Project
from tasks.orchestration.records import stage_env

log = logging.getLogger(__name__)

HIDDEN = (".", "_")
"""Name prefixes of a drop still being copied in: never listed (rename it when complete)."""
SCORED = "scored.json"
"""The file the score command writes last for a drop: its presence means "scored"."""
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
"""Where an S3-compatible inbox is (MinIO, moto), first set wins; none: AWS itself."""


def dataset_inbox(project: Project, cfg: Config, dataset: str) -> str:
    """The dataset's inbox: ``s3://bucket/prefix/<ds>`` or an absolute folder path."""
    inbox = cfg.scoring.inbox.rstrip("/")
    if inbox.startswith("s3://"):
        return f"{inbox}/{dataset}"
    path = Path(inbox).expanduser()
    return str((path if path.is_absolute() else project.state / path) / dataset)


def scoring_reports(project: Project, dataset: str, drop: str) -> Path:
    """Where the score command writes a drop's reports (under the state dir)."""
    return project.reports / dataset / "scoring" / drop


def pending_drops(project: Project, cfg: Config, dataset: str, rescore: bool = False) -> list[str]:
    """The names of the drops in the dataset's inbox not scored yet, sorted.

    ``rescore``: every drop (the score command itself does nothing for a drop already
    scored by the same model version). A missing inbox folder has no drops.
    """
    inbox = dataset_inbox(project, cfg, dataset)
    found = _s3_drops(inbox) if inbox.startswith("s3://") else _local_drops(Path(inbox))
    drops = sorted(name for name in found if name and not name.startswith(HIDDEN))
    if not rescore:
        drops = [d for d in drops if not (scoring_reports(project, dataset, d) / SCORED).is_file()]
    log.info("%d drop(s) to score in %s: %s", len(drops), inbox, ", ".join(drops) or "none")
    return drops


def _local_drops(folder: Path) -> set[str]:
    if not folder.is_dir():
        log.info("no inbox folder %s yet: no drops", folder)
        return set()
    names = set()
    for entry in folder.iterdir():
        if entry.is_dir():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix.lower() == ".zip":
            names.add(entry.name[: -len(".zip")])
    return names


def s3_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return next((env[name] for name in S3_ENDPOINT_ENVS if env.get(name)), None)


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, f"{prefix.strip('/')}/" if prefix.strip("/") else ""


def _s3_drops(url: str) -> set[str]:
    """The sub-prefixes of ``url`` (one per drop), listed with boto3."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split_s3(url)
    client = boto3.client("s3", endpoint_url=s3_endpoint())
    names = set()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        )
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(prefix) :].rstrip("/"))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        retryable = code not in {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"}
        raise StageFailed(
            f"cannot list the drops in {url}: {code or error}; check scoring.inbox and the "
            "S3 credentials (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL_S3)",
            retryable=retryable,
        ) from None
    except BotoCoreError as error:
        raise StageFailed(f"cannot list the drops in {url}: {error}", retryable=True) from None
    return names


def drop_source(project: Project, cfg: Config, dataset: str, drop: str) -> str:
    """What ``python -m tasks score`` reads for ``drop``: its folder, zip or S3 prefix."""
    inbox = dataset_inbox(project, cfg, dataset)
    if inbox.startswith("s3://"):
        return f"{inbox}/{drop}/"
    folder = Path(inbox) / drop
    zipped = folder.with_name(f"{drop}.zip")
    return str(zipped if not folder.is_dir() and zipped.is_file() else folder)


def score_command(
    project: Project, dataset: str, source: str, drop: str, result: Path
) -> list[str]:
    """The score command's arguments after ``python -m``: reports under the state dir."""
    return [
        "tasks",
        "score",
        dataset,
        source,
        "--drop",
        drop,
        "--result-json",
        str(result),
        "--params",
        str(project.params),
        "--root",
        str(project.state),
    ]


def score_drop(
    project: Project, dataset: str, drop: str, cfg: Config | None = None
) -> dict[str, Any]:
    """Run ``python -m tasks score`` on one drop in the state dir; its result (for XCom).

    Raises :class:`StageFailed`: not retryable for the command's user-fixable error
    (exit 2, its ``error:`` line), retryable for a crash.
    """
    cfg = cfg or project.load_config()
    source = drop_source(project, cfg, dataset, drop)
    project.state.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="score-") as tmp:
        out = Path(tmp) / "result.json"
        args = score_command(project, dataset, source, drop, out)
        code, lines = workspace_command(project.state, args, env=score_env(project, cfg))
        if code:
            raise score_failure(dataset, drop, code, lines)
        if not out.is_file():
            raise StageFailed(f"score@{dataset} {drop}: no result written", retryable=True)
        result = json.loads(out.read_text())
    log.info("%s", describe(result))
    return result


def score_env(project: Project, cfg: Config) -> dict[str, str]:
    """A stage's environment, with the project's tracking store (``$TASKS_STORE_ROOT``, and
    ``$MLFLOW_TRACKING_URI``: the caller's, else ``tracking.uri``, else the state dir's)."""
    from tasks.tracking.store import tracking_uri

    env = stage_env({"store_root": str(project.state)})
    env["MLFLOW_TRACKING_URI"] = tracking_uri(cfg, project.state)
    return env


def score_failure(dataset: str, drop: str, code: int, lines: list[str]) -> StageFailed:
    """The command's last ``error:`` line (else its last line), and whether a retry could
    help: not after a user-fixable error (exit 2)."""
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    reason = errors[-1] if errors else (lines[-1] if lines else f"exit {code}, no output")
    return StageFailed(f"score@{dataset} {drop}: {reason}", retryable=code != 2)


def describe(result: Mapping[str, Any]) -> str:
    """One line for the task log: what was scored, with what, and the drift verdict."""
    head = f"{result.get('dataset')}/{result.get('drop')} with {result.get('model')} "
    head += f"v{result.get('version')}"
    if not result.get("scored"):
        return f"{head}: already scored by this version, nothing done"
    verdict = {True: "DRIFT", False: "no drift"}.get(result.get("drift"), "not tested")
    return (
        f"{head}: {result.get('images')} image(s) scored, {result.get('quarantined')} "
        f"quarantined; {verdict}; reports in {result.get('reports')}"
    )


def drift_summary(results: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The drift asset event's ``extra``: the drops this run scored that drifted, each with
    the tests that flagged it; None when none did.

    A drop the command did not score again (``scored`` false: already scored by the same
    version) raised its event when it was scored, and counts not here.
    """
    drifted = [r for r in results if r and r.get("scored") and r.get("drift") is True]
    if not drifted:
        return None
    drops = []
    for result in sorted(drifted, key=lambda r: str(r.get("drop"))):
        tests = {
            name: {key: test.get(key) for key in ("statistic", "p_value", "threshold")}
            for name, test in (result.get("summary") or {}).items()
            if test.get("drift")
        }
        drops.append(
            {
                "drop": result.get("drop"),
                "version": result.get("version"),
                "images": result.get("images"),
                "run_id": result.get("run_id"),
                "reports": result.get("reports"),
                "tests": tests,
            }
        )
    latest = max(drifted, key=lambda r: _version_key(r.get("version")))
    return {
        "dataset": latest.get("dataset"),
        "model": latest.get("model"),
        "version": latest.get("version"),
        "drops": [d["drop"] for d in drops],
        "flagged": sorted({name for d in drops for name in d["tests"]}),
        "details": drops,
    }


def _version_key(version: Any) -> tuple[int, str]:
    text = str(version)
    return (int(text), text) if text.isdigit() else (-1, text)


def check_all_scored(planned: list[str] | None, results: Iterable[Mapping[str, Any] | None]) -> str:
    """The last task: the run fails when a drop was not scored (its own task failed), after
    the drift event of the others was raised. Returns a one-line account."""
    if planned is None:
        raise StageFailed("find_drops failed: no drop was scored", retryable=False)
    done = {str(r.get("drop")) for r in results if r}
    missing = [drop for drop in planned if drop not in done]
    if missing:
        raise StageFailed(
            f"{len(missing)} of {len(planned)} drop(s) failed to score: {', '.join(missing)} "
            "(each has its own score task; fix it and clear that task, or let the next run "
            "pick it up)",
            retryable=False,
        )
    return f"{len(planned)} drop(s) scored" if planned else "no drops waiting"


def scoring_doc(project: Project, cfg: Config, dataset: str) -> str:
    """The scoring DAG's page in the Airflow UI."""
    inbox = dataset_inbox(project, cfg, dataset)
    return f"""\
### Scoring: `{dataset}`

`find_drops` → `score` (one mapped task per drop) → `drift_event` → `all_scored`

Every `{cfg.scoring.cron}` (`scoring.cron`), `find_drops` lists the drops in
`{inbox}/`: a folder `<drop>/` or a `<drop>.zip` (an `s3://` inbox: a prefix `<drop>/`).
Copy a drop in under a name starting with `.` or `_` and rename it when complete: such
names are never listed. A drop with `{project.reports / dataset / "scoring"}/<drop>/{SCORED}`
is already scored and is left out, unless the run's conf says `{{"rescore": true}}`
(the command still skips a drop the same model version already scored).

Each `score` task runs `python -m tasks score {dataset} <drop>` with the registry's
`{cfg.scoring.model}` model (`scoring.model`): predictions, quarantined images, drift tests
and an MLflow run; its reports go to `reports/{dataset}/scoring/<drop>/`.

`drift_event` raises an event of the asset `drift/{dataset}` (its extra: the drops that
drifted, the model version and the tests that flagged, with statistics and p-values)
when a drop drifted, and is skipped otherwise; it runs even when a drop failed.
With `schedule.retrain_on_drift: true` the event starts the `{dataset}` training DAG
(after its running run, if any). `all_scored` fails the run if any drop failed.
DAG ids: `{SCORING_DAG_PREFIX}<dataset>`.
"""
