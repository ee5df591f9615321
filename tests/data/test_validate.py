"""The expectation suite, run for real with Great Expectations on generated datasets.

GE's import costs seconds once per process; each run after that is about a second,
so every case here is one small tree and one run.
"""

from __future__ import annotations

import html
import json
import shutil

import pandas as pd
import pytest
import yaml

from tasks.cli import main
from tasks.config import parse_config
from tasks.errors import StageError
from tasks.ml.manifest import COLUMNS, OK, QUARANTINED
from tasks.steps import validate
from tasks.steps.validate import run_validation
from tests.data.images import (
    config_for,
    copy_over,
    jpeg_bytes,
    make_raw,
    write_converted,
    write_truncated_jpeg,
)
from tests.datagen import tiny_params

ALL_CHECKS = {
    "labels_known",
    "splits_present",
    "quarantine_budget",
    "width_in_bounds",
    "height_in_bounds",
    "unique_within_split",
    "no_extra_class_folder",
    "no_missing_class_folder",
    "counts_within_tolerance",
    "class_balance",
    "no_leakage",
}


def failed(result) -> set[str]:
    return {check.check for check in result.failed}


@pytest.fixture(scope="module", params=["cats_vs_dogs", "ants_vs_bees"])
def clean(request, tmp_path_factory):
    """A clean tree of each layout, validated once; also checks no gx/ lands in the cwd."""
    root = tmp_path_factory.mktemp(request.param)
    paths, _ = make_raw(root, request.param)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = validate.run(config_for(request.param), paths)
    return paths, result, root


@pytest.mark.slow
def test_clean_data_passes_every_expectation(clean):
    paths, result, _ = clean
    assert result.passed and result.failed == ()
    assert {check.check for check in result.checks} == ALL_CHECKS
    assert result.counts["files"] == result.counts["ok"] == 18
    assert result.counts["quarantined"] == 0
    for labels in result.counts["splits"].values():
        assert [c["ok"] for c in labels.values()] == [c["expected"] for c in labels.values()]


@pytest.mark.slow
def test_clean_run_writes_the_manifest(clean):
    paths, result, _ = clean
    assert result.manifest == paths.manifest
    manifest = pd.read_parquet(paths.manifest)
    assert tuple(manifest.columns) == COLUMNS
    assert len(manifest) == 18
    assert set(manifest["status"]) == {OK}
    assert set(manifest["split"]) == {"train", "validation", "test"}
    assert (paths.raw / manifest["path"]).map(lambda p: p.is_file()).all()


@pytest.mark.slow
def test_clean_run_holds_out_a_test_split_from_the_validation_folder(clean):
    paths, result, _ = clean
    manifest = pd.read_parquet(paths.manifest)
    # 3 validation images per class; a 0.2 share rounds to one each, never all of them
    per_split = manifest.groupby(["split", "label"]).size().unstack()
    assert per_split.loc["test"].tolist() == [1, 1]
    assert per_split.loc["validation"].tolist() == [2, 2]
    assert per_split.loc["train"].tolist() == [6, 6]
    test_rows = manifest[manifest["split"] == "test"]
    assert test_rows["path"].str.contains(f"/{validate_folder(paths.dataset)}/").all()
    assert manifest.groupby("sha256")["split"].nunique().max() == 1  # no image in two splits
    assert result.counts["splits"]["test"][
        "cats" if paths.dataset == "cats_vs_dogs" else "ants"
    ] == {
        "ok": 1,
        "quarantined": 0,
        "expected": 1,
    }


def validate_folder(dataset: str) -> str:
    return {"cats_vs_dogs": "validation", "ants_vs_bees": "val"}[dataset]


