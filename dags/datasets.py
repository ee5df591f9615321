"""One DAG per dataset in params.yaml: ``transfer_learning__<dataset>``.

::

    prepare >> download >> validate >> train >> finetune >> evaluate >> register
            >> record >> finish
    register >> needs_approval >> approve >> promote

``prepare`` checks the run conf and brings the dataset's workspace (a git checkout
of the deployed commit) to that commit; each stage task runs its DVC stage there
(``dvc repro --single-item <stage>@<dataset>``); ``record`` saves the run as a DVC
experiment and updates the dataset's model asset; ``finish`` ends the MLflow parent
run with the outcome. With ``register.approval: human`` a candidate the gate passed
waits for a person (``approve``). A new dataset in params.yaml is a new DAG.
With ``schedule.retrain_on_drift`` a drift event of the dataset's scoring DAG (the asset
``drift/<dataset>``, ``dags/scoring.py``) starts it too, after a running run.

Wiring only: each task calls one function of ``tasks.orchestration``. Where the GPU
stages run (``TASKS_GPU_BACKEND``) and the other parse-time settings:
docs/scheduling.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from airflow.sdk import DAG, get_current_context, task

from tasks.config import Config
from tasks.orchestration.backends import Backend
from tasks.orchestration.dag_docs import dataset_doc
from tasks.orchestration.dag_tasks import (
    START,
    TAG,
    fails_fast,
    indexed_workers,
    model_asset,
    retry_args,
    stage_operator,
    task_args,
    training_schedule,
)
from tasks.orchestration.project import DAG_PREFIX, Project

xcom_task = partial(task, multiple_outputs=False)


def stage_task(project: Project, cfg: Config, dataset: str, stage: str, backend: Backend) -> Any:
    """The task running one DVC stage: on the worker, or as a pod/container."""
    args = task_args(cfg, backend, stage)
    operator = stage_operator(project, cfg, dataset, stage, backend, **args)
    if operator is not None:
        return operator

    @xcom_task(task_id=stage, **args)
    @fails_fast(stage)
    def run_stage() -> dict[str, Any]:
        from tasks.orchestration import dvc

        return dvc.run_stage(project, dataset, stage).xcom()

    return run_stage().operator


def approval_tasks(project: Project, dataset: str) -> Any:
    """``needs_approval >> approve >> promote``: a person's answer on a gated candidate."""
    from airflow.providers.standard.operators.hitl import HITLOperator
    from airflow.sdk import Param

    from tasks.orchestration import review

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def needs_approval() -> bool:
        return review.needs_review(get_current_context()["ti"].xcom_pull(task_ids="register"))

    approve = HITLOperator(
        task_id="approve",
        subject=review.APPROVAL_SUBJECT,
        body=review.APPROVAL_BODY,
        options=[review.APPROVE, review.REJECT],
        params={
            "reason": Param(
                None,
                type=["null", "string"],
                title="Reason",
                description="Why (required to reject; recorded with the decision)",
            )
        },
        retries=0,
    )

    @xcom_task(retries=0)
    @fails_fast()
    def promote() -> dict[str, Any]:
        ti = get_current_context()["ti"]
        version = ((ti.xcom_pull(task_ids="register") or {}).get("metrics") or {})["version"]
        answer = ti.xcom_pull(task_ids="approve")
        return review.apply_review(project, dataset, version, answer).xcom()

    first = needs_approval().operator
    first >> approve >> promote().operator
    return first


def build_dataset_dag(
    project: Project, cfg: Config, dataset: str, backend: Backend | None = None
) -> DAG:
    """The DAG of one dataset: prepare, one task per DVC stage, record, finish."""
    backend = backend or Backend.from_env()
    cfg.dataset(dataset)
    graph = project.stage_graph(dataset)
    jobs = max(indexed_workers(cfg, backend, stage) for stage in graph.names)
    with DAG(
        dag_id=f"{DAG_PREFIX}{dataset}",
        description=f"Transfer learning on {dataset}: download, validate, train, register",
        schedule=training_schedule(cfg, dataset),  # or drift/<ds>: retrain_on_drift
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=[TAG, dataset],
        doc_md=dataset_doc(project, dataset, graph.names, backend, jobs),
        default_args={"owner": cfg.schedule.owner, **retry_args(cfg, "default")},
    ) as dag:

        @xcom_task(**retry_args(cfg, "prepare"))
        @fails_fast("prepare")
        def prepare() -> dict[str, Any]:
            from tasks.orchestration import workspace

            dag_run = get_current_context()["dag_run"]
            return workspace.prepare_workspace(
                project, dataset, dag_run.conf, run_id=dag_run.run_id
            ).xcom()

        @xcom_task(outlets=[model_asset(project, dataset)], **retry_args(cfg, "record"))
        @fails_fast("record")
        def record() -> dict[str, Any]:
            from tasks.orchestration import experiments

            result = experiments.record_experiment(project, dataset).xcom()
            context = get_current_context()
            headline = experiments.headline(
                dataset,
                context["dag_run"].run_id,
                result["name"],
                context["ti"].xcom_pull(task_ids=graph.leaves),
            )
            context["outlet_events"][model_asset(project, dataset)].extra = headline
            return {**result, "headline": headline}

        @xcom_task(trigger_rule="all_done", **retry_args(cfg, "finish"))
        @fails_fast()
        def finish() -> dict[str, Any]:
            from tasks.orchestration import parent_run

            ti = get_current_context()["ti"]
            names = ["prepare", *graph.names, "record"]
            return parent_run.finish_tasks(
                project, dataset, {name: ti.xcom_pull(task_ids=name) for name in names}
            )

        stages = {stage: stage_task(project, cfg, dataset, stage, backend) for stage in graph.names}
        first = prepare().operator
        for stage in graph.names:
            for up in sorted(graph.upstream[stage]) or [None]:
                (stages[up] if up else first) >> stages[stage]
        last = record().operator
        for leaf in graph.leaves:
            stages[leaf] >> last
        last >> finish().operator
        if "register" in stages:
            stages["register"] >> approval_tasks(project, dataset)
    return dag


def build_dataset_dags(project: Project, backend: Backend | None = None) -> dict[str, DAG]:
    """One DAG per dataset of the project's params.yaml."""
    cfg = project.load_config()
    return {
        f"{DAG_PREFIX}{ds}": build_dataset_dag(project, cfg, ds, backend) for ds in cfg.datasets
    }


globals().update(build_dataset_dags(Project.of_dag_file(__file__)))
