"""``validate``: build the image manifest and check it with a Great Expectations suite.

The manifest comes from ``tasks.ml.manifest`` (every image decoded), the suite
and its Checkpoints from ``tasks.ml.expectations``; this module writes what the
stage promises:

Outputs (see :class:`tasks.paths.DatasetPaths`):

- ``data/manifests/<ds>.parquet``: written atomically, only when every
  expectation passes; a failing run leaves the previous manifest untouched.
  Its ``split`` column holds ``train``, ``validation`` and the held-out
  ``test`` (the archive's test folder, or carved from validation by
  ``evaluate.test_fraction``; see ``tasks.ml.manifest``). The labelled drops
  fed back (``python -m tasks feedback``, ``data/feedback/<ds>/<drop>/``) are
  ``train`` rows, never validation or test, their ``source`` the drop's name;
  the expected counts grow by what they add.
- ``reports/<ds>/validation/``: ``index.html``, our own self-contained page
  (opens offline), and ``data_docs/``, Great Expectations' Data Docs site.
  Data Docs pull Bootstrap, jQuery and Vega from CDNs: offline their result
  pages are unstyled but readable, and their index table (filled in by
  JavaScript) is empty; hence our ``index.html``. Written on pass and fail.
- ``data/shards/<ds>/``: for a dataset stored as shards (``datasets.<ds>.format``;
  ``download`` kept the archive whole), the accepted images as TFRecord shards
  and their ``index.json`` (``tasks.ml.shards``), the manifest locating each
  image; for a dataset stored as files only an index that says so. Written
  with the manifest, only when every expectation passes.
- ``reports/<ds>/validation.json``: DVC metrics: each check's pass/fail and
  observed value, counts per split/class/status, the quarantined files.

A failed expectation raises :class:`StageError` with a one-screen summary.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import SPLITS, Config, DatasetConfig, ValidateConfig
from tasks.errors import StageError
from tasks.io import atomic_path, kept_on_full_disk, write_json
from tasks.ml.expectations import (
    SHOW,
    CheckOutcome,
    build_suites,
    count_images,
    derive_frames,
    import_great_expectations,
    run_checkpoints,
)
from tasks.ml.manifest import (
    OK,
    QUARANTINED,
    Scan,
    build_manifest,
    carve_test_split,
    read_source,
    scan_class_tree,
    scan_raw,
)
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

DATA_DOCS = "data_docs"


@dataclass(frozen=True)
class ValidationResult:
    dataset: str
    manifest: Path
    counts: dict[str, Any]
    """``files``, ``ok``, ``quarantined``; ``splits``: split -> label -> ok/quarantined/expected."""
    passed: bool
    failed: tuple[CheckOutcome, ...]
    report: Path
    """Our offline ``index.html``; GE's Data Docs are in ``data_docs/`` beside it."""
    seconds: float
    checks: tuple[CheckOutcome, ...] = ()
    quarantined: tuple[tuple[str, str], ...] = ()
    """(path, reason) of every quarantined file."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data_docs(self) -> Path:
        return self.report.parent / DATA_DOCS / "index.html"

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        passed = len(self.checks) - len(self.failed)
        lines = [
            f"validate {self.dataset}: {verdict} {passed}/{len(self.checks)} expectations "
            f"in {self.seconds:.1f} s",
            f"  files {self.counts['files']}: ok {self.counts['ok']}, "
            f"quarantined {self.counts['quarantined']}",
        ]
        for split, labels in self.counts["splits"].items():
            per_class = ", ".join(f"{label} {c['ok']}" for label, c in labels.items())
            lines.append(f"  {split} (ok): {per_class}")
        for drop, labels in self.counts.get("feedback", {}).items():
            per_class = ", ".join(f"{label} {n}" for label, n in labels.items())
            lines.append(f"  fed back in train: {drop}: {per_class}")
        lines += [f"  {check.line()}" for check in self.failed]
        if self.passed:
            lines.append(f"manifest: {self.manifest}")
        lines.append(f"report: {self.report}")
        return "\n".join(lines)


def run(cfg: Config, paths: DatasetPaths) -> ValidationResult:
    """The stage: scan, decode, check, report; raise StageError if any expectation fails."""
    result = run_validation(cfg, paths)
    if not result.passed:
        raise StageError(failure_summary(result))
    return result


def run_validation(cfg: Config, paths: DatasetPaths) -> ValidationResult:
    """Like :func:`run` but returns a failing result instead of raising."""
    start = time.perf_counter()
    dataset = cfg.dataset(paths.dataset)
    settings = cfg.validate_
    scan = scan_raw(paths.raw, dataset, archive=_kept_archive(paths, dataset))
    manifest = build_manifest(scan, settings)
    if dataset.test_carved:
        manifest = carve_test_split(manifest, cfg.evaluate.test_fraction)
    manifest = with_feedback(manifest, paths, settings)
    expected = expected_counts(dataset, cfg.evaluate.test_fraction, manifest)
    timings = {"scan_decode": time.perf_counter() - start}
    frames = derive_frames(manifest, scan, dataset, settings, expected)
    timings["ge_import"] = import_great_expectations()

    report = paths.validation_reports / "index.html"
    with atomic_path(paths.validation_reports) as staging:
        staging.mkdir()
        checks, pages = run_checkpoints(
            frames, build_suites(dataset, settings), staging / DATA_DOCS, timings
        )
        failed = tuple(check for check in checks if not check.success)
        quarantined = manifest[manifest["status"] == QUARANTINED]
        result = ValidationResult(
            dataset=dataset.name,
            manifest=paths.manifest,
            counts={
                **count_images(manifest, dataset, expected),
                "feedback": feedback_counts(manifest),
            },
            passed=not failed,
            failed=failed,
            report=report,
            seconds=0.0,
            checks=tuple(checks),
            quarantined=tuple(zip(quarantined["path"], quarantined["reason"], strict=True)),
            timings=timings,
        )
        (staging / "index.html").write_text(render_report(result, pages), encoding="utf-8")

    if result.passed:
        writing = time.perf_counter()
        manifest = _write_images(manifest, scan, paths, settings)
        with kept_on_full_disk(paths.manifest, "writing the manifest", "manifest"):
            with atomic_path(paths.manifest) as tmp:
                manifest.to_parquet(tmp, index=False)
        timings["write"] = time.perf_counter() - writing
    seconds = time.perf_counter() - start
    result = replace(result, seconds=seconds)
    write_json(paths.validation_summary, summary_metrics(result, settings))
    log.info("validation of %s %s in %.1f s", dataset.name, _verdict(result), seconds)
    return result


def with_feedback(
    manifest: pd.DataFrame, paths: DatasetPaths, settings: ValidateConfig
) -> pd.DataFrame:
    """``manifest`` and the images of every fed-back drop as ``train`` rows (``source``: the
    drop), decoded and checked like the archive's; a StageError when a drop recorded as a
    DVC data version is not checked out here."""
    import pandas as pd

    missing = paths.feedback_not_checked_out()
    if missing:
        folder = paths.feedback_root.relative_to(paths.root).as_posix()
        raise StageError(
            f"fed-back drop(s) {', '.join(missing)} of {paths.dataset} are recorded "
            f"({paths.feedback}/<drop>.dvc) but their images are not here: run "
            f"`dvc checkout -R {folder}` (or `dvc pull -R {folder}`) and rerun validate"
        )
    files = []
    for drop in paths.feedback_drops():
        files += scan_class_tree(drop, base=paths.raw, source=drop.name).files
    if not files:
        return manifest
    fed_back = build_manifest(Scan(raw=paths.raw, files=files), settings)
    return pd.concat([manifest, fed_back], ignore_index=True).sort_values("path", ignore_index=True)


def expected_counts(
    dataset: DatasetConfig, test_fraction: float, manifest: pd.DataFrame
) -> dict[str, dict[str, int]]:
    """``datasets.<ds>.counts`` per split and class, the train counts grown by the ok
    images the fed-back drops add."""
    expected = dataset.expected_counts(test_fraction)
    for label, added in feedback_rows(manifest).groupby("label").size().items():
        if label in expected["train"]:
            expected["train"][label] += int(added)
    return expected


def feedback_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The ok rows that came from fed-back drops."""
    return manifest[(manifest["source"] != "") & (manifest["status"] == OK)]


