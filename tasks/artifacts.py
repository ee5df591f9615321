"""The files stages hand each other: read with clear errors, written atomically.

- the validated manifest (``validate`` writes it; every later stage reads it);
- saved models (``train``/``finetune`` write them; ``evaluate``, ``register``
  and ``predict`` load them);
- the candidate record (``finetune`` writes which model goes on; ``evaluate``
  and ``register`` read it);
- per-epoch histories (each training phase writes its own).

Each reader turns a missing or broken file into a one-line StageError that
names the command that makes it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import StageError
from tasks.io import atomic_path, kept_on_full_disk, write_text
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import pandas as pd

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "split", "label", "status")
HISTORY_COLUMNS = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy")


# ---------------------------------------------------------------- manifest


def read_manifest(paths: DatasetPaths) -> pd.DataFrame:
    """The validated manifest, or a StageError telling to run ``validate`` first."""
    import pandas as pd

    if not paths.manifest.is_file():
        raise StageError(
            f"manifest {paths.manifest} not found; run `python -m tasks validate "
            f"{paths.dataset}` first"
        )
    try:
        frame = pd.read_parquet(paths.manifest)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types
        raise StageError(
            f"cannot read manifest {paths.manifest} ({error}); rerun "
            f"`python -m tasks validate {paths.dataset}`"
        ) from None
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise StageError(
            f"manifest {paths.manifest} lacks columns {missing}; rerun "
            f"`python -m tasks validate {paths.dataset}`"
        )
    _check_shards(paths, frame)
    return frame


def _check_shards(paths: DatasetPaths, frame: pd.DataFrame) -> None:
    """A manifest that locates its images in shards must be the one the shards were
    written with (``index.json``'s digest): a run killed between the two is refused."""
    from tasks.ml.shards import is_sharded, locator_digest, read_index

    if not is_sharded(frame):
        return
    if read_index(paths.shards).get("digest") != locator_digest(frame):
        raise StageError(
            f"the shards in {paths.shards} were not written with the manifest "
            f"{paths.manifest}; rerun `python -m tasks validate {paths.dataset}`"
        )


def image_root(paths: DatasetPaths, frame: pd.DataFrame) -> Path:
    """Where ``frame``'s images are read: the shards folder, or the extracted files."""
    from tasks.ml.shards import is_sharded

    return paths.shards if is_sharded(frame) else paths.raw


def labelled_rows(paths: DatasetPaths, split: str, classes: Sequence[str]) -> pd.DataFrame:
    """The manifest's usable rows of ``split`` in path order, with ``label_index``."""
    from tasks.ml.inputs import usable_rows

    frame = usable_rows(read_manifest(paths), split, classes)
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    frame["label_index"] = frame["label"].map({name: i for i, name in enumerate(classes)})
    return frame


# ---------------------------------------------------------------- models


def load_model(path: Path) -> keras.Model:
    """Load a saved end-to-end model (``tasks.ml.model`` registers its layers)."""
    import keras

    import tasks.ml.model  # noqa: F401 - registers the custom layers

    path = Path(path)
    if not path.is_file():
        raise StageError(f"model file {path} not found")
    try:
        return keras.saving.load_model(path, compile=False)
    except (OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StageError(f"cannot load model {path}: {first}; is it a .keras file?") from None


def save_model(model: keras.Model, target: Path) -> Path:
    """Write ``model`` to ``target`` (a .keras file) atomically.

    A full disk (or a file-size limit) is a one-line StageError; ``target`` is then
    left as it was (the previous model, or nothing).
    """
    target = Path(target)
    with kept_on_full_disk(target, "saving the model to", "model"):
        with atomic_path(target, suffix=".keras") as tmp, _scratch_temp_dir():
            model.save(tmp)
    return target


@contextmanager
def _scratch_temp_dir() -> Iterator[None]:
    """Keras's temp files in a folder removed whatever happens: a save that fails (a full
    disk) skips Keras's own clean-up and would leave its asset folder in $TMPDIR."""
    import tempfile

    before = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="tasks-save-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = before


def relative(paths: DatasetPaths, file: Path) -> str:
    """``file`` relative to the workspace root (as records and tags name it)."""
    try:
        return Path(file).resolve().relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        return str(file)


def read_candidate(paths: DatasetPaths) -> tuple[Path, dict[str, Any]]:
    """The model file named in ``candidate.json`` and the record itself."""
    if not paths.candidate.exists():
        raise StageError(
            f"{paths.candidate} not found; run `python -m tasks finetune {paths.dataset}` first"
        )
    try:
        record = json.loads(paths.candidate.read_text())
        model = paths.root / record["path"]
    except (ValueError, KeyError, TypeError):
        raise StageError(
            f"{paths.candidate} is not a candidate record with a 'path'; rerun "
            f"`python -m tasks finetune {paths.dataset}`"
        ) from None
    if not model.exists():
        raise StageError(
            f"candidate model {model} (named in {paths.candidate}) is missing; rerun "
            f"`python -m tasks finetune {paths.dataset}` or `dvc pull`"
        )
    return model, record


# ---------------------------------------------------------------- histories


def history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per-epoch rows as a frame with exactly :data:`HISTORY_COLUMNS` (NaN where missing)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in HISTORY_COLUMNS:
        if column not in frame:
            frame[column] = float("nan")
    return frame[list(HISTORY_COLUMNS)]


def write_history(frame: pd.DataFrame, csv: Path, png: Path) -> None:
    """The history as CSV (DVC plots) and its training-curves figure."""
    from tasks.ml import plots

    write_text(csv, frame.to_csv(index=False))
    with atomic_path(png, suffix=".png") as tmp:
        plots.training_curves(frame, tmp)


def read_phase_history(paths: DatasetPaths, phase: str) -> pd.DataFrame:
    """The rows ``phase`` wrote to its history CSV (empty, with a warning, if there is none)."""
    import pandas as pd

    file = paths.phase_history(phase)
    if not file.is_file():
        log.warning("%s not found; epochs of later phases are numbered from 1", file)
        return history_frame([])
    frame = pd.read_csv(file)
    return frame[frame["phase"] == phase] if "phase" in frame else history_frame([])


def read_history(paths: DatasetPaths) -> tuple[pd.DataFrame | None, str]:
    """Both phases' history, or (None, why not) for the figure to say so."""
    import pandas as pd

    if not paths.history.exists():
        log.warning("%s not found; the training-curves figure says so", paths.history)
        return None, f"no training history: {paths.history} not found"
    history = pd.read_csv(paths.history)
    missing = {"phase", "epoch", "loss", "accuracy"} - set(history.columns)
    if missing:
        return None, f"{paths.history} lacks columns {sorted(missing)}"
    return history, ""
