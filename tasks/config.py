"""Typed, validated parameters: the only reader of ``params.yaml``.

Every stage takes a :class:`Config` (or one of its sections) instead of reading
files or globals. Problems surface as :class:`ConfigError` with one line that
names the key path and what is allowed, e.g.::

    params.yaml: train.backbone: 'resnet' is not allowed; use one of: mobilenet_v2, ...

This module must stay cheap to import: Airflow's DAG processor imports it.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.contract import RUN_OVERRIDES_ENV, SET_ENV
from tasks.errors import ConfigError
from tasks.io import SHA256_HEX

DEFAULT_PARAMS = Path("params.yaml")
RECIPES = Path(__file__).parent / "recipes"
"""The named presets (``recipe:``): one ``<name>.yaml`` of parameter values each."""
DEFAULT_RECIPE = "default"
BACKBONES = (
    "mobilenet_v2",
    "inception_v3",
    "vgg16",
    "xception",
    "resnet50",
    "efficientnet_b0",
)
SPLITS = ("train", "validation", "test")
"""The manifest's logical splits. ``test`` is held out: only evaluate and register read it."""
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def check_source(value: str) -> str:
    """Accept ``http(s)://``, ``file://`` or a plain local path; refuse the rest."""
    if not value or not value.strip():
        raise ValueError("must not be empty")
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise ValueError(f"{value!r} has no host; write e.g. https://example.com/data.zip")
    elif parsed.scheme == "file":
        if not parsed.path:
            raise ValueError(f"{value!r} has no path; write e.g. file:///srv/mirror/data.zip")
    elif "://" in value:
        raise ValueError(
            f"{value!r} has unsupported scheme {parsed.scheme!r}; use https://, file:// or a path"
        )
    return value


class Layout(_Section):
    """Where the splits live inside the extracted archive: ``<root>/<split>/<class>/``.

    ``test`` names the archive's own test folder; null (neither dataset has one)
    carves the test split out of the validation folder (``evaluate.test_fraction``).
    """

    root: str
    train: str = "train"
    validation: str = "validation"
    test: str | None = None

    @field_validator("root", "train", "validation", "test")
    @classmethod
    def _plain_folder(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value or value.startswith("/") or ".." in Path(value).parts:
            raise ValueError(f"{value!r} must be a relative folder name inside the archive")
        return value


def carve_count(available: int, fraction: float) -> int:
    """How many of ``available`` validation images of one class the test split takes.

    ``round(available * fraction)``, but at least one and never all of them
    when there are two or more, so both splits keep every class.
    """
    if available < 2:
        return 0
    return min(max(int(available * fraction + 0.5), 1), available - 1)


SHARDS_ABOVE = 20_000
"""``format: auto`` stores a dataset as shards above this many files."""


class DatasetConfig(_Section):
    name: str = ""
    url: str
    sha256: str | None = None
    size: PositiveInt | None = None
    mirrors: list[str] = Field(default_factory=list)
    layout: Layout
    classes: list[str] = Field(min_length=2)
    counts: dict[Literal["train", "validation", "test"], dict[str, NonNegativeInt]]
    """Images per class in each split *folder* (``test`` only with ``layout.test``)."""
    format: Literal["auto", "files", "shards"] = "auto"
    """How the images are stored: ``files`` (the archive extracted, one file per image),
    ``shards`` (the archive kept whole, the accepted images written as TFRecord shards);
    ``auto``: shards when the archive holds more than :data:`SHARDS_ABOVE` files."""

    def stored_as(self, files: int) -> Literal["files", "shards"]:
        """The format for an archive of ``files`` files."""
        if self.format == "auto":
            return "shards" if files > SHARDS_ABOVE else "files"
        return self.format

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_source(value)

    @field_validator("mirrors")
    @classmethod
    def _mirrors(cls, value: list[str]) -> list[str]:
        for item in value:
            check_source(item)
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_HEX.match(value.lower()):
            raise ValueError("must be 64 hex characters (or null to trust on first use)")
        return value.lower() if value else value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"class names repeat in {value}")
        return value

    @model_validator(mode="after")
    def _counts_match_classes(self) -> DatasetConfig:
        if "test" in self.counts and self.layout.test is None:
            raise ValueError(
                "counts.test needs layout.test (the archive's test folder); without one the "
                "test split is carved from validation by evaluate.test_fraction, so remove "
                "counts.test"
            )
        for split in self.folder_splits:
            if split not in self.counts:
                raise ValueError(
                    f"counts.{split} is missing; give the expected image count per class"
                )
            got = set(self.counts[split])
            if got != set(self.classes):
                raise ValueError(
                    f"counts.{split} names {sorted(got)} but classes are {sorted(self.classes)}"
                )
        return self

    @property
    def test_carved(self) -> bool:
        """True when the test split is carved out of the validation folder."""
        return self.layout.test is None

    @property
    def folder_splits(self) -> tuple[str, ...]:
        """The splits that have a folder of their own in the archive."""
        return SPLITS if self.layout.test else SPLITS[:2]

    def split_folder(self, split: str) -> str:
        folders = {"train": self.layout.train, "validation": self.layout.validation}
        folders["test"] = self.layout.test or self.layout.validation
        return folders[split]

    def expected_counts(self, test_fraction: float) -> dict[str, dict[str, int]]:
        """Expected images per logical split and class (a carved test split included)."""
        expected = {split: dict(self.counts[split]) for split in self.folder_splits}
        if self.test_carved:
            held = {c: carve_count(n, test_fraction) for c, n in expected["validation"].items()}
            expected["validation"] = {c: n - held[c] for c, n in expected["validation"].items()}
            expected["test"] = held
        return expected


