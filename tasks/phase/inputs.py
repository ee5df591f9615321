"""What a training phase trains on: the images, or activations computed once, in batches.

:class:`PhaseInputs` is the half of :class:`tasks.phase.Phase` that makes the data:

- whether the layers that do not train run once over the images (the feature
  cache), within the disk's free space;
- the per-image caches (decoded images, backbone features, phase 2's boundary
  activations), held in RAM within ``train.cache_budget_mb`` and read from disk
  beyond it, and keyed by what they were computed from;
- across machines (``train.distribute: multi_worker``), each worker's own part of
  every split (:attr:`PhaseInputs.part`), its own caches, and batches that give
  every worker the same number of steps.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import image_root
from tasks.io import file_md5

if TYPE_CHECKING:
    import keras

    from tasks.ml.arrays import ArrayStore, Budget
    from tasks.ml.model import Split

SPLITS = ("train", "validation")


class PhaseInputs:
    """The data-making methods of :class:`tasks.phase.Phase` (its fields: ``cfg``,
    ``paths``, ``manifest``, ``policy``, ``devices``, ``cluster``, ...)."""

    cfg: Any
    paths: Any
    settings: Any
    manifest: Any
    policy: Any
    devices: Any
    cluster: Any
    name: str
    _temporary: list[ArrayStore]

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
    def input_batch(self) -> int:
        """Images per batch the input pipeline makes: the global batch, or across machines
        one replica's (each worker's pipeline feeds its own replicas)."""
        return self.cfg.train.batch_size if self.across else self.batch

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
