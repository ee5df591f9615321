"""The ``doc_md`` of each DAG: what a person reads on the DAG's page in the Airflow UI."""

from __future__ import annotations

from tasks.orchestration.backends import Backend
from tasks.orchestration.k8s_job import MULTI_WORKER_STAGES
from tasks.orchestration.project import DAG_PREFIX, SUMMARY_DAG_ID, Project
from tasks.orchestration.runconf import CONF_KEYS


def _chain(stages: list[str]) -> str:
    return " → ".join(f"`{s}`" for s in stages)


def _workers_note(backend: Backend, workers: int) -> str:
    """What a multi-worker stage runs as (nothing when every stage is one pod or process)."""
    if workers <= 1:
        return ""
    names = ", ".join(sorted(MULTI_WORKER_STAGES & backend.gpu_stages))
    return (
        f"\nUnder `train.distribute: multi_worker`, {names} run as a Kubernetes Indexed Job of "
        f"{workers} worker pods (worker 0 the chief) that find each other through a headless "
        f"Service; such a task takes {workers} slots of pool `{backend.pool}`."
    )


def dataset_doc(
    project: Project, dataset: str, stages: list[str], backend: Backend, workers: int = 1
) -> str:
    conf_keys = "\n".join(f"| `{key}` | `{dotted}` |" for key, dotted in CONF_KEYS.items())
    ws = project.workspace(dataset)
    paths = project.dataset_paths(dataset)
    return f"""\
### Transfer learning: `{dataset}`

`prepare` → {_chain(stages)} → `record` → `finish`

The workspace `{ws}` is a git checkout of the deployed commit. Each stage task
runs `dvc repro --single-item <stage>@{dataset}` there (unchanged stages are
skipped or restored from the shared run cache), sharing the project's DVC cache
and MLflow store. `record` saves the run as the DVC experiment
`{dataset}-<run id>` (`dvc exp show` in the project lists it; `dvc exp apply` +
`dvc pull` restores it), pushes its outputs to the DVC remote and updates the
`{DAG_PREFIX}{dataset}.model` asset, which triggers `{SUMMARY_DAG_ID}`. `finish`
ends the run's MLflow parent run with the outcome.
GPU stages ({", ".join(sorted(backend.gpu_stages))}) run on the `{backend.kind}`
backend in pool `{backend.pool}`.{_workers_note(backend, workers)}

**Per-run overrides** (trigger with conf), validated like params.yaml; the
checked-in params.yaml is not modified and MLflow records them (`overrides` tag):

| conf key | params key |
|---|---|
{conf_keys}

Any other key: `{{"set": {{"train.epochs": 3}}}}`. Example:
`{{"backbone": "vgg16", "finetune_epochs": 5}}`.

Results: `{paths.reports}`, models in `{paths.models}`,
MLflow experiment `{dataset}`, registered model `{dataset}-classifier`.
"""


def summary_doc(project: Project) -> str:
    return f"""\
### Transfer learning: summary

Triggered by any dataset DAG's model asset. Writes
`{project.reports / "summary.md"}` and `summary.json`: per dataset, the current
`@champion` in the MLflow registry with its metrics, and the latest run's gate.
"""


def sweep_doc(
    project: Project, group: str, stages: list[str], backend: Backend, workers: int = 1
) -> str:
    note = _workers_note(backend, workers)
    return f"""\
### Transfer learning: sweep

Trigger with a conf naming what to compare, e.g.
`{{"backbones": ["mobilenet_v2", "efficientnet_b0"], "datasets": ["cats_vs_dogs"]}}`
(optional: `"learning_rates": [0.001, 0.0001]`, `"set": {{"train.epochs": 5}}` for every
combination, `"per_backbone": {{"inception_v3": {{"train.image_size": 150}}}}`).

`plan` validates it; `{group}` is mapped over the combinations: each one runs
`prepare` → {_chain(stages)} → `record` → `finish` in its own
workspace (`{project.workspaces / "sweeps"}/<sweep>/<combination>`), recorded like a
run of its dataset's DAG (DVC experiment, MLflow parent run tagged `sweep.id`). GPU
stages ({", ".join(sorted(backend.gpu_stages))}) take a slot of pool `{backend.pool}`
(and the GPU queue under Celery), so combinations spread over the GPU workers; they run
on the `{backend.kind}` backend (kubernetes, docker: a pod or container per lane and stage,
`python -m tasks dvc-stage <stage> <dataset> --lane <sweep>/<combination>`).{note}
`compare` writes `{project.reports / "sweep"}/<sweep>/` (comparison.md/.csv and a
test accuracy × training seconds plot with the Pareto front, also on an MLflow run in
experiment `sweeps`); `gate` runs `register` (the registry gate) for the best
combination of each dataset.
"""