class DownloadConfig(_Section):
    retries: PositiveInt = 5
    backoff_seconds: float = Field(1.0, ge=0)
    max_backoff_seconds: float = Field(30.0, ge=0)
    timeout_seconds: PositiveFloat = 60.0
    chunk_bytes: PositiveInt = 1 << 20
    offline: bool = False


class ValidateConfig(_Section):
    count_tolerance: float = Field(0.05, ge=0, le=1)
    min_side: PositiveInt = 32
    max_side: PositiveInt = 10000
    max_pixels: PositiveInt = 89_478_485
    quarantine_budget: float = Field(0.02, ge=0, le=1)
    class_balance: float = Field(0.5, ge=0, le=1)
    workers: NonNegativeInt = 0
    shard_mb: float = Field(256.0, gt=0)
    """Target size of one shard (``datasets.<ds>.format: shards``)."""


class HeadConfig(_Section):
    pooling: Literal["avg", "flatten"] | None = None
    dense_units: NonNegativeInt | None = None
    dropout: float | None = Field(None, ge=0, lt=1)


Optimizer = Literal["rmsprop", "adam", "sgd"]


class _Optimized(_Section):
    """What a training phase optimizes with."""

    optimizer: Optimizer = "rmsprop"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """SGD's momentum (0: plain SGD); only with ``optimizer: sgd``."""

    @model_validator(mode="after")
    def _momentum_is_sgds(self) -> Any:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(
                f"momentum {self.momentum} is SGD's; set optimizer: sgd or momentum: 0"
            )
        return self


PREPROCESS_MODES = ("tf", "caffe", "torch", "none")
MODEL_FILE = ".keras"
"""``train.backbone`` ending so names a Keras model file instead of a registry entry."""


class BackboneFileConfig(_Section):
    """How a Keras model file serves as the backbone (``train.backbone: <path>.keras``)."""

    cut_at: str | None = None
    """The layer whose output is the features; null: the model's own output."""
    unfreeze_from: str | None = None
    """The first layer fine-tuning unfreezes (``all``: every layer); required with a file."""
    preprocess: Literal[PREPROCESS_MODES] | None = None  # type: ignore[valid-type]
    """What inputs the file's first layer expects; required with a file."""


