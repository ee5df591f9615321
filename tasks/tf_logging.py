"""TensorFlow's start-up lines kept out of a command's stderr.

:func:`quiet_tensorflow_startup` runs before any command imports TensorFlow
(commands import their modules when they run): it sets TensorFlow's C++
logging to errors only unless the user set a level, and then installs an
import hook that takes absl's remaining start-up lines out of what the import
writes to stderr. Our own messages (Python logging, stderr prints) are left
alone.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

NATIVE_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
"""TensorFlow's C++ logging at errors only: its start-up lines (``cpu_feature_guard``,
``oneDNN custom operations are on``, absl's ``All log messages before absl::InitializeLog()``)
are INFO, and each stage would print them. A value already in the environment wins."""


STARTUP_NOISE = ("absl::InitializeLog() is called", "] oneDNN custom operations are on")
"""What TensorFlow 2.21 prints through absl on import whatever ``TF_CPP_MIN_LOG_LEVEL``
says (the oneDNN note, on CPUs where oneDNN's custom operations are on by default)."""


def quiet_tensorflow_startup() -> None:
    """Set :data:`NATIVE_LOG_ENV` where unset; unless that leaves TensorFlow's C++ logging
    at INFO (the user asked for it) or TensorFlow is already imported, filter
    :data:`STARTUP_NOISE` out of its first import."""
    for name, value in NATIVE_LOG_ENV.items():
        os.environ.setdefault(name, value)
    if (
        os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")
        and "tensorflow" not in sys.modules
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``tensorflow`` (when a command first does) with the :data:`STARTUP_NOISE`
    lines taken out of what it writes to stderr; everything else it writes is kept."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        with _native_stderr_filtered(STARTUP_NOISE):
            module = importlib.import_module(name)
        # The import system prefers the __spec__ of a module already in sys.modules over
        # the spec returned here, and would execute tensorflow/__init__.py a second time
        # from it: hide it until exec_module puts it back.
        self.real, module.__spec__ = module.__spec__, None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: Any) -> Any:
        return sys.modules[spec.name]  # imported above, once

    def exec_module(self, module: Any) -> None:
        module.__spec__, module.__loader__ = self.real, self.real.loader


@contextlib.contextmanager
def _native_stderr_filtered(noise: Sequence[str]) -> Iterator[None]:
    """File descriptor 2 (C++ and Python writes alike) into a temporary file; afterwards
    its lines without any of ``noise`` go to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(mark in line for mark in noise):
                    sys.stderr.write(line)
            sys.stderr.flush()
