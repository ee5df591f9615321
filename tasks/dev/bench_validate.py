"""How long ``validate`` takes on a cats_vs_dogs-sized dataset, and where the time goes.

``python -m tasks.dev.bench_validate [--images 3000] [--size 300] [--workers 0]``
(from the project root: it reads params.yaml). It writes ``--images``
distinct generated JPEGs of about ``--size`` px in the cats_vs_dogs layout and
proportions (1000/1000 train, 500/500 validation at 3000) into a temporary
workspace, then prints:

- ``ge import``: ``import great_expectations`` alone, in a fresh interpreter;
- ``decode``: scan + decode into the manifest in-process, with one process and
  with ``--workers`` (0 = one per core);
- ``stage``: the whole ``python -m tasks validate`` command, wall clock, and
  the stage's own breakdown from its metrics file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from tasks.config import parse_config
from tasks.ml.manifest import build_manifest, scan_raw, worker_count
from tasks.paths import DatasetPaths

DATASET = "cats_vs_dogs"
SHARES = {("train", "cats"): 1 / 3, ("train", "dogs"): 1 / 3}
SHARES.update({("validation", "cats"): 1 / 6, ("validation", "dogs"): 1 / 6})


def _write_image(job: tuple[str, int, int, int]) -> None:
    from tasks.dev.synthetic import make_image

    path, label_index, size, seed = job
    make_image(label_index, size, seed=seed).save(path, "JPEG", quality=90)


def make_dataset(raw: Path, images: int, size: int) -> dict[str, dict[str, int]]:
    """Write the tree; returns the expected counts per split and class."""
    counts: dict[str, dict[str, int]] = {"train": {}, "validation": {}}
    jobs = []
    seed = 0
    for (split, label), share in SHARES.items():
        folder = raw / "cats_and_dogs_filtered" / split / label
        folder.mkdir(parents=True, exist_ok=True)
        counts[split][label] = round(images * share)
        for n in range(counts[split][label]):
            seed += 1
            jobs.append((str(folder / f"{label}.{n}.jpg"), label == "dogs", size, seed))
    with ProcessPoolExecutor(worker_count(0)) as pool:
        list(pool.map(_write_image, jobs, chunksize=64))
    return counts


def params_for(counts: dict[str, dict[str, int]], workers: int) -> dict:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    dataset = raw["datasets"][DATASET]
    dataset["counts"] = counts
    raw["datasets"] = {DATASET: dataset}
    raw["validate"]["workers"] = workers
    return raw


def ge_import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import great_expectations; "
    code += "print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.dev.bench_validate")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        root = Path(tmp)
        paths = DatasetPaths.of(DATASET, root)
        started = time.perf_counter()
        counts = make_dataset(paths.raw, args.images, args.size)
        files = sorted(paths.raw.rglob("*.jpg"))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"generated {len(files)} JPEGs of {args.size}x{args.size} px ({megabytes:.1f} MB) "
            f"in {time.perf_counter() - started:.1f} s; {os.cpu_count()} cores, "
            f"workers={args.workers} -> {worker_count(args.workers)} processes"
        )
        params = params_for(counts, args.workers)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        cfg = parse_config(params)

        print(f"ge import   {ge_import_seconds():6.2f} s  (fresh interpreter)")
        scan = scan_raw(paths.raw, cfg.dataset(DATASET))
        for workers in dict.fromkeys([1, worker_count(args.workers)]):
            started = time.perf_counter()
            manifest = build_manifest(scan, cfg.validate_.model_copy(update={"workers": workers}))
            seconds = time.perf_counter() - started
            print(
                f"decode      {seconds:6.2f} s  ({workers} process(es), "
                f"{len(manifest) / seconds:.0f} images/s)"
            )

        command = [sys.executable, "-m", "tasks", "validate", DATASET]
        command += ["--params", str(root / "params.yaml"), "--root", str(root)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            print(done.stdout, done.stderr, sep="\n")
            raise SystemExit(f"validate exited {done.returncode}")
        metrics = json.loads(paths.validation_summary.read_text())
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in metrics["timings"].items())
        print(f"stage       {wall:6.2f} s  wall for `python -m tasks validate` (passed)")
        print(f"            {metrics['seconds']:6.2f} s  inside the stage: {parts}")


if __name__ == "__main__":
    main()
