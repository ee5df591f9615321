"""``feedback``: add a labelled drop to a dataset's training data, as a new data version.

``python -m tasks feedback <dataset> <drop>``. A drop is a folder laid out
``<drop>/<class>/<image>`` (the classes of ``datasets.<ds>.classes``): a folder
path, or its name under ``scoring.inbox`` (``<inbox>/<ds>/<drop>/``). Checked
before anything is written:

- the folder exists, holds class folders, and every one is a class of the dataset;
- every image passes validate's checks (:func:`tasks.ml.manifest.inspect_image`
  with ``validate:``'s settings, and ``validate.max_side``): a bad file is skipped
  and named;
- leakage: an image with the bytes (sha256) of one of the current manifest's
  ``validation`` or ``test`` images refuses the whole drop (training on held-out
  images would make the gate's scores lie);
- duplicates of training images, of earlier drops' images, or within the drop are
  skipped and named; a drop already fed back (same name and images, or the same
  images under another name) is a no-op; another drop's name is refused.

What is written: the accepted images at ``data/feedback/<ds>/<drop>/<class>/<file>``
with the drop's record ``feedback.json`` (name, source, time, counts per class,
each image's sha256, the drop's digest, what was skipped), copied into a
temporary folder renamed into place. In a DVC project the folder becomes a DVC
data version of its own (``dvc add``: ``<drop>.dvc`` beside it, the images in
the DVC cache); in a git checkout the ``.dvc`` file and the folder's
``.gitignore`` are committed, alone (``git commit -- <paths>``), else the
commands to do so are printed. A failed ``dvc add`` takes the folder away again.

``validate`` adds every drop under ``data/feedback/<ds>/`` to the manifest as
``train`` rows (``source``: the drop): the next ``dvc repro`` sees a changed
``data/feedback`` dep, and every stage after it a new manifest, a new data version.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import read_manifest
from tasks.config import Config, DatasetConfig, ValidateConfig
from tasks.errors import StageError
from tasks.io import atomic_path, file_lock, sha256_file, write_json
from tasks.ml.manifest import OK, Reason, Scan, build_manifest, scan_class_tree
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import pandas as pd

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SHOW = 3
"""Files named per problem in a one-line error (the rest counted)."""
HELD_OUT = ("validation", "test")


@dataclass(frozen=True)
class Earlier:
    """A drop fed back before: its record, or what its folder holds where it has none."""

    name: str
    digest: str | None
    added_at: str
    hashes: dict[str, str]
    """sha256 -> the image's path under the drop's folder."""


@dataclass
class FeedbackResult:
    dataset: str
    drop: str
    folder: Path
    added: dict[str, int] = field(default_factory=dict)
    """Class -> images fed back (empty for a no-op)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path in the drop, why) of every image left out."""
    noop: str = ""
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.noop:
            return f"feedback {self.dataset} {self.drop}: nothing to do, {self.noop}"
        per_class = ", ".join(f"{label} {n}" for label, n in self.added.items())
        lines = [
            f"feedback {self.dataset} {self.drop}: {sum(self.added.values())} images fed back "
            f"({per_class}) to {self.folder}"
        ]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            lines += [f"    {path}: {why}" for path, why in self.skipped]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def run(cfg: Config, paths: DatasetPaths, drop: str) -> FeedbackResult:
    """Check the drop, copy what passes into ``data/feedback/<ds>/<drop>/``, version it."""
    dataset = cfg.dataset(paths.dataset)
    source = find_drop(cfg, paths, drop)
    name = drop_name(source)
    with file_lock(paths.checkpoint("feedback").with_suffix(".lock")):
        found, loose = read_drop(source, dataset, cfg.validate_)
        digest = drop_digest(found)
        earlier = earlier_drops(paths)
        result = FeedbackResult(dataset.name, name, paths.feedback_drop(name))
        result.noop = already_fed_back(name, digest, earlier, paths)
        if result.noop and unversioned(paths, name):  # a run stopped before `dvc add` ended
            record = _read_record(paths.feedback_record(name))
            result.noop, result.added = "", dict(record.get("counts", {}))
            result.notes = version(paths, name, int(record.get("images", 0)))
        if result.noop or result.notes:
            return result
        accepted, result.skipped = sort_images(found, read_manifest(paths), earlier, name)
        result.skipped = [(path, Reason.NO_CLASS) for path in loose] + result.skipped
        if accepted.empty:
            raise StageError(
                f"nothing to feed back from {source}: all {len(found)} images were skipped "
                f"({_named(result.skipped)}); fix or replace them and rerun"
            )
        result.added = {
            label: int(n) for label, n in accepted.groupby("label", sort=True).size().items()
        }
        record = {
            "name": name,
            "dataset": dataset.name,
            "added_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": str(source.resolve()),
            "digest": digest,
            "images": int(len(accepted)),
            "counts": result.added,
            "files": dict(zip(accepted["path"], accepted["sha256"], strict=True)),
            "skipped": [{"path": path, "reason": why} for path, why in result.skipped],
        }
        copy_drop(source, accepted, paths, name, record)
        result.notes = version(paths, name, int(len(accepted)))
    return result


# --- the drop -------------------------------------------------------------------


def find_drop(cfg: Config, paths: DatasetPaths, drop: str) -> Path:
    """The drop's folder: ``drop`` itself, else ``<scoring.inbox>/<ds>/<drop>``."""
    given = Path(drop).expanduser()
    inbox = cfg.scoring.inbox
    looked = [given]
    if "://" not in inbox and not given.is_absolute():
        looked.append(paths.root / inbox / paths.dataset / drop)
    for folder in looked:
        if folder.is_dir():
            return folder
    if given.is_file():
        raise StageError(
            f"drop {drop} is a file, not a folder: unpack it into a folder laid out "
            "<drop>/<class>/<image> and give that folder"
        )
    raise StageError(
        f"drop {drop!r} not found (looked for {' and '.join(str(p) for p in looked)}); give "
        f"a drop's folder, or the name of one under {inbox}/{paths.dataset}/ (scoring.inbox)"
    )


