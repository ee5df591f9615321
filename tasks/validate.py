"""``validate``: build the image manifest and check it with a Great Expectations suite.

The suite comes from params.yaml (classes, splits, expected counts and their
tolerance, size bounds, quarantine budget, class balance). It runs as Great
Expectations 1.x Checkpoints in an ephemeral (in-memory) context over pandas
dataframes: the manifest itself plus small derived frames of aggregate facts
(class folders found, ok images per split and class, class balance per split,
files per split by content hash), because a row-level expectation cannot see a
per-class count or a file that appears in both splits. Nothing is written to a
``gx/`` folder; the only files are the reports.

Outputs (see :class:`tasks.paths.DatasetPaths`):

- ``data/manifests/<ds>.parquet``: written atomically, only when every
  expectation passes; a failing run leaves the previous manifest untouched.
- ``reports/<ds>/validation/``: ``index.html``, our own self-contained page
  (opens offline), and ``data_docs/``, Great Expectations' Data Docs site.
  Data Docs pull Bootstrap, jQuery and Vega from CDNs: offline their result
  pages are unstyled but readable, and their index table (filled in by
  JavaScript) is empty; hence our ``index.html``. Written on pass and fail.
- ``reports/<ds>/validation.json``: DVC metrics: each check's pass/fail and
  observed value, counts per split/class/status, the quarantined files.

A failed expectation raises :class:`StageError` with a one-screen summary.
"""

from __future__ import annotations

import html
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.atomic import atomic_path, write_json
from tasks.config import SPLITS, Config, DatasetConfig, ValidateConfig
from tasks.errors import StageError
from tasks.manifest import OK, QUARANTINED, Scan, build_manifest, scan_raw
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

DATA_DOCS = "data_docs"
SHOW = 3
"""Unexpected rows named per failed check in the text; ``unexpected_keys`` holds them all."""


@dataclass(frozen=True)
class CheckOutcome:
    """One expectation's verdict, in words a user can act on."""

    check: str
    """Stable id, e.g. ``no_leakage``."""
    description: str
    expectation: str
    """The Great Expectations type, e.g. ``expect_column_values_to_be_unique``."""
    frame: str
    success: bool
    observed: str
    unexpected: str = ""
    unexpected_keys: tuple[str, ...] = ()
    """Every row GE flagged (``key`` column: a path, ``split/class``…) or value missing."""

    def line(self) -> str:
        mark = "ok  " if self.success else "FAIL"
        tail = f" -> {self.unexpected}" if self.unexpected and not self.success else ""
        return f"{mark} {self.description}: {self.observed}{tail}"


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
        lines += [f"  {check.line()}" for check in self.failed]
        if self.passed:
            lines.append(f"manifest: {self.manifest}")
        lines.append(f"report: {self.report}")
        return "\n".join(lines)


def validate(cfg: Config, paths: DatasetPaths) -> ValidationResult:
    """The stage: scan, decode, check, report; raise StageError if any expectation fails."""
    result = run_validation(cfg, paths)
    if not result.passed:
        raise StageError(failure_summary(result))
    return result


def run_validation(cfg: Config, paths: DatasetPaths) -> ValidationResult:
    """Like :func:`validate` but returns a failing result instead of raising."""
    start = time.perf_counter()
    dataset = cfg.dataset(paths.dataset)
    settings = cfg.validation
    scan = scan_raw(paths.raw, dataset)
    manifest = build_manifest(scan, settings)
    timings = {"scan_decode": time.perf_counter() - start}
    frames = derive_frames(manifest, scan, dataset, settings)
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
            counts=count_images(manifest, dataset),
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
        with atomic_path(paths.manifest) as tmp:
            manifest.to_parquet(tmp, index=False)
    seconds = time.perf_counter() - start
    result = replace(result, seconds=seconds)
    write_json(paths.validation_summary, summary_metrics(result, settings))
    log.info("validation of %s %s in %.1f s", dataset.name, _verdict(result), seconds)
    return result


