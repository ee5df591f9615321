"""``make bench-gpu`` (tasks/dev/bench_gpu.py): the projection, the table, the arguments,
that it stays free of TensorFlow and the pipeline's modules, and one tiny real run."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from tasks.dev import bench_gpu
from tasks.dev.bench_gpu import JAX_JIT, Pipeline, best_projections, format_table, project
from tests.conftest import REPO


def _row(backbone: str = "mobilenet_v2", **values: object) -> dict:
    row = {
        "backend": "tensorflow",
        "device": "cpu",
        "backbone": backbone,
        "image_size": 160,
        "precision": "float32",
        "jit": False,
        "batch_size": 32,
        "extract_img_s": 100.0,
        "head_img_s": 1000.0,
        "finetune_img_s": 50.0,
    }
    row.update(values)
    return row


def test_the_projection_prices_every_part_of_the_cats_dogs_run():
    result = project(extract=100.0, head=1000.0, finetune=50.0)
    assert result["terms"] == {
        "extract_features": 28.0,  # (2000 + 800) / 100
        "head_epochs": 20.0,  # 10 * 2000 / 1000
        "finetune_epochs": 480.0,  # 10 * (2000 / 50 + 800 / 100)
        "evaluate": 2.0,  # 200 / 100
    }
    assert result["seconds"] == 530.0 == 11000 / 100 + 20000 / 1000 + 20000 / 50
    small = project(10.0, 10.0, 10.0, Pipeline(100, 50, 0.2, 2, 3))
    assert small["terms"] == {
        "extract_features": 14.0,
        "head_epochs": 20.0,
        "finetune_epochs": 42.0,
        "evaluate": 1.0,
    }
    assert bench_gpu.PIPELINE.formula() == (
        "T = (2000 + 800)/E + 10*2000/H + 10*(2000/F + 800/E) + 200/E"
    )


def test_the_projection_takes_the_fastest_complete_configuration_per_backbone():
    rows = [
        _row(batch_size=32),
        _row(batch_size=64, finetune_img_s=100.0),  # 330 s: the fastest
        _row(batch_size=128, finetune_img_s=1e6, error="finetune: ResourceExhaustedError: OOM"),
        _row(precision="mixed_float16", batch_size=None, skipped="skipped: CPU"),
        _row("vgg16", error="build: ValueError: no"),
    ]
    by_name = {entry["backbone"]: entry for entry in best_projections(rows)}
    assert list(by_name) == ["mobilenet_v2", "vgg16"]
    best = by_name["mobilenet_v2"]
    assert best["seconds"] == pytest.approx(330.0)
    assert best["config"] == {
        "image_size": 160,
        "precision": "float32",
        "jit": False,
        "batch_size": 64,
    }
    assert best["rates"] == {"extract": 100.0, "head": 1000.0, "finetune": 100.0}
    assert by_name["vgg16"] == {"backbone": "vgg16", "error": "no configuration completed"}


def test_the_table_has_a_fixed_width_line_for_every_row_errors_and_skips_included():
    rows = [
        _row(batch_size=32, extract_img_s=1234.56),
        _row(batch_size=256, jit=True, extract_img_s=9.0, error="extract: OOM at 256"),
        _row(
            precision="mixed_float16",
            jit=None,
            batch_size=None,
            extract_img_s=None,
            head_img_s=None,
            finetune_img_s=None,
            skipped="skipped: no fp16",
        ),
        _row("efficientnet_b0", jit=JAX_JIT, backend="jax", device="NVIDIA H100 80GB HBM3"),
    ]
    lines = format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].split()[:3] == ["backend", "device", "backbone"]
    assert set(lines[1]) == {"-"}
    body = lines[2:]
    assert (
        body[0].split()
        == "tensorflow cpu mobilenet_v2 160 float32 False 32 1234.6 1000.0 50.0".split()
    )
    assert body[1].endswith("extract: OOM at 256") and " True " in body[1]
    assert body[2].split()[4:10] == ["mixed_float16", "-", "-", "-", "-", "-"]
    assert "skipped: no fp16" in body[2]
    assert body[3].startswith("jax ") and "NVIDIA H100 80GB HBM3" in body[3]
    assert "always (jax)" in body[3]
    # fixed width: every rate column ends at the same place as its title
    end = lines[0].index("finetune img/s") + len("finetune img/s")
    assert [line[:end].rstrip()[-4:] for line in body] == ["50.0", "50.0", "   -", "50.0"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--backbones", "resnet"], "argument --backbones: invalid choice: 'resnet'"),
        (["--batch-sizes", "32", "0"], "argument --batch-sizes: '0' is not a positive whole"),
        (["--batch-sizes", "-8"], "argument --batch-sizes: '-8' is not a positive whole"),
        (["--steps", "many"], "argument --steps: 'many' is not a positive whole number; e.g."),
        (
            ["--backbones", "inception_v3", "--image-size", "64"],
            "--image-size 64 is too small for inception_v3; use at least 75 (default 150)",
        ),
        (["--precisions", "float64"], "argument --precisions: invalid choice: 'float64'"),
    ],
)
def test_a_bad_argument_is_one_error_line_naming_the_problem_and_the_fix(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and errors == err[-1:]
    assert expected in errors[0]
    if "invalid choice" in expected:
        assert "choose from" in errors[0]


def test_quick_and_the_backend_decide_the_defaults():
    quick = bench_gpu.parse_args(["--quick"])
    assert (quick.backbones, quick.image_size, quick.batch_sizes) == (
        ("mobilenet_v2",),
        96,
        (8, 16),
    )
    assert (quick.warmup, quick.steps) == bench_gpu.QUICK_STEPS
    full = bench_gpu.parse_args(["--batch-sizes", "64", "64", "32"])
    assert full.backbones == tuple(bench_gpu.BACKBONES) and full.image_size is None
    assert full.batch_sizes == (64, 32) and full.precisions is None
    assert bench_gpu.jit_settings("jax", "off", accelerator=True) == [JAX_JIT]
    assert bench_gpu.jit_settings("tensorflow", "auto", accelerator=True) == [False, True]
    assert bench_gpu.jit_settings("tensorflow", "auto", accelerator=False) == [False]
    assert bench_gpu.jit_settings("torch", "auto", accelerator=True) == [False]
    assert bench_gpu.jit_settings("torch", "both", accelerator=False) == [False, True]


def test_the_mirrored_registry_matches_the_projects():
    from tasks.ml.backbones import BACKBONES

    assert list(bench_gpu.BACKBONES) == list(BACKBONES)
    for name, entry in BACKBONES.items():
        mine = bench_gpu.BACKBONES[name]
        head = entry.head
        assert (mine.constructor, mine.image_size, mine.min_size, mine.preprocess) == (
            entry.constructor,
            entry.image_size,
            entry.min_size,
            entry.preprocess,
        ), name
        assert (mine.pooling, mine.dense_units, mine.dropout) == (
            head.pooling,
            head.dense_units,
            head.dropout,
        )
        assert (mine.unfreeze_from, mine.cut_at) == (entry.unfreeze_from, entry.cut_at), name


def test_the_script_imports_neither_tensorflow_nor_the_pipeline():
    tree = ast.parse((REPO / "tasks" / "dev" / "bench_gpu.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "tasks", "")}
    assert not any(
        isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
        for node in ast.walk(tree)
    )


def test_the_json_is_written_atomically_into_new_folders(tmp_path):
    out = tmp_path / "reports" / "bench" / "gpu.json"
    bench_gpu.write_json(out, {"rows": [1]})
    bench_gpu.write_json(out, {"rows": [2]})
    assert json.loads(out.read_text()) == {"rows": [2]}
    assert [p.name for p in out.parent.iterdir()] == ["gpu.json"]


RUNNER = """
import json, runpy, sys
sys.argv = ["bench_gpu"] + json.loads(sys.argv[1])
try:
    runpy.run_module("tasks.dev.bench_gpu", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("TENSORFLOW_LOADED=" + str("tensorflow" in sys.modules))
sys.exit(code)
"""


@pytest.mark.slow
def test_a_tiny_real_run_writes_one_measured_row_per_configuration(tmp_path):
    """On Keras's JAX backend (JAX for CPU is a dev dependency), as the GPU machine runs it:
    TensorFlow is never imported (the static test above covers the script's own imports)."""
    backend = "jax"
    out = tmp_path / "bench" / "gpu.json"
    args = [
        "--backbones", "mobilenet_v2", "--image-size", "32", "--batch-sizes", "4",
        "--precisions", "float32", "mixed_bfloat16", "--warmup", "1", "--steps", "2",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["backend"] == backend and payload["devices"]
    assert payload["args"]["batch_sizes"] == [4] and payload["args"]["image_size"] == 32
    rows = payload["rows"]
    assert [(r["precision"], r["batch_size"]) for r in rows] == [
        ("float32", 4),
        ("mixed_bfloat16", 4),
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["extract_img_s"] > 0 and row["head_img_s"] > 0 and row["finetune_img_s"] > 0
    [projection] = payload["projection"]["backbones"]
    best = min(
        project(r["extract_img_s"], r["head_img_s"], r["finetune_img_s"])["seconds"] for r in rows
    )
    assert projection["seconds"] == pytest.approx(best)
    table_lines = [line for line in proc.stdout.splitlines() if line.startswith(backend + " ")]
    assert len(table_lines) == 2
    assert "TENSORFLOW_LOADED=False" in proc.stdout