def drop_name(folder: Path) -> str:
    """The drop's name (its folder's), safe as a path, a git message and a DVC target."""
    name = folder.resolve().name
    if not NAME.fullmatch(name):
        raise StageError(
            f"drop folder name {name!r} is not a usable drop name: rename the folder to "
            "letters, digits, '.', '_' and '-' (starting with a letter or digit)"
        )
    return name


def read_drop(
    source: Path, dataset: DatasetConfig, settings: ValidateConfig
) -> tuple[pd.DataFrame, list[str]]:
    """Every file of the drop's class folders decoded and checked (manifest rows, paths
    relative to the drop), and the files in no class folder; errors on a wrong layout."""
    tree = scan_class_tree(source)
    classes = ", ".join(dataset.classes)
    known = [name for name in tree.classes if name in dataset.classes]
    if not known:
        found = ", ".join(tree.classes) or "none"
        raise StageError(
            f"drop {source} is not laid out folder-per-class: class folders found: {found}; "
            f"expected {source}/<class>/<image> with the classes of {dataset.name} "
            f"({classes})"
        )
    unknown = [name for name in tree.classes if name not in dataset.classes]
    if unknown:
        raise StageError(
            f"drop {source} has class folder(s) {', '.join(unknown)} that are not classes of "
            f"{dataset.name} (datasets.{dataset.name}.classes: {classes}); rename or remove "
            "them and rerun"
        )
    if not tree.files:
        raise StageError(f"drop {source} holds no images in its class folders ({classes})")
    found = build_manifest(Scan(raw=source, files=tree.files), settings)
    too_big = (found["status"] == OK) & (
        (found["width"] > settings.max_side) | (found["height"] > settings.max_side)
    )
    found.loc[too_big, "status"] = "quarantined"
    found.loc[too_big, "reason"] = [
        f"larger than max_side {settings.max_side}: {w}x{h} px"
        for w, h in zip(found.loc[too_big, "width"], found.loc[too_big, "height"], strict=True)
    ]
    return found, tree.loose