def _verdict(result: ValidationResult) -> str:
    return "passed" if result.passed else f"failed ({len(result.failed)} expectations)"


# --- derived frames: pandas only, no Great Expectations ---------------------


def derive_frames(
    manifest: pd.DataFrame, scan: Scan, dataset: DatasetConfig, settings: ValidateConfig
) -> dict[str, pd.DataFrame]:
    """The frames the suites run on, each with a ``key`` and a human ``detail`` column.

    ``manifest``: one row per file. ``class_folders``: one row per folder found
    in a split folder. ``class_counts``: one row per configured split and
    class, with its ok count and relative deviation from the expected count.
    ``class_balance``: one row per split. ``cross_split``: one row per split
    and distinct ok content hash, so a hash seen twice is in both splits.
    """
    import pandas as pd

    rows = manifest.copy()
    rows["key"] = rows["path"]
    size = rows["width"].astype("string") + "x" + rows["height"].astype("string")
    described = (
        rows["label"]
        + ", "
        + rows["format"]
        + " "
        + rows["mode"]
        + " "
        + size
        + ", sha256 "
        + rows["sha256"].str.slice(0, 12)
    )
    rows["detail"] = described.where(rows["status"] == OK, rows["reason"]).fillna("")

    by_label = rows.groupby(["split", "label"]).size()
    folders = pd.DataFrame(
        [
            {
                "key": f"{split}/{folder}",
                "split": split,
                "folder": folder,
                "files": int(by_label.get((split, folder), 0)),
                "detail": f"{int(by_label.get((split, folder), 0))} files",
            }
            for split, names in scan.class_folders.items()
            for folder in names
        ],
        columns=["key", "split", "folder", "files", "detail"],
    )

    ok = rows[rows["status"] == OK]
    ok_counts = ok.groupby(["split", "label"]).size()
    counts = []
    for split in SPLITS:
        for label in dataset.classes:
            expected = dataset.counts[split][label]
            got = int(ok_counts.get((split, label), 0))
            counts.append(
                {
                    "key": f"{split}/{label}",
                    "split": split,
                    "label": label,
                    "expected": expected,
                    "ok": got,
                    "deviation": abs(got - expected) / max(expected, 1),
                    "detail": f"{got} ok, expected {expected}",
                }
            )
    counts_frame = pd.DataFrame(counts)

    balance = []
    for split in SPLITS:
        sizes = counts_frame.loc[counts_frame["split"] == split, "ok"]
        smallest, largest = int(sizes.min()), int(sizes.max())
        ratio = smallest / largest if largest else 0.0
        balance.append(
            {
                "key": split,
                "smallest": smallest,
                "largest": largest,
                "ratio": ratio,
                "detail": f"smallest/largest class = {smallest}/{largest} = {ratio:.2f}",
            }
        )

    distinct = ok.drop_duplicates(["split", "sha256"])[["path", "split", "sha256"]]
    where = distinct.groupby("sha256")["path"].agg(list)
    cross = distinct.rename(columns={"path": "key"}).reset_index(drop=True)
    cross["detail"] = [
        "same bytes as " + ", ".join(p for p in where[sha] if p != key)
        if len(where[sha]) > 1
        else ""
        for key, sha in zip(cross["key"], cross["sha256"], strict=True)
    ]
    return {
        "manifest": rows.reset_index(drop=True),
        "class_folders": folders,
        "class_counts": counts_frame,
        "class_balance": pd.DataFrame(balance),
        "cross_split": cross,
    }


