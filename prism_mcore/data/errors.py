"""Validation errors for user data and the counts of what was dropped or cut (ARCHITECTURE principle 4).

Every problem with an input row becomes one `DataError` that names the file, the 0-based row (line of a JSONL file,
element of a JSON array, row of a parquet file) and the field. `checked` applies the data policy to a stream:
malformed rows raise or, with `on_error="skip"`, are dropped and counted by reason; over-long samples are never
errors of the data but a length policy (`over_length="filter"`, PRISM_SPEC §4 "over-long prompts filtered"), so they
are always dropped and counted. `DataStats` keeps the counts and the first location of each reason, so nothing is
lost silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from prism_mcore.config.schema import OnError

# Reasons, used as stable keys of `DataStats.skipped`.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
INVALID_VALUE = "invalid_value"
EMPTY_VALUE = "empty_value"
UNREADABLE_FILE = "unreadable_file"
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_ASPECT_RATIO = "image_aspect_ratio"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
TOO_LONG = "too_long"
ROW_TOO_LARGE = "row_too_large"  # over `data.max_row_bytes`, refused before it is parsed
NO_USABLE_ROWS = "no_usable_rows"  # a file (or a stage's data) left nothing to train or evaluate on

In = TypeVar("In")
Out = TypeVar("Out")


class DataError(ValueError):
    """One problem with one input row: `reason` (a constant above), where it is, and what is wrong."""

    def __init__(
        self, reason: str, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None
    ) -> None:
        self.reason = reason
        self.message = message
        self.file = file
        self.row = row
        self.field = field
        super().__init__(message)

    def locate(self, file: str, row: int | None) -> DataError:
        """Fill in the file and row when the code that raised the error did not know them; returns self."""
        if self.file is None:
            self.file, self.row = file, row
        return self

    @property
    def location(self) -> str:
        parts = [self.file or "<unknown file>"]
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return f"{self.location}: {self.message} [{self.reason}]"


@dataclass
class DataStats:
    """How many rows were read, kept, truncated, and skipped (by reason), with the first location of each reason."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        self.first_skipped.setdefault(error.reason, str(error))

    def summary(self) -> str:
        text = f"read {self.read}, kept {self.kept}, truncated {self.truncated}, skipped {sum(self.skipped.values())}"
        if self.skipped:
            text += " (" + ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items())) + ")"
        return text


@contextmanager
def located(file: str, row: int | None) -> Iterator[None]:
    """Attach `file` and `row` to any `DataError` raised inside the block that does not name them yet."""
    try:
        yield
    except DataError as error:
        raise error.locate(file, row) from None


def checked(items: Iterable[In], convert: Callable[[In], Out], on_error: OnError, stats: DataStats) -> Iterator[Out]:
    """Yield `convert(item)` for each item, applying the data policy to the `DataError`s it raises.

    Over-long samples (`TOO_LONG`, raised only when they cannot or may not be truncated) are always skipped; other
    errors are raised under `on_error="raise"` and skipped under `"skip"`. Either way the skip is counted.
    """
    for item in items:
        stats.read += 1
        try:
            converted = convert(item)
        except DataError as error:
            if on_error == "raise" and error.reason != TOO_LONG:
                raise
            stats.skip(error)
            continue
        stats.kept += 1
        yield converted
