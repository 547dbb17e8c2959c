"""The normalised batch every reader yields (columns in the package docstring), and the row-level faults
the readers find themselves."""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

from capfilt.data.shards.errors import ShardSchemaError
from capfilt.data.shards.paths import derived_key, make_source_key

IMAGE_COLUMNS = ("jpg", "png", "webp")
NORMALISED_COLUMNS = ("key", "source_key", "shard", "row", "image", "caption", "status", "error_message", "sha256")
RENAMED_PREFIX = "input_"
SUCCESS = "success"


def is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def is_bytes(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_binary_view(type_)


def check_type(path: str, column: str, actual: pa.DataType, expected: str) -> None:
    ok = {
        "string": is_text(actual) or pa.types.is_null(actual),
        "binary": is_bytes(actual) or pa.types.is_null(actual),
        "string or integer": is_text(actual) or pa.types.is_integer(actual),
    }[expected]
    if not ok:
        raise ShardSchemaError(path, f"column {column!r} has type {actual}, expected {expected}")


def describe_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def as_array(values: pa.Array | pa.ChunkedArray | Sequence[Any] | None, type_: pa.DataType, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, type_)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values, type=type_)
    return values if values.type == type_ else values.cast(type_)


# Row-level faults the readers find themselves. They travel as the row's status (so every consumer
# that splits by status rejects them) and are reported under their own name, not as "status: ...".
DUPLICATE_KEY = "duplicate_key"
KEY_MISSING = "key_missing"
ROWS_UNREADABLE = "rows_unreadable"
READER_FAULTS = (DUPLICATE_KEY, KEY_MISSING, ROWS_UNREADABLE)


def status_reason(status: str | None) -> str:
    """The reject reason of a row whose status is not ``success``."""
    if status in READER_FAULTS:
        return status
    return f"status: {status}" if status is not None else "status: null"


class KeyBook:
    """Keys seen so far in one shard: the first row with a key keeps it, a later one is a duplicate."""

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[str, int] = {}

    def check(self, keys: Sequence[str | None], rows: Sequence[int]) -> list[tuple[int, str, str]]:
        """``(index, reason, detail)`` of each row whose key is missing or taken."""
        faults = []
        for index, (key, row) in enumerate(zip(keys, rows)):
            if key is None or key == "":
                faults.append((index, KEY_MISSING, f"row {row}: key is {'null' if key is None else 'empty'}"))
                continue
            previous = self.rows.setdefault(key, row)
            if previous != row:
                faults.append((index, DUPLICATE_KEY, f"key {key!r} first at row {previous}, which keeps it"))
        return faults


def with_faults(batch: pa.Table, faults: Sequence[tuple[int, str, str]]) -> pa.Table:
    """``batch`` with each faulty row's status set to the fault and its error message to the detail.

    Only rows whose status is ``success`` change: a row img2dataset already failed keeps its own reason.
    """
    if not faults:
        return batch
    status = batch.column("status").to_pylist()
    message = batch.column("error_message").to_pylist()
    for index, reason, detail in faults:
        if status[index] == SUCCESS:
            status[index], message[index] = reason, detail
    batch = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    return batch.set_column(batch.schema.get_field_index("error_message"), "error_message",
                            pa.array(message, pa.string()))


def normalised_batch(
    path: str,
    rows: Sequence[int],
    *,
    keys: pa.Array | Sequence[Any] | None,
    images: pa.Array | Sequence[Any] | None,
    captions: pa.Array | Sequence[Any] | None,
    statuses: pa.Array | Sequence[Any] | None = None,
    error_messages: pa.Array | Sequence[Any] | None = None,
    sha256: pa.Array | Sequence[Any] | None = None,
    extras: dict[str, pa.Array | Sequence[Any]] | None = None,
    key_book: KeyBook | None = None,
    source_keys: Sequence[str] | None = None,
) -> pa.Table:
    """One batch in the normalised layout (see the module docstring); ``rows`` are the rows' indices in ``path``."""
    rows = list(rows)
    num_rows = len(rows)
    if keys is None:
        key_array = pa.array([derived_key(path, row) for row in rows], pa.string())
    else:
        key_array = as_array(keys, pa.string(), num_rows)
    columns: dict[str, pa.Array] = {
        "key": key_array,
        "source_key": pa.array(source_keys if source_keys is not None else
                               [make_source_key(path, row) for row in rows], pa.string()),
        "shard": pa.array([path] * num_rows, pa.string()),
        "row": pa.array(rows, pa.int64()),
        "image": as_array(images, pa.binary(), num_rows),
        "caption": as_array(captions, pa.string(), num_rows),
        "status": pa.array([SUCCESS] * num_rows) if statuses is None else as_array(statuses, pa.string(), num_rows),
        "error_message": as_array(error_messages, pa.string(), num_rows),
        "sha256": as_array(sha256, pa.string(), num_rows),
    }
    for name, values in (extras or {}).items():
        out_name = RENAMED_PREFIX + name if name in NORMALISED_COLUMNS else name
        if out_name in columns:
            raise ShardSchemaError(path, f"extra column {name!r} collides with {out_name!r}")
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        else:
            try:
                array = pa.array(list(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                raise ShardSchemaError(path, f"column {name!r} mixes value types ({error})") from None
        columns[out_name] = array
    table = pa.table(columns)
    return with_faults(table, key_book.check(key_array.to_pylist(), rows)) if key_book is not None else table
