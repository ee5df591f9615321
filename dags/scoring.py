"""One scoring DAG per dataset in params.yaml: ``scoring__<dataset>``.

::

    find_drops >> score[drop] (mapped: one task per drop) >> drift_event >> all_scored

On ``scoring.cron``, ``find_drops`` lists the drops waiting in the dataset's inbox
(``scoring.inbox``); each ``score`` task runs ``python -m tasks score`` on one drop
with the ``scoring.model`` model; ``drift_event`` updates the asset ``drift/<dataset>``
(the drifted drops, model version and flagging tests in the event's extra) when a drop
drifted, and is skipped otherwise (a skipped task raises no asset event); it runs
whatever the score tasks did, so a failed drop hides no other drop's drift.
``all_scored`` then fails the run if a drop failed. No drops: ``score`` expands to no
task and ``drift_event`` skips. The conf ``{"rescore": true}`` lists every drop.

With ``schedule.retrain_on_drift``, the drift asset also schedules the dataset's
training DAG (``dags/datasets.py``). Wiring only: each task calls one function of
``tasks.orchestration.scoring``; docs/scheduling.md has more.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task

from tasks.config import Config
from tasks.orchestration.dag_tasks import START, TAG, drift_asset, fails_fast, retry_args
from tasks.orchestration.project import SCORING_DAG_PREFIX, Project
from tasks.orchestration.scoring import scoring_doc

xcom_task = partial(task, multiple_outputs=False)


def build_scoring_dag(project: Project, cfg: Config, dataset: str) -> DAG:
    """find_drops → score (mapped over the drops) → drift_event → all_scored."""
    cfg.dataset(dataset)
    asset = drift_asset(dataset)
    with DAG(
        dag_id=f"{SCORING_DAG_PREFIX}{dataset}",
        description=f"Score new drops of {dataset} with the champion; raise drift/{dataset}",
        schedule=cfg.scoring.cron,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=[TAG, "scoring", dataset],
        doc_md=scoring_doc(project, cfg, dataset),
        params={
            "rescore": Param(
                False,
                type="boolean",
                title="Rescore",
                description="List every drop, not only the unscored ones (a drop already "
                "scored by the same model version is still not scored again)",
            )
        },
        default_args={"owner": cfg.schedule.owner, **retry_args(cfg, "default")},
    ) as dag:

        @xcom_task(**retry_args(cfg, "find_drops"))
        @fails_fast("find_drops")
        def find_drops() -> list[str]:
            from tasks.orchestration import scoring

            rescore = bool(get_current_context()["params"].get("rescore"))
            return scoring.pending_drops(project, cfg, dataset, rescore=rescore)

        @xcom_task(map_index_template="{{ drop_name }}", **retry_args(cfg, "score"))
        @fails_fast("score")
        def score(drop: str) -> dict[str, Any]:
            from tasks.orchestration import scoring

            get_current_context()["drop_name"] = drop  # type: ignore[typeddict-unknown-key]
            return scoring.score_drop(project, dataset, drop, cfg)

        @xcom_task(trigger_rule="all_done", outlets=[asset])
        def drift_event(results: Any) -> dict[str, Any]:
            from airflow.sdk.exceptions import AirflowSkipException

            from tasks.orchestration import scoring

            summary = scoring.drift_summary(results[:])  # one request: every drop's result
            if summary is None:
                raise AirflowSkipException("no drop drifted: no drift event")
            get_current_context()["outlet_events"][asset].extra = summary
            return summary

        @xcom_task(trigger_rule="all_done")
        @fails_fast()
        def all_scored(results: Any) -> str:
            from tasks.orchestration import scoring

            planned = get_current_context()["ti"].xcom_pull(task_ids="find_drops")
            return scoring.check_all_scored(planned, results[:])

        scored = score.expand(drop=find_drops())
        drift_event(scored) >> all_scored(scored)
    return dag


def build_scoring_dags(project: Project) -> dict[str, DAG]:
    """One scoring DAG per dataset of the project's params.yaml."""
    cfg = project.load_config()
    return {f"{SCORING_DAG_PREFIX}{ds}": build_scoring_dag(project, cfg, ds) for ds in cfg.datasets}


globals().update(build_scoring_dags(Project.of_dag_file(__file__)))
