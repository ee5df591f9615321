"""The code reads in screens: short functions, modules of one concern.

A function reads in one screen (about 60 lines) unless it is a declaration: an
argparse parser, a list of expectations. A function defined inside another (the
``@task`` functions of a DAG factory) counts as its own. A module stays under
about 450 lines, except declarative config. What is allowed past the limits is
listed here with the reason, so a new long function fails this test instead of
going unseen.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

FUNCTION_LINES = 60
MODULE_LINES = 460  # "about 450"

DECLARATIONS = {
    "tasks/cli.py::build_parser": "argparse: one add_argument per option",
    "tasks/ml/expectations.py::build_suites": "the Great Expectations suite, one per check",
}
LONG_MODULES = {
    "tasks/config.py": "declarative: the pydantic models of params.yaml",
    "tasks/ml/expectations.py": "declarative: the expectation suite (build_suites)",
    "tasks/dev/bench_gpu.py": "a standalone script copied alone to the GPU machine",
}


def _sources() -> list[Path]:
    return sorted([*REPO.glob("tasks/**/*.py"), *REPO.glob("dags/*.py")])


def own_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines, less those of the functions defined inside it."""
    inner: set[int] = set()
    for node in ast.walk(function):
        if node is not function and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            inner.update(range(start, node.end_lineno + 1))
    return function.end_lineno - function.lineno + 1 - len(inner)


def long_functions(path: Path, limit: int = FUNCTION_LINES) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = path.relative_to(REPO).as_posix()
    return {
        f"{name}::{node.name}": own_lines(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and own_lines(node) > limit
    }


def test_every_function_reads_in_one_screen():
    found = {}
    for path in _sources():
        found |= long_functions(path)
    assert {k: v for k, v in found.items() if k not in DECLARATIONS} == {}
    assert set(DECLARATIONS) <= set(found), "a declaration got short: drop it from the list"


def test_every_module_holds_one_concern():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in _sources()}
    long = {name: n for name, n in sizes.items() if n > MODULE_LINES}
    assert {k: v for k, v in long.items() if k not in LONG_MODULES} == {}


def test_a_task_function_inside_a_dag_factory_counts_on_its_own(tmp_path):
    """The measure has teeth: 70 lines of body is long; the same lines in an inner
    function leave the outer one short and the inner one long."""
    body = "".join(f"    x{i} = {i}\n" for i in range(70))
    flat = tmp_path / "flat.py"
    flat.write_text(f"def factory():\n{body}")
    nested = tmp_path / "nested.py"
    nested.write_text(
        "def factory():\n    @task\n    def inner():\n" + body.replace("    ", "        ")
    )
    tree = ast.parse(flat.read_text())
    assert own_lines(tree.body[0]) == 71
    outer = ast.parse(nested.read_text()).body[0]
    assert own_lines(outer) == 1 and own_lines(outer.body[0]) == 71