class TrainConfig(_Optimized):
    backbone: str = "mobilenet_v2"
    """A registry name (:data:`BACKBONES`) or a path to a ``.keras`` model file."""
    backbone_file: BackboneFileConfig = BackboneFileConfig()
    image_size: PositiveInt | None = None
    weights: str = "imagenet"
    head: HeadConfig = HeadConfig()
    batch_size: PositiveInt = 32
    epochs: PositiveInt = 10
    cached_epochs: PositiveInt | None = 100
    """Phase 1's epochs on cached features, where early stopping ends it (None: ``epochs``)."""
    learning_rate: PositiveFloat = 1e-4
    early_stopping_patience: NonNegativeInt = 3
    feature_cache: Literal["auto", "on", "off"] = "auto"
    cache_budget_mb: NonNegativeInt | Literal["auto"] = "auto"
    """RAM the per-image caches of a phase may hold; beyond it they are read from disk."""
    augment: bool = False
    seed: int = 42
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    jit_compile: Literal["auto", "true", "false"] = "auto"
    distribute: Literal["auto", "none", "mirrored", "multi_worker"] = "auto"
    workers: PositiveInt = 1
    """Machines training together under ``distribute: multi_worker`` (a launcher starts
    one worker process per machine: ``tasks.cluster``)."""

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("jit_compile", mode="before")
    @classmethod
    def _true_false(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str) -> str:
        if value in BACKBONES or (value.endswith(MODEL_FILE) and len(value) > len(MODEL_FILE)):
            return value
        raise ValueError(
            f"{value!r} is not allowed; use one of: {', '.join(BACKBONES)}, "
            f"or a path to a {MODEL_FILE} model file"
        )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in ("imagenet", "none"):
            return value
        if not value.endswith(".h5"):
            raise ValueError(
                f"{value!r} is not allowed; use imagenet, none, or a path to a .weights.h5 "
                "or *_notop.h5 file"
            )
        return value

    @property
    def backbone_is_file(self) -> bool:
        return self.backbone not in BACKBONES

    @property
    def backbone_name(self) -> str:
        """The backbone's short name: the registry name, or the model file's stem (for run
        and model names; the params keep the path)."""
        return Path(self.backbone).stem if self.backbone_is_file else self.backbone

    @model_validator(mode="after")
    def _workers(self) -> Any:
        if self.workers > 1 and self.distribute != "multi_worker":
            raise ValueError(
                f"workers={self.workers} trains across machines, which needs "
                "distribute=multi_worker; set distribute to multi_worker, or workers to 1"
            )
        return self

    @model_validator(mode="after")
    def _file_settings(self) -> Any:
        given = {k: v for k, v in self.backbone_file.model_dump().items() if v is not None}
        if not self.backbone_is_file:
            if given:
                raise ValueError(
                    f"backbone_file ({', '.join(given)}) applies only when backbone is a "
                    f"{MODEL_FILE} file; remove it or set backbone to a model file"
                )
            return self
        for key, meaning in (
            ("preprocess", f"what inputs {self.backbone} expects: {', '.join(PREPROCESS_MODES)}"),
            ("unfreeze_from", "the first layer fine-tuning unfreezes, or all"),
        ):
            if key not in given:
                raise ValueError(
                    f"backbone_file.{key} is required with a model file; set {meaning}"
                )
        if self.weights.endswith(".h5") and not self.weights.endswith(".weights.h5"):
            raise ValueError(
                f"weights {self.weights!r} is a keras.applications file; a {MODEL_FILE} backbone "
                "takes imagenet (its own weights), none, or a .weights.h5 saved from it"
            )
        return self


class AugmentationConfig(_Section):
    flip: Literal["horizontal", "vertical", "horizontal_and_vertical", "none"] = "horizontal"
    rotation: float = Field(0.1, ge=0, le=1)
    zoom: float = Field(0.1, ge=0, lt=1)
    translation: float = Field(0.1, ge=0, lt=1)
    width_shift: float | None = Field(None, ge=0, lt=1)
    """Horizontal shift, a fraction of the width; null = ``translation``."""
    height_shift: float | None = Field(None, ge=0, lt=1)
    """Vertical shift, a fraction of the height; null = ``translation``."""
    shear: float = Field(0.0, ge=0, le=1)
    """Horizontal shear factor (x moves by up to ``shear`` * y: 0.2 is about 11 degrees)."""

    @property
    def shifts(self) -> tuple[float, float]:
        """(height, width) shift fractions, each defaulting to ``translation``."""
        height = self.translation if self.height_shift is None else self.height_shift
        width = self.translation if self.width_shift is None else self.width_shift
        return height, width


class FinetuneConfig(_Optimized):
    unfreeze_from: str | None = None
    epochs: NonNegativeInt = 10
    learning_rate: PositiveFloat = 1e-5
    early_stopping_patience: NonNegativeInt = 3
    augment: bool = False
    feature_cache: Literal["auto", "on", "off"] = "auto"

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class EvaluateConfig(_Section):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    gradcam_images: NonNegativeInt = 4
    mistakes: NonNegativeInt = 16


