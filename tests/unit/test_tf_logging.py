"""The TensorFlow start-up filter itself, on a stand-in ``tensorflow`` package whose native
part writes absl's noise and a line of its own to file descriptor 2 when it loads, once per
process like the real one (no TensorFlow needed; tests/unit/test_cli.py checks the real one
through a stage process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FAKE_NATIVE = """
import os
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called go to stderr\\n")
os.write(2, b"I0000 00:00:1.0  1 port.cc:153] oneDNN custom operations are on. ...\\n")
os.write(2, b"kept: a line of its own\\n")
"""

PROBE = """
import sys
from tasks.tf_logging import quiet_tensorflow_startup
quiet_tensorflow_startup()
import tensorflow
import os
print(os.environ["TF_CPP_MIN_LOG_LEVEL"], type(tensorflow.__loader__).__name__)
print(any(type(f).__name__ == "_QuietTensorFlowImport" for f in sys.meta_path))
"""


@pytest.fixture
def fake_tensorflow(tmp_path) -> Path:
    package = tmp_path / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text("from tensorflow import _native  # noqa: F401\n")
    (package / "_native.py").write_text(FAKE_NATIVE)
    return tmp_path


def probe(fake_tensorflow: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ["PYTHONPATH"] = os.pathsep.join([str(fake_tensorflow), str(REPO)])
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=60
    )


def test_the_first_import_loses_absls_startup_lines_and_keeps_the_rest(fake_tensorflow):
    proc = probe(fake_tensorflow)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "kept: a line of its own\n"
    # The level defaults to errors only; the module keeps its own loader; the hook is gone.
    assert proc.stdout.split() == ["2", "SourceFileLoader", "False"]


def test_a_log_level_the_user_set_wins_and_nothing_is_filtered(fake_tensorflow):
    proc = probe(fake_tensorflow, TF_CPP_MIN_LOG_LEVEL="0")
    assert proc.returncode == 0, proc.stderr
    assert "absl::InitializeLog() is called" in proc.stderr
    assert "oneDNN custom operations are on" in proc.stderr
    assert proc.stdout.split() == ["0", "SourceFileLoader", "False"]


def test_tensorflow_is_executed_once_and_is_the_module_everyone_gets(fake_tensorflow):
    """The import system prefers the spec of a module already in sys.modules: the filter
    must not let it run tensorflow/__init__.py a second time into another module."""
    init = fake_tensorflow / "tensorflow" / "__init__.py"
    init.write_text(
        "import builtins\n"
        "builtins.fake_tf_inits = getattr(builtins, 'fake_tf_inits', 0) + 1\n" + init.read_text()
    )
    code = (
        "import builtins, sys\n"
        "from tasks.tf_logging import quiet_tensorflow_startup\n"
        "quiet_tensorflow_startup()\n"
        "import tensorflow\n"
        "from tensorflow import _native\n"
        "print(builtins.fake_tf_inits, sys.modules['tensorflow'] is tensorflow,"
        " type(tensorflow.__spec__.loader).__name__)\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ["PYTHONPATH"] = os.pathsep.join([str(fake_tensorflow), str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "True", "SourceFileLoader"]
    assert proc.stderr == "kept: a line of its own\n"
