"""A DAG run's conf, turned into validated parameter overrides.

A conf such as ``{"backbone": "vgg16", "finetune_epochs": 5}`` (friendly keys,
see :data:`CONF_KEYS`) or ``{"set": {"train.epochs": 3}}`` becomes
``--set``-style ``key=value`` assignments, validated like ``params.yaml`` (one-line
:class:`ConfigError`). The workspace's ``params.yaml`` holds the result
(:func:`params_mapping`), so DVC sees the real values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from tasks.config import Config, parse_config
from tasks.errors import ConfigError
from tasks.orchestration.project import Project

CONF_KEYS: dict[str, str] = {
    "backbone": "train.backbone",
    "weights": "train.weights",
    "image_size": "train.image_size",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "learning_rate": "train.learning_rate",
    "finetune_epochs": "finetune.epochs",
    "finetune_learning_rate": "finetune.learning_rate",
    "unfreeze_from": "finetune.unfreeze_from",
    "floor": "register.floor",
    "offline": "download.offline",
    "url": "datasets.{dataset}.url",
    "mirrors": "datasets.{dataset}.mirrors",
}
"""Friendly DAG-run conf keys and the dotted params key each one sets.

Any other key goes through ``{"set": {"dotted.key": value}}`` (or a list of
``"dotted.key=value"`` strings); ``url``/``mirrors`` apply to the DAG's dataset.
"""


def _as_text(value: Any) -> str:
    """``value`` written so that the CLI's YAML parse gives it back unchanged."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def conf_overrides(conf: Mapping[str, Any] | None, dataset: str) -> tuple[str, ...]:
    """Turn a DAG run's conf into ``dotted.key=value`` overrides (see :data:`CONF_KEYS`)."""
    if not conf:
        return ()
    if not isinstance(conf, Mapping):
        raise ConfigError('run conf: must be a JSON object, e.g. {"backbone": "vgg16"}')
    overrides = []
    for key, value in conf.items():
        if key == "set":
            overrides.extend(set_entries(value))
        elif key in CONF_KEYS:
            overrides.append(f"{CONF_KEYS[key].format(dataset=dataset)}={_as_text(value)}")
        else:
            allowed = ", ".join([*CONF_KEYS, "set"])
            raise ConfigError(
                f"run conf: unknown key {key!r}; use one of: {allowed} "
                '(any parameter: {"set": {"train.epochs": 3}})'
            )
    return tuple(overrides)


def set_entries(value: Any) -> list[str]:
    """A conf's ``"set"``: a mapping of dotted keys to values, or ``"key=value"`` strings."""
    if isinstance(value, Mapping):
        return [f"{key}={_as_text(item)}" for key, item in value.items()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(
        'run conf: "set" must map dotted keys to values, e.g. {"set": {"train.epochs": 3}}, '
        'or list "key=value" strings'
    )


def resolve_run_config(project: Project, dataset: str, conf: Mapping[str, Any] | None) -> Config:
    """The validated Config of one run: the params file plus the conf's overrides."""
    cfg = project.load_config()
    cfg.dataset(dataset)
    overrides = conf_overrides(conf, dataset)
    if not overrides:
        return cfg
    raw = yaml.safe_load(project.params.read_text(encoding="utf-8")) or {}
    return parse_config(raw, overrides, source="run conf")


def params_mapping(cfg: Config) -> dict[str, Any]:
    """Every parameter of ``cfg``, defaults included, in params.yaml's shape.

    The workspace's params.yaml holds this, so DVC tracks (and dvc.lock
    records) the effective value of every key a stage lists, even defaulted ones.
    """
    data = cfg.model_dump(mode="json", by_alias=True, exclude={"overrides"})
    for entry in data["datasets"].values():
        entry.pop("name", None)
    return data
