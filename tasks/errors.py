"""Every error type of the project, in one place.

A user-fixable problem is a :class:`ConfigError` (a parameter) or a
:class:`StageError` (anything else a stage finds); the CLI prints its one-line
message and exits 2, without a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A parameter problem, described in one line that names the key path."""


class StageError(RuntimeError):
    """A stage cannot go on; the message names the problem and the fix.

    Keep it to one line, except where a stage promises a one-screen summary
    (validation lists each failed expectation).
    """


class StageFailed(StageError):
    """A stage command run by the orchestration layer failed.

    ``retryable`` is False for a user-fixable (exit 2) error: trying again
    cannot help.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class WorkerLost(RuntimeError):
    """Across machines, another worker stopped during the phase: TensorFlow's collective
    ops failed. One line, but exit 1 rather than 2: starting the workers again resumes
    the phase from the chief's checkpoint."""


class SourceFailed(Exception):
    """One download source gave no good archive (the next source is tried).

    ``unreachable``: it could not be reached or had no file there (connection
    errors, 5xx after retries, 4xx, a missing local file), as opposed to
    answering with the wrong bytes.
    """

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
