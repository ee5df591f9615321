"""``transfer_learning__summary``: the champion of every dataset, in one report.

Runs whenever any dataset DAG's ``record`` updates its model asset; writes
``reports/summary.md`` and ``summary.json`` (per dataset: the ``@champion`` in the
MLflow registry with its metrics, and the latest run's gate).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, AssetAny, task

from tasks.config import Config
from tasks.orchestration.dag_docs import summary_doc
from tasks.orchestration.dag_tasks import START, TAG, model_asset, retry_args
from tasks.orchestration.project import SUMMARY_DAG_ID, Project


def build_summary_dag(project: Project, cfg: Config) -> DAG:
    """Runs when any dataset's model asset updates; writes reports/summary.md and .json."""
    with DAG(
        dag_id=SUMMARY_DAG_ID,
        description="Champion model per dataset, with its metrics (reports/summary.md)",
        schedule=AssetAny(*(model_asset(project, ds) for ds in cfg.datasets)),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=[TAG, "summary"],
        doc_md=summary_doc(project),
        default_args={"owner": cfg.schedule.owner, **retry_args(cfg, "summary")},
    ) as dag:

        @task(multiple_outputs=False)
        def write_summary() -> dict[str, Any]:
            from tasks.orchestration import summary

            return summary.write_summary(project).xcom()

        write_summary()
    return dag


_project = Project.of_dag_file(__file__)
globals()[SUMMARY_DAG_ID] = build_summary_dag(_project, _project.load_config())
