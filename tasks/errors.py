"""The error a user can fix: the CLI prints its message and exits non-zero, no traceback."""


class StageError(RuntimeError):
    """A stage cannot go on; the message names the problem and the fix.

    Keep it to one line, except where a stage promises a one-screen summary
    (validation lists each failed expectation).
    """
