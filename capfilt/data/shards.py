"""Read input pairs: img2dataset Parquet shards, WebDataset tars, or images beside a captions file.

One reader class per format, one job each: :meth:`ShardReader.read_shard` turns one input file into a
stream of ``pyarrow.Table`` batches with the same normalised columns, whatever the format. It is a
pure function of (config, path), so Ray Data can run one read task per shard.

Normalised columns, in this order, then every extra input column unchanged:

=================  ================================================================================
``key``            the input's ``key`` column (img2dataset: shard id + index, e.g. ``"000000003"``)
                   when present; otherwise derived as ``"{file stem}_{row:06d}"``, stable as long
                   as file names are. Keys are unique within a shard: the first row with a key
                   keeps it, a later row with the same key is a ``duplicate_key`` reject naming the
                   first row, and a null or empty key a ``key_missing`` reject (set
                   ``key_column: null`` to derive keys instead).
``source_key``     ``"{file name}:{row}"``: the physical input row, whatever ``key`` is (for
                   WebDataset failures read from img2dataset's sidecar: ``"{shard}.parquet:{row}"``).
``shard``          the input file's path or URL (WebDataset: the tar, also for its sidecar's rows).
``row``            the row's index within that shard (tar: the sample's index in the tar; the
                   sidecar's rows follow the tar's), so ``(shard, row)`` names one input row.
``image``          the image bytes (binary), null when the input has none.
``caption``        the raw caption (string), untouched: clean it with
                   :func:`capfilt.data.text.clean_caption`. WebDataset ``.txt`` members are decoded
                   as UTF-8, invalid bytes replaced by U+FFFD.
``status``         img2dataset's status; ``"success"`` when the input has no status.
``error_message``  img2dataset's error message; null when none.
``sha256``         the input's ``sha256`` (img2dataset: of the downloaded file, before resizing);
                   folder input: computed from the file. Null when unknown.
(folder only)      ``image_path``: the path as written in the captions file.
=================  ================================================================================

An extra input column whose name is one of the normalised names is renamed ``input_{name}``
(e.g. a folder CSV's own ``shard`` column becomes ``input_shard``).

Rejects
-------
Every input row is either passed on or becomes one reject row, never dropped: ``rows in == rows out +
rejects`` per shard. Reject rows have :data:`REJECT_SCHEMA`: ``key, source_key, text, reason, detail,
score, stage`` (:func:`split_by_status`, :func:`reject_rows`, :func:`reject_table` build them). The
reasons, grouped by the function that decides them:

==================================  ===========================  =====================================
reason                              decided by                   detail
==================================  ===========================  =====================================
``status: failed_to_download``      shards.split_by_status       img2dataset's ``error_message``
``status: failed_to_resize``        shards.split_by_status       img2dataset's ``error_message``
``status: failed_to_read``          shards.split_by_status       folder input: the I/O error
``status: <other>`` / ``null``      shards.split_by_status       the row's ``error_message``
``duplicate_key``                   shards (the readers)         the key and the row that keeps it
``key_missing``                     shards (the readers)         null or empty key
``rows_unreadable``                 shards (the readers)         Parquet: the row group that does not
                                                                 decode and why; tar: the sample's
                                                                 ``.json`` that does not parse
``decode_error: missing``           decode.decode_image          null image bytes
``decode_error: empty``             decode.decode_image          zero bytes
``decode_error: not_bytes``         decode.decode_image          the value's type
``decode_error: not_an_image``      decode.decode_image          size and first bytes
``decode_error: truncated``         decode.decode_image          Pillow's message
``decode_error: too_many_pixels``   decode.decode_image          ``WxH > limit N``, from the header,
                                                                 before any pixel is decoded (or
                                                                 Pillow's own bomb message)
``decode_error: corrupt``           decode.decode_image          exception type and message
``decode_error: unsupported_mode``  decode.decode_image          the Pillow mode
``transform_error``                 images.decode_batch          exception type and message
``caption_missing``                 text.clean_caption           ``NaN`` or nothing
``caption_not_text``                text.clean_caption           the value's type, or bad UTF-8
``caption_empty``                   text.clean_caption           the raw caption
==================================  ===========================  =====================================

A caption reject removes that text only: the image can still receive synthetic captions. A caption
longer than the word limit is truncated, not rejected.

Whole-file problems are exceptions, for the pipeline to quarantine the shard:
:class:`ShardSchemaError` (missing column, wrong type: names file, column, expected and actual
type) and :class:`ShardReadError` (not Parquet / not a tar / truncated: names the file). Both are
:class:`ShardError` with a ``.path``, and ``.rows`` when the file's footer gave its row count before
the problem showed. Storage errors (opening or reading the file object fails: network, timeout,
throttling) are retried by :meth:`ShardReader.read_shard` (``read_retries``, exponential backoff
from ``retry_backoff_s``) and end as :class:`ShardTransientError` when retries run out.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
import time
import zlib
from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from capfilt.config import ReaderConfig

IMAGE_COLUMNS = ("jpg", "png", "webp")
NORMALISED_COLUMNS = ("key", "source_key", "shard", "row", "image", "caption", "status", "error_message", "sha256")
RENAMED_PREFIX = "input_"
SUCCESS = "success"

REJECT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("text", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("score", pa.float64()),
        ("stage", pa.string()),
    ]
)


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


class _StorageError(OSError):
    """An error of the underlying file object, told apart from the parsers' own ``OSError``s."""


