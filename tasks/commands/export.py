"""``export``: the champion (or a given model) in serving formats, each checked against Keras.

``python -m tasks export <ds> [--format saved_model|litert|onnx ...] [--model PATH_OR_URI]``

The model is the registered ``<prefix><ds>-classifier@champion`` (resolved to its
version first, so a concurrent promotion cannot mix two versions), or ``--model``
(a ``.keras`` file or an MLflow model URI), written in the form the registry serves
(:func:`tasks.ml.model.probability_model`) with ``keras.Model.export`` under
``models/<ds>/export/<format>/``.

Each format is written into a temporary folder, read back with its own runtime and
run on the held-out test images; only when its probabilities are the Keras model's
to within :data:`tasks.ml.export.TOLERANCE` on every image is it renamed into place.
A refused format leaves nothing and keeps the previous good export; the command then
fails with one line per refused format. ``export.json`` describes every format there;
a registered model also gets its exports on the run that logged the version and the
figures as version tags. What a user sees: docs/serving.md, "Export".
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import image_root, labelled_rows, load_model, relative
from tasks.config import Config
from tasks.errors import StageError
from tasks.io import atomic_path, storage_error, write_json
from tasks.ml.export import (
    FORMATS,
    TOLERANCE,
    ExportFormat,
    Parity,
    export_format,
    missing_packages,
    runtime,
)
from tasks.paths import DatasetPaths
from tasks.tracking.registry import CHAMPION, registered_model_name
from tasks.tracking.store import server_errors, tracking_uri

if TYPE_CHECKING:
    import keras
    from mlflow import MlflowClient

_log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("saved_model",)
REPORT = "export.json"
KERAS_SUFFIXES = (".keras", ".h5")
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")
_FIX = {
    "saved_model": "check that the model's layers trace with tf.function",
    "litert": "use --format saved_model or onnx, or replace the layers LiteRT computes differently",
    "onnx": "use --format saved_model or litert, or replace the layers tf2onnx converts "
    "differently",
}


def export_root(paths: DatasetPaths) -> Path:
    """``models/<ds>/export/``: one folder per format, and the report."""
    return paths.models / "export"


@dataclass(frozen=True)
class Source:
    """The model that was exported."""

    model: str
    """A ``models:/NAME/VERSION`` URI (pinned), another MLflow URI, or a model file."""
    registered_model: str | None = None
    version: str | None = None
    run_id: str | None = None
    """The run that logged the registered version (its exports are logged there)."""
    alias: str | None = None
    """The alias it was reached by (``champion`` by default)."""


@dataclass(frozen=True)
class Exported:
    format: str
    path: str
    """The format's folder, relative to the workspace."""
    size_bytes: int
    max_abs_diff: float
    images: int


@dataclass(frozen=True)
class ExportResult:
    dataset: str
    source: Source
    exported: list[Exported] = field(default_factory=list)
    report: Path | None = None

    def __str__(self) -> str:
        where = self.source.model
        if self.source.alias:
            where += f" (@{self.source.alias})"
        lines = [f"export: {self.dataset} from {where}"]
        for item in self.exported:
            lines.append(
                f"  {item.format:<12} {item.path}  {item.size_bytes:,} bytes, max abs diff "
                f"{item.max_abs_diff:.2e} on {item.images} test images (limit {TOLERANCE:g})"
            )
        if self.report is not None:
            lines.append(f"  report: {self.report}")
        if self.source.run_id:
            lines.append(f"  logged to run {self.source.run_id} under export/")
        return "\n".join(lines)


class _Refused(Exception):
    """One format cannot be exported; the message is the user's line."""


# ---------------------------------------------------------------- the stage


def run(
    cfg: Config,
    paths: DatasetPaths,
    formats: Sequence[str] | None = None,
    model: str | None = None,
) -> ExportResult:
    """Export ``model`` (default: the dataset's ``@champion``) in ``formats``
    (default: saved_model), each after its parity check; see the module's docs."""
    specs = [export_format(name) for name in dict.fromkeys(formats or DEFAULT_FORMATS)]
    refusals: dict[str, str] = {}
    for spec in specs:
        missing = missing_packages(spec)
        if missing:
            refusals[spec.name] = (
                f"export {spec.name} refused: {', '.join(missing)} not installed (its "
                f"converter and runtime); run `uv sync` to install the project's dependencies, "
                f"or leave out --format {spec.name}; nothing was written for it"
            )
    wanted = [spec for spec in specs if spec.name not in refusals]
    if not wanted:
        raise StageError("; ".join(refusals.values()))

    dataset_classes = list(cfg.dataset(paths.dataset).classes)
    keras_model, source, classes, client = _load_source(cfg, paths, model)
    frame = labelled_rows(paths, "test", dataset_classes)
    from tasks.ml.model import probability_model

    serving = probability_model(keras_model, len(classes))
    batches = _test_batches(serving, frame, paths, dataset_classes, cfg.train.batch_size)
    with _on_cpu():
        references = [np.asarray(serving(batch, training=False)) for batch in batches]

    exported: list[Exported] = []
    for spec in wanted:
        try:
            exported.append(_export_one(serving, spec, paths, batches, references))
        except _Refused as refused:
            refusals[spec.name] = str(refused)

    report = None
    if exported:
        report = _write_report(paths, exported, source, classes, serving)
        if client is not None:
            _log_to_registry(cfg, paths, client, source, exported, report)
    if refusals:
        written = ", ".join(item.format for item in exported)
        also = f" ({written} written)" if written else ""
        raise StageError("; ".join(refusals.values()) + also)
    return ExportResult(paths.dataset, source, exported, report)


