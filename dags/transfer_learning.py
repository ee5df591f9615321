"""Transfer-learning DAGs: one per dataset in params.yaml, plus a cross-dataset summary.

Wiring only; every task calls one function of ``tasks.orchestration``.

``transfer_learning__<dataset>``::

    prepare >> download >> validate >> train >> finetune >> evaluate >> register
            >> record >> finish
    register >> needs_approval >> approve >> promote

- ``prepare`` validates the run conf (see ``tasks.orchestration.runconf.CONF_KEYS``),
  brings the dataset's workspace (``.workspaces/<dataset>``, a git checkout of
  the deployed commit) to that commit, writes its params.yaml and opens the
  run's MLflow parent run;
- one task per DVC stage, in dvc.yaml's order (read from dvc.yaml's deps and
  outs, so a new stage is a new task), each running
  ``dvc repro --single-item <stage>@<dataset>`` in the workspace (shared DVC
  cache, run cache and MLflow store), so DVC skips unchanged stages;
- ``record`` saves the run as a DVC experiment (``<dataset>-<run id>``), pushes
  it to the project's git repository and its outputs to the DVC remote, and
  updates the dataset's model Asset;
- ``finish`` (whatever happened before it) ends the MLflow parent run with the
  outcome: FINISHED with the experiment's name, or FAILED naming the task;
- with ``register.approval: human`` (params.yaml or the run conf), a candidate
  the gate passed waits at ``@challenger``: ``needs_approval`` lets the run go
  on to ``approve``, an Airflow human-in-the-loop task showing the gate report
  (Approve / Reject with a reason), and ``promote`` applies the answer
  (``tasks.orchestration.review``). Otherwise (``auto``, or a refused
  candidate) ``needs_approval`` skips both;
- a new dataset in params.yaml is a new DAG, with no code.

``transfer_learning__summary`` runs whenever any dataset's model Asset updates
and writes ``reports/summary.md`` / ``.json`` (champion per dataset).

Parse-time configuration (environment, never Airflow Variables):
``TASKS_PROJECT``/``TASKS_PARAMS``/``TASKS_STATE_DIR`` (see tasks/orchestration/project.py);
``TASKS_GPU_BACKEND`` = ``local`` (default) | ``kubernetes`` | ``docker`` for the
GPU stages ``TASKS_GPU_STAGES`` (default ``train,finetune``); ``TASKS_GPU_POOL``
(default ``gpu``, sized by ``schedule.gpus``); ``TASKS_GPU_QUEUE`` (Celery
queue of GPU workers; ``gpu`` by default under CeleryExecutor);
``TASKS_TRAINER_IMAGE``, ``TASKS_GPUS_PER_TASK``, ``TASKS_K8S_NAMESPACE``,
``TASKS_K8S_PVC``, ``TASKS_K8S_STATE_PVC`` (the claim at ``TASKS_STATE_DIR`` when
that is outside ``TASKS_PROJECT``), ``TASKS_K8S_NODE_SELECTOR`` (JSON),
``TASKS_K8S_TOLERATIONS`` (JSON list), ``TASKS_DOCKER_URL``;
``TASKS_RETRY_DELAY_SECONDS`` (first retry wait).

Nothing heavy at import: no tensorflow, great_expectations or mlflow; the
kubernetes/docker providers are imported only when their backend is chosen.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, AssetAny, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException

from tasks.config import Config
from tasks.errors import ConfigError
from tasks.orchestration.backends import Backend, SweepLane, docker_stage, kubernetes_stage
from tasks.orchestration.dvc import NO_RETRY_STAGES
from tasks.orchestration.project import DAG_PREFIX, SUMMARY_DAG_ID, SWEEP_DAG_ID, Project
from tasks.orchestration.runconf import CONF_KEYS

TAG = "transfer-learning"
START = datetime(2025, 1, 1, tzinfo=UTC)


def model_asset(project: Project, dataset: str) -> Asset:
    """The dataset's model output: updated by the ``record`` task of its DAG."""
    return Asset(name=project.asset_name(dataset), uri=project.asset_uri(dataset), group="model")


