"""``make bench-scale`` (tasks/dev/bench_scale.py): the counts, the arguments each stage gets,
the measure of a process (its peak RSS, its failure as one line), and one tiny real run."""

from __future__ import annotations

import json
import sys

import pytest

from tasks.dev.bench_scale import (
    add_marginal,
    build_parser,
    main,
    measure,
    run_workspace,
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


def test_the_marginal_cost_leaves_out_the_start_up():
    results = [
        {"images": n, "stages": {"train": {"seconds": 10 + n / 500}, "validate": {"seconds": 1}}}
        for n in (50000, 5000, 200000)
    ]
    results[1]["stages"].pop("validate")
    add_marginal(results)
    small, medium, large = results[1], results[0], results[2]
    assert "marginal_seconds_per_1000" not in small["stages"]["train"]
    assert medium["stages"]["train"]["marginal_seconds_per_1000"] == 2.0
    assert large["stages"]["train"]["marginal_seconds_per_1000"] == 2.0
    assert "marginal_seconds_per_1000" not in medium["stages"]["validate"]  # nothing before it
    assert large["stages"]["validate"]["marginal_seconds_per_1000"] == 0.0


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
def test_a_tiny_run_times_each_stage_and_dvc_tracks_a_few_shards(tmp_path, capsys):
    state, out = tmp_path / "state", tmp_path / "reports" / "scale.json"
    argv = ["--sizes", "60", "--side", "40", "--state", str(state), "--out", str(out)]
    argv += ["--params", str(REPO / "params.yaml")]
    assert main(argv) == 0

    report = json.loads(out.read_text())
    assert report["cpus"] >= 1 and report["ram_gb"] > 0 and report["commit"]
    assert report["options"]["sizes"] == [60] and report["options"]["cache_budget_mb"] is None
    (size,) = report["sizes"]
    assert size["generated_seconds"] > 0 and size["format"] == "shards"
    images = sorted((workspace(state.resolve(), 60, 40) / "data" / "raw").rglob("*.jpg"))
    assert size["images"] == len(images) == 60
    assert size["counts"]["train"] == {"ants": 20, "bees": 20}
    assert set(size["stages"]) == {"download", "validate", "train", "finetune"}
    for figures in size["stages"].values():
        assert figures["images"] == 60
        assert figures["seconds"] > 0 and figures["peak_rss_mb"] > 0
        # seconds are rounded to 0.01: that rounding, scaled
        per_1000 = pytest.approx(figures["seconds"] * 1000 / 60, abs=0.005 * 1000 / 60)
        assert figures["seconds_per_1000"] == per_1000
    ws = run_workspace(state.resolve(), 60, 40, "shards")
    assert [p.name for p in (ws / "data" / "raw" / "ants_vs_bees").iterdir()] == ["archive.zip"]
    shards = sorted((ws / "data" / "shards" / "ants_vs_bees").glob("*.tfrecord"))
    assert [p.name.split("-")[0] for p in shards] == ["test", "train", "validation"]
    dvc = size["dvc"]
    assert dvc["tracked"] == ["data/raw/ants_vs_bees", "data/shards/ants_vs_bees"]
    assert all(dvc[c]["seconds"] > 0 for c in ("add", "status", "push"))
    # the archive, the shards and their index, and one .dir object (listing) per folder
    dirs = list((ws / ".dvc" / "cache" / "files" / "md5").rglob("*.dir"))
    assert len(dirs) == 2 and dvc["objects"] == 1 + len(shards) + 1 + 2 == dvc["remote_objects"]
    printed = capsys.readouterr().out
    assert "download" in printed and "dvc push" in printed and str(out) in printed

    # files: the same images, reused, tracked as they are: one object per image
    assert main([*argv, "--format", "files", "--stages", "dvc"]) == 0
    again = json.loads(out.read_text())["sizes"][0]
    assert again["generated_seconds"] is None and again["stages"] == {}
    assert again["dvc"]["tracked"] == ["data/raw/ants_vs_bees"]
    assert again["dvc"]["objects"] == 61
