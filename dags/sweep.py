"""``transfer_learning__sweep``: which backbone (recipe, learning rate) wins?

::

    plan >> pipeline[combination] (mapped) >> compare >> gate

Triggered with a conf naming what to compare (``{"backbones": [...], "datasets": [...]}``).
``plan`` checks it; each combination runs the dataset pipeline (prepare, every stage
but register, record, finish) in its own workspace, its GPU stages spread over the
GPU pool; ``compare`` writes the comparison table and Pareto plot; ``gate`` runs the
registry gate for the best combination of each dataset. docs/scheduling.md has more.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from airflow.sdk import DAG, get_current_context, task, task_group

from tasks.config import Config
from tasks.errors import StageError
from tasks.orchestration.backends import Backend
from tasks.orchestration.dag_docs import sweep_doc
from tasks.orchestration.dag_tasks import (
    START,
    TAG,
    fails_fast,
    indexed_workers,
    retry_args,
    stage_operator,
    task_args,
)
from tasks.orchestration.project import SWEEP_DAG_ID, Project

GROUP = "pipeline"
xcom_task = partial(task, multiple_outputs=False)


def lane_stage_task(
    project: Project, cfg: Config, stage: str, backend: Backend, combination: Any
) -> Any:
    """A combination's stage: a task mapped over the plan, or a pod/container per lane."""
    args = task_args(cfg, backend, stage)
    operator = stage_operator(project, cfg, "sweep", stage, backend, lane=True, **args)
    if operator is not None:
        return operator

    @xcom_task(task_id=stage, **args)
    @fails_fast(stage)
    def run_lane_stage(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.orchestration import sweep

        combo = sweep.Combination.from_xcom(combination)
        return sweep.run_lane_stage(project, combo, stage).xcom()

    return run_lane_stage(combination)


def lane_group(project: Project, cfg: Config, backend: Backend, stages: list[str]) -> Any:
    """The task group mapped over the plan: one combination's pipeline, ``prepare`` →
    every stage but register → ``record`` → ``finish``, in its own workspace."""

    @xcom_task(task_id="prepare", **retry_args(cfg, "prepare"))
    @fails_fast("prepare")
    def prepare_lane(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.orchestration import sweep

        run_id = get_current_context()["dag_run"].run_id
        combo = sweep.Combination.from_xcom(combination)
        return sweep.prepare_lane(project, combo, run_id).xcom()

    @xcom_task(task_id="record", **retry_args(cfg, "record"))
    @fails_fast("record")
    def record_lane(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.orchestration import experiments, sweep

        combo = sweep.Combination.from_xcom(combination)
        return experiments.record_experiment(combo.project(project), combo.dataset, stages).xcom()

    @xcom_task(task_id="finish", trigger_rule="all_done", **retry_args(cfg, "finish"))
    @fails_fast()
    def finish_lane(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.orchestration import parent_run, sweep

        combo = sweep.Combination.from_xcom(combination)
        ti = get_current_context()["ti"]
        results = {
            name: ti.xcom_pull(task_ids=f"{GROUP}.{name}", map_indexes=ti.map_index)
            for name in ["prepare", *stages, "record"]
        }
        return parent_run.finish_tasks(
            combo.project(project), combo.dataset, results, combo.tags, label=combo.key
        )

    @task_group(group_id=GROUP)
    def pipeline(combination: Any) -> None:
        chain = [prepare_lane(combination)]
        for stage in stages:
            chain.append(lane_stage_task(project, cfg, stage, backend, combination))
        chain += [record_lane(combination), finish_lane(combination)]
        for up, down in zip(chain, chain[1:], strict=False):
            up >> down

    return pipeline


def build_sweep_dag(project: Project, cfg: Config, backend: Backend | None = None) -> DAG:
    """Datasets × backbones (× learning rates) from the conf: one full pipeline per
    combination (a mapped task group), then a comparison, then the gate for the best."""
    backend = backend or Backend.from_env()
    stages = [s for s in project.stage_graph(next(iter(cfg.datasets))).names if s != "register"]
    jobs = max(indexed_workers(cfg, backend, stage) for stage in stages)
    with DAG(
        dag_id=SWEEP_DAG_ID,
        description="Compare backbones (and learning rates) on datasets: one pipeline each",
        schedule=None,
        start_date=START,
        catchup=False,
        max_active_runs=1,  # one sweep at a time; its combinations run in parallel
        tags=[TAG, "sweep"],
        doc_md=sweep_doc(project, GROUP, stages, backend, jobs),
        default_args={"owner": cfg.schedule.owner, **retry_args(cfg, "default")},
    ) as dag:

        @xcom_task()  # the DAG's retries: for a task the executor could not send
        @fails_fast()
        def plan() -> list[dict[str, Any]]:
            from tasks.orchestration import sweep

            dag_run = get_current_context()["dag_run"]
            combos = sweep.plan_sweep(project, dag_run.conf, dag_run.run_id)
            return [combo.xcom() for combo in combos]

        lanes = lane_group(project, cfg, backend, stages)

        @xcom_task(trigger_rule="all_done")
        @fails_fast(also=(StageError,))
        def compare() -> dict[str, Any]:
            from tasks.orchestration import sweep

            planned = get_current_context()["ti"].xcom_pull(task_ids="plan") or []
            combos = [sweep.Combination.from_xcom(c) for c in planned]
            return sweep.compare_sweep(project, combos).xcom()

        @xcom_task(**task_args(cfg, backend, "register"))
        @fails_fast()
        def gate() -> dict[str, Any]:
            from tasks.orchestration import sweep

            ti = get_current_context()["ti"]
            combos = [sweep.Combination.from_xcom(c) for c in ti.xcom_pull(task_ids="plan")]
            return sweep.gate_sweep(project, combos, ti.xcom_pull(task_ids="compare"))

        lanes.expand(combination=plan()) >> compare() >> gate()
    return dag


_project = Project.of_dag_file(__file__)
globals()[SWEEP_DAG_ID] = build_sweep_dag(_project, _project.load_config())
