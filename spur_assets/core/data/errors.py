"""Errors raised on bad input data, shaped so a user can find and fix the record at fault."""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """One bad record (or a bad file) in a dataset batch.

    The message names the file, the record id and the field at fault, what is wrong
    and what to do. ``record`` and ``field`` are None for file-level problems
    (malformed JSON, a missing top-level key). The attributes stay available so
    that quarantine mode can turn the same finding into a table row.
    """

    def __init__(
        self,
        file: Path | str,
        record: str | int | None,
        field: str | None,
        problem: str,
        hint: str = "",
    ) -> None:
        self.file = str(file)
        self.record = record
        self.field = field
        self.problem = problem
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        where = [self.file]
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        message = f"{', '.join(where)}: {self.problem}"
        if self.hint:
            message += f" -- {self.hint}"
        return message

    def __reduce__(self):
        # Exceptions pickle via their args; ours has keyword-shaped state, so spell it
        # out (Dagster and process pools pickle exceptions across process boundaries).
        return (type(self), (self.file, self.record, self.field, self.problem, self.hint))


def require_columns(frame, columns, what: str, advice: str) -> None:
    """ValueError when the Polars ``frame`` lacks any of ``columns``: "<what> lacks column(s) [...]; it has [...]. <advice>".

    For tables handed between functions (a programming error, not a bad record: no DatasetError).
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {frame.columns}. {advice}")
