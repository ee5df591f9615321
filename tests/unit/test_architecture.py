"""The package's layers are checked, not hoped for (docs/architecture.md).

- the import contracts in pyproject.toml (import-linter): layers point down,
  the ML library knows no MLflow or file layout, steps stand alone, no cycles,
  nothing imports the test suite;
- importing the orchestration layer or the CLI loads nothing heavy (Airflow
  imports the one on every parse, every stage process the other);
- every DVC stage is one step module with ``run`` and one CLI command of the same name;
- the wheel leaves the developer tools out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import yaml

from tasks import cli
from tests.conftest import REPO

HEAVY = ("tensorflow", "keras", "great_expectations", "mlflow", "dvc", "sklearn", "pandas")

PROBE = """
import json, sys
import tasks.cli
import tasks.orchestration.backends, tasks.orchestration.dvc, tasks.orchestration.experiments
import tasks.orchestration.dag_docs, tasks.orchestration.dag_tasks
import tasks.orchestration.parent_run, tasks.orchestration.process, tasks.orchestration.project
import tasks.orchestration.records, tasks.orchestration.review
import tasks.orchestration.runconf, tasks.orchestration.stage_graph, tasks.orchestration.sweep
import tasks.orchestration.scoring
import tasks.orchestration.summary, tasks.orchestration.workspace
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_the_import_contracts_hold():
    lint = REPO / ".venv" / "bin" / "lint-imports"
    command = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
    assert proc.stdout.count(" KEPT") >= 6


def test_orchestration_and_the_cli_import_nothing_heavy():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert loaded & set(HEAVY) == set()


def test_every_dvc_stage_is_a_step_module_and_a_cli_command_of_its_name():
    import importlib

    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert [command.__name__ for command in cli.STAGES] == stages
    for stage in stages:
        module = importlib.import_module(f"tasks.steps.{stage}")
        assert callable(module.run), stage
        assert (REPO / "tasks" / "steps" / f"{stage}.py").is_file()
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no API
    assert set(stages) <= set(commands)
    # tasks/steps/ holds the stages and nothing else; other commands live in tasks/commands/
    steps = {p.stem for p in (REPO / "tasks" / "steps").glob("*.py") if p.stem != "__init__"}
    assert steps == set(stages)


def test_the_wheel_leaves_the_developer_tools_out():
    from setuptools import find_packages

    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(find_packages(str(REPO), **found["packages"]["find"]))
    assert {"tasks", "tasks.steps", "tasks.ml", "tasks.orchestration"} <= packages
    assert not {p for p in packages if p.startswith("tasks.dev")}
