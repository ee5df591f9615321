"""The outline the two training stages share: ``train`` (phase 1) and ``finetune`` (phase 2).

Each stage says what is special about its phase: the model it starts from, which
layers train, what it records afterwards. :class:`Phase` does the rest the same
way for both:

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

import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import image_root, read_manifest, save_model
from tasks.cluster import Cluster, cluster_from_env
from tasks.config import Config, FinetuneConfig, TrainConfig
from tasks.io import file_md5
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import mlflow

    from tasks.ml.arrays import ArrayStore, Budget
    from tasks.ml.devices import DevicePolicy
    from tasks.ml.model import Split
    from tasks.ml.training import PhaseCheckpoint, TrainResult, WorkerResult
    from tasks.tracking.callback import EpochLogger

LABELS = {"train": "phase 1", "finetune": "phase 2"}
SPLITS = ("train", "validation")
HEADLINE_PREFIX = {"train": "frozen", "finetune": "finetuned"}
CACHED_STEPS_PER_EXECUTION = 16
"""Batches per call into the compiled step on cached activations: the same updates, with
half the wall time of a head's epoch on the CPU (where Python's per-batch cost dominates)."""


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

    @cached_property
    def part(self) -> Any:
        """The manifest rows this worker reads: all of them on one machine; across
        machines, its own run of each split (``tasks.ml.inputs.worker_rows``)."""
        from tasks.ml.inputs import worker_rows

        return worker_rows(self.manifest, self.cluster.index, self.cluster.workers)

    @cached_property
    def root(self) -> Path:
        """Where the manifest's images are: the extracted files, or the shards."""
        return image_root(self.paths, self.manifest)

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
    def input_batch(self) -> int:
        """Images per batch the input pipeline makes: the global batch, or across machines
        one replica's (each worker's pipeline feeds its own replicas)."""
        return self.cfg.train.batch_size if self.across else self.batch

    @property
    def rate(self) -> float:
        """The phase's learning rate, scaled with the number of replicas."""
        return self.policy.learning_rate(self.settings.learning_rate)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def use_cache(self, below: keras.Model, layer: str | None = "backbone") -> bool:
        """Whether the layers that do not train (``below``) run once over the images."""
        from tasks.ml.arrays import free_bytes
        from tasks.ml.training import feature_bytes, use_feature_cache

        images = self.images(*SPLITS)
        needed = feature_bytes(below, images, layer=layer)
        free = free_bytes(self.paths.array_cache(""))
        return use_feature_cache(self.settings, needed, self.name, free)

    @cached_property
    def budget(self) -> Budget:
        """The RAM this phase's per-image caches may hold (``train.cache_budget_mb``)."""
        from tasks.ml.arrays import Budget, budget_bytes

        return Budget(budget_bytes(self.cfg.train.cache_budget_mb))

    def datasets(self, size: int) -> tuple[Any, Any]:
        """Training and validation images, decoded once (held within the budget, else read
        from disk), training batches shuffled and augmented if the phase augments."""
        from tasks.ml.inputs import training_batches

        stores = [self._image_store(split, size) for split in SPLITS]
        train, val = (self._hold(store) for store in stores)
        augment = self.cfg.augmentation if self.settings.augment else None
        seed = self.cfg.train.seed
        return (
            self._distributed(training_batches(self._batches(train, True), augment, seed), "train"),
            self._distributed(training_batches(self._batches(val, False), None, 0), "validation"),
        )

    def feature_data(self, model: keras.Model, boundary: str | None) -> tuple[Any, Any]:
        """Phase 1's backbone features of the training and validation images, computed once.

        With ``boundary`` (phase 2 will train on cached activations), the images pass
        the layers below it and then the rest of the backbone: the activations at the
        boundary are kept for phase 2, so the lower backbone runs once for both phases.
        """
        from tasks.ml.model import feature_extractor, split_at

        with self.devices.scope():
            split = split_at(model, boundary) if boundary else None
            extractor = feature_extractor(model)
        stores = []
        for name in SPLITS:
            features = self._key(name, "features", extractor)
            chain = [(extractor, self._cache_dir(f"features/{name}"), features)]
            if split is not None:
                below = self._key(name, "boundary", split.lower)
                chain[:1] = [
                    (split.lower, self._cache_dir(f"boundary/{name}"), below),
                    (split.above, chain[0][1], features),
                ]
            stores.append(self._stores(name, model.input_shape[1], chain)[-1])
        return self._store_data(stores)

    def boundary_data(self, split: Split) -> tuple[Any, Any]:
        """Phase 2's activations at the boundary (phase 1's, when it kept them for us)."""
        stores = []
        for name in SPLITS:
            directory = self._cache_dir(f"boundary/{name}")
            chain = [(split.lower, directory, self._key(name, "boundary", split.lower))]
            stores.append(self._stores(name, split.lower.input_shape[1], chain)[-1])
        return self._store_data(stores)

    def _cache_dir(self, name: str) -> Path:
        """Where this worker keeps a cache: across machines each worker has its own."""
        return self.paths.array_cache(f"{self.cluster.part}/{name}" if self.across else name)

    def _key(self, split: str, what: str, model: keras.Model) -> dict[str, Any]:
        """What a cache of ``model``'s outputs for ``split`` depends on."""
        from tasks.ml.training import weights_digest

        return {
            "what": what, "split": split, "manifest": file_md5(self.paths.manifest),
            "input": list(model.input_shape[1:]), "weights": weights_digest(model),
            "precision": self.policy.precision,
        }  # fmt: skip

    def _stores(self, split: str, size: int, chain: list[Any]) -> list[ArrayStore]:
        """The chain's stores, read back if made from the same inputs, else computed in one
        pass over the split's images; the last one is this phase's to remove."""
        from tasks.ml.arrays import ArrayStore
        from tasks.ml.inputs import decoded_batches, training_batches
        from tasks.ml.training import extract_stores

        found = [ArrayStore.open(directory, key) for _, directory, key in chain]
        if found[-1] is None:
            images = decoded_batches(
                self.part, self.root, split, self.classes, size, self.input_batch
            )
            with self.devices.scope():
                found = list(extract_stores(training_batches(images, None, 0), chain))
        self._temporary.append(found[-1])
        return [store for store in found if store is not None]

    def _image_store(self, split: str, size: int) -> ArrayStore:
        """The split's images decoded once, as uint8 at ``size`` px."""
        from tasks.ml.arrays import ArrayStore
        from tasks.ml.inputs import decoded_batches

        directory = self._cache_dir(f"images/{split}")
        key = {"what": "images", "split": split, "size": size,
               "manifest": file_md5(self.paths.manifest)}  # fmt: skip
        store = ArrayStore.open(directory, key)
        if store is None:
            batches = decoded_batches(
                self.part, self.root, split, self.classes, size, self.input_batch
            )
            store = ArrayStore.write(directory, ((x.numpy(), y.numpy()) for x, y in batches), key)
        self._temporary.append(store)
        return store

    def _hold(self, store: ArrayStore) -> ArrayStore:
        store.hold(self.budget)
        return store

    def _batches(self, store: ArrayStore, shuffle: bool) -> Any:
        return store.dataset(self.input_batch, shuffle=shuffle, seed=self.cfg.train.seed)

    def _store_data(self, stores: list[ArrayStore]) -> tuple[Any, Any]:
        """Shuffled training batches and ordered validation batches of two stores."""
        train, val = (self._hold(store) for store in stores)
        return (
            self._distributed(self._batches(train, True), "train"),
            self._distributed(self._batches(val, False), "validation"),
        )

    def _distributed(self, batches: Any, split: str) -> Any:
        """Across machines, this worker's batches as the strategy's input, the same number
        of steps on every worker: TensorFlow's collective ops need each to take part in
        every step, so a worker whose part is a batch short starts it over for that batch
        (at most a batch per worker and split counts twice in an epoch). On one machine,
        ``batches`` as they are (Keras distributes them)."""
        if not self.across:
            return batches
        local = len(self.policy.devices)
        most = math.ceil(self.images(split) / self.cluster.workers)
        steps = math.ceil(math.ceil(most / self.input_batch) / local)
        even = batches.repeat().take(steps * local)
        return self.devices.distribute_datasets_from_function(lambda _: even)

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
        from tasks.ml.model import compile_model, n_outputs

        s = self.settings
        with self.devices.scope():
            if trainee is not None:
                compile_model(
                    trainee, s.optimizer, self.rate, n_outputs(trainee),
                    self.policy.jit_compile, s.momentum, self.steps_per_execution,
                )  # fmt: skip
                model = trainee
            model.fit(
                data[0], validation_data=data[1], epochs=self.epochs(trainee is not None),
                callbacks=callbacks,
                verbose=0, shuffle=False,
            )  # fmt: skip

    @property
    def steps_per_execution(self) -> int:
        """Batches per call on cached activations: several on one device; one across
        replicas (Keras 3's multi-step loop under MirroredStrategy fails to build)."""
        return CACHED_STEPS_PER_EXECUTION if self.policy.replicas == 1 else 1

    def save(self, model: keras.Model, path: Path, checkpoint: PhaseCheckpoint) -> None:
        """Save the model in float32 (any policy); the checkpoint is then done with.

        A worker other than the chief saves too (saving takes part in the workers'
        collective ops), into its scratch folder, which :meth:`followed` removes."""
        from tasks.ml.model import with_precision

        if not self.chief:
            path = self._cache_dir(f"scratch/{path.name}")
        save_model(with_precision(model, "float32"), path)
        checkpoint.remove()
        for store in self._temporary:
            store.remove()

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
