"""Where each stage reads and writes, per dataset (docs/architecture.md, data flow)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetPaths:
    """All file locations of one dataset under a workspace ``root``."""

    root: Path
    dataset: str

    @classmethod
    def of(cls, dataset: str, root: str | Path = ".") -> DatasetPaths:
        return cls(Path(root), dataset)

    @property
    def raw(self) -> Path:
        """Extracted, verified archive (DVC out of ``download``)."""
        return self.root / "data" / "raw" / self.dataset

    @property
    def raw_archive(self) -> Path:
        """``format: shards``: the verified archive, kept whole in ``raw`` (one DVC object)."""
        return self.raw / "archive.zip"

    @property
    def shards(self) -> Path:
        """The accepted images as TFRecord shards and their ``index.json`` (DVC out of
        ``validate``; with ``format: files`` only the index, which says so)."""
        return self.root / "data" / "shards" / self.dataset

    @property
    def archive(self) -> Path:
        """The downloaded archive itself, kept for resume and re-verification."""
        return self.root / "data" / "archives" / f"{self.dataset}.zip"

    @property
    def download_record(self) -> Path:
        """What was fetched from where, with its sha256 and time.

        Outside ``raw``, so the cached tree holds the archive's files only and
        the same archive always gets the same DVC hash.
        """
        return self.reports / "download.json"

    @property
    def known_hashes(self) -> Path:
        """Trust-on-first-use sha256 records, outside ``raw`` so they survive its removal."""
        return self.root / "data" / "checksums" / f"{self.dataset}.sha256"

    @property
    def feedback_root(self) -> Path:
        """Labelled drops fed back, every dataset's (a dep of ``validate``, so it must exist:
        its README.md is committed)."""
        return self.root / "data" / "feedback"

    @property
    def feedback(self) -> Path:
        """This dataset's fed-back drops, each a folder ``<drop>/<class>/<image>`` and, in a
        DVC project, a data version of its own (``<drop>.dvc`` beside it)."""
        return self.feedback_root / self.dataset

    def feedback_drop(self, drop: str) -> Path:
        return self.feedback / drop

    def feedback_record(self, drop: str) -> Path:
        """What ``python -m tasks feedback`` took from a drop and from where: inside the
        drop's folder, so it is versioned (and removed) with its images."""
        return self.feedback_drop(drop) / "feedback.json"

    def feedback_drops(self) -> list[Path]:
        """The drop folders fed back to this dataset, by name (hidden staging folders of a
        feedback in progress left out)."""
        if not self.feedback.is_dir():
            return []
        return sorted(
            p for p in self.feedback.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def feedback_not_checked_out(self) -> list[str]:
        """Drops recorded as DVC data versions (``<drop>.dvc``) whose folder is not here: a
        clone or workspace that has not run ``dvc checkout`` (or ``dvc pull``) for them."""
        if not self.feedback.is_dir():
            return []
        return sorted(
            dvc.stem
            for dvc in self.feedback.glob("*.dvc")
            if not self.feedback_drop(dvc.stem).is_dir()
        )

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "manifests" / f"{self.dataset}.parquet"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.dataset

    @property
    def validation_reports(self) -> Path:
        return self.reports / "validation"

    @property
    def validation_summary(self) -> Path:
        """DVC metrics of ``validate`` (beside, not inside, the Data Docs folder out)."""
        return self.reports / "validation.json"

    @property
    def models(self) -> Path:
        return self.root / "models" / self.dataset

    @property
    def frozen_model(self) -> Path:
        return self.models / "frozen.keras"

    @property
    def finetuned_model(self) -> Path:
        return self.models / "finetuned.keras"

    def checkpoint(self, phase: str) -> Path:
        """A training phase's resume state: outside every DVC output, removed when it ends."""
        return self.root / ".checkpoints" / self.dataset / phase

    def array_cache(self, name: str) -> Path:
        """Per-image arrays a phase computes once (decoded images, features, boundary
        activations): beside the checkpoints, outside every DVC output."""
        return self.root / ".checkpoints" / self.dataset / "arrays" / name

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def predictions(self) -> Path:
        """One row per validation image from ``evaluate`` (DVC confusion plot)."""
        return self.reports / "predictions.csv"

    @property
    def gate(self) -> Path:
        """The registry gate's decision and both scores (DVC metrics of ``register``)."""
        return self.reports / "gate.json"

    @property
    def history(self) -> Path:
        """Per-epoch metrics of both phases (written by ``finetune``; DVC plots)."""
        return self.reports / "history.csv"

    def phase_history(self, phase: str) -> Path:
        """Per-epoch metrics of one phase, owned by that phase's stage."""
        return self.reports / "history" / f"{phase}.csv"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def candidate(self) -> Path:
        """Which model fine-tuning passes on (the better of frozen and fine-tuned), and why."""
        return self.models / "candidate.json"

    def run_record(self, phase: str) -> Path:
        """MLflow run ids of one phase, handed to later stage processes.

        One file per phase, so each DVC stage owns its own output.
        """
        return self.reports / "runs" / f"{phase}.json"