def feedback_counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Drop -> class -> ok images it adds to the train split."""
    counts: dict[str, dict[str, int]] = {}
    for (drop, label), added in feedback_rows(manifest).groupby(["source", "label"]).size().items():
        counts.setdefault(str(drop), {})[str(label)] = int(added)
    return counts


def _kept_archive(paths: DatasetPaths, dataset: DatasetConfig) -> Path | None:
    """The archive ``download`` kept whole (the dataset is stored as shards), else None;
    an error when ``datasets.<ds>.format`` asks for the other storage."""
    stored_as = "shards" if paths.raw_archive.is_file() else "files"
    if dataset.format not in ("auto", stored_as):
        raise StageError(
            f"datasets.{dataset.name}.format is {dataset.format} but {paths.raw} holds the "
            f"dataset as {stored_as}; rerun `python -m tasks download {dataset.name}`"
        )
    return paths.raw_archive if stored_as == "shards" else None


def _write_images(
    manifest: pd.DataFrame, scan: Scan, paths: DatasetPaths, settings: ValidateConfig
) -> pd.DataFrame:
    """``data/shards/<ds>``: the accepted images as shards when read from the archive (the
    manifest gains their locations), else an index saying they are files."""
    from tasks.ml.shards import write_index, write_shards

    with atomic_path(paths.shards) as staging:
        staging.mkdir()
        if scan.archive is None:
            write_index(staging, {"format": "files"})
            return manifest
        manifest = write_shards(
            manifest,
            # a fed-back drop's images are files (their paths relative to data/raw/<ds>)
            lambda path: read_source(
                scan.source(path) if path in scan.members else str(paths.raw / path)
            ),
            staging,
            int(settings.shard_mb * 2**20),
            SPLITS,
        )
    log.info("%s: accepted images written as shards to %s", paths.dataset, paths.shards)
    return manifest


def _verdict(result: ValidationResult) -> str:
    return "passed" if result.passed else f"failed ({len(result.failed)} expectations)"


# --- reports -----------------------------------------------------------------


def failure_summary(result: ValidationResult) -> str:
    """One screen: each failed expectation with its observed value, and where the report is."""
    counts = result.counts
    lines = [
        f"validation of {result.dataset} failed: {len(result.failed)} of {len(result.checks)} "
        f"expectations ({counts['files']} files: {counts['ok']} ok, "
        f"{counts['quarantined']} quarantined)",
    ]
    lines += [f"  {check.line()}" for check in result.failed]
    if result.quarantined and "quarantine_budget" not in {c.check for c in result.failed}:
        shown = "; ".join(f"{path}: {reason}" for path, reason in result.quarantined[:SHOW])
        more = f" +{len(result.quarantined) - SHOW} more" if len(result.quarantined) > SHOW else ""
        lines.append(f"  quarantined: {shown}{more}")
    lines += [
        f"report: {result.report} (Great Expectations Data Docs: {result.data_docs})",
        f"the previous manifest ({result.manifest}) was left untouched; fix the data or "
        f"params.yaml (datasets.{result.dataset}, validate:) and re-run "
        f"`python -m tasks validate {result.dataset}`",
    ]
    return "\n".join(lines)


def summary_metrics(result: ValidationResult, settings: ValidateConfig) -> dict[str, Any]:
    """The DVC metrics file: verdicts, observed values, counts, quarantined files."""
    counts = result.counts
    return {
        "dataset": result.dataset,
        "passed": result.passed,
        "failed": [check.check for check in result.failed],
        "expectations": {
            check.check: {
                "success": check.success,
                "observed": check.observed,
                "unexpected": check.unexpected,
                "unexpected_keys": list(check.unexpected_keys),
                "description": check.description,
                "expectation": check.expectation,
            }
            for check in result.checks
        },
        "files": counts["files"],
        "ok": counts["ok"],
        "quarantined": counts["quarantined"],
        "quarantined_share": counts["quarantined"] / counts["files"] if counts["files"] else 0.0,
        "counts": counts["splits"],
        "quarantined_files": [{"path": p, "reason": r} for p, r in result.quarantined],
        "feedback": counts.get("feedback", {}),
        "settings": settings.model_dump(),
        "report": str(result.report),
        "seconds": round(result.seconds, 3),
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
    }


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:75em}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}.pass{color:#176f2c;font-weight:600}
.fail{color:#b3261e;font-weight:600}code{font-size:12px}.note{color:#555}
"""