@pytest.mark.slow
def test_the_test_split_follows_the_bytes_not_the_names(tree):
    paths, top = tree
    first = validate.run(config_for(), paths)
    chosen = _test_hashes(paths)
    for image in sorted((top / "validation").rglob("*.jpg")):  # rename every validation file
        image.rename(image.with_name("renamed-" + image.name))
    validate.run(config_for(), paths)
    assert _test_hashes(paths) == chosen and len(chosen) == 2
    assert first.passed


def _test_hashes(paths) -> set[str]:
    manifest = pd.read_parquet(paths.manifest)
    return set(manifest.loc[manifest["split"] == "test", "sha256"])


@pytest.mark.slow
def test_an_archive_test_folder_is_the_test_split(tree):
    paths, top = tree
    for index, label in enumerate(("cats", "dogs")):
        shutil.copytree(top / "train" / label, top / "test" / label)
        for n, image in enumerate(sorted((top / "test" / label).iterdir())):
            image.write_bytes(jpeg_bytes(seed=500 + 100 * index + n))  # unseen bytes
    per_class = {
        "train": {"cats": 6, "dogs": 6},
        "validation": {"cats": 3, "dogs": 3},
        "test": {"cats": 6, "dogs": 6},
    }
    params = tiny_params({"cats_vs_dogs": "file:///nowhere/archive.zip"})
    params["datasets"]["cats_vs_dogs"]["layout"]["test"] = "test"
    params["datasets"]["cats_vs_dogs"]["counts"] = per_class
    params["validate"]["class_balance"] = 0.0
    result = validate.run(parse_config(params), paths)
    assert result.passed, [c.line() for c in result.failed]
    manifest = pd.read_parquet(paths.manifest)
    sizes = manifest.groupby("split").size().to_dict()
    assert sizes == {"train": 12, "validation": 6, "test": 12}
    test_paths = manifest.loc[manifest["split"] == "test", "path"]
    assert test_paths.str.startswith("cats_and_dogs_filtered/test/").all()


@pytest.mark.slow
def test_a_test_image_copied_into_train_is_leakage(tree):
    paths, top = tree
    validate.run(config_for(), paths)
    manifest = pd.read_parquet(paths.manifest)
    held = manifest.loc[manifest["split"] == "test", "path"].iloc[0]
    copy_over(paths.raw / held, top / "train" / "cats" / "cats.0.jpg")
    result = run_validation(config_for(), paths)
    assert "no_leakage" in failed(result)
    leak = next(c for c in result.failed if c.check == "no_leakage")
    assert held in leak.unexpected_keys
    assert "no image (sha256) in two splits (train, validation, test)" in leak.line()


@pytest.mark.slow
def test_clean_run_writes_reports_and_metrics(clean):
    paths, result, root = clean
    assert result.report == paths.validation_reports / "index.html"
    page = result.report.read_text()
    assert "PASSED" in page
    assert "<script" not in page and "https://" not in page and "http://" not in page
    for check in result.checks:
        assert html.escape(check.description) in page
    assert result.data_docs.is_file()
    ge_pages = list((paths.validation_reports / "data_docs" / "validations").rglob("*.html"))
    assert len(ge_pages) == 5  # one per frame
    for ge_page in ge_pages:
        assert ge_page.relative_to(paths.validation_reports).as_posix() in page

    metrics = json.loads(paths.validation_summary.read_text())
    assert metrics["passed"] is True and metrics["failed"] == []
    assert set(metrics["expectations"]) == ALL_CHECKS
    assert all(e["success"] and e["observed"] for e in metrics["expectations"].values())
    assert metrics["counts"] == result.counts["splits"]
    assert metrics["quarantined_files"] == []
    assert not (root / "gx").exists()


@pytest.mark.slow
def test_result_prints_readably(clean):
    paths, result, _ = clean
    text = str(result)
    assert f"validate {paths.dataset}: passed 11/11 expectations" in text
    assert str(paths.manifest) in text and str(result.report) in text
    assert result.seconds > 0


@pytest.fixture
def tree(tmp_path):
    paths, top = make_raw(tmp_path)
    return paths, top