def count_images(manifest: pd.DataFrame, dataset: DatasetConfig) -> dict[str, Any]:
    """Files per status, and per split and label (configured classes first)."""
    splits: dict[str, dict[str, dict[str, int]]] = {}
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        found = sorted(set(part["label"]) - set(dataset.classes))
        splits[split] = {}
        for label in [*dataset.classes, *found]:
            status = part.loc[part["label"] == label, "status"]
            entry = {"ok": int((status == OK).sum()), "quarantined": int((status != OK).sum())}
            if label in dataset.classes:
                entry["expected"] = dataset.counts[split][label]
            splits[split][label or "(no class folder)"] = entry
    status = manifest["status"]
    return {
        "files": len(manifest),
        "ok": int((status == OK).sum()),
        "quarantined": int((status != OK).sum()),
        "splits": splits,
    }


# --- the suites: Great Expectations from here on ---------------------------


@dataclass(frozen=True)
class Check:
    """A suite entry: which frame, which GE expectation, and how to say what was observed."""

    check: str
    frame: str
    expectation: Any
    observe: Any
    """frame -> str: the fact the expectation judges, in words."""


def build_suites(dataset: DatasetConfig, settings: ValidateConfig) -> list[Check]:
    """The expectation suite from params.yaml, one :class:`Check` per expectation."""
    import_great_expectations()
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    classes = list(dataset.classes)
    folders = [f"{split}/{label}" for split in SPLITS for label in classes]
    is_ok = Column("status") == OK
    budget = settings.quarantine_budget
    tolerance = settings.count_tolerance
    lo, hi = settings.min_side, settings.max_side

    def ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["status"] == OK]

    def span(column: str):
        def observe(frame: pd.DataFrame) -> str:
            values = ok_rows(frame)[column]
            return f"{values.min()}..{values.max()} px" if len(values) else "no ok images"

        return observe

    def quarantine_share(frame: pd.DataFrame) -> str:
        bad = int((frame["status"] != OK).sum())
        share = bad / len(frame) if len(frame) else 0.0
        return f"{bad} of {len(frame)} files quarantined ({share:.1%}; budget {budget:.1%})"

    def list_keys(frame: pd.DataFrame) -> str:
        return ", ".join(frame["key"]) or "none"

    def dup_count(frame: pd.DataFrame) -> str:
        dups = ok_rows(frame).duplicated(["split", "sha256"], keep=False).sum()
        return f"{dups} ok files share their bytes with another in the same split"

    def per_class(frame: pd.DataFrame) -> str:
        return ", ".join(
            f"{key} {ok}/{expected}"
            for key, ok, expected in zip(frame["key"], frame["ok"], frame["expected"], strict=True)
        )

    def leak_count(frame: pd.DataFrame) -> str:
        return f"{frame['sha256'].duplicated(keep=False).sum()} files found in both splits"

    return [
        Check(
            "labels_known",
            "manifest",
            gxe.ExpectColumnValuesToBeInSet(
                column="label",
                value_set=classes,
                description=f"every file is in a configured class folder ({', '.join(classes)})",
            ),
            lambda f: "labels " + (", ".join(repr(x) for x in sorted(set(f["label"]))) or "none"),
        ),
        Check(
            "splits_present",
            "manifest",
            gxe.ExpectColumnDistinctValuesToEqualSet(
                column="split",
                value_set=list(SPLITS),
                description="both splits (train, validation) have files",
            ),
            lambda f: "splits " + (", ".join(sorted(set(f["split"]))) or "none"),
        ),
        Check(
            "quarantine_budget",
            "manifest",
            gxe.ExpectColumnValuesToBeInSet(
                column="status",
                value_set=[OK],
                mostly=max(0.0, 1.0 - budget),
                description=f"at most {budget:.1%} of files quarantined",
            ),
            quarantine_share,
        ),
        Check(
            "width_in_bounds",
            "manifest",
            gxe.ExpectColumnValuesToBeBetween(
                column="width",
                min_value=lo,
                max_value=hi,
                row_condition=is_ok,
                description=f"ok images are {lo}..{hi} px wide",
            ),
            span("width"),
        ),
        Check(
            "height_in_bounds",
            "manifest",
            gxe.ExpectColumnValuesToBeBetween(
                column="height",
                min_value=lo,
                max_value=hi,
                row_condition=is_ok,
                description=f"ok images are {lo}..{hi} px high",
            ),
            span("height"),
        ),
        Check(
            "unique_within_split",
            "manifest",
            gxe.ExpectCompoundColumnsToBeUnique(
                column_list=["split", "sha256"],
                row_condition=is_ok,
                description="no duplicate image (sha256) within a split",
            ),
            dup_count,
        ),
        Check(
            "no_extra_class_folder",
            "class_folders",
            gxe.ExpectColumnValuesToBeInSet(
                column="key",
                value_set=folders,
                description="no unexpected class folder",
            ),
            lambda f: "folders " + list_keys(f),
        ),
        Check(
            "no_missing_class_folder",
            "class_folders",
            gxe.ExpectColumnDistinctValuesToContainSet(
                column="key",
                value_set=folders,
                description="every configured class folder exists in both splits",
            ),
            lambda f: "folders " + list_keys(f),
        ),
        Check(
            "counts_within_tolerance",
            "class_counts",
            gxe.ExpectColumnValuesToBeBetween(
                column="deviation",
                min_value=0,
                max_value=tolerance,
                description=f"ok images per split and class within {tolerance:.0%} of "
                f"datasets.{dataset.name}.counts",
            ),
            per_class,
        ),
        Check(
            "class_balance",
            "class_balance",
            gxe.ExpectColumnValuesToBeBetween(
                column="ratio",
                min_value=settings.class_balance,
                description=f"smallest/largest ok class count per split >= "
                f"{settings.class_balance:g}",
            ),
            lambda f: ", ".join(f"{k} {r:.2f}" for k, r in zip(f["key"], f["ratio"], strict=True)),
        ),
        Check(
            "no_leakage",
            "cross_split",
            gxe.ExpectColumnValuesToBeUnique(
                column="sha256",
                description="no image (sha256) in both train and validation",
            ),
            leak_count,
        ),
    ]