class RegisterConfig(_Section):
    metric: Literal["accuracy", "f1_macro", "roc_auc"] = "accuracy"
    floor: float = Field(0.8, ge=0, le=1)
    method: Literal["mcnemar", "bootstrap"] = "mcnemar"
    alpha: float = Field(0.05, gt=0, lt=0.5)
    promote_if: Literal["better", "not_worse"] = "better"
    bootstrap_samples: int = Field(2000, ge=100)
    seed: int = 0
    approval: Literal["auto", "human"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, value: Any) -> Any:
        if isinstance(value, dict) and "tolerance" in value:
            raise ValueError(
                "tolerance was replaced by a paired statistical test; remove it and set "
                "register.method (mcnemar | bootstrap) and register.alpha instead"
            )
        return value

    @model_validator(mode="after")
    def _method_fits_metric(self) -> RegisterConfig:
        if self.method == "mcnemar" and self.metric != "accuracy":
            raise ValueError(
                f"method mcnemar compares accuracy, not {self.metric}; use method: bootstrap "
                "or metric: accuracy"
            )
        return self


class TrackingConfig(_Section):
    uri: str | None = None
    artifact_location: str = "mlflow/artifacts"
    experiment_prefix: str = ""


class ScheduleConfig(_Section):
    cron: str | None = "@weekly"
    owner: str = "mlops"
    retries: NonNegativeInt = 2
    gpus: PositiveInt = 1
    retrain_on_drift: bool = False


class DriftConfig(_Section):
    alpha: float = Field(0.05, gt=0, lt=0.5)
    domain_auc: float = Field(0.55, gt=0.5, lt=1)
    permutations: int = Field(100, ge=20)
    components: PositiveInt = 32
    sample: int = Field(500, ge=20)
    min_images: int = Field(20, ge=5)
    seed: int = 0

    @model_validator(mode="after")
    def _permutations_reach_alpha(self) -> DriftConfig:
        needed = math.ceil(4 / self.alpha)
        if self.permutations + 1 <= needed:
            raise ValueError(
                f"permutations {self.permutations} cannot give a p-value under alpha/4 = "
                f"{self.alpha / 4:g}; use at least {needed} permutations"
            )
        return self


class ScoringConfig(_Section):
    inbox: str = "inbox"
    cron: str | None = "@hourly"
    model: str = "champion"
    batch_size: PositiveInt = 32
    reference_size: int = Field(1000, ge=20)
    drift: DriftConfig = DriftConfig()

    @field_validator("model")
    @classmethod
    def _alias_or_version(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z][\w-]*|\d+", value):
            raise ValueError(
                f"scoring.model {value!r} must be a registry alias (champion) or a version number"
            )
        return value


class Config(_Section):
    recipe: str = DEFAULT_RECIPE
    """The preset under the file's own keys (``tasks/recipes/<recipe>.yaml``)."""
    datasets: dict[str, DatasetConfig] = Field(min_length=1)
    download: DownloadConfig = DownloadConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    """The ``validate:`` section (``validate`` itself is a BaseModel method)."""
    train: TrainConfig = TrainConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    """The ``register:`` section: the registry gate (``register`` is taken by ABCMeta)."""
    tracking: TrackingConfig = TrackingConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    scoring: ScoringConfig = ScoringConfig()
    overrides: tuple[str, ...] = ()
    """The ``--set`` overrides applied on top of the file (recorded with every run)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("datasets", mode="before")
    @classmethod
    def _name_datasets(cls, value: Any) -> Any:
        if isinstance(value, dict):
            named = {}
            for key, entry in value.items():
                if not isinstance(key, str) or not _NAME.match(key):
                    raise ValueError(
                        f"dataset name {key!r} must be lowercase letters, digits and _"
                    )
                named[key] = {**entry, "name": key} if isinstance(entry, dict) else entry
            return named
        return value

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset called ``name``, or a ConfigError listing the known ones."""
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(self.datasets)
            raise ConfigError(
                f"unknown dataset {name!r}; known datasets: {known} "
                "(add one under datasets: in params.yaml)"
            ) from None


def _format_error(source: str, error: ValidationError, raw: dict[str, Any]) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = _lookup_model(loc[:-1])
        allowed = ", ".join(sorted(_field_names(parent))) if parent else "see params.yaml"
        return f"{source}: {key}: unknown key; allowed keys here: {allowed}"
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        got = first.get("input")
        return f"{source}: {key}: {got!r} is not allowed; use one of: {expected}"
    if kind == "missing":
        return f"{source}: {key}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if kind.endswith(("_type", "_parsing")):
        return f"{source}: {key}: {msg} (got {got!r})"
    return f"{source}: {key}: {msg}"


