"""The outline the two training stages share: ``train`` (phase 1) and ``finetune`` (phase 2).

Each stage says what is special about its phase: the model it starts from, which
layers train, what it records afterwards. :class:`Phase` does the rest the same
way for both (the data it trains on comes from :mod:`tasks.phase.inputs`):

- the device policy (precision, XLA, MirroredStrategy, or MultiWorkerMirroredStrategy
  across machines: ``tasks.cluster``) and the seed;
- the data: whether the layers that do not train run once (the feature cache),
  the augmentation, the global batch and the scaled learning rate;
- the checkpoint that lets a killed attempt resume (its fingerprint names what
  the phase trains, so other params or inputs start clean);
- the MLflow child run with the same param names for every backbone, the epoch
  callback, and the headline copied onto the pipeline's parent run;
- the fit (on images, or the trainable part on cached activations) and saving
  the model in float32.

Across machines (``train.distribute: multi_worker``) every worker runs the stage the
same way up to the end of the fit, each on its own part of the data (:attr:`Phase.part`);
worker 0, the chief, then writes the model, the reports, the checkpoint and the MLflow
run, and the others stop there (:meth:`Phase.followed`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import read_manifest, save_model
from tasks.cluster import Cluster, cluster_from_env
from tasks.config import Config, FinetuneConfig, TrainConfig
from tasks.errors import WorkerLost
from tasks.io import file_md5
from tasks.paths import DatasetPaths
from tasks.phase.inputs import PhaseInputs

if TYPE_CHECKING:
    import keras
    import mlflow

    from tasks.ml.arrays import ArrayStore
    from tasks.ml.devices import DevicePolicy
    from tasks.ml.training import PhaseCheckpoint, TrainResult, WorkerResult
    from tasks.tracking.callback import EpochLogger

log = logging.getLogger(__name__)

LABELS = {"train": "phase 1", "finetune": "phase 2"}
HEADLINE_PREFIX = {"train": "frozen", "finetune": "finetuned"}
CACHED_STEPS_PER_EXECUTION = 16
"""Batches per call into the compiled step on cached activations: the same updates, with
half the wall time of a head's epoch on the CPU (where Python's per-batch cost dominates)."""


@dataclass
class Phase(PhaseInputs):
    """One training phase as a stage runs it: settings, data, device policy, timing."""

    name: str
    cfg: Config
    paths: DatasetPaths
    settings: TrainConfig | FinetuneConfig
    manifest: Any
    policy: DevicePolicy
    devices: Any
    started: float
    cluster: Cluster = field(default_factory=Cluster)
    _temporary: list[ArrayStore] = field(default_factory=list)
    """The per-image caches to remove once the phase's model is saved."""

    @classmethod
    def start(cls, name: str, cfg: Config, paths: DatasetPaths) -> Phase:
        """Read the manifest, choose the device policy, seed Keras."""
        import keras

        from tasks.ml.devices import device_policy, strategy

        started = time.perf_counter()
        train = cfg.train
        across = train.distribute == "multi_worker"
        cluster = cluster_from_env(train.workers) if across else Cluster()
        policy = device_policy(
            train.precision, train.jit_compile, train.distribute, cluster.workers
        )
        devices = strategy(policy, cluster)  # before anything else starts TensorFlow's runtime
        settings = train if name == "train" else cfg.finetune
        phase = cls(
            name, cfg, paths, settings, read_manifest(paths), policy, devices, started, cluster
        )
        keras.utils.set_random_seed(train.seed)  # the same on every worker
        return phase

    @property
    def chief(self) -> bool:
        """Whether this process writes the phase's outputs (always, on one machine)."""
        return self.cluster.chief

    @property
    def across(self) -> bool:
        """Whether several workers train this phase together."""
        return self.cluster.workers > 1

    @property
    def classes(self) -> list[str]:
        return self.cfg.dataset(self.paths.dataset).classes

    def images(self, *splits: str) -> int:
        from tasks.ml.inputs import count_rows

        return sum(count_rows(self.manifest, split) for split in splits)

    @property
    def batch(self) -> int:
        """The global batch: ``train.batch_size`` per replica."""
        return self.policy.global_batch(self.cfg.train.batch_size)

    @property
    def rate(self) -> float:
        """The phase's learning rate, scaled with the number of replicas."""
        return self.policy.learning_rate(self.settings.learning_rate)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def epochs(self, cached: bool) -> int:
        """The phase's epochs. Phase 1's head on cached features (an epoch costs next to
        nothing) trains up to ``train.cached_epochs``, until early stopping finds it
        converged; null there keeps ``train.epochs``."""
        if self.name == "train" and cached and self.cfg.train.cached_epochs:
            return self.cfg.train.cached_epochs
        return self.settings.epochs

    def augments(self, cached: bool) -> bool:
        return self.settings.augment and not cached

    def boundary(self, model: keras.Model) -> str:
        """Where phase 2 starts unfreezing ``model``'s backbone."""
        from tasks.ml.backbone_file import default_boundary
        from tasks.ml.model import backbone_name

        backbone = backbone_name(model, default=self.cfg.train.backbone)
        return self.cfg.finetune.unfreeze_from or default_boundary(backbone, self.cfg.train)

    def compile(self, model: keras.Model) -> None:
        """Compile ``model`` with the phase's optimizer (after changing ``trainable``)."""
        from tasks.ml.model import compile_model

        s = self.settings
        with self.devices.scope():
            compile_model(
                model,
                s.optimizer,
                self.rate,
                len(self.classes),
                self.policy.jit_compile,
                s.momentum,
            )

    def checkpoint(self, **inputs: Any) -> PhaseCheckpoint:
        """The phase's resumable state; ``inputs`` add to what its fingerprint names."""
        from tasks.ml.training import PhaseCheckpoint

        fingerprint = {
            "phase": self.name,
            # the budget moves caches between RAM and disk; it changes no result
            self.name: self.settings.model_dump(exclude={"cache_budget_mb"}),
            "augmentation": self.cfg.augmentation.model_dump(),
            "manifest": file_md5(self.paths.manifest),
            "policy": self.policy.params(),
            **inputs,
        }
        scratch = None if self.chief else self._cache_dir(f"scratch/{self.name}")
        return PhaseCheckpoint(self.paths.checkpoint(self.name), fingerprint, scratch)

    def params(self, model: keras.Model, size: int, cached: bool, **own: Any) -> dict[str, Any]:
        """The phase's MLflow params: the same names for every backbone and both phases."""
        from tasks.ml.model import parameter_counts

        s = self.settings
        return {
            **own,
            "image_size": size,
            "epochs": self.epochs(cached),
            "optimizer": s.optimizer,
            "learning_rate": s.learning_rate,
            "batch_size": self.cfg.train.batch_size,
            "augment": self.augments(cached),
            "feature_cache": cached,
            "train_images": self.images("train"),
            "validation_images": self.images("validation"),
            "global_batch_size": self.batch,
            "scaled_learning_rate": self.rate,
            **self.policy.params(),
            **parameter_counts(model),
        }

    @contextmanager
    def tracked(
        self,
        params: dict[str, Any],
        tags: dict[str, str],
        checkpoint: PhaseCheckpoint,
        *,
        offset: int = 0,
        new_parent: bool = False,
    ) -> Iterator[tuple[mlflow.ActiveRun, EpochLogger, list[Any]]]:
        """The phase's MLflow child run, its epoch logger and the fit's callbacks (a worker
        other than the chief: no run, and an epoch logger that logs no metrics)."""
        import mlflow

        from tasks.tracking.callback import EpochLogger
        from tasks.tracking.runs import log_resume, phase_run

        patience = self.settings.early_stopping_patience
        if not self.chief:
            if checkpoint.resumed_epochs:
                log.info(
                    "%s resumes after epoch %d on %s (the chief's checkpoint in %s)",
                    LABELS[self.name], checkpoint.resumed_epochs, self.cluster.part,
                    checkpoint.directory,
                )  # fmt: skip
            logger = EpochLogger(
                self.name, offset=offset, images=self.images("train"), track=False,
                restored=checkpoint.finished,
            )  # fmt: skip
            yield None, logger, [*checkpoint.callbacks(patience), logger]  # type: ignore[misc]
            return
        with phase_run(self.cfg, self.paths, self.name, new_parent=new_parent) as run:
            mlflow.log_params(params)
            mlflow.set_tags(tags)
            log_resume(checkpoint, LABELS[self.name], params["epochs"])
            logger = EpochLogger(
                self.name, offset=offset, images=self.images("train"), restored=checkpoint.finished
            )
            yield run, logger, [*checkpoint.callbacks(patience), logger]

    def fit(
        self,
        model: keras.Model,
        data: tuple[Any, Any],
        callbacks: list[Any],
        trainee: keras.Model | None = None,
    ) -> None:
        """Fit the compiled ``model`` on ``data``; or, with ``trainee`` (the part of it that
        trains: the head, or the layers above the boundary), fit that part on ``data``'s
        cached activations with the phase's optimizer."""
        import tensorflow as tf

        from tasks.ml.model import compile_model, n_outputs

        s = self.settings
        with self.devices.scope():
            if trainee is not None:
                compile_model(
                    trainee, s.optimizer, self.rate, n_outputs(trainee),
                    self.policy.jit_compile, s.momentum, self.steps_per_execution,
                )  # fmt: skip
                model = trainee
            try:
                model.fit(
                    data[0], validation_data=data[1], epochs=self.epochs(trainee is not None),
                    callbacks=callbacks,
                    verbose=0, shuffle=False,
                )  # fmt: skip
            except (tf.errors.UnavailableError, tf.errors.InternalError) as error:
                if not self.across:
                    raise
                raise WorkerLost(self._lost(error)) from None

    def _lost(self, error: Exception) -> str:
        """One line: which worker saw which peer stop, and how the phase goes on."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        said = next((line for line in lines if "unhealthy" in line or "aborted" in line), "")
        said = said.split("aborted by: ")[-1].rstrip(":")
        return (
            f"{LABELS[self.name]} on {self.cluster.part}: another worker stopped during the fit "
            f"({said or type(error).__name__}); start all {self.cluster.workers} workers again "
            "and the phase resumes from the chief's last checkpoint"
        )

    @property
    def steps_per_execution(self) -> int:
        """Batches per call on cached activations: several on one device; one across
        replicas (Keras 3's multi-step loop under MirroredStrategy fails to build)."""
        return CACHED_STEPS_PER_EXECUTION if self.policy.replicas == 1 else 1

    def save(self, model: keras.Model, path: Path, checkpoint: PhaseCheckpoint) -> bool:
        """Save the model in float32 (any policy); the checkpoint is then done with.
        Returns whether this process goes on to write the phase's records (the chief).

        A worker other than the chief saves too (saving takes part in the workers'
        collective ops), into its scratch folder, which :meth:`followed` removes."""
        from tasks.ml.model import with_precision

        if not self.chief:
            path = self._cache_dir(f"scratch/{path.name}")
        save_model(with_precision(model, "float32"), path)
        checkpoint.remove()
        for store in self._temporary:
            store.remove()
        return self.chief

    def followed(self) -> WorkerResult:
        """A worker other than the chief, once the model is saved: its caches and scratch
        copies go, and nothing else is written (the chief writes the phase's outputs)."""
        from tasks.ml.training import WorkerResult

        for store in self._temporary:
            store.remove()
        shutil.rmtree(self._cache_dir("scratch"), ignore_errors=True)
        return WorkerResult(self.name, self.paths.dataset, self.cluster.part, self.seconds)

    def headline(
        self,
        val_accuracy: float,
        logger: EpochLogger,
        metrics: dict[str, float] | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """The figures the runs table compares, copied onto the parent run."""
        from tasks.tracking.runs import log_headline

        values = {
            f"{HEADLINE_PREFIX[self.name]}.val_accuracy": val_accuracy,
            f"{self.name}.seconds": self.seconds,
            **(metrics or {}),
        }
        if logger.images_per_second():
            values[f"{self.name}.images_per_second"] = logger.images_per_second()
        log_headline(values, params, tags)

    def result(self, trained: keras.Model, run: mlflow.ActiveRun, **fields: Any) -> TrainResult:
        """What the phase did, as the CLI prints it (``fields``: the phase's own)."""
        from tasks.ml.model import parameter_counts
        from tasks.ml.training import TrainResult

        counts = parameter_counts(trained)
        return TrainResult(
            phase=self.name,
            dataset=self.paths.dataset,
            trainable_params=counts["trainable_params"],
            total_params=counts["total_params"],
            seconds=self.seconds,
            run_id=run.info.run_id,
            **fields,
        )