def test_usable_conversions_pass(tree):
    paths, top = tree
    write_converted(top / "train" / "cats" / "cats.0.jpg", "L")
    write_converted(top / "train" / "cats" / "cats.1.jpg", "CMYK")
    write_converted(top / "train" / "dogs" / "dogs.0.jpg", "RGBA", "PNG")
    write_converted(top / "validation" / "dogs" / "dogs.0.jpg", "P", "PNG")
    result = validate.run(config_for(), paths)
    assert result.passed and result.counts["ok"] == 18


def test_same_image_in_train_and_validation_is_leakage(tree):
    paths, top = tree
    copy_over(top / "train" / "cats" / "cats.4.jpg", top / "validation" / "cats" / "cats.0.jpg")
    result = run_validation(config_for(), paths)
    assert failed(result) == {"no_leakage"}
    (leak,) = result.failed
    assert "train/cats/cats.4.jpg" in leak.unexpected
    assert "validation/cats/cats.0.jpg" in leak.unexpected
    assert leak.unexpected_keys == (
        "cats_and_dogs_filtered/train/cats/cats.4.jpg",
        "cats_and_dogs_filtered/validation/cats/cats.0.jpg",
    )


def test_duplicate_within_a_split_fails(tree):
    paths, top = tree
    copy_over(top / "train" / "dogs" / "dogs.0.jpg", top / "train" / "dogs" / "dogs.1.jpg")
    assert failed(run_validation(config_for(), paths)) == {"unique_within_split"}


def test_extra_class_folder_fails(tree):
    paths, top = tree
    (top / "train" / "cows").mkdir()
    copy_over(top / "train" / "cats" / "cats.0.jpg", top / "train" / "cows" / "cow.jpg")
    (top / "train" / "cats" / "cats.0.jpg").unlink()  # keep sha256s unique, counts off by one
    result = run_validation(config_for(count_tolerance=0.2), paths)
    assert failed(result) == {"no_extra_class_folder", "labels_known"}
    extra = next(c for c in result.failed if c.check == "no_extra_class_folder")
    assert "train/cows" in extra.line()


def test_empty_extra_class_folder_fails(tree):
    paths, top = tree
    (top / "validation" / "horses").mkdir()
    assert failed(run_validation(config_for(), paths)) == {"no_extra_class_folder"}


def test_missing_class_folder_fails(tree):
    paths, top = tree
    shutil.rmtree(top / "validation" / "dogs")
    result = run_validation(config_for(), paths)
    assert {"no_missing_class_folder", "counts_within_tolerance"} <= failed(result)
    missing = next(c for c in result.failed if c.check == "no_missing_class_folder")
    assert "validation/dogs" in missing.unexpected


def test_missing_split_fails(tree):
    paths, top = tree
    shutil.rmtree(top / "validation")
    result = run_validation(config_for(), paths)
    assert {"splits_present", "no_missing_class_folder", "counts_within_tolerance"} <= failed(
        result
    )


def test_counts_far_from_expected_fail(tree):
    paths, _ = tree
    result = run_validation(config_for(counts={"train": 60, "validation": 30}), paths)
    assert failed(result) == {"counts_within_tolerance"}
    assert "train/cats (6 ok, expected 60)" in result.failed[0].unexpected


def test_class_imbalance_fails(tree):
    paths, top = tree
    for n in range(4):
        (top / "train" / "dogs" / f"dogs.{n}.jpg").unlink()
    per_class = {"train": {"cats": 6, "dogs": 2}, "validation": {"cats": 3, "dogs": 3}}
    result = run_validation(config_for(per_class=per_class), paths)
    assert failed(result) == {"class_balance"}
    assert "2/6" in result.failed[0].unexpected


def test_images_over_max_side_fail_the_bounds(tree):
    paths, _ = tree
    result = run_validation(config_for(max_side=40), paths)
    assert failed(result) == {"width_in_bounds", "height_in_bounds"}


