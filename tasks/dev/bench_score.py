"""``make bench-score``: images/s of ``score`` against the plain way, same folder, same model.

The model is registered through the real ``register`` stage (which keeps its drift
reference and card), built on ``--backbone`` at ``--image-size`` with untrained
weights (throughput does not depend on them), on a generated cats_vs_dogs dataset.
The drop is ``--images`` generated JPEGs (``--side`` px high) in one folder.

- **plain**: the same version loaded from the registry (``mlflow.tensorflow.load_model``),
  ``keras.utils.image_dataset_from_directory(folder, labels=None)``, ``model.predict``:
  loading, decoding and the forward pass only;
- **score**: ``python -m tasks score``'s own ``run`` end to end: loading the version
  from the registry, every image through validate's checks (full decode, hash,
  duplicates), the forward pass with embeddings, the four drift tests, the plots,
  the parquet, the MLflow run and the card refresh.

Both read the same files from the page cache (the folder is read once before either
clock starts). The two ways run ``--repeats`` times, alternated, and the medians are
compared. A table and ``reports/bench/score.json``.

    python -m tasks.dev.bench_score [--images 2000] [--backbone mobilenet_v2]
                                    [--image-size 160] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tasks.config import Config, parse_config
from tasks.errors import ConfigError, StageError
from tasks.paths import DatasetPaths

DATASET = "cats_vs_dogs"


def make_drop(folder: Path, images: int, side: int) -> Path:
    from tasks.dev.synthetic import _write_image

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == images:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{n:06d}.jpg"), n % 2, side * 9 // 8, side, 7_000_000 + n)
            for n in range(images)]  # fmt: skip
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_write_image, jobs, chunksize=64))
    return folder


def registered_version(cfg: Config, paths: DatasetPaths) -> str:
    """Register an untrained model on the generated data; returns its version."""
    import pandas as pd

    from tasks.artifacts import save_model
    from tasks.ml.backbones import get_backbone
    from tasks.ml.manifest import carve_test_split
    from tasks.ml.model import ModelSpec, build_model
    from tasks.steps import register

    manifest = pd.read_parquet(paths.manifest)
    if not manifest["split"].eq("test").any():
        carve_test_split(manifest, cfg.evaluate.test_fraction).to_parquet(paths.manifest)
    entry = get_backbone(cfg.train.backbone)
    spec = ModelSpec(entry, cfg.train.image_size, entry.head_spec(cfg.train.head), 2)
    model = build_model(spec)
    target = save_model(model, paths.models / "finetuned.keras")
    paths.candidate.write_text(json.dumps({"path": f"models/{DATASET}/{target.name}",
                                           "phase": "finetune"}))  # fmt: skip
    return register.run(cfg, paths).version


def plain_way(uri: str, folder: Path, size: int, batch: int) -> tuple[float, int]:
    import keras

    from tasks.tracking.models import load_logged_model

    started = time.perf_counter()
    model, _ = load_logged_model(uri)
    dataset = keras.utils.image_dataset_from_directory(
        folder, labels=None, image_size=(size, size), batch_size=batch, shuffle=False
    )
    count = len(model.predict(dataset, verbose=0))
    return time.perf_counter() - started, count


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.commands import score
    from tasks.dev.bench import make_data
    from tasks.dev.synthetic import tiny_params
    from tasks.tracking.store import tracking_uri

    state = Path(args.state).resolve()
    paths = make_data(state, args.train_images, 200, args.image_size)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{state / 'mlflow.db'}"
    params = tiny_params({DATASET: "file:///unused.zip"}, {"train": args.train_images // 2,
                                                          "validation": 100})  # fmt: skip
    params["train"] = {"backbone": args.backbone, "image_size": args.image_size,
                       "weights": "none", "batch_size": args.batch_size}  # fmt: skip
    params["scoring"] = {"batch_size": args.batch_size}
    params["validate"] = {"workers": 0}
    cfg = parse_config(params)
    version = registered_version(cfg, paths)
    drop = make_drop(state / "drops" / f"drop-{args.images}-{args.side}", args.images, args.side)
    for file in drop.iterdir():  # into the page cache for both ways
        file.read_bytes()
    uri = f"models:/{DATASET}-classifier/{version}"
    plain_runs, score_runs = [], []
    for _ in range(args.repeats):  # alternated, so drift in the machine's speed hits both
        plain_s, plain_n = plain_way(uri, drop, args.image_size, args.batch_size)
        plain_runs.append(round(plain_s, 2))
        started = time.perf_counter()
        result = score.run(cfg, paths, str(drop), model=version, drop=f"bench-{time.time_ns()}")
        score_runs.append(round(time.perf_counter() - started, 2))
    plain_s, score_s = statistics.median(plain_runs), statistics.median(score_runs)
    return {
        "backbone": args.backbone, "image_size": args.image_size, "images": args.images,
        "batch_size": args.batch_size, "cpu_cores": os.cpu_count(),
        "repeats": args.repeats,
        "plain": {"seconds": round(plain_s, 2), "runs": plain_runs, "images": plain_n,
                  "images_per_second": round(plain_n / plain_s, 1)},
        "score": {"seconds": round(score_s, 2), "runs": score_runs, "images": result.images,
                  "images_per_second": round(result.images / score_s, 1),
                  "drift": result.drift, "quarantined": result.quarantined,
                  "last_run_seconds": result.seconds},
        "store": tracking_uri(cfg, paths.root),
    }  # fmt: skip


def table(report: dict[str, Any]) -> str:
    plain, ours = report["plain"], report["score"]
    lines = [
        f"bench-score: {report['backbone']} at {report['image_size']} px, {report['images']} "
        f"images, batch {report['batch_size']}, {report['cpu_cores']} CPU cores",
        f"{'way (median of ' + str(report['repeats']) + ' runs, alternated)':<64}"
        f"{'seconds':>9}{'images/s':>10}  runs (s)",
        f"{'plain: image_dataset_from_directory + model.predict':<64}"
        f"{plain['seconds']:>9.1f}{plain['images_per_second']:>10.1f}  {plain['runs']}",
        f"{'score: checks + predict + embeddings + drift + MLflow + card':<64}"
        f"{ours['seconds']:>9.1f}{ours['images_per_second']:>10.1f}  {ours['runs']}",
        f"score / plain: {ours['images_per_second'] / plain['images_per_second']:.2f}x",
        f"score's last run, seconds per part: {ours['last_run_seconds']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.dev.bench_score", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", type=int, default=2000, help="images in the drop")
    parser.add_argument("--side", type=int, default=200, help="their height in px")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way (median)")
    parser.add_argument("--train-images", type=int, default=400, help="the reference's source")
    parser.add_argument("--state", default=".bench/score", help="data, model and store")
    parser.add_argument("--out", default="reports/bench/score.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        report = run(args)
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from tasks.io import write_json

    write_json(args.out, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