# ---------------------------------------------------------------- the model


def _load_source(
    cfg: Config, paths: DatasetPaths, model: str | None
) -> tuple[keras.Model, Source, list[str], MlflowClient | None]:
    """The Keras model, where it came from, its classes and (registry models) a client."""
    classes = list(cfg.dataset(paths.dataset).classes)
    if model is not None and not _is_registered(model):
        if Path(model).suffix.lower() in KERAS_SUFFIXES:
            return load_model(Path(model)), Source(str(model)), classes, None
        from tasks.tracking.models import load_logged_model

        if not Path(model).exists():  # runs:/... and other store URIs; not a model folder
            _use_store(cfg, paths)
        keras_model, metadata = load_logged_model(model)
        return keras_model, Source(model), list(metadata.get("classes") or classes), None

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.tracking.models import load_logged_model

    uri = _use_store(cfg, paths)
    if model is None:
        name, number, alias = registered_model_name(cfg, paths.dataset), None, CHAMPION
    else:
        match = _REGISTERED.match(model)
        assert match is not None
        name, number, alias = match["name"], match["version"], match["alias"]
    client = MlflowClient(uri)
    with server_errors(uri, f"python -m tasks export {paths.dataset}"):
        try:
            if number is not None:
                version = client.get_model_version(name, number)
            else:
                version = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            what = f"version {number}" if number is not None else f"@{alias}"
            hint = (
                "run register (python -m tasks register "
                f"{paths.dataset}) or pass --model FILE.keras"
                if model is None
                else "check the name and version with the MLflow UI"
            )
            raise StageError(
                f"registered model {name} has no {what} in {mlflow.get_tracking_uri()}; {hint}"
            ) from None
        pinned = f"models:/{name}/{version.version}"
        keras_model, metadata = load_logged_model(pinned)
    source = Source(pinned, name, str(version.version), version.run_id, alias)
    return keras_model, source, list(metadata.get("classes") or classes), client


def _is_registered(model: str) -> bool:
    return _REGISTERED.match(model) is not None


def _use_store(cfg: Config, paths: DatasetPaths) -> str:
    import mlflow

    from tasks.tracking.store import store_exists

    uri = tracking_uri(cfg, paths.root)
    if not store_exists(uri):
        raise StageError(
            f"no MLflow store at {uri}; run the pipeline (or register) first, or pass "
            "--model FILE.keras"
        )
    mlflow.set_tracking_uri(uri)
    return uri


def _test_batches(
    model: keras.Model,
    frame: Any,
    paths: DatasetPaths,
    classes: list[str],
    batch_size: int,
) -> list[np.ndarray]:
    """The test images as float32 0-255 batches, decoded and resized as in training."""
    from tasks.ml.model import image_batches

    batches = image_batches(model, frame, image_root(paths, frame), classes, batch_size)
    return [np.asarray(images, np.float32) for images in batches]


@contextmanager
def _on_cpu() -> Iterator[None]:
    """Run TensorFlow on the CPU: the reference is the same arithmetic the runtimes do."""
    import tensorflow as tf

    with tf.device("/CPU:0"):
        yield


# ---------------------------------------------------------------- one format


def _export_one(
    model: keras.Model,
    spec: ExportFormat,
    paths: DatasetPaths,
    batches: list[np.ndarray],
    references: list[np.ndarray],
) -> Exported:
    """Write ``spec`` to a temporary folder, check it, and only then put it in place."""
    target = export_root(paths) / spec.name
    try:
        with atomic_path(target) as tmp:
            artifact = tmp / spec.artifact if spec.artifact else tmp
            artifact.parent.mkdir(parents=True, exist_ok=True)
            _convert(model, spec, artifact)
            parity = _check(spec, artifact, batches, references)
            size = _size(tmp)
    except _Refused:
        raise
    except Exception as error:  # noqa: BLE001 - converters raise anything; one line instead
        full = storage_error(error, f"exporting {spec.name} to {target}", where=target.parent)
        if full is not None:
            raise StageError(f"{full}; the previous {spec.name} export is kept") from None
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise _Refused(
            f"export {spec.name} refused: the conversion failed ({type(error).__name__}"
            f"{': ' + first if first else ''}); nothing was written for it; "
            f"{_FIX[spec.name]}"
        ) from None
    _log.info(
        "%s: %s, %d bytes, max abs diff %.2e on %d images",
        spec.name, target, size, parity.max_abs_diff, parity.images,
    )  # fmt: skip
    return Exported(spec.name, relative(paths, target), size, parity.max_abs_diff, parity.images)