def import_great_expectations() -> float:
    """Import Great Expectations quietly; returns the seconds it took (0 if already loaded)."""
    if "great_expectations" in sys.modules:
        return 0.0
    # Its import logs hundreds of INFO lines about its own docs decorators.
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:
        gx_log.setLevel(logging.WARNING)
    begin = time.perf_counter()
    import great_expectations  # noqa: F401

    return time.perf_counter() - begin


def _context(docs: Path) -> Any:
    """An in-memory GE context whose only Data Docs site is ``docs`` (no analytics)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            "local": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs),
                },
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_checkpoints(
    frames: dict[str, pd.DataFrame],
    checks: list[Check],
    docs: Path,
    timings: dict[str, float] | None = None,
) -> tuple[list[CheckOutcome], dict[str, Path]]:
    """Run one Checkpoint per frame, build Data Docs into ``docs``.

    Returns the outcome of each check (in ``checks`` order) and, per frame, its
    Data Docs result page relative to ``docs.parent``. One checkpoint per frame
    because a checkpoint hands the same ``dataframe`` batch parameter to all
    its validation definitions.
    """
    import_great_expectations()
    import great_expectations as gx

    timings = timings if timings is not None else {}
    begin = time.perf_counter()
    context = _context(docs)
    source = context.data_sources.add_pandas("frames")
    outcomes: dict[str, CheckOutcome] = {}
    for name, frame in frames.items():
        mine = [c for c in checks if c.frame == name]
        if not mine:
            continue
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(
            gx.ExpectationSuite(name=name, expectations=[c.expectation for c in mine])
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                actions=[],
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": ["key", "detail"],
                },
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": _for_ge(frame)})
        for run in result.run_results.values():
            for check, verdict in zip(mine, run.results, strict=True):
                outcomes[check.check] = _outcome(check, verdict, frame)
    timings["expectations"] = time.perf_counter() - begin
    begin = time.perf_counter()
    context.build_data_docs(site_names=["local"])
    timings["data_docs"] = time.perf_counter() - begin
    pages = {}
    for name in frames:
        found = sorted((docs / "validations" / name).rglob("*.html"))
        if found:
            pages[name] = found[-1].relative_to(docs.parent)
    return [outcomes[c.check] for c in checks], pages


def _for_ge(frame: pd.DataFrame) -> pd.DataFrame:
    """Plain numpy dtypes: GE's pandas engine is most at home with object/int/float."""
    out = frame.copy()
    for column in out.columns:
        dtype = str(out[column].dtype)
        if dtype == "string":
            out[column] = out[column].astype(object).where(out[column].notna(), None)
        elif dtype == "Int64":
            has_na = out[column].isna().any()
            out[column] = out[column].astype("float64" if has_na else "int64")
    return out