def render_report(result: ValidationResult, pages: dict[str, Path]) -> str:
    """A self-contained HTML page: no scripts, no network, readable anywhere."""
    e = html.escape
    verdict = "PASSED" if result.passed else "FAILED"
    css = "pass" if result.passed else "fail"
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Validation: {e(result.dataset)} {verdict}</title><style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>Validation of <code>{e(result.dataset)}</code>: <span class='{css}'>{verdict}</span>"
        "</h1>",
        f"<p>{result.counts['files']} files: {result.counts['ok']} ok, "
        f"{result.counts['quarantined']} quarantined. "
        f"{len(result.checks) - len(result.failed)}/{len(result.checks)} expectations passed.</p>",
        *_expectation_rows(result, pages),
        *_count_rows(result),
        *_quarantine_rows(result),
        f"<h2>Great Expectations Data Docs</h2><p><a href='{DATA_DOCS}/index.html'>"
        "Data Docs site</a>. <span class='note'>Its pages load Bootstrap, jQuery and Vega from "
        "CDNs: offline they are unstyled, and the site index (built by JavaScript) is empty; "
        "the result pages linked above still read fine.</span></p>",
        "</body></html>\n",
    ]
    return "\n".join(out)


def _expectation_rows(result: ValidationResult, pages: dict[str, Path]) -> list[str]:
    """The expectations table, each linked to its Great Expectations result page."""
    e = html.escape
    out = [
        "<h2>Expectations</h2><table><tr><th>result</th><th>check</th><th>observed</th>"
        "<th>unexpected</th><th>Great Expectations</th></tr>",
    ]
    for check in result.checks:
        mark = (
            "<span class='pass'>pass</span>" if check.success else "<span class='fail'>FAIL</span>"
        )
        page = pages.get(check.frame)
        where = (
            f"<a href='{e(page.as_posix())}'>{e(check.expectation)}</a>"
            if page
            else e(check.expectation)
        )
        out.append(
            f"<tr><td>{mark}</td><td>{e(check.description)}</td><td>{e(check.observed)}</td>"
            f"<td>{e(check.unexpected)}</td><td><code>{where}</code> on <code>"
            f"{e(check.frame)}</code></td></tr>"
        )
    return out


def _count_rows(result: ValidationResult) -> list[str]:
    e = html.escape
    out = [
        "</table><h2>Images per split and class</h2><table><tr><th>split</th>"
        "<th>class</th><th>ok</th><th>quarantined</th><th>expected</th></tr>"
    ]
    for split, labels in result.counts["splits"].items():
        for label, c in labels.items():
            out.append(
                f"<tr><td>{e(split)}</td><td>{e(label)}</td><td>{c['ok']}</td>"
                f"<td>{c['quarantined']}</td><td>{c.get('expected', '')}</td></tr>"
            )
    return [*out, "</table>"]


def _quarantine_rows(result: ValidationResult) -> list[str]:
    e = html.escape
    out = [f"<h2>Quarantined files ({len(result.quarantined)})</h2>"]
    if not result.quarantined:
        return [*out, "<p>None.</p>"]
    out.append(
        "<p class='note'>Left in place under data/raw, never trained on.</p>"
        "<table><tr><th>path</th><th>reason</th></tr>"
    )
    out += [f"<tr><td><code>{e(p)}</code></td><td>{e(r)}</td></tr>" for p, r in result.quarantined]
    return [*out, "</table>"]
