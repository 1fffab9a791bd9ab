"""Errors and problem reports for bad input.

Users bring their own slides and CSVs, so bad input is normal, not exceptional: every problem is
reported in one line naming the file (and row, when there is one) and the command line turns a
:class:`CytoFuseError` into that line instead of a traceback.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]


class CytoFuseError(Exception):
    """An error the user can fix; its message is one line that names the file (and row)."""


class DataError(CytoFuseError):
    """The data set on disk is unusable as given."""


class CheckpointError(CytoFuseError):
    """A checkpoint is missing, corrupt, or does not fit the model or class list it is loaded into."""


def where(file: Optional[PathLike], row: Optional[int] = None) -> str:
    """Format a location as ``file:row`` (row is the 1-based line number in the file)."""
    if file is None:
        return "<unknown>"
    return f"{file}:{row}" if row is not None else str(file)


@dataclass(frozen=True)
class Problem:
    """One problem found in input data; ``severity`` is ``"warning"`` (kept/fixed) or ``"error"`` (skipped)."""

    file: Optional[str]
    row: Optional[int]
    message: str
    severity: str = "warning"

    def __str__(self) -> str:
        return f"{self.severity}: {where(self.file, self.row)}: {self.message}"


class ProblemLog:
    """Collects problems so a reader can report all of them, not just the first, and summarise."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def warn(self, file: Optional[PathLike], row: Optional[int], message: str) -> None:
        self._add(Problem(str(file) if file is not None else None, row, message, "warning"))

    def error(self, file: Optional[PathLike], row: Optional[int], message: str) -> None:
        self._add(Problem(str(file) if file is not None else None, row, message, "error"))

    def _add(self, problem: Problem) -> None:
        self.items.append(problem)
        # The log level already says "warning"; "WARNING: error: ..." read as a crash. The message says
        # what was skipped or fixed.
        log.warning("%s: %s", where(problem.file, problem.row), problem.message)

    def extend(self, other: "ProblemLog") -> None:
        self.items.extend(other.items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)