# --- task callables (a few lines each: the work is in tasks/) ------------------


def _prepare_callable(project: Project, dataset: str) -> Any:
    def prepare_workspace() -> dict[str, Any]:
        from tasks.orchestration.workspace import prepare_workspace

        dag_run = get_current_context()["dag_run"]
        try:
            prepared = prepare_workspace(project, dataset, dag_run.conf, run_id=dag_run.run_id)
        except ConfigError as error:
            raise AirflowFailException(str(error)) from None
        return prepared.xcom()

    return prepare_workspace


def _stage_callable(project: Project, dataset: str, stage: str) -> Any:
    def run_dvc_stage() -> dict[str, Any]:
        from tasks.errors import StageFailed
        from tasks.orchestration.dvc import run_stage, should_retry

        try:
            return run_stage(project, dataset, stage).xcom()
        except StageFailed as error:
            if not should_retry(stage, error):
                raise AirflowFailException(str(error)) from None
            raise

    return run_dvc_stage


def _record_callable(project: Project, dataset: str, leaves: list[str]) -> Any:
    def record_experiment() -> dict[str, Any]:
        from tasks.orchestration.experiments import record_experiment

        result = record_experiment(project, dataset).xcom()
        context = get_current_context()
        headline: dict[str, Any] = {
            "dataset": dataset,
            "dag_run_id": context["dag_run"].run_id,
            "experiment": result["name"],
        }
        for value in context["ti"].xcom_pull(task_ids=leaves) or []:
            if isinstance(value, dict):
                headline.update(value.get("metrics") or {})
        context["outlet_events"][model_asset(project, dataset)].extra = headline
        return {**result, "headline": headline}

    return record_experiment


def _finish_callable(project: Project, dataset: str, tasks_in_order: list[str]) -> Any:
    def end_pipeline_run() -> dict[str, Any]:
        from tasks.orchestration.experiments import finish_pipeline

        ti = get_current_context()["ti"]
        results = {name: ti.xcom_pull(task_ids=name) for name in tasks_in_order}
        failed = next((name for name, value in results.items() if value is None), None)
        outcome = finish_pipeline(project, dataset, results["prepare"], failed)
        if failed:
            raise AirflowFailException(outcome.message)
        return outcome.xcom()

    return end_pipeline_run


def _needs_approval_callable() -> Any:
    def needs_approval() -> bool:
        from tasks.orchestration.review import needs_review

        return needs_review(get_current_context()["ti"].xcom_pull(task_ids="register"))

    return needs_approval


def _promote_callable(project: Project, dataset: str) -> Any:
    def apply_review() -> dict[str, Any]:
        from tasks.errors import StageFailed
        from tasks.orchestration.review import apply_review

        ti = get_current_context()["ti"]
        gate = (ti.xcom_pull(task_ids="register") or {}).get("metrics") or {}
        try:
            result = apply_review(
                project, dataset, gate["version"], ti.xcom_pull(task_ids="approve")
            )
        except StageFailed as error:
            raise AirflowFailException(str(error)) from None
        return result.xcom()

    return apply_review


