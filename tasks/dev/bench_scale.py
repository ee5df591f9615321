"""``make bench-scale``: how validate, train, finetune and DVC scale with the image count.

    python -m tasks.dev.bench_scale [--sizes 5000,50000,200000] [--side 64] [--format shards]
        [--stages download,validate,train,finetune,dvc] [--cache-budget-mb N] [--set K=V]

(from the project root, whose params.yaml is the base; ``make bench-scale SIZES=5000``).

For each size (images in total; ``50k``, ``1m`` work too) it:

1. generates that many distinct JPEGs (``--side`` px high, 9/8 of that wide) in the
   ants_vs_bees layout, 2/3 train and 1/3 validation, once: ``<state>/ants_vs_bees-<size>-
   <side>px/data/raw/`` is reused (``.generated.json`` marks a finished tree);
2. ``--format shards`` (the default): zips that tree once (stored) and runs in a second
   workspace, ``...-shards``, whose ``data/archives/`` holds the zip (download runs
   afresh each time); ``--format files``: validate reads the tree, download does not run;
3. writes the workspace's params.yaml (the project's, with the dataset's counts and
   format, mobilenet_v2 at 64 px, ``train.weights: none``, epochs 1 + 1
   (``cached_epochs: null``), batch 32, an SQLite MLflow store in the workspace) and
   runs each stage as its own process, ``python -m tasks <stage> ants_vs_bees``. The
   MLflow store is created before the clocks start; ``--cache-budget-mb`` adds
   ``--set train.cache_budget_mb=N`` to train and finetune, ``--set`` goes to every stage;
4. ``git init`` + ``dvc init`` in the workspace (afresh each run), then times ``dvc add``
   of :func:`tracked_dirs`, ``dvc status`` and ``dvc push`` to a local remote, and
   counts the objects in the DVC cache and the remote.

With two sizes or more, ``marginal`` is each stage's seconds per 1,000 images beyond
its time at the next smaller size: the cost per image that the fixed start-up
(imports, building the model) hides at the small sizes.

Each command's wall seconds and peak RSS (``ru_maxrss`` from ``os.wait4``: the largest
of the process and the worker processes it waited for, not their sum) go into one
table and ``--out`` with the commit, the machine and the options. A failing command
stops the bench with one line: the command and the last line it printed on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.contract import RUN_ENV
from tasks.dev.synthetic import LAYOUTS, generate_tree, zip_tree
from tasks.errors import ConfigError, StageError
from tasks.io import atomic_path, link_or_copy, write_json
from tasks.orchestration.process import last_line
from tasks.paths import DatasetPaths

DATASET = "ants_vs_bees"
STAGES = ("download", "validate", "train", "finetune")
FORMATS = ("shards", "files")
DVC = "dvc"
"""The pseudo-stage that times ``dvc add``, ``dvc status`` and ``dvc push``."""
DEFAULT_SIZES = "5000,50000,200000"
TRAIN_SHARE = 2 / 3
GENERATED = ".generated.json"
"""In a workspace: the finished tree's counts; without it the tree is made again."""
OVERRIDES: dict[str, dict[str, Any]] = {
    "download": {"offline": True},
    "train": {
        "backbone": "mobilenet_v2",
        "image_size": 64,
        "weights": "none",  # we time, not score: no download, no pretraining
        "batch_size": 32,
        "epochs": 1,
        "cached_epochs": None,  # one epoch on cached features too: the same work per image
    },
    "finetune": {"epochs": 1},
}
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_mb: float


def tracked_dirs(paths: DatasetPaths, stored_as: str) -> list[Path]:
    """What ``dvc add`` tracks: the data the pipeline's DVC outs hold for the format (the
    kept archive and the shards, or the extracted tree)."""
    return [paths.raw, paths.shards] if stored_as == "shards" else [paths.raw]


def workspace(state: Path, size: int, side: int) -> Path:
    """Where the generated tree is (and the workspace of ``--format files``)."""
    return state / f"{DATASET}-{size}-{side}px"


def run_workspace(state: Path, size: int, side: int, stored_as: str) -> Path:
    tree = workspace(state, size, side)
    return tree if stored_as == "files" else tree.with_name(f"{tree.name}-shards")