def drop_digest(found: pd.DataFrame) -> str:
    """sha256 over the drop's files (path in the drop and sha256 of each): same images,
    same digest, whatever the folder is called."""
    lines = sorted(f"{p}\t{s}" for p, s in zip(found["path"], found["sha256"], strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --- what was fed back before ---------------------------------------------------


def earlier_drops(paths: DatasetPaths) -> list[Earlier]:
    """The drops already under ``data/feedback/<ds>/``: their records, else their files."""
    missing = paths.feedback_not_checked_out()
    if missing:
        raise StageError(
            f"fed-back drop(s) {', '.join(missing)} are recorded ({paths.feedback}/<drop>.dvc) "
            f"but not checked out, so this drop cannot be checked against them: run `dvc "
            f"checkout -R {_relative(paths, paths.feedback)}` (or `dvc pull -R ...`) and rerun"
        )
    drops = []
    for folder in paths.feedback_drops():
        record = _read_record(paths.feedback_record(folder.name))
        hashes = record.get("files")
        if not isinstance(hashes, dict):  # no record (placed by hand): hash what is there
            tree = scan_class_tree(folder)
            hashes = {f.path: sha256_file(folder / f.path) for f in tree.files}
        drops.append(
            Earlier(
                name=folder.name,
                digest=record.get("digest"),
                added_at=str(record.get("added_at", "an earlier run")),
                hashes={sha: path for path, sha in hashes.items()},
            )
        )
    return drops


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def already_fed_back(name: str, digest: str, earlier: list[Earlier], paths: DatasetPaths) -> str:
    """Why this drop needs nothing done ("" if it is new); an error for a taken name."""
    for drop in earlier:
        if drop.name == name and drop.digest == digest:
            return f"drop {name} was fed back on {drop.added_at} ({paths.feedback_drop(name)})"
        if drop.name == name:
            raise StageError(
                f"a drop named {name} was fed back to {paths.dataset} on {drop.added_at} with "
                f"other images; rename the new drop's folder to feed it back as another drop "
                "(or undo the earlier one: docs/datasets.md)"
            )
        if drop.digest == digest:
            return (
                f"the same images were fed back as drop {drop.name} on {drop.added_at} "
                f"({paths.feedback_drop(drop.name)})"
            )
    return ""


def unversioned(paths: DatasetPaths, name: str) -> bool:
    """Whether the drop's folder is here, in a DVC project, without its ``.dvc`` file."""
    return (
        (paths.root / ".dvc").is_dir()
        and paths.feedback_drop(name).is_dir()
        and not (paths.feedback / f"{name}.dvc").exists()
    )


# --- which images go in ---------------------------------------------------------


def sort_images(
    found: pd.DataFrame, manifest: pd.DataFrame, earlier: list[Earlier], name: str
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The rows to feed back and (path, why) of each left out; a StageError when the drop
    holds an image of the held-out splits (leakage)."""
    refuse_leaks(found, manifest, name)
    train = manifest[manifest["split"] == "train"]
    seen = {sha: f"training image {path}" for path, sha in _pairs(train)}
    for drop in earlier:
        for sha, path in drop.hashes.items():
            seen.setdefault(sha, f"{drop.name}/{path} (fed back before)")
    keep, skipped = [], []
    for index, path, sha, status, reason in zip(
        found.index, found["path"], found["sha256"], found["status"], found["reason"], strict=True
    ):
        if status != OK:
            skipped.append((path, reason))
        elif sha in seen:
            skipped.append((path, f"duplicate of {seen[sha]}"))
        else:
            keep.append(index)
            seen[sha] = f"{path} in this drop"
    return found.loc[keep], skipped


def refuse_leaks(found: pd.DataFrame, manifest: pd.DataFrame, name: str) -> None:
    """A StageError naming the drop's images that are validation or test images."""
    held = manifest[manifest["split"].isin(HELD_OUT)]
    splits = dict(zip(held["path"], held["split"], strict=True))
    held_at = {sha: f"{splits[path]} image {path}" for path, sha in _pairs(held)}
    leaks = [(path, held_at[sha]) for path, sha in _pairs(found) if sha in held_at]
    if leaks:
        raise StageError(
            f"drop {name} refused: {len(leaks)} of its images are held-out images of the "
            f"dataset ({_named(leaks)}); training on them would make the test scores lie: "
            "remove them from the drop and rerun"
        )


def _pairs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(path, sha256) of the rows whose bytes could be read."""
    return [
        (str(path), str(sha))
        for path, sha in zip(frame["path"], frame["sha256"], strict=True)
        if isinstance(sha, str) and sha
    ]


def _named(items: list[tuple[str, str]]) -> str:
    named = "; ".join(f"{path}: {what}" for path, what in items[:SHOW])
    return named + (f" +{len(items) - SHOW} more" if len(items) > SHOW else "")


# --- writing and versioning -----------------------------------------------------


def copy_drop(
    source: Path, accepted: pd.DataFrame, paths: DatasetPaths, name: str, record: dict[str, Any]
) -> None:
    """The accepted images and the record, copied into a temporary folder renamed into
    ``data/feedback/<ds>/<drop>``: on any failure nothing is left there."""
    with atomic_path(paths.feedback_drop(name)) as staging:
        for path, sha in zip(accepted["path"], accepted["sha256"], strict=True):
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / path, target)
            if sha256_file(target) != sha:
                raise StageError(
                    f"{source / path} changed while it was fed back; rerun when the drop is "
                    "complete (nothing was fed back)"
                )
        write_json(staging / paths.feedback_record(name).name, record)


def version(paths: DatasetPaths, name: str, images: int) -> list[str]:
    """``dvc add`` the drop (removed again if that fails) and commit its ``.dvc`` file and
    ``.gitignore``; what was done, or the commands left to run."""
    folder = _relative(paths, paths.feedback_drop(name))
    dvc_file, ignore = f"{folder}.dvc", _relative(paths, paths.feedback / ".gitignore")
    message = f"feedback: {paths.dataset} {name} ({images} images)"
    commit = [
        ["git", "add", "--", dvc_file, ignore],
        ["git", "commit", "-m", message, "--", dvc_file, ignore],
    ]
    if not (paths.root / ".dvc").is_dir():
        steps = [["dvc", "add", folder], *commit]
        return [
            f"not a DVC project ({paths.root}): the drop is not versioned; to version it: "
            + " && ".join(shlex.join(step) for step in steps)
        ]
    code, said = _run(paths.root, [sys.executable, "-m", "dvc", "add", folder])
    if code:
        shutil.rmtree(paths.feedback_drop(name), ignore_errors=True)
        (paths.root / dvc_file).unlink(missing_ok=True)
        hint = (
            f"; {_relative(paths, paths.feedback_root)}/ must not be git-ignored: ignore "
            "data/'s other folders in .gitignore, not /data/ as a whole"
            if "git-ignored" in said
            else ""
        )
        raise StageError(
            f"`dvc add {folder}` failed: {said.rstrip('.')}; nothing was fed back{hint}"
        )
    notes = [f"dvc add: {dvc_file} (the images are in the DVC cache; `dvc push` shares them)"]
    if _run(paths.root, ["git", "rev-parse", "--is-inside-work-tree"])[0]:
        todo = " && ".join(shlex.join(step) for step in commit)
        return [*notes, f"not a git checkout; to commit the data version: {todo}"]
    for step in commit:
        code, said = _run(paths.root, step)
        if code:
            todo = " && ".join(shlex.join(step) for step in commit)
            return [*notes, f"git could not commit ({said}); commit it yourself: {todo}"]
    head = _run(paths.root, ["git", "rev-parse", "--short", "HEAD"])[1]
    return [*notes, f"git commit {head}: {message}", "next: `dvc repro` trains on it"]


def _run(cwd: Path, argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` in ``cwd``: its exit code and the last line it said."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as error:
        return 127, str(error)
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode:
        errors = [line for line in lines if line.startswith(("ERROR", "error", "fatal"))]
        lines = [re.sub(r"^(ERROR|error|fatal):\s*", "", line) for line in errors or lines]
    return proc.returncode, (lines[-1] if lines else "")


def _relative(paths: DatasetPaths, path: Path) -> str:
    return path.relative_to(paths.root).as_posix()