def _field_names(model: type[BaseModel]) -> list[str]:
    hidden = {"overrides", "name"}
    return [field.alias or name for name, field in model.model_fields.items() if name not in hidden]


def _lookup_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is Config and part == "datasets":
            if not parts:
                return None
            parts.pop(0)
            model = DatasetConfig
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` (value parsed as YAML) to ``raw`` in place."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {assignment!r}: write it as dotted.key=value, e.g. train.epochs=5"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            path = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {assignment!r}: {path} is a value, not a section")
        node = child
    node[parts[-1]] = value


def recipe_names() -> list[str]:
    """The known presets: the ``*.yaml`` files shipped in ``tasks/recipes``."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def recipe_values(name: Any, source: str = "params") -> dict[str, Any]:
    """The parameter values of the preset ``name``, or a one-line ConfigError."""
    values = _recipe_file(name, source)
    values.pop("reference", None)
    return values


def recipe_reference(name: str) -> dict[str, Any]:
    """What the walkthrough behind preset ``name`` reported: ``dataset`` (the one it used)
    and ``reported`` (its accuracy, as it stated it), each None where it gives none."""
    reference = _recipe_file(name).get("reference") or {}
    return {"dataset": reference.get("dataset"), "reported": reference.get("reported")}


def _recipe_file(name: Any, source: str = "params") -> dict[str, Any]:
    known = recipe_names()
    if not isinstance(name, str) or name not in known:
        near = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(
            f"{source}: recipe: {name!r} is not a known recipe{hint}; use one of: "
            f"{', '.join(known)} (files in tasks/recipes)"
        )
    path = RECIPES / f"{name}.yaml"
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: is not valid YAML; fix the syntax there") from None
    if not isinstance(values, dict) or "recipe" in values or "datasets" in values:
        raise ConfigError(
            f"{path}: a recipe must be a mapping of parameter sections (train:, augmentation:, "
            "finetune:, ...) without recipe: or datasets:"
        )
    return values


def layered(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``under``: nested mappings merge key by key, ``over``'s keys win."""
    merged = copy.deepcopy(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = layered(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_config(
    raw: dict[str, Any], overrides: tuple[str, ...] | list[str] = (), source: str = "params"
) -> Config:
    """Validate a parameter mapping (plus ``--set`` overrides) into a Config.

    Layers, each winning over the one before: the field defaults, the ``recipe:``
    preset's values, the keys ``raw`` actually writes, the ``--set`` overrides
    (``--set recipe=NAME`` picks the preset). The Config holds the resolved values.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, e.g. datasets:, train:")
    picked = {"recipe": raw.get("recipe", DEFAULT_RECIPE)}
    for assignment in overrides:
        if assignment.partition("=")[0].strip() == "recipe":
            apply_override(picked, assignment)
    raw = layered(recipe_values(picked["recipe"], source), {**raw, **picked})
    for assignment in overrides:
        apply_override(raw, assignment)
    raw.pop("overrides", None)
    try:
        return Config.model_validate({**raw, "overrides": tuple(overrides)})
    except ValidationError as error:
        raise ConfigError(_format_error(source, error, raw)) from None


def load_config(
    path: str | Path = DEFAULT_PARAMS, overrides: tuple[str, ...] | list[str] = ()
) -> Config:
    """Read ``params.yaml`` (or ``path``), apply overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found; run from the project root or pass --params PATH"
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML; fix the syntax there") from None
    return parse_config(raw, overrides, source=str(path))


def env_overrides(name: str = SET_ENV) -> list[str]:
    """``$TASKS_SET`` (or ``name``): a JSON list of ``key=value`` strings."""
    text = os.environ.get(name, "").strip()
    if not text:
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f'${name}: must be a JSON list of "key=value" strings')
    return items


def load_stage_config(
    path: str | Path = DEFAULT_PARAMS, overrides: tuple[str, ...] | list[str] = ()
) -> Config:
    """What a stage command runs with: the params file, ``$TASKS_SET`` then ``--set``.

    A scheduled run's overrides are already written into its workspace's params.yaml;
    the orchestrator names them in ``$TASKS_RUN_OVERRIDES`` so that every stage
    records them (MLflow's ``overrides`` tag) without applying them a second time.
    """
    cfg = load_config(path, [*env_overrides(), *overrides])
    recorded = env_overrides(RUN_OVERRIDES_ENV)
    if not recorded:
        return cfg
    return cfg.model_copy(update={"overrides": (*recorded, *cfg.overrides)})