def _approval_tasks(project: Project, dataset: str) -> tuple[Any, Any]:
    """``needs_approval >> approve >> promote``: the human-in-the-loop step."""
    from airflow.providers.standard.operators.hitl import HITLOperator
    from airflow.sdk import Param

    from tasks.orchestration.review import APPROVAL_BODY, APPROVAL_SUBJECT, APPROVE, REJECT

    gate = task.short_circuit(
        _needs_approval_callable(), task_id="needs_approval", ignore_downstream_trigger_rules=False
    )().operator
    approve = HITLOperator(
        task_id="approve",
        subject=APPROVAL_SUBJECT,
        body=APPROVAL_BODY,
        options=[APPROVE, REJECT],
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
    promote = task(
        _promote_callable(project, dataset), task_id="promote", multiple_outputs=False, retries=0
    )().operator
    gate >> approve >> promote
    return gate, promote


def _summary_callable(project: Project) -> Any:
    def summarize_champions() -> dict[str, Any]:
        from tasks.orchestration.summary import write_summary

        return write_summary(project).xcom()

    return summarize_champions


# --- the sweep's task callables -----------------------------------------------------


def _plan_callable(project: Project) -> Any:
    def plan_sweep() -> list[dict[str, Any]]:
        from tasks.orchestration.sweep import plan_sweep

        dag_run = get_current_context()["dag_run"]
        try:
            combos = plan_sweep(project, dag_run.conf, dag_run.run_id)
        except ConfigError as error:
            raise AirflowFailException(str(error)) from None
        return [combo.xcom() for combo in combos]

    return plan_sweep


def _lane_prepare_callable(project: Project) -> Any:
    def prepare_lane(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.orchestration.sweep import Combination, prepare_lane

        dag_run = get_current_context()["dag_run"]
        combo = Combination.from_xcom(combination)
        try:
            return prepare_lane(project, combo, dag_run.run_id).xcom()
        except ConfigError as error:
            raise AirflowFailException(f"{combo.key}: {error}") from None

    return prepare_lane


def _lane_stage_callable(project: Project, stage: str) -> Any:
    def run_lane_stage(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.errors import StageFailed
        from tasks.orchestration.dvc import should_retry
        from tasks.orchestration.sweep import Combination, run_lane_stage

        try:
            return run_lane_stage(project, Combination.from_xcom(combination), stage).xcom()
        except StageFailed as error:
            if not should_retry(stage, error):
                raise AirflowFailException(str(error)) from None
            raise

    return run_lane_stage


def _lane_record_callable(project: Project, stages: list[str]) -> Any:
    def record_lane(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.orchestration.experiments import record_experiment
        from tasks.orchestration.sweep import Combination

        combo = Combination.from_xcom(combination)
        return record_experiment(combo.project(project), combo.dataset, stages).xcom()

    return record_lane


def _lane_finish_callable(project: Project, group: str, tasks_in_order: list[str]) -> Any:
    def end_lane(combination: dict[str, Any]) -> dict[str, Any]:
        from tasks.orchestration.experiments import finish_pipeline
        from tasks.orchestration.sweep import Combination

        combo = Combination.from_xcom(combination)
        ti = get_current_context()["ti"]
        results = {
            name: ti.xcom_pull(task_ids=f"{group}.{name}", map_indexes=ti.map_index)
            for name in tasks_in_order
        }
        failed = next((name for name, value in results.items() if value is None), None)
        outcome = finish_pipeline(
            combo.project(project), combo.dataset, results["prepare"], failed, combo.tags
        )
        if failed:
            raise AirflowFailException(f"{combo.key}: {outcome.message}")
        return outcome.xcom()

    return end_lane


def _compare_callable(project: Project) -> Any:
    def compare_sweep() -> dict[str, Any]:
        from tasks.errors import StageError
        from tasks.orchestration.sweep import Combination, compare_sweep

        plan = get_current_context()["ti"].xcom_pull(task_ids="plan") or []
        try:
            return compare_sweep(project, [Combination.from_xcom(c) for c in plan]).xcom()
        except StageError as error:
            raise AirflowFailException(str(error)) from None

    return compare_sweep


def _gate_callable(project: Project) -> Any:
    def gate_best() -> dict[str, Any]:
        from tasks.errors import StageFailed
        from tasks.orchestration.sweep import Combination, gate_best

        ti = get_current_context()["ti"]
        plan = [Combination.from_xcom(c) for c in ti.xcom_pull(task_ids="plan")]
        comparison = ti.xcom_pull(task_ids="compare")
        try:
            gated = gate_best(project, plan, comparison["best"])
        except StageFailed as error:
            raise AirflowFailException(str(error)) from None
        failed = [row["combination"] for row in comparison["rows"] if row["status"] != "ok"]
        if failed:  # the sweep run fails, after the rest was compared and gated
            raise AirflowFailException(
                f"sweep: {len(failed)} of {len(plan)} combinations failed ({', '.join(failed)}); "
                f"the others were compared in {comparison['folder']} and the best gated"
            )
        return gated

    return gate_best


# --- the factory -------------------------------------------------------------------


def _retry_args(cfg: Config, stage: str) -> dict[str, Any]:
    if stage in NO_RETRY_STAGES:
        return {"retries": 0}
    delay = float(os.environ.get("TASKS_RETRY_DELAY_SECONDS", "60"))
    return {
        "retries": cfg.schedule.retries,
        "retry_delay": timedelta(seconds=delay),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    }


def _doc(project: Project, dataset: str, stages: list[str], backend: Backend) -> str:
    conf_keys = "\n".join(f"| `{key}` | `{dotted}` |" for key, dotted in CONF_KEYS.items())
    ws = project.workspace(dataset)
    return f"""\
### Transfer learning: `{dataset}`

`prepare` → {" → ".join(f"`{s}`" for s in stages)} → `record` → `finish`

The workspace `{ws}` is a git checkout of the deployed commit. Each stage task
runs `dvc repro --single-item <stage>@{dataset}` there (unchanged stages are
skipped or restored from the shared run cache), sharing the project's DVC cache
and MLflow store. `record` saves the run as the DVC experiment
`{dataset}-<run id>` (`dvc exp show` in the project lists it; `dvc exp apply` +
`dvc pull` restores it), pushes its outputs to the DVC remote and updates the
`{DAG_PREFIX}{dataset}.model` asset, which triggers `{SUMMARY_DAG_ID}`. `finish`
ends the run's MLflow parent run with the outcome.
GPU stages ({", ".join(sorted(backend.gpu_stages))}) run on the `{backend.kind}`
backend in pool `{backend.pool}`.

**Per-run overrides** (trigger with conf), validated like params.yaml; the
checked-in params.yaml is not modified and MLflow records them (`overrides` tag):

| conf key | params key |
|---|---|
{conf_keys}

Any other key: `{{"set": {{"train.epochs": 3}}}}`. Example:
`{{"backbone": "vgg16", "finetune_epochs": 5}}`.

Results: `{ws / "reports" / dataset}`, models in `{ws / "models" / dataset}`,
MLflow experiment `{dataset}`, registered model `{dataset}-classifier`.
"""


def build_dataset_dag(
    project: Project, cfg: Config, dataset: str, backend: Backend | None = None
) -> DAG:
    """The DAG of one dataset: prepare, one task per DVC stage, record, finish."""
    backend = backend or Backend.from_env()
    cfg.dataset(dataset)
    graph = project.stage_graph(dataset)
    asset = model_asset(project, dataset)
    with DAG(
        dag_id=f"{DAG_PREFIX}{dataset}",
        description=f"Transfer learning on {dataset}: download, validate, train, register",
        schedule=cfg.schedule.cron,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=[TAG, dataset],
        doc_md=_doc(project, dataset, graph.names, backend),
        default_args={"owner": cfg.schedule.owner, **_retry_args(cfg, "default")},
    ) as dag:
        prepare = task(
            _prepare_callable(project, dataset),
            task_id="prepare",
            multiple_outputs=False,
            **_retry_args(cfg, "prepare"),
        )().operator
        stage_tasks: dict[str, Any] = {}
        for stage in graph.names:
            args = _retry_args(cfg, stage)
            if stage in backend.gpu_stages:
                args.update(pool=backend.pool, pool_slots=1)
                if backend.queue and backend.kind == "local":
                    args["queue"] = backend.queue
            if stage in backend.gpu_stages and backend.kind == "kubernetes":
                stage_tasks[stage] = kubernetes_stage(project, dataset, stage, backend, **args)
            elif stage in backend.gpu_stages and backend.kind == "docker":
                stage_tasks[stage] = docker_stage(project, dataset, stage, backend, **args)
            else:
                stage_tasks[stage] = task(
                    _stage_callable(project, dataset, stage),
                    task_id=stage,
                    multiple_outputs=False,
                    **args,
                )().operator
        record = task(
            _record_callable(project, dataset, graph.leaves),
            task_id="record",
            multiple_outputs=False,
            outlets=[asset],
            **_retry_args(cfg, "record"),
        )().operator
        finish = task(
            _finish_callable(project, dataset, ["prepare", *graph.names, "record"]),
            task_id="finish",
            multiple_outputs=False,
            trigger_rule="all_done",
            retries=0,
        )().operator
        for stage in graph.names:
            ups = graph.upstream[stage]
            if not ups:
                prepare >> stage_tasks[stage]
            for up in sorted(ups):
                stage_tasks[up] >> stage_tasks[stage]
        for leaf in graph.leaves:
            stage_tasks[leaf] >> record
        record >> finish
        if "register" in stage_tasks:
            first, _ = _approval_tasks(project, dataset)
            stage_tasks["register"] >> first
    return dag


def build_summary_dag(project: Project, cfg: Config) -> DAG:
    """Runs when any dataset's model asset updates; writes reports/summary.md and .json."""
    assets = [model_asset(project, ds) for ds in cfg.datasets]
    with DAG(
        dag_id=SUMMARY_DAG_ID,
        description="Champion model per dataset, with its metrics (reports/summary.md)",
        schedule=AssetAny(*assets),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=[TAG, "summary"],
        doc_md=f"""\
### Transfer learning: summary

Triggered by any dataset DAG's model asset. Writes
`{project.reports / "summary.md"}` and `summary.json`: per dataset, the current
`@champion` in the MLflow registry with its metrics, and the latest run's gate.
""",
        default_args={"owner": cfg.schedule.owner, **_retry_args(cfg, "summary")},
    ) as dag:
        task(_summary_callable(project), task_id="write_summary", multiple_outputs=False)()
    return dag


def _gpu_args(backend: Backend, stage: str, args: dict[str, Any]) -> dict[str, Any]:
    """A GPU stage's pool slot (and Celery queue): what spreads them over GPU workers."""
    if stage in backend.gpu_stages:
        args.update(pool=backend.pool, pool_slots=1)
        if backend.queue and backend.kind == "local":
            args["queue"] = backend.queue
    return args


def build_sweep_dag(project: Project, cfg: Config, backend: Backend | None = None) -> DAG:
    """Datasets × backbones (× learning rates) from the conf: one full pipeline per
    combination (a mapped task group), then a comparison, then the gate for the best."""
    backend = backend or Backend.from_env()
    first = next(iter(cfg.datasets))
    stages = [s for s in project.stage_graph(first).names if s != "register"]
    group_id = "pipeline"
    with DAG(
        dag_id=SWEEP_DAG_ID,
        description="Compare backbones (and learning rates) on datasets: one pipeline each",
        schedule=None,
        start_date=START,
        catchup=False,
        max_active_runs=1,  # one sweep at a time; its combinations run in parallel
        tags=[TAG, "sweep"],
        doc_md=f"""\
### Transfer learning: sweep

Trigger with a conf naming what to compare, e.g.
`{{"backbones": ["mobilenet_v2", "efficientnet_b0"], "datasets": ["cats_vs_dogs"]}}`
(optional: `"learning_rates": [0.001, 0.0001]`, `"set": {{"train.epochs": 5}}` for every
combination, `"per_backbone": {{"inception_v3": {{"train.image_size": 150}}}}`).

`plan` validates it; `{group_id}` is mapped over the combinations: each one runs
`prepare` → {" → ".join(f"`{s}`" for s in stages)} → `record` → `finish` in its own
workspace (`{project.workspaces / "sweeps"}/<sweep>/<combination>`), recorded like a
run of its dataset's DAG (DVC experiment, MLflow parent run tagged `sweep.id`). GPU
stages ({", ".join(sorted(backend.gpu_stages))}) take a slot of pool `{backend.pool}`
(and the GPU queue under Celery), so combinations spread over the GPU workers; they run
on the `{backend.kind}` backend (kubernetes, docker: a pod or container per lane and stage,
`python -m tasks dvc-stage <stage> <dataset> --lane <sweep>/<combination>`).
`compare` writes `{project.reports / "sweep"}/<sweep>/` (comparison.md/.csv and a
test accuracy × training seconds plot with the Pareto front, also on an MLflow run in
experiment `sweeps`); `gate` runs `register` (the registry gate) for the best
combination of each dataset.
""",
        default_args={"owner": cfg.schedule.owner, **_retry_args(cfg, "default")},
    ) as dag:
        plan = task(_plan_callable(project), task_id="plan", multiple_outputs=False, retries=0)()

        @task_group(group_id=group_id)
        def pipeline(combination: Any) -> None:
            prepare = task(
                _lane_prepare_callable(project),
                task_id="prepare",
                multiple_outputs=False,
                **_retry_args(cfg, "prepare"),
            )(combination)
            chain = [prepare]
            for stage in stages:
                args = _gpu_args(backend, stage, _retry_args(cfg, stage))
                container = stage in backend.gpu_stages and backend.kind != "local"
                if container:  # a pod or container, in the lane's workspace
                    make = kubernetes_stage if backend.kind == "kubernetes" else docker_stage
                    lane = SweepLane(plan_task="plan")
                    chain.append(make(project, "sweep", stage, backend, lane=lane, **args))
                    continue
                chain.append(
                    task(
                        _lane_stage_callable(project, stage),
                        task_id=stage,
                        multiple_outputs=False,
                        **args,
                    )(combination)
                )
            chain.append(
                task(
                    _lane_record_callable(project, stages),
                    task_id="record",
                    multiple_outputs=False,
                    **_retry_args(cfg, "record"),
                )(combination)
            )
            finish = task(
                _lane_finish_callable(project, group_id, ["prepare", *stages, "record"]),
                task_id="finish",
                multiple_outputs=False,
                trigger_rule="all_done",
                retries=0,
            )(combination)
            for up, down in zip(chain, chain[1:] + [finish], strict=True):
                up >> down

        lanes = pipeline.expand(combination=plan)
        compare = task(
            _compare_callable(project),
            task_id="compare",
            multiple_outputs=False,
            trigger_rule="all_done",
            retries=0,
        )()
        gate = task(
            _gate_callable(project),
            task_id="gate",
            multiple_outputs=False,
            **_gpu_args(backend, "register", _retry_args(cfg, "register")),
        )()
        lanes >> compare >> gate
    return dag


def build_dags(project: Project | None = None, backend: Backend | None = None) -> dict[str, DAG]:
    """Every DAG of the project: one per dataset in params.yaml, the summary, the sweep."""
    project = project or Project.from_env(
        os.environ.get("TASKS_PROJECT") or Path(__file__).resolve().parents[1]
    )
    backend = backend or Backend.from_env()
    cfg = project.load_config()
    dags = {
        f"{DAG_PREFIX}{ds}": build_dataset_dag(project, cfg, ds, backend) for ds in cfg.datasets
    }
    dags[SUMMARY_DAG_ID] = build_summary_dag(project, cfg)
    dags[SWEEP_DAG_ID] = build_sweep_dag(project, cfg, backend)
    return dags


globals().update(build_dags())
