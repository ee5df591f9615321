"""``make bench-scale`` (tasks/dev/bench_scale.py): the counts, the arguments each stage gets,
the measure of a process (its peak RSS, its failure as one line), and one tiny real run."""

from __future__ import annotations

import json
import sys

import pytest

from tasks.dev.bench_scale import (
    build_parser,
    main,
    measure,
    split_counts,
    stage_argv,
    workspace,
)
from tasks.errors import StageError
from tests.conftest import REPO


def test_the_counts_add_up_to_the_size_two_thirds_train_and_balanced():
    assert split_counts(5000) == {
        "train": {"ants": 1667, "bees": 1666},
        "validation": {"ants": 834, "bees": 833},
    }
    for size in (12, 61, 200_000):
        assert sum(sum(c.values()) for c in split_counts(size).values()) == size


def test_the_cache_budget_goes_to_train_and_finetune_and_set_to_every_stage(tmp_path):
    args = build_parser().parse_args(
        ["--sizes", "5k,12", "--cache-budget-mb", "64", "--set", "train.seed=1"]
    )
    assert args.sizes == [5000, 12]
    for stage in ("validate", "train", "finetune"):
        argv = stage_argv(stage, tmp_path, args)
        assert argv[1:5] == ["-m", "tasks", stage, "ants_vs_bees"]
        sets = [argv[i + 1] for i, part in enumerate(argv) if part == "--set"]
        budget = ["train.cache_budget_mb=64"] if stage != "validate" else []
        assert sets == ["train.seed=1", *budget]
    plain = build_parser().parse_args([])
    assert "--set" not in stage_argv("train", tmp_path, plain)
    assert plain.sizes == [5000, 50000, 200000]


def test_measure_reports_the_child_peak_rss_and_a_failure_in_one_line(tmp_path):
    grow = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    got = measure([sys.executable, "-c", grow], "grow", tmp_path, {}, tmp_path / "grow")
    assert got.seconds > 0 and got.peak_rss_mb > 300
    fail = "import sys; print('working'); print('boom: disk full', file=sys.stderr); sys.exit(3)"
    with pytest.raises(StageError) as error:
        measure([sys.executable, "-c", fail], "train on 60 images", tmp_path, {}, tmp_path / "f")
    assert str(error.value).startswith("train on 60 images failed (exit 3): boom: disk full [")
    assert "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_tiny_run_times_each_stage_and_dvc_caches_one_object_per_image(tmp_path, capsys):
    state, out = tmp_path / "state", tmp_path / "reports" / "scale.json"
    argv = ["--sizes", "60", "--side", "40", "--state", str(state), "--out", str(out)]
    assert main([*argv, "--params", str(REPO / "params.yaml")]) == 0

    report = json.loads(out.read_text())
    assert report["cpus"] >= 1 and report["ram_gb"] > 0 and report["commit"]
    assert report["options"]["sizes"] == [60] and report["options"]["cache_budget_mb"] is None
    (size,) = report["sizes"]
    assert size["generated_seconds"] > 0
    ws = workspace(state.resolve(), 60, 40)
    images = sorted((ws / "data" / "raw" / "ants_vs_bees").rglob("*.jpg"))
    assert size["images"] == len(images) == 60
    assert size["counts"]["train"] == {"ants": 20, "bees": 20}
    assert set(size["stages"]) == {"validate", "train", "finetune"}
    for figures in size["stages"].values():
        assert figures["images"] == 60
        assert figures["seconds"] > 0 and figures["peak_rss_mb"] > 0
        assert figures["seconds_per_1000"] == pytest.approx(figures["seconds"] * 1000 / 60, 0.01)
    dvc = size["dvc"]
    assert dvc["tracked"] == "data/raw/ants_vs_bees"
    assert all(dvc[c]["seconds"] > 0 for c in ("add", "status", "push"))
    # one object per image and one .dir object (the directory's listing)
    dirs = list((ws / ".dvc" / "cache" / "files" / "md5").rglob("*.dir"))
    assert len(dirs) == 1 and dvc["objects"] == len(images) + 1 == dvc["remote_objects"]
    printed = capsys.readouterr().out
    assert "validate" in printed and "dvc push" in printed and str(out) in printed

    # a second run reuses the images and starts DVC afresh: the same figures, no generation
    assert main([*argv, "--params", str(REPO / "params.yaml"), "--stages", "dvc"]) == 0
    again = json.loads(out.read_text())["sizes"][0]
    assert again["generated_seconds"] is None and again["stages"] == {}
    assert again["dvc"]["objects"] == 61 and (ws / ".generated.json").is_file()
