"""What makes a whole input file (or the rest of it) unusable: the exceptions the readers raise."""

from __future__ import annotations


class ShardError(Exception):
    """A whole input file (or the rest of it) cannot be used; ``path`` names it.

    ``rows``: how many rows the file has, when its footer said so before the problem showed (Parquet),
    so the rows that could not be read can still be accounted for one by one.
    """

    def __init__(self, path: str, message: str, rows: int | None = None):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.rows = rows

    def __reduce__(self):  # keep path, message and rows across Ray's pickling
        return type(self), (self.path, self.message, self.rows)


class ShardSchemaError(ShardError, ValueError):
    """A required column is missing or has the wrong type."""


class ShardReadError(ShardError):
    """The file is not what its format says (not Parquet, not a tar, truncated)."""


class ShardTransientError(ShardError, OSError):
    """Storage failed in a way a retry may fix (network error, timeout, throttling), after the retries.

    Raised only for errors of the file object itself (opening, reading, seeking), never for what a
    parser says of the bytes: a corrupt file is a :class:`ShardReadError` and is not retried.
    """