def ensure_archive(tree: Path, ws: Path) -> None:
    """``ws``'s ``data/archives/<ds>.zip``: the generated tree zipped (stored), made once
    (``<tree>.zip``, kept beside the tree) and hard-linked in."""
    bundle = tree.with_name(f"{tree.name}.zip")
    raw = DatasetPaths.of(DATASET, tree).raw
    if not bundle.is_file() or bundle.stat().st_mtime < (tree / GENERATED).stat().st_mtime:
        print(f"bench-scale: zipping {raw} ...", flush=True)
        with atomic_path(bundle) as tmp:
            zip_tree(raw, tmp)
    archive = DatasetPaths.of(DATASET, ws).archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.unlink(missing_ok=True)
    link_or_copy(bundle, archive)


def split_counts(images: int) -> dict[str, dict[str, int]]:
    """Per split and class, summing to ``images``: 2/3 train, 1/3 validation, halved."""
    first, second = LAYOUTS[DATASET]["classes"]
    train = round(images * TRAIN_SHARE)
    counts = {}
    for split, total in (("train", train), ("validation", images - train)):
        counts[split] = {first: total - total // 2, second: total // 2}
    return counts


def ensure_dataset(ws: Path, size: int, side: int, workers: int) -> float | None:
    """Generate the workspace's tree unless a finished one is there; its seconds, or None
    when it was reused."""
    counts = split_counts(size)
    marker = ws / GENERATED
    if marker.is_file() and json.loads(marker.read_text()).get("counts") == counts:
        return None
    marker.unlink(missing_ok=True)
    raw = DatasetPaths.of(DATASET, ws).raw
    shutil.rmtree(raw, ignore_errors=True)
    print(f"bench-scale: generating {size} images of {side * 9 // 8}x{side} px ...", flush=True)
    started = time.perf_counter()
    generate_tree(raw, DATASET, counts, side, workers)
    seconds = time.perf_counter() - started
    write_json(marker, {"counts": counts, "side": side, "seconds": seconds})
    return seconds


def forget_download(paths: DatasetPaths) -> None:
    """What an earlier download left (the placed archive, its record, the trusted hash)."""
    shutil.rmtree(paths.raw, ignore_errors=True)
    paths.download_record.unlink(missing_ok=True)
    paths.known_hashes.unlink(missing_ok=True)


def workspace_params(
    project_params: Path, ws: Path, size: int, stored_as: str = "files"
) -> dict[str, Any]:
    """The project's params with this bench's dataset, settings and MLflow store."""
    params: dict[str, Any] = yaml.safe_load(project_params.read_text())
    dataset = params["datasets"][DATASET]
    params["datasets"] = {
        DATASET: {**dataset, "counts": split_counts(size), "format": stored_as, "sha256": None}
    }
    for section, values in OVERRIDES.items():
        params[section] = {**(params.get(section) or {}), **values}
    params["tracking"] = {
        **(params.get("tracking") or {}),
        "uri": f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}",
        "artifact_location": str(ws / "mlflow" / "artifacts"),
    }
    return params


def child_env(ws: Path) -> dict[str, str]:
    """This environment, less anything that ties a process to another run or store."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_ENV and not k.startswith("MLFLOW_")}
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(ws / ".dvc" / "tmp" / "site")  # not /var/tmp/dvc
    return env


def measure(argv: list[str], doing: str, cwd: Path, env: dict[str, str], log: Path) -> Measured:
    """Run ``argv`` (output to ``log``.out/.err); its wall seconds and peak RSS. A failure
    raises StageError: ``doing``, the exit status and the last line on stderr."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        done = subprocess.CompletedProcess(
            argv, proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
        )
        raise StageError(
            f"{doing} failed (exit {proc.returncode}): {last_line(done)} [full output: {err}]"
        )
    return Measured(seconds, usage.ru_maxrss / 1024)  # Linux: KiB


def stage_argv(stage: str, ws: Path, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "tasks", stage, DATASET]
    argv += ["--params", str(ws / "params.yaml"), "--root", str(ws)]
    sets = list(args.set)
    if args.cache_budget_mb is not None and stage in ("train", "finetune"):
        sets.append(f"train.cache_budget_mb={args.cache_budget_mb}")
    return argv + [part for item in sets for part in ("--set", item)]


CREATE_STORE = f"""\
import sys
from tasks.config import load_stage_config
from tasks.paths import DatasetPaths
from tasks.tracking.runs import use_experiment
cfg = load_stage_config(sys.argv[1], sys.argv[3:])
use_experiment(cfg, DatasetPaths.of({DATASET!r}, sys.argv[2]))
"""
"""``python -c`` it with: params file, root, overrides."""