def _outcome(check: Check, verdict: Any, frame: pd.DataFrame) -> CheckOutcome:
    config = verdict.expectation_config
    if config.description != check.expectation.description:
        raise AssertionError(f"result order mismatch at {check.check}")
    result = verdict.result or {}
    info = verdict.exception_info or {}
    unexpected = ""
    keys: list[str] = []
    if info.get("raised_exception"):
        unexpected = f"error: {info.get('exception_message')}"
    elif result.get("missing_count"):
        keys = [str(value) for value in result.get("partial_missing_list", [])]
        unexpected = "missing: " + ", ".join(keys)
    elif result.get("unexpected_index_list"):
        rows = result["unexpected_index_list"]
        keys = [str(row["key"]) for row in rows]
        named = [
            f"{row['key']} ({row['detail']})" if row.get("detail") else row["key"]
            for row in rows[:SHOW]
        ]
        more = f" +{len(rows) - SHOW} more" if len(rows) > SHOW else ""
        unexpected = (
            f"{result['unexpected_count']} of {result['element_count']}: " + "; ".join(named) + more
        )
    elif result.get("unexpected_count"):
        keys = [str(value) for value in result.get("partial_unexpected_list", [])]
        unexpected = "unexpected: " + ", ".join(keys)
    return CheckOutcome(
        check=check.check,
        description=config.description,
        expectation=config.type,
        frame=check.frame,
        success=bool(verdict.success),
        observed=check.observe(frame),
        unexpected=unexpected,
        unexpected_keys=tuple(keys),
    )


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
    out.append(
        "</table><h2>Images per split and class</h2><table><tr><th>split</th>"
        "<th>class</th><th>ok</th><th>quarantined</th><th>expected</th></tr>"
    )
    for split, labels in result.counts["splits"].items():
        for label, c in labels.items():
            out.append(
                f"<tr><td>{e(split)}</td><td>{e(label)}</td><td>{c['ok']}</td>"
                f"<td>{c['quarantined']}</td><td>{c.get('expected', '')}</td></tr>"
            )
    out.append("</table>")
    out.append(f"<h2>Quarantined files ({len(result.quarantined)})</h2>")
    if result.quarantined:
        out.append(
            "<p class='note'>Left in place under data/raw, never trained on.</p>"
            "<table><tr><th>path</th><th>reason</th></tr>"
        )
        out += [
            f"<tr><td><code>{e(p)}</code></td><td>{e(r)}</td></tr>" for p, r in result.quarantined
        ]
        out.append("</table>")
    else:
        out.append("<p>None.</p>")
    out.append(
        f"<h2>Great Expectations Data Docs</h2><p><a href='{DATA_DOCS}/index.html'>"
        "Data Docs site</a>. <span class='note'>Its pages load Bootstrap, jQuery and Vega from "
        "CDNs: offline they are unstyled, and the site index (built by JavaScript) is empty; "
        "the result pages linked above still read fine.</span></p>"
    )
    out.append("</body></html>\n")
    return "\n".join(out)
