"""One training or evaluation row, and the error a bad row raises."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A data source or row that cannot be used; the message starts with its location."""


@dataclass(frozen=True, slots=True)
class Example:
    """One row: `reference` is None when the source has none (the answer then serves as context)."""

    question: str
    answer: str
    reference: str | None
    # Where the row came from, for error messages: `file.jsonl:12`, `file.parquet[row 5]`,
    # `hf:NAME[split=train, index 3]`.
    location: str