def create_store(ws: Path, args: argparse.Namespace, env: dict[str, str]) -> None:
    """The MLflow store and experiment, before the clocks start (its migrations take
    seconds that are the store's, not train's)."""
    argv = [sys.executable, "-c", CREATE_STORE, str(ws / "params.yaml"), str(ws), *args.set]
    measure(argv, "creating the MLflow store", ws, env, ws / "logs" / "mlflow-store")


def run_stages(ws: Path, size: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each chosen pipeline stage as a fresh process: its figures by stage."""
    env = child_env(ws)
    chosen = [stage for stage in STAGES if stage in args.stages]
    if args.format == "files" and "download" in chosen:
        chosen.remove("download")  # the generated tree is data/raw already
    if {"train", "finetune"} & set(chosen):
        create_store(ws, args, env)
    figures = {}
    for stage in chosen:
        print(f"bench-scale: {size} images: {stage} ...", flush=True)
        argv = stage_argv(stage, ws, args)
        got = measure(argv, f"{stage} on {size} images", ws, env, ws / "logs" / stage)
        figures[stage] = row(size, got)
    return figures


def row(images: int, got: Measured) -> dict[str, float]:
    return {
        "images": images,
        "seconds": round(got.seconds, 2),
        "seconds_per_1000": round(got.seconds * 1000 / images, 3),
        "peak_rss_mb": round(got.peak_rss_mb, 1),
    }


# --- DVC ---------------------------------------------------------------------------


def remote_of(ws: Path) -> Path:
    return ws.parent / f"{ws.name}.remote"


def reset_dvc(ws: Path, tracked: list[Path]) -> None:
    """Remove what an earlier run's ``git init`` / ``dvc init`` / ``dvc add`` left."""
    for folder in (ws / ".git", ws / ".dvc", remote_of(ws)):
        shutil.rmtree(folder, ignore_errors=True)
    (ws / ".dvcignore").unlink(missing_ok=True)
    for folder in tracked:
        (folder.parent / ".gitignore").unlink(missing_ok=True)
        folder.with_name(f"{folder.name}.dvc").unlink(missing_ok=True)


def count_files(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def run_dvc(ws: Path, size: int, stored_as: str) -> dict[str, Any]:
    """``dvc add`` / ``status`` / ``push`` of :func:`tracked_dirs` in a fresh DVC repo."""
    tracked = tracked_dirs(DatasetPaths.of(DATASET, ws), stored_as)
    reset_dvc(ws, tracked)
    env, logs = child_env(ws), ws / "logs"
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    targets = [str(folder.relative_to(ws)) for folder in tracked]
    for name, argv in {
        "git-init": ["git", "init", "-q"],
        "dvc-init": [dvc, "init", "-q"],
        "dvc-remote": [dvc, "remote", "add", "-d", "bench", str(remote_of(ws))],
    }.items():
        measure(argv, f"{name} in {ws}", ws, env, logs / name)
    figures: dict[str, Any] = {"tracked": targets}
    for command in ("add", "status", "push"):
        print(f"bench-scale: {size} images: dvc {command} ...", flush=True)
        argv = [dvc, command, *(targets if command == "add" else [])]
        got = measure(argv, f"dvc {command} on {size} images", ws, env, logs / f"dvc-{command}")
        figures[command] = row(size, got)
    figures["objects"] = count_files(ws / ".dvc" / "cache" / "files" / "md5")
    figures["remote_objects"] = count_files(remote_of(ws) / "files" / "md5")
    return figures


# --- one size, the table, the report --------------------------------------------------


def bench_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    state = Path(args.state).resolve()
    tree = workspace(state, size, args.side)
    generated = ensure_dataset(tree, size, args.side, args.workers)
    ws = run_workspace(state, size, args.side, args.format)
    if args.format == "shards":
        ensure_archive(tree, ws)
        if "download" in args.stages:  # its real work, not "already verified"
            forget_download(DatasetPaths.of(DATASET, ws))
    params = workspace_params(Path(args.params), ws, size, args.format)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result: dict[str, Any] = {
        "images": size,
        "format": args.format,
        "width": args.side * 9 // 8,
        "height": args.side,
        "counts": split_counts(size),
        "workspace": str(ws),
        "generated_seconds": None if generated is None else round(generated, 1),
        "stages": run_stages(ws, size, args),
    }
    if DVC in args.stages:
        result["dvc"] = run_dvc(ws, size, args.format)
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'images':>8}  {'stage':<10} {'wall s':>8} {'s/1k img':>9} {'marginal':>9} "
        f"{'peak RSS MB':>12} {'objects':>8}"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        rows = [(stage, figures, "") for stage, figures in result["stages"].items()]
        dvc = result.get("dvc")
        if dvc:
            counted = {"add": dvc["objects"], "push": dvc["remote_objects"]}
            rows += [(f"dvc {c}", dvc[c], counted.get(c, "")) for c in ("add", "status", "push")]
        for name, figures, objects in rows:
            marginal = figures.get("marginal_seconds_per_1000")
            lines.append(
                f"{result['images']:>8}  {name:<10} {figures['seconds']:>8.1f} "
                f"{figures['seconds_per_1000']:>9.2f} "
                f"{'' if marginal is None else f'{marginal:.2f}':>9} "
                f"{figures['peak_rss_mb']:>12.0f} {objects:>8}"
            )
    if any("dvc" in result for result in results):
        lines.append("objects: files in .dvc/cache/files/md5 after add, in the remote after push")
    if len(results) > 1:
        lines.append("marginal: seconds per 1,000 images beyond the next smaller size's time")
    lines += [data_line(result) for result in results]
    return "\n".join(lines)


def add_marginal(results: list[dict[str, Any]]) -> None:
    """Each stage's ``marginal_seconds_per_1000``: the seconds per 1,000 images it took
    beyond its time at the next smaller size (what the fixed start-up does not hide)."""
    ordered = sorted(results, key=lambda r: r["images"])
    for smaller, larger in zip(ordered, ordered[1:], strict=False):
        added = larger["images"] - smaller["images"]
        for stage, figures in larger["stages"].items():
            before = smaller["stages"].get(stage)
            if before and added > 0:
                extra = figures["seconds"] - before["seconds"]
                figures["marginal_seconds_per_1000"] = round(extra * 1000 / added, 3)


def data_line(result: dict[str, Any]) -> str:
    """Which images: the size, split and side, and whether they were made this run."""
    train, validation = (sum(result["counts"][s].values()) for s in ("train", "validation"))
    seconds = result["generated_seconds"]
    made = "reused" if seconds is None else f"generated in {seconds:.1f} s"
    return (
        f"{result['images']} ({result['format']}): {train} train + {validation} validation "
        f"JPEGs of {result['width']}x{result['height']} px, {made}; in {result['workspace']}"
    )


def machine() -> dict[str, Any]:
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "cpus": os.cpu_count(),
        "ram_gb": round(ram / 2**30, 1),
        "python": sys.version.split()[0],
    }


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = {"k": 1000, "m": 1_000_000}.get(item[-1:], 1)
        value = int(float(item[:-1] if scale > 1 else item) * scale)
        if value < 12:
            raise argparse.ArgumentTypeError(f"{item}: at least 12 images")
        sizes.append(value)
    return sizes


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(stages) - {*STAGES, DVC})
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"{unknown}: use some of {', '.join([*STAGES, DVC])}")
    return stages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.dev.bench_scale", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--sizes", type=parse_sizes, default=DEFAULT_SIZES, help="images in total, e.g. 5000,50k")
    add("--side", type=int, default=64, help="image height in px (width: 9/8 of it)")
    add("--format", choices=FORMATS, default="shards", help="datasets.<ds>.format of the runs")
    add(
        "--stages",
        type=parse_stages,
        default=",".join([*STAGES, DVC]),
        help="a subset (train reads the manifest of an earlier validate, finetune train's model)",
    )
    add("--cache-budget-mb", type=int, help="--set train.cache_budget_mb=N to train and finetune")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="to every stage")
    add("--workers", type=int, default=os.cpu_count() or 1, help="image-generating processes")
    add("--params", default="params.yaml", help="the project's params file (the base)")
    add("--state", default=".bench/scale", help="generated data and workspaces")
    add("--out", default="reports/bench/scale.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"bench-scale: sizes {args.sizes}, stages {args.stages}", flush=True)
    results = []
    try:
        for size in args.sizes:
            results.append(bench_size(size, args))
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    add_marginal(results)
    report = {**machine(), "options": vars(args), "sizes": results}
    print(table(results))
    print(f"report: {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
