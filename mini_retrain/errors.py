"""The one error type that carries a fix: a file that cannot become a backbone input.

Library functions raise ValueError naming the *parameter* (`learning_rate must be > 0`); the command line
(mini_retrain/cli.py) maps parameter names to its flags. A bad image is different: it is about a *file*, so it names
the file, what is wrong and what to do.

Messages go through a `log` callable (print by default); `print_to_stderr` is the default where stdout carries data
(`label --json`).
"""

from __future__ import annotations

import os
import sys


def print_to_stderr(line: str) -> None:
    """A `log` callable for warnings that must stay out of stdout."""
    print(line, file=sys.stderr, flush=True)


class BadImageError(ValueError):
    """A file that cannot become a backbone input: `path`, `reason` and `fix` (what to do).

    str(error) is one line: "<path>: <reason> (<fix>)".
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # decoder messages may hold newlines
        self.fix = fix
        super().__init__(f"{self.path}: {self.reason} ({self.fix})")

    def __reduce__(self):
        # Exceptions pickle as type(self)(*self.args); ours takes three arguments, not the message.
        # Needed when images are read in worker processes.
        return (type(self), (self.path, self.reason, self.fix))
