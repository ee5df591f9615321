"""The per-dataset stage graph, read from ``dvc.yaml`` (no DVC import, no I/O beyond one file).

The Airflow DAG factory builds one task per stage from this, so the DAG and
``dvc repro`` can never disagree about order: stage B runs after stage A when
one of B's deps is, contains or lies inside one of A's outputs (``outs``,
``metrics`` and ``plots`` are all outputs to DVC).

Only ``foreach: ${datasets}`` stages belong to a dataset; other stages (none
today) are not part of the per-dataset DAG.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tasks.errors import ConfigError

PER_DATASET = "${datasets}"


@dataclass(frozen=True)
class StageSpec:
    """One DVC stage instantiated for one dataset (paths relative to the workspace)."""

    name: str
    dataset: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[str, ...]

    @property
    def target(self) -> str:
        """The DVC address of this stage, e.g. ``train@cats_vs_dogs``."""
        return f"{self.name}@{self.dataset}"

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.outs + self.metrics + self.plots


@dataclass(frozen=True)
class StageGraph:
    """Stages of one dataset in ``dvc.yaml`` order, with their upstream stages."""

    stages: tuple[StageSpec, ...]
    upstream: dict[str, frozenset[str]]

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def leaves(self) -> list[str]:
        used = {up for ups in self.upstream.values() for up in ups}
        return [name for name in self.names if name not in used]


def _entries(items: Any, dataset: str) -> tuple[str, ...]:
    paths = []
    for item in items or []:
        path = next(iter(item)) if isinstance(item, dict) else item
        paths.append(str(path).replace("${key}", dataset))
    return tuple(paths)


def _overlaps(dep: str, out: str) -> bool:
    a, b = PurePosixPath(dep), PurePosixPath(out)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def read_stage_graph(dvc_yaml: str | Path, dataset: str) -> StageGraph:
    """Parse ``dvc.yaml`` and return the stage graph of ``dataset``."""
    path = Path(dvc_yaml)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; the DAGs need the project's dvc.yaml") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: is not valid YAML; fix the syntax there") from None
    stages = []
    for name, body in (spec.get("stages") or {}).items():
        if not isinstance(body, dict) or body.get("foreach") != PER_DATASET:
            continue
        do = body.get("do") or {}
        stages.append(
            StageSpec(
                name=name,
                dataset=dataset,
                deps=_entries(do.get("deps"), dataset),
                outs=_entries(do.get("outs"), dataset),
                metrics=_entries(do.get("metrics"), dataset),
                plots=_entries(do.get("plots"), dataset),
            )
        )
    if not stages:
        raise ConfigError(f"{path}: no stage has 'foreach: {PER_DATASET}'; nothing to schedule")
    return StageGraph(tuple(stages), _upstream(stages))


def _upstream(stages: Iterable[StageSpec]) -> dict[str, frozenset[str]]:
    stages = list(stages)
    upstream: dict[str, frozenset[str]] = {}
    for stage in stages:
        ups = {
            other.name
            for other in stages
            if other is not stage
            and any(_overlaps(dep, out) for dep in stage.deps for out in other.outputs)
        }
        upstream[stage.name] = frozenset(ups)
    return upstream