# Errors that a retry cannot fix although they are OSErrors.
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _open(fs, fs_path: str, path: str, **options):
    """Open ``fs_path`` for reading, guarded; a failure to open that a retry may fix is a _StorageError."""
    try:
        return _GuardedFile(fs.open(fs_path, "rb", **options))
    except _PERMANENT_OS_ERRORS:
        raise
    except OSError as error:  # includes TimeoutError and ConnectionError
        raise _StorageError(f"cannot open {path} ({type(error).__name__}: {error})") from error


def retrying(call, path: str, config: ReaderConfig, sleep=time.sleep):
    """``call(open)`` where ``open(fs, fs_path)`` opens guarded; storage errors retried as in ``read_shard``.

    For readers of part of a shard (e.g. the images of some rows) that do not go through ``read_shard``.
    """
    for attempt in range(config.read_retries + 1):
        try:
            return call(lambda fs, fs_path: _open(fs, fs_path, path))
        except _StorageError as error:
            if attempt == config.read_retries:
                raise ShardTransientError(path, f"storage error after {attempt + 1} attempts: {error}") from None
            sleep(config.retry_backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class _GuardedFile:
    """A file object whose own I/O errors are :class:`_StorageError`, whichever parser called it.

    pyarrow and tarfile re-raise what the file object raised, so after a failure the reader can tell
    a storage blip (retry) from bytes that do not parse (give up).
    """

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def _guard(self, method, *args):
        try:
            return method(*args)
        except _PERMANENT_OS_ERRORS:
            raise
        except OSError as error:
            raise _StorageError(f"{type(error).__name__}: {error}") from error

    def read(self, *args):
        return self._guard(self._handle.read, *args)

    def readinto(self, *args):
        return self._guard(self._handle.readinto, *args)

    def seek(self, *args):
        return self._guard(self._handle.seek, *args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{a,b}`` and zero-padded numeric ranges ``{00000..00009}``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        start, stop = int(first), int(last)
        padded = any(len(text.lstrip("-")) > 1 and text.lstrip("-").startswith("0") for text in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if stop >= start else -1
        options = [str(number).zfill(width) for number in range(start, stop + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace expression (as in bash): keep it literally
        return [head + "{" + body + "}" + path for path in expand_braces(tail)]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_paths(spec: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Files matching ``spec`` (paths, globs, brace lists; local or any fsspec URL), sorted, unique.

    Raises ``FileNotFoundError`` naming the pattern when a glob matches nothing or a named file is absent.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise FileNotFoundError("no input paths given")
    found: set[str] = set()
    for pattern in specs:
        for expanded in expand_braces(pattern):
            fs, fs_path = fsspec.core.url_to_fs(expanded, **(storage_options or {}))
            if _GLOB_CHARS.search(fs_path):
                matches = [path for path in fs.glob(fs_path) if fs.isfile(path)]
                if not matches:
                    raise FileNotFoundError(f"no input files match {expanded!r} (from {pattern!r})")
            elif fs.isfile(fs_path):
                matches = [fs_path]
            else:
                raise FileNotFoundError(f"input file {expanded!r} (from {pattern!r}) does not exist")
            found.update(_as_url(fs, path) for path in matches)
    return sorted(found)


def _as_url(fs, path: str) -> str:
    # Local files stay plain paths; anything else keeps its protocol so another process can reopen it.
    return path if "file" in _protocols(fs) else fs.unstrip_protocol(path)


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def file_name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def file_stem(path: str) -> str:
    return file_name(path).split(".", 1)[0]


def derived_key(path: str, row: int) -> str:
    """The stable key of a row whose input has no key: file stem and row index."""
    return f"{file_stem(path)}_{row:06d}"


def make_source_key(path: str, row: int) -> str:
    return f"{file_name(path)}:{row}"


# --------------------------------------------------------------------------------------------------
# Normalisation (shared by the readers)
# --------------------------------------------------------------------------------------------------


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def _is_bytes(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_binary_view(type_)


def _check_type(path: str, column: str, actual: pa.DataType, expected: str) -> None:
    ok = {
        "string": _is_text(actual) or pa.types.is_null(actual),
        "binary": _is_bytes(actual) or pa.types.is_null(actual),
        "string or integer": _is_text(actual) or pa.types.is_integer(actual),
    }[expected]
    if not ok:
        raise ShardSchemaError(path, f"column {column!r} has type {actual}, expected {expected}")


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _as_array(values: pa.Array | pa.ChunkedArray | Sequence[Any] | None, type_: pa.DataType, n: int) -> pa.Array:
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


class _KeyBook:
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
    key_book: _KeyBook | None = None,
    source_keys: Sequence[str] | None = None,
) -> pa.Table:
    """One batch in the normalised layout (see the module docstring); ``rows`` are the rows' indices in ``path``."""
    rows = list(rows)
    num_rows = len(rows)
    if keys is None:
        key_array = pa.array([derived_key(path, row) for row in rows], pa.string())
    else:
        key_array = _as_array(keys, pa.string(), num_rows)
    columns: dict[str, pa.Array] = {
        "key": key_array,
        "source_key": pa.array(source_keys if source_keys is not None else
                               [make_source_key(path, row) for row in rows], pa.string()),
        "shard": pa.array([path] * num_rows, pa.string()),
        "row": pa.array(rows, pa.int64()),
        "image": _as_array(images, pa.binary(), num_rows),
        "caption": _as_array(captions, pa.string(), num_rows),
        "status": pa.array([SUCCESS] * num_rows) if statuses is None else _as_array(statuses, pa.string(), num_rows),
        "error_message": _as_array(error_messages, pa.string(), num_rows),
        "sha256": _as_array(sha256, pa.string(), num_rows),
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


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


class ShardReader(ABC):
    """Reads one input format. Holds only its config, so it pickles into Ray read tasks."""

    def __init__(self, config: ReaderConfig | None = None, **overrides: Any):
        base = config or ReaderConfig()
        self.config = ReaderConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base

    @abstractmethod
    def read_once(self, path: str) -> Iterator[pa.Table]:
        """The normalised batches of one input file, in file order, in one attempt."""

    def read_shard(self, path: str, sleep=time.sleep) -> Iterator[pa.Table]:
        """The normalised batches of one input file, in file order; storage errors are retried.

        A failure of the storage itself (an error opening or reading the file object: network,
        timeout, throttling) is retried up to ``read_retries`` times with exponential backoff, reading
        again from the start and skipping the rows already yielded (the readers are deterministic),
        so a retry neither repeats nor loses a row. Then it raises :class:`ShardTransientError`. A
        file whose bytes do not parse is not retried.
        """
        yielded = 0
        for attempt in range(self.config.read_retries + 1):
            seen = 0
            try:
                for batch in self.read_once(path):
                    skip = min(max(yielded - seen, 0), batch.num_rows)
                    seen += batch.num_rows
                    if skip < batch.num_rows:
                        yielded += batch.num_rows - skip
                        yield batch.slice(skip) if skip else batch
                return
            except _StorageError as error:
                if attempt == self.config.read_retries:
                    raise ShardTransientError(
                        path, f"storage error after {attempt + 1} attempts, {yielded} rows read: {error}"
                    ) from None
                sleep(self.config.retry_backoff_s * 2**attempt)

    def paths(self, spec: str | Sequence[str] | None = None) -> list[str]:
        spec = spec if spec is not None else self.config.paths
        if spec is None:
            raise ValueError("no input paths: set paths in the reader config")
        return expand_paths(spec, self.config.storage_options)

    def read(self, spec: str | Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Every shard of ``spec`` (default: the config's paths) in order; keys unique across shards.

        A key already read from an earlier shard is a ``duplicate_key`` row, as within a shard. The
        cross-shard check holds every key in memory: fine for a local run; at scale Ray reads shards
        with :meth:`read_shard` and checks uniqueness per shard.
        """
        owners: dict[str, str] = {}
        for path in self.paths(spec):
            for batch in self.read_shard(path):
                faults = []
                columns = zip(batch["key"].to_pylist(), batch["row"].to_pylist(), batch["status"].to_pylist())
                for index, (key, row, status) in enumerate(columns):
                    if status != SUCCESS:
                        continue
                    here = f"{path} row {row}"
                    previous = owners.setdefault(key, here)
                    if previous != here:
                        faults.append((index, DUPLICATE_KEY, f"key {key!r} first at {previous}, which keeps it"))
                yield with_faults(batch, faults)

    def _fs(self, path: str):
        return fsspec.core.url_to_fs(path, **self.config.storage_options)

    def _extra_names(self, path: str, available: Iterable[str], consumed: set[str]) -> list[str]:
        available = list(available)
        if self.config.columns is None:
            return [name for name in available if name not in consumed]
        missing = [name for name in self.config.columns if name not in available]
        if missing:
            raise ShardSchemaError(path, f"missing column(s) {missing} listed in columns; the file has {available}")
        return [name for name in self.config.columns if name not in consumed]


_EXPECTED_TYPES = {
    "image": "binary",
    "caption": "string",
    "key": "string or integer",
    "status": "string",
    "error_message": "string",
    "sha256": "string",
}


class ParquetShardReader(ShardReader):
    """img2dataset ``output_format="parquet"`` shards (or any Parquet with a caption and an image column).

    Reads only the needed columns, one record batch at a time, through an fsspec file object.
    """

    def image_column(self, path: str, schema: pa.Schema) -> str:
        if self.config.image_column is not None:
            if self.config.image_column not in schema.names:
                raise ShardSchemaError(
                    path, f"missing image column {self.config.image_column!r}; columns are {schema.names}"
                )
            return self.config.image_column
        present = [name for name in IMAGE_COLUMNS if name in schema.names]
        if len(present) != 1:
            problem = "no image column" if not present else f"ambiguous image columns {present}"
            raise ShardSchemaError(
                path,
                f"{problem}: expected exactly one of {list(IMAGE_COLUMNS)} (or set image_column); "
                f"columns are {schema.names}",
            )
        return present[0]

    def _plan(self, path: str, schema: pa.Schema) -> dict[str, str | None]:
        """Validate the schema; the input column behind each normalised one (None: absent)."""
        config = self.config
        image = self.image_column(path, schema)
        if config.caption_column not in schema.names:
            raise ShardSchemaError(
                path, f"missing caption column {config.caption_column!r}; columns are {schema.names}"
            )
        plan = {
            "image": image,
            "caption": config.caption_column,
            "key": config.key_column if config.key_column in schema.names else None,
            "status": "status" if "status" in schema.names else None,
            "error_message": "error_message" if "error_message" in schema.names else None,
            "sha256": "sha256" if "sha256" in schema.names else None,
        }
        for role, column in plan.items():
            if column is not None:
                _check_type(path, column, schema.field(column).type, _EXPECTED_TYPES[role])
        return plan

    def read_once(self, path: str) -> Iterator[pa.Table]:
        fs, fs_path = self._fs(path)
        with _open(fs, fs_path, path) as handle:
            try:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
            except _StorageError:
                raise
            except (pa.ArrowException, OSError, ValueError) as error:
                raise ShardReadError(path, f"not a readable Parquet file ({_describe(error)})") from None
            try:
                plan = self._plan(path, schema)
                consumed = {column for column in plan.values() if column is not None}
                extras = self._extra_names(path, schema.names, consumed)
            except ShardError as error:
                error.rows = parquet.metadata.num_rows  # the footer is readable: its rows can be accounted for
                raise
            columns = [name for name in schema.names if name in consumed or name in extras]
            key_book = _KeyBook(path)
            first_row = 0
            # Row group by row group, so a corrupt one costs its own rows only (those not yet read).
            for group in range(parquet.num_row_groups):
                group_end = first_row + parquet.metadata.row_group(group).num_rows
                batches = parquet.iter_batches(batch_size=self.config.batch_size, row_groups=[group],
                                               columns=columns, use_threads=False)
                while True:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except _StorageError:
                        raise
                    except (pa.ArrowException, OSError, ValueError) as error:
                        yield self._unreadable_rows(path, first_row, group_end - first_row, schema, extras,
                                                    f"row group {group}: {_describe(error)}")
                        break
                    yield normalised_batch(
                        path,
                        range(first_row, first_row + batch.num_rows),
                        keys=batch.column(plan["key"]) if plan["key"] else None,
                        images=batch.column(plan["image"]),
                        captions=batch.column(plan["caption"]),
                        statuses=batch.column(plan["status"]) if plan["status"] else None,
                        error_messages=batch.column(plan["error_message"]) if plan["error_message"] else None,
                        sha256=batch.column(plan["sha256"]) if plan["sha256"] else None,
                        extras={name: batch.column(name) for name in extras},
                        key_book=key_book,
                    )
                    first_row += batch.num_rows
                first_row = group_end

    @staticmethod
    def _unreadable_rows(path: str, first_row: int, num_rows: int, schema: pa.Schema, extras: list[str],
                         detail: str) -> pa.Table:
        """The rows of a row group that does not decode: kept in the accounting as ``rows_unreadable``."""
        return normalised_batch(
            path,
            range(first_row, first_row + num_rows),
            keys=pa.nulls(num_rows, pa.string()),
            images=None,
            captions=None,
            statuses=[ROWS_UNREADABLE] * num_rows,
            error_messages=[detail] * num_rows,
            extras={name: pa.nulls(num_rows, schema.field(name).type) for name in extras},
        )


_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


class WebDatasetShardReader(ShardReader):
    """img2dataset ``output_format="webdataset"`` tars: members ``{key}.jpg``, ``{key}.txt``, ``{key}.json``.

    The key is the member name up to the first dot (the WebDataset convention); the caption is the
    ``.txt`` member (else the JSON's ``caption_column``); JSON fields become columns (``status``,
    ``error_message``, ``sha256`` normalised, the rest carried through); other members are carried as
    binary columns named by their extension. img2dataset writes only successful samples into the tar
    and every row into ``{shard}.parquet`` beside it: with ``webdataset_sidecar`` the rows found only
    there follow the tar's rows, with ``shard``/``row``/``source_key`` pointing into that Parquet file.
    """

    image_extensions = ("jpg", "jpeg", "png", "webp")

    def read_once(self, path: str) -> Iterator[pa.Table]:
        sidecar_path, sidecar = self._sidecar(path) if self.config.webdataset_sidecar else (None, None)
        # The sidecar has img2dataset's exact column types; without it types are inferred from the JSON.
        types = {field.name: field.type for field in sidecar.schema} if sidecar is not None else {}
        fs, fs_path = self._fs(path)
        key_book = _KeyBook(path)
        samples: list[dict[str, Any]] = []
        first_row = 0
        with _open(fs, fs_path, path) as handle:
            try:
                with tarfile.open(fileobj=handle, mode="r|*") as tar:
                    for key, members in self._samples(tar):
                        samples.append(self._sample(path, key, members))
                        if len(samples) == self.config.batch_size:
                            yield self._batch(path, first_row, samples, key_book, types)
                            first_row += len(samples)
                            samples = []
            except _StorageError:
                raise
            except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
                where = f" after {first_row + len(samples)} samples" if first_row or samples else ""
                raise ShardReadError(path, f"not a readable tar file{where} ({_describe(error)})") from None
        if samples:
            yield self._batch(path, first_row, samples, key_book, types)
            first_row += len(samples)
        if sidecar is not None:
            yield from self._sidecar_rows(path, sidecar_path, sidecar, key_book, first_row)

    @staticmethod
    def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
        # Members of a sample are contiguous; a key that comes back later is a duplicate (reported by _KeyBook).
        key, members = None, {}
        for member in tar:
            match = _MEMBER.match(member.name) if member.isfile() else None
            if match is None:
                continue
            member_key, extension = match.group(1), match.group(2).lower()
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members[extension] = tar.extractfile(member).read()
        if key is not None:
            yield key, members

    def _sample(self, path: str, key: str, members: dict[str, bytes]) -> dict[str, Any]:
        wanted = (self.config.image_column,) if self.config.image_column else self.image_extensions
        images = [extension for extension in wanted if extension in members]
        if len(images) > 1:
            raise ShardSchemaError(path, f"sample {key!r} has several images {images}; set image_column")
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
                problem = None if isinstance(meta, dict) else "is not a JSON object"
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                problem = f"is not JSON ({error})"
            if problem:  # one sample's metadata: that sample is rejected, the shard goes on
                return {"key": key, "image": None, "caption": None, "status": ROWS_UNREADABLE,
                        "error_message": f"{key}.json {problem}", "sha256": None, "extras": {}}
        if "txt" in members:
            caption = members["txt"].decode("utf-8", errors="replace")
        else:
            caption = meta.get(self.config.caption_column)
        if caption is not None and not isinstance(caption, str):
            raise ShardSchemaError(path, f"sample {key!r}: caption has type {type(caption).__name__}, expected string")
        taken = {"json", "txt", *images}
        normalised = ("key", self.config.caption_column, "status", "error_message", "sha256")
        extras = {name: value for name, value in meta.items() if name not in normalised}
        extras.update({extension: data for extension, data in members.items() if extension not in taken})
        return {
            "key": key,
            "image": members[images[0]] if images else None,
            "caption": caption,
            "status": meta.get("status", SUCCESS),
            "error_message": meta.get("error_message"),
            "sha256": meta.get("sha256"),
            "extras": extras,
        }

    def _batch(
        self,
        path: str,
        first_row: int,
        samples: list[dict[str, Any]],
        key_book: _KeyBook,
        types: dict[str, pa.DataType],
    ) -> pa.Table:
        names: list[str] = []
        for sample in samples:
            names.extend(name for name in sample["extras"] if name not in names)
        if self.config.columns is not None:
            names = list(self.config.columns)
        extras = {}
        for name in names:
            values = [sample["extras"].get(name) for sample in samples]
            try:
                extras[name] = pa.array(values, type=types.get(name))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                expected = types.get(name, "inferred")
                raise ShardSchemaError(path, f"column {name!r} does not fit type {expected} ({error})") from None
        return normalised_batch(
            path,
            range(first_row, first_row + len(samples)),
            keys=[sample["key"] for sample in samples],
            images=[sample["image"] for sample in samples],
            captions=[sample["caption"] for sample in samples],
            statuses=[sample["status"] for sample in samples],
            error_messages=[sample["error_message"] for sample in samples],
            sha256=[sample["sha256"] for sample in samples],
            extras=extras,
            key_book=key_book,
        )

    def _sidecar(self, path: str) -> tuple[str | None, pa.Table | None]:
        """img2dataset's ``{shard}.parquet`` beside ``{shard}.tar``: every row's metadata, no image bytes."""
        if not path.endswith(".tar"):
            return None, None
        sidecar = path[: -len(".tar")] + ".parquet"
        fs, fs_path = self._fs(sidecar)
        if not fs.exists(fs_path):
            return None, None
        with _open(fs, fs_path, sidecar) as handle:
            try:
                table = pq.read_table(handle)
            except _StorageError:
                raise
            except (pa.ArrowException, OSError, ValueError) as error:
                raise ShardReadError(sidecar, f"not a readable Parquet file ({_describe(error)})") from None
        if "key" not in table.column_names:
            raise ShardSchemaError(sidecar, f"missing column 'key'; columns are {table.column_names}")
        for column in (self.config.caption_column, "status", "error_message", "sha256"):
            if column in table.column_names:
                _check_type(sidecar, column, table.schema.field(column).type, "string")
        return sidecar, table

    def _sidecar_rows(self, path: str, sidecar: str, table: pa.Table, tar_keys: _KeyBook,
                      first_row: int) -> Iterator[pa.Table]:
        """The sidecar's rows missing from the tar (img2dataset's failures).

        They follow the tar's samples in ``row`` (so ``(shard, row)`` names one row of the shard,
        whichever file holds it); ``source_key`` names their row in the sidecar.
        """
        table = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
        in_tar = pa.array(list(tar_keys.rows), pa.string())
        table = table.filter(pc.invert(pc.is_in(table["key"].cast(pa.string()), value_set=in_tar)))
        normalised = {"key", "__row", self.config.caption_column, "status", "error_message", "sha256"}
        extra_names = [name for name in table.column_names if name not in normalised]
        if self.config.columns is not None:
            extra_names = [name for name in self.config.columns if name in table.column_names]
        for batch in table.to_batches(max_chunksize=self.config.batch_size):
            get = lambda name: batch.column(name) if name in batch.schema.names else None  # noqa: E731
            yield normalised_batch(
                path,
                range(first_row, first_row + batch.num_rows),
                keys=batch.column("key"),
                images=None,
                captions=get(self.config.caption_column),
                statuses=get("status"),
                error_messages=get("error_message"),
                sha256=get("sha256"),
                extras={name: batch.column(name) for name in extra_names},
                key_book=tar_keys,
                source_keys=[make_source_key(sidecar, row) for row in batch.column("__row").to_pylist()],
            )
            first_row += batch.num_rows


class FolderReader(ShardReader):
    """Images on disk (or any fsspec store) listed by a captions file: CSV, TSV or JSON lines.

    The shard is the captions file; ``image_path_column`` holds paths relative to ``images_root``
    (default: the captions file's folder), or absolute paths / URLs. An image that cannot be read keeps
    its row with status ``failed_to_read`` and the error as ``error_message``.
    """

    def read_captions(self, path: str) -> pa.Table:
        config = self.config
        fs, fs_path = self._fs(path)
        name = file_name(path).lower()
        try:
            with _open(fs, fs_path, path, compression="infer") as handle:
                if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
                    table = pa_json.read_json(handle)
                else:
                    # CSV has no types: the text columns are text even when they look like numbers.
                    text_columns = {config.caption_column: pa.string(), config.image_path_column: pa.string()}
                    if config.key_column:
                        text_columns[config.key_column] = pa.string()
                    delimiter = "\t" if name.endswith((".tsv", ".tsv.gz")) else ","
                    table = pa_csv.read_csv(
                        handle,
                        parse_options=pa_csv.ParseOptions(delimiter=delimiter),
                        convert_options=pa_csv.ConvertOptions(column_types=text_columns),
                    )
        except pa.ArrowInvalid as error:
            raise ShardSchemaError(path, f"cannot parse captions file ({error})") from None
        for column in (config.image_path_column, config.caption_column):
            if column not in table.column_names:
                raise ShardSchemaError(path, f"missing column {column!r}; columns are {table.column_names}")
        _check_type(path, config.caption_column, table.schema.field(config.caption_column).type, "string")
        _check_type(path, config.image_path_column, table.schema.field(config.image_path_column).type, "string")
        if config.key_column in table.column_names:
            _check_type(path, config.key_column, table.schema.field(config.key_column).type, "string or integer")
        return table

    def read_once(self, path: str) -> Iterator[pa.Table]:
        config = self.config
        table = self.read_captions(path)
        root = config.images_root or posixpath.dirname(path)
        key_column = config.key_column if config.key_column in table.column_names else None
        consumed = {config.image_path_column, config.caption_column, key_column} - {None}
        extras = self._extra_names(path, table.column_names, consumed)
        key_book = _KeyBook(path)
        for first_row in range(0, table.num_rows, config.batch_size):
            chunk = table.slice(first_row, config.batch_size)
            reads = [self._read_image(root, name) for name in chunk[config.image_path_column].to_pylist()]
            yield normalised_batch(
                path,
                range(first_row, first_row + chunk.num_rows),
                keys=chunk[key_column] if key_column else None,
                images=[data for data, _ in reads],
                captions=chunk[config.caption_column],
                statuses=[SUCCESS if error is None else "failed_to_read" for _, error in reads],
                error_messages=[error for _, error in reads],
                sha256=[hashlib.sha256(data).hexdigest() if data is not None else None for data, _ in reads],
                extras={"image_path": chunk[config.image_path_column], **{name: chunk[name] for name in extras}},
                key_book=key_book,
            )

    def _read_image(self, root: str, name: str | None) -> tuple[bytes | None, str | None]:
        if not name:
            return None, "no image path"
        location = name if "://" in name or name.startswith("/") else posixpath.join(root, name)
        for attempt in range(self.config.read_retries + 1):
            try:
                fs, fs_path = self._fs(location)
                return fs.cat_file(fs_path), None
            except _PERMANENT_OS_ERRORS as error:
                return None, f"{location}: {_describe(error)}"
            except (OSError, ValueError) as error:
                if isinstance(error, ValueError) or attempt == self.config.read_retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    return None, f"{location}: {_describe(error)}{tries}"
                time.sleep(self.config.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")


READERS: dict[str, type[ShardReader]] = {
    "parquet": ParquetShardReader,
    "webdataset": WebDatasetShardReader,
    "folder": FolderReader,
}


def make_reader(config: ReaderConfig) -> ShardReader:
    return READERS[config.format](config)


# --------------------------------------------------------------------------------------------------
# The split: rows passed on, rows rejected
# --------------------------------------------------------------------------------------------------


def reject_table(
    batch: pa.Table,
    reasons: Sequence[str] | str,
    details: Sequence[str | None] | str | None,
    stage: str,
    scores: Sequence[float | None] | None = None,
) -> pa.Table:
    """Reject rows (:data:`REJECT_SCHEMA`) for every row of ``batch``; ``text`` is its raw caption."""
    n = batch.num_rows
    reasons = [reasons] * n if isinstance(reasons, str) else list(reasons)
    details = [details] * n if details is None or isinstance(details, str) else list(details)
    if len(reasons) != n or len(details) != n:
        raise ValueError(f"{n} rows but {len(reasons)} reasons and {len(details)} details")
    text = batch["caption"] if "caption" in batch.column_names else batch["text"]
    return pa.table(
        {
            "key": _as_array(batch["key"], pa.string(), n),
            "source_key": _as_array(batch["source_key"], pa.string(), n),
            "text": _as_array(text, pa.string(), n),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
            "score": pa.array(scores if scores is not None else [None] * n, pa.float64()),
            "stage": pa.array([stage] * n, pa.string()),
        },
        schema=REJECT_SCHEMA,
    )


def reject_rows(batch: pa.Table, failures: Iterable[tuple[int, str, str | None]], stage: str) -> pa.Table:
    """Reject rows for per-row failures ``(index in batch, reason, detail)``, e.g. ``decode_batch``'s."""
    failures = list(failures)
    picked = batch.take(pa.array([index for index, _, _ in failures], pa.int64()))
    return reject_table(picked, [reason for _, reason, _ in failures], [detail for _, _, detail in failures], stage)


def split_by_status(batch: pa.Table, stage: str = "read") -> tuple[pa.Table, pa.Table]:
    """(rows with status ``success``, reject rows ``status: <status>`` with the error message as detail).

    A null status counts as a failure (``status: null``). ``good.num_rows + rejects.num_rows == batch.num_rows``.
    """
    succeeded = pc.fill_null(pc.equal(batch["status"], SUCCESS), False)
    good = batch.filter(succeeded)
    failed = batch.filter(pc.invert(succeeded))
    reasons = [status_reason(status) for status in failed["status"].to_pylist()]
    details = failed["error_message"].to_pylist() if "error_message" in failed.column_names else None
    return good, reject_table(failed, reasons, details, stage)
