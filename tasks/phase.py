"""The outline the two training stages share: ``train`` (phase 1) and ``finetune`` (phase 2).

Each stage says what is special about its phase: the model it starts from, which
layers train, what it records afterwards. :class:`Phase` does the rest the same
way for both:

- the device policy (precision, XLA, MirroredStrategy) and the seed;
- the data: whether the layers that do not train run once (the feature cache),
  the augmentation, the global batch and the scaled learning rate;
- the checkpoint that lets a killed attempt resume (its fingerprint names what
  the phase trains, so other params or inputs start clean);
- the MLflow child run with the same param names for every backbone, the epoch
  callback, and the headline copied onto the pipeline's parent run;
- the fit (on images, or the trainable part on cached activations) and saving
  the model in float32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import read_manifest, save_model
from tasks.config import Config, FinetuneConfig, TrainConfig
from tasks.io import file_md5
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import mlflow

    from tasks.ml.devices import DevicePolicy
    from tasks.ml.training import PhaseCheckpoint, TrainResult
    from tasks.tracking.callback import EpochLogger

LABELS = {"train": "phase 1", "finetune": "phase 2"}
HEADLINE_PREFIX = {"train": "frozen", "finetune": "finetuned"}


@dataclass
class Phase:
    """One training phase as a stage runs it: settings, data, device policy, timing."""

    name: str
    cfg: Config
    paths: DatasetPaths
    settings: TrainConfig | FinetuneConfig
    manifest: Any
    policy: DevicePolicy
    devices: Any
    started: float

    @classmethod
    def start(cls, name: str, cfg: Config, paths: DatasetPaths) -> Phase:
        """Read the manifest, choose the device policy, seed Keras."""
        import keras

        from tasks.ml.devices import device_policy, strategy

        started = time.perf_counter()
        train = cfg.train
        policy = device_policy(train.precision, train.jit_compile, train.distribute)
        settings = train if name == "train" else cfg.finetune
        phase = cls(
            name, cfg, paths, settings, read_manifest(paths), policy, strategy(policy), started
        )
        keras.utils.set_random_seed(train.seed)
        return phase

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

    def use_cache(self, below: keras.Model, layer: str | None = "backbone") -> bool:
        """Whether the layers that do not train (``below``) run once over the images."""
        from tasks.ml.training import feature_bytes, use_feature_cache

        images = self.images("train", "validation")
        needed = feature_bytes(below, images, layer=layer)
        return use_feature_cache(self.settings, needed, self.name)

    def augments(self, cached: bool) -> bool:
        return self.settings.augment and not cached

    def datasets(self, size: int, cached: bool) -> tuple[Any, Any]:
        """Training and validation images (augmented training images unless cached)."""
        from tasks.ml.inputs import phase_datasets

        augment = self.cfg.augmentation if self.augments(cached) else None
        return phase_datasets(
            self.manifest, self.paths.raw, self.classes, size, self.cfg.train,
            shuffle=not cached, augment=augment, batch_size=self.batch,
        )  # fmt: skip

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
            self.name: self.settings.model_dump(),
            "augmentation": self.cfg.augmentation.model_dump(),
            "manifest": file_md5(self.paths.manifest),
            "policy": self.policy.params(),
            **inputs,
        }
        return PhaseCheckpoint(self.paths.checkpoint(self.name), fingerprint)

    def params(self, model: keras.Model, size: int, cached: bool, **own: Any) -> dict[str, Any]:
        """The phase's MLflow params: the same names for every backbone and both phases."""
        from tasks.ml.model import parameter_counts

        s = self.settings
        return {
            **own,
            "image_size": size,
            "epochs": s.epochs,
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
        """The phase's MLflow child run, its epoch logger and the fit's callbacks."""
        import mlflow

        from tasks.tracking.callback import EpochLogger
        from tasks.tracking.runs import log_resume, phase_run

        with phase_run(self.cfg, self.paths, self.name, new_parent=new_parent) as run:
            mlflow.log_params(params)
            mlflow.set_tags(tags)
            log_resume(checkpoint, LABELS[self.name], self.settings.epochs)
            logger = EpochLogger(
                self.name, offset=offset, images=self.images("train"), restored=checkpoint.finished
            )
            patience = self.settings.early_stopping_patience
            yield run, logger, [*checkpoint.callbacks(patience), logger]

    def fit(
        self,
        model: keras.Model,
        split: tuple[keras.Model, keras.Model] | None,
        data: tuple[Any, Any],
        callbacks: list[Any],
    ) -> None:
        """Fit the compiled ``model`` on images; with ``split`` (the layers that run once,
        the part that trains), fit the trainable part on activations computed once."""
        from tasks.ml.training import fit_on_activations

        s = self.settings
        with self.devices.scope():
            if split is None:
                model.fit(
                    data[0], validation_data=data[1], epochs=s.epochs, callbacks=callbacks,
                    verbose=0, shuffle=False,
                )  # fmt: skip
                return
            fit_on_activations(
                *split, *data,
                optimizer=s.optimizer, momentum=s.momentum, learning_rate=self.rate,
                jit_compile=self.policy.jit_compile, batch_size=self.batch,
                seed=self.cfg.train.seed, epochs=s.epochs, callbacks=callbacks,
            )  # fmt: skip

    def save(self, model: keras.Model, path: Path, checkpoint: PhaseCheckpoint) -> None:
        """Save the model in float32 (any policy); the checkpoint is then done with."""
        from tasks.ml.model import with_precision

        save_model(with_precision(model, "float32"), path)
        checkpoint.remove()

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