def _convert(model: keras.Model, spec: ExportFormat, artifact: Path) -> None:
    import warnings

    quiet = logging.getLogger("tf2onnx"), logging.getLogger("absl")
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx on NumPy 2
            model.export(str(artifact), format=spec.keras_format, verbose=False)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def _check(
    spec: ExportFormat, artifact: Path, batches: list[np.ndarray], references: list[np.ndarray]
) -> Parity:
    """Run the artifact with its own runtime on every batch; refuse it above the tolerance."""
    parity = Parity()
    with _on_cpu():
        predict = runtime(spec, artifact)
        for batch, reference in zip(batches, references, strict=True):
            parity.add(reference, predict(batch))
    if not parity.holds:
        raise _Refused(
            f"export {spec.name} refused: its probabilities differ from the Keras model's by "
            f"up to {parity.max_abs_diff:.3g} on {parity.images} test images (the limit is "
            f"{TOLERANCE:g}); nothing was written for it; {_FIX[spec.name]}"
        )
    return parity


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


# ---------------------------------------------------------------- report and registry


def _entry(
    item: Exported, source: Source, classes: list[str], model: keras.Model
) -> dict[str, Any]:
    spec: ExportFormat = FORMATS[item.format]
    return {
        "path": item.path,
        "file": spec.artifact or None,
        "size_bytes": item.size_bytes,
        "max_abs_diff": item.max_abs_diff,
        "images": item.images,
        "tolerance": TOLERANCE,
        "runtime": spec.runtime,
        "input": {
            "name": "image",
            "shape": [None, *model.input_shape[1:]],
            "dtype": "float32",
            "values": "RGB 0-255",
        },
        "classes": classes,
        "source": {k: v for k, v in asdict(source).items() if v is not None},
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_report(
    paths: DatasetPaths,
    exported: list[Exported],
    source: Source,
    classes: list[str],
    model: keras.Model,
) -> Path:
    """``export.json``: this export's formats, plus the earlier ones still on disk."""
    target = export_root(paths) / REPORT
    formats: dict[str, Any] = {}
    if target.is_file():
        try:
            formats = dict(json.loads(target.read_text()).get("formats") or {})
        except (ValueError, AttributeError, TypeError):
            _log.warning("%s is not a readable report; starting a new one", target)
    formats = {
        name: entry
        for name, entry in formats.items()
        if isinstance(entry, dict) and (paths.root / str(entry.get("path", ""))).exists()
    }
    for item in exported:
        formats[item.format] = _entry(item, source, classes, model)
    write_json(target, {"dataset": paths.dataset, "formats": dict(sorted(formats.items()))})
    return target


def _log_to_registry(
    cfg: Config,
    paths: DatasetPaths,
    client: MlflowClient,
    source: Source,
    exported: list[Exported],
    report: Path,
) -> None:
    """The folders and this version's report on the version's run; its tags on the version."""
    from tasks.tracking.card import refresh_card

    assert source.registered_model and source.version
    uri = tracking_uri(cfg, paths.root)
    formats = json.loads(report.read_text())["formats"]
    mine = {  # every export on disk of this version, not only today's
        name: entry
        for name, entry in formats.items()
        if entry.get("source", {}).get("registered_model") == source.registered_model
        and entry.get("source", {}).get("version") == source.version
    }
    with server_errors(uri, f"python -m tasks export {paths.dataset}"):
        for item in exported:
            if source.run_id:
                client.log_artifacts(
                    source.run_id, str(paths.root / item.path), f"export/{item.format}"
                )
            prefix = f"export.{item.format}."
            for key, value in (
                ("max_abs_diff", f"{item.max_abs_diff:.3g}"),
                ("size_bytes", str(item.size_bytes)),
                ("images", str(item.images)),
            ):
                client.set_model_version_tag(
                    source.registered_model, source.version, prefix + key, value
                )
        if source.run_id:
            client.log_dict(
                source.run_id,
                {"dataset": paths.dataset, "formats": mine},
                f"export/{REPORT}",
            )
            # the model card's export parity table
            refresh_card(client, source.registered_model, source.version)
