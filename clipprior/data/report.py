"""Problems found in a dataset, and the raise-or-skip policy that decides what happens to them.

With ``on_error="raise"`` (the default everywhere) the first problem raises a
:class:`~clipprior.errors.DatasetError` (or :class:`~clipprior.errors.DataNotFoundError` for a
missing file) whose message names the file and what is wrong. With ``on_error="skip"`` the broken
entry is left out and the problem is recorded in a :class:`DataReport`.

Example:
    >>> from clipprior.data.report import DataReport, Problem
    >>> report = DataReport()
    >>> report.add(Problem("lists/data_list_0.txt", "image JPEGImages/a.jpg not found", line=3))
    >>> print(report.summary())
    1 problem skipped:
      lists/data_list_0.txt:3: image JPEGImages/a.jpg not found
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

from clipprior.errors import DataNotFoundError, DatasetError, InvalidInputError

__all__ = ["ON_ERROR_CHOICES", "DataReport", "OnError", "Problem", "check_on_error"]

OnError = Literal["raise", "skip"]
#: The values of ``on_error`` (and of the CLI's ``--on-error``), the default first.
ON_ERROR_CHOICES: tuple[str, ...] = get_args(OnError)


def check_on_error(on_error: str) -> OnError:
    """Validate an ``on_error`` argument.

    Raises:
        InvalidInputError: ``on_error`` is not ``"raise"`` or ``"skip"``.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise InvalidInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error  # type: ignore[return-value]


@dataclass(frozen=True)
class Problem:
    """One broken entry.

    Attributes:
        path: The file at fault (a list file, image or mask), as a string.
        message: What is wrong, in words.
        line: 1-based line number inside ``path`` when ``path`` is a list file.
        missing: True when the problem is a file that does not exist.
    """

    path: str
    message: str
    line: int | None = None
    missing: bool = False

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}"

    def to_error(self, hint: str = "") -> DatasetError:
        """The exception to raise for this problem (``DataNotFoundError`` for missing files)."""
        cls = DataNotFoundError if self.missing else DatasetError
        return cls(f"{self}{'; ' + hint if hint else ''}")


@dataclass
class DataReport:
    """Problems skipped under ``on_error="skip"``, in the order they were found.

    Attributes:
        problems: The recorded problems.
    """

    problems: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        """Record one problem."""
        self.problems.append(problem)

    def extend(self, other: DataReport) -> None:
        """Append every problem of ``other``."""
        self.problems.extend(other.problems)

    def __len__(self) -> int:
        return len(self.problems)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def summary(self, max_lines: int = 20) -> str:
        """A human-readable summary, at most ``max_lines`` problems listed.

        Returns:
            ``"no problems"`` or a header line followed by one indented line per problem.
        """
        if not self.problems:
            return "no problems"
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} skipped:"]
        lines += [f"  {p}" for p in self.problems[:max_lines]]
        if n > max_lines:
            lines.append(f"  ... and {n - max_lines} more")
        return "\n".join(lines)


class _Policy:
    """Raise the problem (``on_error="raise"``) or record it in a report (``"skip"``)."""

    def __init__(self, on_error: str, report: DataReport | None = None, hint: str = "") -> None:
        self.on_error = check_on_error(on_error)
        self.report = report if report is not None else DataReport()
        self.hint = hint or "fix it, or pass on_error='skip' (--on-error skip) to skip and report such entries"

    def __call__(self, problem: Problem) -> None:
        if self.on_error == "raise":
            raise problem.to_error(self.hint)
        self.report.add(problem)
