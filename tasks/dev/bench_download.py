"""Download throughput: our ``download`` against ``curl`` on the same loopback URL.

``python -m tasks.dev.bench_download [--mb 50] [--repeat 3]`` (from the project
root: it serves the archive with the test suite's loopback server). It builds a
zip shaped like cats_vs_dogs (JPEGs of ~20 KB in the real layout), then prints
the median of ``--repeat`` runs of:

- ``curl``: ``curl -sS --fail -o FILE URL`` (the baseline: fetch only);
- ``fetch``: our fetch alone (stream to the ``.part`` file + sha256 on the fly);
- ``extract``: safe extraction alone (bound by file creation on the disk);
- ``download``: the whole stage (fetch, verify, extract, record) into a fresh
  workspace;
- ``verified``: ``download`` again on a verified workspace (should not fetch).
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from tasks.archives import extract_archive
from tasks.config import parse_config
from tasks.dev.synthetic import make_image, tiny_params
from tasks.paths import DatasetPaths
from tasks.steps import download
from tasks.steps.download import fetch_source, partial_path

DATASET = "cats_vs_dogs"


def build_archive(path: Path, megabytes: float) -> Path:
    """A zip of distinct-named JPEGs in the cats_vs_dogs layout, about ``megabytes`` MB."""
    pool = []
    for seed in range(64):
        buffer = io.BytesIO()
        make_image(seed % 2, 150, seed=seed).save(buffer, "JPEG", quality=95)
        pool.append(buffer.getvalue())
    target = int(megabytes * 1e6)
    written = n = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as bundle:
        while written < target:
            split = "train" if n % 3 else "validation"
            label = ("cats", "dogs")[n % 2]
            data = pool[n % len(pool)]
            bundle.writestr(f"cats_and_dogs_filtered/{split}/{label}/{label}.{n}.jpg", data)
            written += len(data)
            n += 1
    return path


def median_seconds(action: Callable[[int], None], repeat: int) -> float:
    times = []
    for index in range(repeat):
        started = time.perf_counter()
        action(index)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from tasks.dev.httpserver import ArchiveServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="archive size in MB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    curl = shutil.which("curl")

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp, ArchiveServer() as server:
        base = Path(tmp)
        started = time.perf_counter()
        archive = build_archive(base / "served.zip", args.mb)
        with zipfile.ZipFile(archive) as bundle:
            members = len(bundle.infolist())
        body = archive.read_bytes()
        size = len(body)
        print(
            f"archive: {size / 1e6:.1f} MB, {members} JPEGs "
            f"(built in {time.perf_counter() - started:.1f} s)"
        )
        url = server.add(f"/{DATASET}.zip", body)
        raw = tiny_params({DATASET: url})
        raw["download"] = {}  # the production defaults (1 MiB chunks, 60 s timeout)
        raw["datasets"][DATASET]["size"] = size
        cfg = parse_config(raw)
        ds = cfg.dataset(DATASET)

        rows: list[tuple[str, float, str]] = []
        if curl:
            out = base / "curl.zip"
            seconds = median_seconds(
                lambda _: subprocess.run([curl, "-sS", "--fail", "-o", str(out), url], check=True),
                args.repeat,
            )
            rows.append(("curl (fetch only)", seconds, f"{size / 1e6 / seconds:8.0f} MB/s"))

        part = partial_path(DatasetPaths.of(DATASET, base / "fetch"))

        def fetch(_: int) -> None:
            part.unlink(missing_ok=True)
            fetch_source(url, part, ds, cfg.download)

        seconds = median_seconds(fetch, args.repeat)
        rows.append(("ours: fetch + sha256", seconds, f"{size / 1e6 / seconds:8.0f} MB/s"))

        def extract(index: int) -> None:
            folder = base / f"extract{index}"
            folder.mkdir()
            extract_archive(archive, folder)

        seconds = median_seconds(extract, args.repeat)
        rows.append(("ours: extract only", seconds, f"{members / seconds:8.0f} files/s"))

        workspaces = [DatasetPaths.of(DATASET, base / f"ws{i}") for i in range(args.repeat)]
        seconds = median_seconds(lambda i: download.run(cfg, workspaces[i]), args.repeat)
        rows.append(("ours: download stage", seconds, f"{size / 1e6 / seconds:8.0f} MB/s"))
        requests_before = server.count()
        seconds = median_seconds(lambda _: download.run(cfg, workspaces[0]), args.repeat)
        fetched_again = server.count() - requests_before
        rows.append(("ours: already verified", seconds, f"{fetched_again} requests"))

    print(f"median of {args.repeat} runs, loopback HTTP, {size / 1e6:.1f} MB")
    for name, secs, rate in rows:
        print(f"  {name:<24} {secs * 1000:9.1f} ms  {rate}")
    if not curl:
        print("  (curl not found on PATH: no baseline)")


if __name__ == "__main__":
    main()
