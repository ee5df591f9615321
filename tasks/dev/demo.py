"""``make demo``: the whole system end to end, with no internet and no GPU, in minutes.

Generated archives in the real layouts (``tasks.dev.synthetic``) are served from
127.0.0.1; a tiny params file points both datasets at them; backbone weights
are made offline (no ImageNet download); then the same DAGs ``make run`` runs
(``airflow dags test``: every DVC stage, MLflow tracking, the registry gate,
``dvc push``, the summary) run on it. Everything lands under ``.demo/`` (its
own Airflow home, MLflow store, workspaces and DVC remote); the checked-in
params.yaml, the project's MLflow store and remote are not touched.

``--sweep mobilenet_v2,efficientnet_b0`` then runs the sweep DAG over those
backbones (each on its own offline-made weights) and prints its comparison.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tasks.config import BACKBONES, parse_config
from tasks.dev.airflow_local import (
    LocalAirflow,
    print_timings,
    run_dags,
    run_sweep,
    sweep_results,
    where_to_look,
)
from tasks.dev.synthetic import LAYOUTS, make_archive, tiny_params
from tasks.errors import ConfigError, StageError
from tasks.orchestration.project import Project

log = logging.getLogger(__name__)

COUNTS = {"train": 24, "validation": 12}
IMAGE_SIDE = 48
BACKBONE = "mobilenet_v2"
MODEL_SIDE = 32


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def make_archives(folder: Path) -> dict[str, Path]:
    """One generated zip per dataset layout (kept between demo runs)."""
    archives = {}
    for seed, dataset in enumerate(LAYOUTS):
        path = folder / f"{dataset}-{COUNTS['train']}x{COUNTS['validation']}.zip"
        if not path.exists():
            make_archive(path, dataset, COUNTS, IMAGE_SIDE, seed=seed)
        archives[dataset] = path
    return archives


def offline_weights(folder: Path, backbone: str, image_size: int) -> str:
    """A backbone weights file made without the network, or ``none`` where unsupported."""
    try:
        from tasks.dev.offline_weights import make_offline_weights
    except ImportError:
        return "none"
    path = folder / f"{backbone}_{image_size}.weights.h5"
    if not path.exists():
        make_offline_weights(backbone, path, image_size=image_size)
    return str(path)


def demo_params(archives: dict[str, Path], base_url: str, weights: str) -> dict[str, Any]:
    """Tiny params for the served archives, each pinned by sha256 and size.

    Pinning (not trust-on-first-use) lets a regenerated archive replace the old one.
    """
    sources = {ds: f"{base_url}/{path.name}" for ds, path in archives.items()}
    params = tiny_params(
        sources,
        COUNTS,
        # Frozen-base features are cached, so 15 head epochs take seconds.
        train={
            "backbone": BACKBONE,
            "image_size": MODEL_SIDE,
            "weights": weights,
            "batch_size": 16,
            "epochs": 15,
            "optimizer": "adam",
            "learning_rate": 0.003,
        },
        finetune={"epochs": 1},
        evaluate={"gradcam_images": 2, "mistakes": 4},
        register={"floor": 0.75, "promote_if": "not_worse"},
    )
    for ds, path in archives.items():
        params["datasets"][ds]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        params["datasets"][ds]["size"] = path.stat().st_size
    return params


def sweep_conf(folder: Path, backbones: list[str], datasets: list[str] | None) -> dict[str, Any]:
    """The sweep DAG's conf for ``backbones``, each on its own offline-made weights."""
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown:
        raise ConfigError(f"--sweep: unknown backbone {unknown}; use some of {list(BACKBONES)}")
    conf: dict[str, Any] = {
        "backbones": backbones,
        "per_backbone": {
            b: {"train.weights": offline_weights(folder, b, MODEL_SIDE)} for b in backbones
        },
    }
    if datasets:
        conf["datasets"] = datasets
    return conf


def run_demo(
    root: Path,
    state: Path,
    port: int = 8080,
    datasets: list[str] | None = None,
    sweep: list[str] | None = None,
) -> int:
    state.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    archives = make_archives(state / "archives")
    weights = offline_weights(state / "weights", BACKBONE, MODEL_SIDE)
    project = Project(
        root=root,
        params=state / "params.yaml",
        state=state,
        remote=str(state / "dvc-remote"),
    )
    airflow = LocalAirflow(project, state / "airflow", port=port)
    with serve_folder(state / "archives") as base:
        params = demo_params(archives, base, weights)
        parse_config(params, source="demo params")
        project.params.write_text(yaml.safe_dump(params, sort_keys=False))
        print(f"demo: archives served from {base}/, params in {project.params}", flush=True)
        timings = run_dags(airflow, datasets)
        if sweep:
            conf = sweep_conf(state / "weights", sweep, datasets)
            timings |= run_sweep(airflow, conf)
    print_timings(timings)
    print(where_to_look(project, airflow.home))
    if sweep:
        print(sweep_results(project))
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.dev.demo", description=__doc__)
    parser.add_argument("--state", default=".demo", help="where the demo keeps everything")
    parser.add_argument("--port", type=int, default=8080, help="Airflow api-server port")
    parser.add_argument(
        "--dataset", action="append", help="only this dataset's DAG (repeatable; default both)"
    )
    parser.add_argument(
        "--sweep",
        metavar="BACKBONES",
        help="then run the sweep DAG over these comma-separated backbones, e.g. "
        "mobilenet_v2,efficientnet_b0",
    )
    args = parser.parse_args(argv)
    root = Path.cwd().resolve()
    sweep = [b.strip() for b in args.sweep.split(",") if b.strip()] if args.sweep else None
    try:
        return run_demo(root, (root / args.state).resolve(), args.port, args.dataset, sweep)
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
