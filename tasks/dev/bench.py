"""``make bench``: wall time, images/s and validation accuracy of both training phases,
our way next to the tutorial way, on generated data with offline-made weights.

Our way is the pipeline itself (``tasks.steps.train.run`` then
``tasks.steps.finetune.run``): manifest-driven ``tf.data``, phase 1 on cached backbone
features (augmentation off), phase 2 from the registry's named boundary, with
augmentation on images and without it on activations cached at the boundary
(``--finetune-augment both``, the default).
The tutorial way (TensorFlow's "Transfer learning and fine-tuning"):
``image_dataset_from_directory``, augmentation layers inside the model, the frozen
base run on every step of phase 1, then fine-tuning from layer 100. Both use the
same backbone weights (made offline, no download), head, optimizer settings,
augmentation (the ``augmentation:`` section), image size, batch size and epoch
counts, except that our head on cached features trains until early stopping
finds it converged (``train.cached_epochs``, the pipeline's default: its epochs
cost next to nothing); otherwise early stopping is off so every epoch runs. As in the tutorial, its
datasets are not cached (every epoch decodes the files again).

images/s counts training images per second of the phase's wall time (data
loading, feature extraction, validation and saving included).

    python -m tasks.dev.bench [--backbone mobilenet_v2] [--image-size 160] [--images 2000]
                          [--val-images 500] [--epochs 10] [--finetune-epochs 3]
                          [--tutorial-freeze-bn] [--skip-tutorial]

The default epochs (10 + 3, not the tutorial's 10 + 10) keep the whole comparison
under 10 minutes on 2 CPU cores; fine-tuning costs the same per epoch both ways.

Everything lands under ``--state`` (default ``.bench/``); data and weights are
reused between runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import Config, TrainConfig, parse_config
from tasks.errors import ConfigError, StageError
from tasks.paths import DatasetPaths

DATASET = "cats_vs_dogs"
PRETRAIN_SIZE = 32


@dataclass(frozen=True)
class Row:
    phase: str
    way: str
    epochs: int
    images: int
    seconds: float
    val_accuracy: float

    @property
    def rate(self) -> float:
        return self.images * self.epochs / self.seconds if self.seconds else 0.0


def table(rows: list[Row]) -> str:
    head = f"{'phase':<22} {'way':<44} {'epochs':>6} {'wall s':>8} {'images/s':>9} {'val acc':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row.phase:<22} {row.way:<44} {row.epochs:>6} {row.seconds:>8.1f} "
            f"{row.rate:>9.1f} {row.val_accuracy:>8.3f}"
        )
    return "\n".join(lines)


def make_data(state: Path, train_images: int, val_images: int, side: int) -> DatasetPaths:
    """A generated cats_vs_dogs tree under ``state`` and its manifest (validate's own code)."""
    import pandas as pd

    from tasks.dev.synthetic import make_tree, tiny_params
    from tasks.ml.manifest import build_manifest, scan_raw

    counts = {"train": train_images // 2, "validation": val_images // 2}
    name = f"data-{counts['train']}-{counts['validation']}-{side}"
    paths = DatasetPaths.of(DATASET, state / name)
    cfg = parse_config(tiny_params({DATASET: "file:///unused.zip"}, counts))
    if not paths.manifest.is_file():
        make_tree(paths.raw, DATASET, counts, side, seed=11)
        frame = build_manifest(scan_raw(paths.raw, cfg.dataset(DATASET)), cfg.validate_)
        paths.manifest.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(frame).to_parquet(paths.manifest, index=False)
    return paths


def bench_config(args: argparse.Namespace, weights: Path, counts: dict[str, int]) -> Config:
    from tasks.dev.synthetic import tiny_params

    params = tiny_params(
        {DATASET: "file:///unused.zip"},
        counts,
        train={
            "backbone": args.backbone,
            "image_size": args.image_size,
            "weights": str(weights),
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            # the pipeline's own: the head on cached features trains until early stopping
            # (with the pipeline's patience) finds it converged; the only phase that
            # stops early, the others run all their epochs, as the tutorial's do
            "cached_epochs": TrainConfig().cached_epochs,
            "early_stopping_patience": TrainConfig().early_stopping_patience,
        },
        finetune={"epochs": args.finetune_epochs, "early_stopping_patience": args.finetune_epochs},
        tracking={"experiment_prefix": "bench-"},
    )
    return parse_config(params)


def ours(cfg: Config, paths: DatasetPaths, train_images: int, augment: str) -> list[Row]:
    """Phase 1, then phase 2 with augmentation (on images) and/or without (on activations
    cached at the boundary), as ``augment`` (on | off | both) asks."""
    from tasks.steps import finetune, train

    started = time.perf_counter()
    frozen = train.run(cfg, paths)
    frozen_s = time.perf_counter() - started
    rows = [
        Row(
            "frozen base (head)",
            "ours: cached features" if frozen.feature_cache else "ours: end to end",
            frozen.epochs_run,
            train_images,
            frozen_s,
            _last_val_accuracy(paths, "train"),
        )
    ]
    flags = {"both": (True, False), "on": (True,), "off": (False,)}[augment]
    for flag in flags:
        tune = cfg.finetune.model_copy(update={"augment": flag})
        tune_cfg = cfg.model_copy(update={"finetune": tune})
        started = time.perf_counter()
        tuned = finetune.run(tune_cfg, paths)
        how = "cached at boundary" if tuned.feature_cache else "augmented images"
        rows.append(
            Row(
                "fine-tune top blocks",
                f"ours: {how}",
                tuned.epochs_run,
                train_images,
                time.perf_counter() - started,
                _last_val_accuracy(paths, "finetune"),
            )
        )
    return rows


def _last_val_accuracy(paths: DatasetPaths, phase: str) -> float:
    import pandas as pd

    history = pd.read_csv(paths.history if phase == "finetune" else paths.phase_history("train"))
    return float(history.loc[history["phase"] == phase, "val_accuracy"].iloc[-1])


def tutorial(
    cfg: Config,
    paths: DatasetPaths,
    weights: Path,
    train_images: int,
    freeze_batch_norm: bool = False,
) -> list[Row]:
    """The TensorFlow tutorial's recipe, on the same data, weights and settings.

    As in the tutorial, fine-tuning leaves the BatchNormalization layers of
    ``layers[100:]`` trainable (their gamma/beta) unless ``freeze_batch_norm``.
    """
    import keras

    from tasks.ml.model import compile_model

    train, tune = cfg.train, cfg.finetune
    keras.utils.set_random_seed(train.seed)
    started = time.perf_counter()
    train_ds, val_ds, size = _tutorial_folders(cfg, paths)
    model, base = _tutorial_model(cfg, size, weights)
    compile_model(model, train.optimizer, train.learning_rate, 2, momentum=train.momentum)
    history = model.fit(train_ds, validation_data=val_ds, epochs=train.epochs, verbose=0)
    frozen = Row(
        "frozen base (head)",
        "tutorial: base + aug every step",
        train.epochs,
        train_images,
        time.perf_counter() - started,
        history.history["val_accuracy"][-1],
    )

    started = time.perf_counter()
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    if freeze_batch_norm:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    compile_model(model, tune.optimizer, tune.learning_rate, 2, momentum=tune.momentum)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=train.epochs + tune.epochs,
        initial_epoch=train.epochs,
        verbose=0,
    )
    tuned = Row(
        "fine-tune top blocks",
        "tutorial: layers[100:]" + (", BN frozen" if freeze_batch_norm else ""),
        tune.epochs,
        train_images,
        time.perf_counter() - started,
        history.history["val_accuracy"][-1],
    )
    return [frozen, tuned]


def _tutorial_folders(cfg: Config, paths: DatasetPaths) -> tuple[Any, Any, int]:
    """The tutorial's input: ``image_dataset_from_directory`` over the raw split folders."""
    import keras
    import tensorflow as tf

    from tasks.ml.backbones import get_backbone

    train = cfg.train
    size = get_backbone(train.backbone).resolve_size(train.image_size)
    top = next(paths.raw.iterdir())

    def folder(split: str, shuffle: bool) -> tf.data.Dataset:
        return keras.utils.image_dataset_from_directory(
            top / split,
            image_size=(size, size),
            batch_size=train.batch_size,
            shuffle=shuffle,
            seed=train.seed,
            verbose=False,
        ).prefetch(tf.data.AUTOTUNE)

    return folder("train", True), folder("validation", False), size


def _tutorial_model(cfg: Config, size: int, weights: Path) -> tuple[Any, Any]:
    """The tutorial's model: augmentation inside it, the frozen base, the head."""
    import keras

    from tasks.ml.backbones import WeightsSource, build_backbone, get_backbone
    from tasks.ml.inputs import augmentation_layers
    from tasks.ml.model import build_head, preprocess_layer

    train = cfg.train
    entry = get_backbone(train.backbone)
    base = build_backbone(train.backbone, size, WeightsSource("file", weights))
    base.trainable = False
    augment = keras.Sequential(augmentation_layers(cfg.augmentation, train.seed))
    inputs = keras.Input((size, size, 3))
    x = preprocess_layer(entry.preprocess)(augment(inputs))
    x = base(x, training=False)
    head = build_head(entry.head, tuple(base.output.shape[1:]), 2)
    return keras.Model(inputs, head(x)), base


def run(args: argparse.Namespace) -> str:
    from tasks.dev.offline_weights import make_offline_weights
    from tasks.ml.backbones import get_backbone

    state = Path(args.state).resolve()
    entry = get_backbone(args.backbone)
    args.image_size = entry.resolve_size(args.image_size)
    weights = state / "weights" / f"{args.backbone}_{PRETRAIN_SIZE}.weights.h5"
    started = time.perf_counter()
    if not weights.is_file():
        print(f"bench: pretraining offline weights for {args.backbone} ...", flush=True)
        make_offline_weights(args.backbone, weights, image_size=max(PRETRAIN_SIZE, entry.min_size))
    weights_s = time.perf_counter() - started
    paths = make_data(state, args.images, args.val_images, args.image_size)
    counts = {"train": args.images // 2, "validation": args.val_images // 2}
    cfg = bench_config(args, weights, counts)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{state / 'mlflow.db'}")
    from tasks.tracking.runs import use_experiment

    use_experiment(cfg, paths)  # create the store before the clock starts
    print(
        f"bench: {args.backbone} at {args.image_size} px, {2 * counts['train']} training and "
        f"{2 * counts['validation']} validation images, batch {args.batch_size}, epochs "
        f"{args.epochs} + {args.finetune_epochs}, {os.cpu_count()} CPU cores "
        f"(offline weights: {weights_s:.0f} s)",
        flush=True,
    )
    train_images = 2 * counts["train"]
    rows: list[Row] = []
    if not args.skip_tutorial:
        rows += tutorial(cfg, paths, weights, train_images, args.tutorial_freeze_bn)
    rows += ours(cfg, paths, train_images, args.finetune_augment)
    rows.sort(key=lambda row: (row.phase != "frozen base (head)", row.way))
    return f"{table(rows)}\n\n{summary(rows)}"


def summary(rows: list[Row]) -> str:
    """Whole train + fine-tune wall time of each way, and its speed-up over the tutorial's."""
    tutorial_s = sum(row.seconds for row in rows if row.way.startswith("tutorial"))
    frozen = [row for row in rows if row.way.startswith("ours") and row.phase.startswith("frozen")]
    lines = []
    if tutorial_s:
        lines.append(f"tutorial way, both phases: {tutorial_s:.0f} s")
    for row in rows:
        if row.way.startswith("ours") and row.phase.startswith("fine-tune") and frozen:
            total = frozen[0].seconds + row.seconds
            ratio = f", {tutorial_s / total:.2f}x the tutorial's speed" if tutorial_s else ""
            way = row.way.split(":")[1].split(",")[0].strip()
            lines.append(f"ours with phase 2 on {way}: {total:.0f} s{ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.dev.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=None, help="px (default: backbone's)")
    parser.add_argument("--images", type=int, default=2000, help="training images")
    parser.add_argument("--val-images", type=int, default=500, help="validation images")
    parser.add_argument("--epochs", type=int, default=10, help="phase 1 epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="phase 2 epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--finetune-augment",
        choices=["on", "off", "both"],
        default="both",
        help="our phase 2 with augmentation, without (boundary cache), or both (default)",
    )
    parser.add_argument("--state", default=".bench", help="where data, weights and runs go")
    parser.add_argument("--skip-tutorial", action="store_true", help="time our way only")
    parser.add_argument(
        "--tutorial-freeze-bn",
        action="store_true",
        help="freeze BatchNormalization in the tutorial's fine-tuning too",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        print(run(args))
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
