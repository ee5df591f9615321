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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.archives import extract_archive
from tasks.config import Config, parse_config
from tasks.dev.synthetic import make_image, tiny_params
from tasks.paths import DatasetPaths
from tasks.steps import download
from tasks.steps.download import fetch_source, partial_path

if TYPE_CHECKING:
    from tasks.dev.httpserver import ArchiveServer

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


@dataclass(frozen=True)
class Served:
    """The archive on disk and where the loopback server serves it."""

    archive: Path
    url: str
    size: int
    members: int


def serve_archive(server: ArchiveServer, folder: Path, megabytes: float) -> Served:
    """Build the archive in ``folder``, serve it and say how large it is."""
    started = time.perf_counter()
    archive = build_archive(folder / "served.zip", megabytes)
    with zipfile.ZipFile(archive) as bundle:
        members = len(bundle.infolist())
    body = archive.read_bytes()
    print(
        f"archive: {len(body) / 1e6:.1f} MB, {members} JPEGs "
        f"(built in {time.perf_counter() - started:.1f} s)"
    )
    return Served(archive, server.add(f"/{DATASET}.zip", body), len(body), members)


def download_config(served: Served) -> Config:
    """The tiny params with the production download settings, pointing at ``served``."""
    raw = tiny_params({DATASET: served.url})
    raw["download"] = {}  # the production defaults (1 MiB chunks, 60 s timeout)
    raw["datasets"][DATASET]["size"] = served.size
    return parse_config(raw)


def measure(
    served: Served, server: ArchiveServer, folder: Path, repeat: int, curl: str | None
) -> list[tuple[str, float, str]]:
    """One row per contender (see the module docstring): name, median seconds, rate."""
    cfg = download_config(served)
    dataset = cfg.dataset(DATASET)
    megabytes = served.size / 1e6
    rows: list[tuple[str, float, str]] = []
    if curl:
        out = folder / "curl.zip"
        command = [curl, "-sS", "--fail", "-o", str(out), served.url]
        seconds = median_seconds(lambda _: subprocess.run(command, check=True), repeat)
        rows.append(("curl (fetch only)", seconds, f"{megabytes / seconds:8.0f} MB/s"))

    part = partial_path(DatasetPaths.of(DATASET, folder / "fetch"))

    def fetch(_: int) -> None:
        part.unlink(missing_ok=True)
        fetch_source(served.url, part, dataset, cfg.download)

    seconds = median_seconds(fetch, repeat)
    rows.append(("ours: fetch + sha256", seconds, f"{megabytes / seconds:8.0f} MB/s"))

    def extract(index: int) -> None:
        target = folder / f"extract{index}"
        target.mkdir()
        extract_archive(served.archive, target)

    seconds = median_seconds(extract, repeat)
    rows.append(("ours: extract only", seconds, f"{served.members / seconds:8.0f} files/s"))

    workspaces = [DatasetPaths.of(DATASET, folder / f"ws{i}") for i in range(repeat)]
    seconds = median_seconds(lambda i: download.run(cfg, workspaces[i]), repeat)
    rows.append(("ours: download stage", seconds, f"{megabytes / seconds:8.0f} MB/s"))
    requests_before = server.count()
    seconds = median_seconds(lambda _: download.run(cfg, workspaces[0]), repeat)
    fetched_again = server.count() - requests_before
    rows.append(("ours: already verified", seconds, f"{fetched_again} requests"))
    return rows


def main(argv: list[str] | None = None) -> None:
    from tasks.dev.httpserver import ArchiveServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="archive size in MB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    curl = shutil.which("curl")

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp, ArchiveServer() as server:
        served = serve_archive(server, Path(tmp), args.mb)
        rows = measure(served, server, Path(tmp), args.repeat, curl)

    print(f"median of {args.repeat} runs, loopback HTTP, {served.size / 1e6:.1f} MB")
    for name, secs, rate in rows:
        print(f"  {name:<24} {secs * 1000:9.1f} ms  {rate}")
    if not curl:
        print("  (curl not found on PATH: no baseline)")


if __name__ == "__main__":
    main()