def test_quarantine_within_budget_passes_and_is_listed(tree):
    paths, top = tree
    write_truncated_jpeg(top / "train" / "cats" / "cats.5.jpg")
    cfg = config_for(quarantine_budget=0.1, count_tolerance=0.2)
    result = validate.run(cfg, paths)
    path = "cats_and_dogs_filtered/train/cats/cats.5.jpg"
    assert result.passed and result.quarantined[0][0] == path
    manifest = pd.read_parquet(paths.manifest)
    assert manifest.loc[manifest["path"] == path, "status"].item() == QUARANTINED
    assert (paths.raw / path).exists()
    assert path in result.report.read_text()
    metrics = json.loads(paths.validation_summary.read_text())
    assert metrics["quarantined_files"][0]["path"] == path


def test_quarantine_over_budget_fails(tree):
    paths, top = tree
    write_truncated_jpeg(top / "train" / "cats" / "cats.5.jpg")
    result = run_validation(config_for(count_tolerance=0.2), paths)
    assert failed(result) == {"quarantine_budget"}
    assert "1 of 18 files quarantined" in result.failed[0].observed


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A dataset with several faults, validated through the CLI after a good run."""
    root = tmp_path_factory.mktemp("dirty")
    paths, top = make_raw(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params({"cats_vs_dogs": "file:///nowhere.zip"})))
    argv = ["validate", "cats_vs_dogs", "--params", str(params), "--root", str(root)]
    assert main(argv) == 0
    good_manifest = paths.manifest.read_bytes()
    (top / "train" / "cats" / "cats.2.jpg").write_bytes(b"")
    (top / "validation" / "cats" / "notes.txt").write_text("hello")
    copy_over(top / "train" / "dogs" / "dogs.3.jpg", top / "validation" / "dogs" / "dogs.1.jpg")
    (top / "train" / "birds").mkdir()
    return paths, argv, good_manifest


def test_failing_run_exits_2_with_a_one_screen_summary(dirty, capsys):
    paths, argv, _ = dirty
    assert main(argv) == 2
    message = capsys.readouterr().err
    lines = message.strip().splitlines()
    assert lines[0].startswith("error: validation of cats_vs_dogs failed: 4 of 11 expectations")
    assert len(lines) <= 25
    for text in (
        "at most 2.0% of files quarantined: 2 of 19 files quarantined",
        "no unexpected class folder",
        "no image (sha256) in two splits (train, validation, test)",
        "ok images per split and class within 5%",
        "train/cats/cats.2.jpg",
        str(paths.validation_reports / "index.html"),
    ):
        assert text in message, text


def test_failing_run_keeps_the_previous_manifest_and_writes_reports(dirty):
    paths, argv, good_manifest = dirty
    main(argv)
    assert paths.manifest.read_bytes() == good_manifest
    assert "FAILED" in (paths.validation_reports / "index.html").read_text()
    metrics = json.loads(paths.validation_summary.read_text())
    assert metrics["passed"] is False
    assert set(metrics["failed"]) == {
        "quarantine_budget",
        "no_extra_class_folder",
        "no_leakage",
        "counts_within_tolerance",
    }
    assert {f["path"].rsplit("/", 1)[1] for f in metrics["quarantined_files"]} == {
        "cats.2.jpg",
        "notes.txt",
    }


def test_validate_raises_stage_error_naming_the_report(dirty):
    paths, _, _ = dirty
    with pytest.raises(StageError) as error:
        validate.run(config_for(), paths)
    assert "data_docs/index.html" in str(error.value)


def test_missing_raw_is_a_one_line_error_from_the_cli(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params({"ants_vs_bees": "file:///nowhere.zip"})))
    argv = ["validate", "ants_vs_bees", "--params", str(params), "--root", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "run `python -m tasks download ants_vs_bees` first" in err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "data" / "manifests").exists()
