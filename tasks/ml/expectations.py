"""The expectation suite and how it runs: manifest frames in, verdicts out.

The suite comes from params.yaml (classes, splits, expected counts and their
tolerance, size bounds, quarantine budget, class balance). It runs as Great
Expectations 1.x Checkpoints in an ephemeral (in-memory) context over pandas
dataframes: the manifest itself plus small derived frames of aggregate facts
(:func:`derive_frames`: class folders found, ok images per split and class,
class balance per split, files per split by content hash), because a
row-level expectation cannot see a per-class count or a file that appears in
two splits. The splits are ``train``, ``validation`` and the held-out ``test``
(its own folder, or carved from validation before the suite runs), so the
leakage check covers all three. Nothing is written to a ``gx/`` folder; the only files are the
Data Docs, in the folder the caller names.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import SPLITS, DatasetConfig, ValidateConfig
from tasks.ml.manifest import OK, Scan

if TYPE_CHECKING:
    import pandas as pd

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


# --- derived frames: pandas only, no Great Expectations ---------------------


def derive_frames(
    manifest: pd.DataFrame,
    scan: Scan,
    dataset: DatasetConfig,
    settings: ValidateConfig,
    expected: dict[str, dict[str, int]],
) -> dict[str, pd.DataFrame]:
    """The frames the suites run on, each with a ``key`` and a human ``detail`` column.

    ``manifest``: one row per file. ``class_folders``: one row per folder found
    in a split folder. ``class_counts``: one row per split and class, with its
    ok count and relative deviation from ``expected`` (split -> class -> images,
    :meth:`DatasetConfig.expected_counts`).
    ``class_balance``: one row per split. ``cross_split``: one row per split
    and distinct ok content hash, so a hash seen twice is in both splits.
    """
    rows = _described_rows(manifest)
    ok = rows[rows["status"] == OK]
    counts = _class_counts(ok, dataset, expected)
    return {
        "manifest": rows.reset_index(drop=True),
        "class_folders": _class_folders(rows, scan),
        "class_counts": counts,
        "class_balance": _class_balance(counts),
        "cross_split": _cross_split(ok),
    }


def _described_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest with ``key`` (its path) and ``detail`` (what it is, or why quarantined)."""
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
    return rows


def _class_folders(rows: pd.DataFrame, scan: Scan) -> pd.DataFrame:
    import pandas as pd

    by_label = rows.groupby(["split", "label"]).size()
    return pd.DataFrame(
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


def _class_counts(
    ok: pd.DataFrame, dataset: DatasetConfig, expected_counts: dict[str, dict[str, int]]
) -> pd.DataFrame:
    import pandas as pd

    ok_counts = ok.groupby(["split", "label"]).size()
    counts = []
    for split in SPLITS:
        for label in dataset.classes:
            expected = expected_counts[split][label]
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
    return pd.DataFrame(counts)


def _class_balance(counts: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    balance = []
    for split in SPLITS:
        sizes = counts.loc[counts["split"] == split, "ok"]
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
    return pd.DataFrame(balance)


def _cross_split(ok: pd.DataFrame) -> pd.DataFrame:
    distinct = ok.drop_duplicates(["split", "sha256"])[["path", "split", "sha256"]]
    where = distinct.groupby("sha256")["path"].agg(list)
    cross = distinct.rename(columns={"path": "key"}).reset_index(drop=True)
    cross["detail"] = [
        "same bytes as " + ", ".join(p for p in where[sha] if p != key)
        if len(where[sha]) > 1
        else ""
        for key, sha in zip(cross["key"], cross["sha256"], strict=True)
    ]
    return cross


def count_images(
    manifest: pd.DataFrame, dataset: DatasetConfig, expected: dict[str, dict[str, int]]
) -> dict[str, Any]:
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
                entry["expected"] = expected[split][label]
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
    folders = [f"{split}/{label}" for split in dataset.folder_splits for label in classes]
    folder_splits = ", ".join(dataset.folder_splits)
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
        return f"{frame['sha256'].duplicated(keep=False).sum()} files found in two splits"

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
                description=f"every split ({', '.join(SPLITS)}) has files",
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
                description=f"every configured class folder exists in each split folder "
                f"({folder_splits})",
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
                f"datasets.{dataset.name}.counts"
                + (" (test carved from validation)" if dataset.test_carved else ""),
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
                description=f"no image (sha256) in two splits ({', '.join(SPLITS)})",
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
