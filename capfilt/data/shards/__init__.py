"""Read input pairs: img2dataset Parquet shards, WebDataset tars, or images beside a captions file.

One reader class per format, one job each: :meth:`ShardReader.read_shard` turns one input file into a
stream of ``pyarrow.Table`` batches with the same normalised columns, whatever the format. It is a
pure function of (config, path), so Ray Data can run one read task per shard.

One module per job: ``parquet``, ``webdataset`` and ``folder`` hold one reader each, on ``base``'s
:class:`ShardReader`; ``normalise`` builds the batch layout below and marks the faults the readers
find; ``rejects`` splits a batch into rows passed on and reject rows; ``paths`` expands input paths;
``storage`` opens files so that storage failures are retried; ``errors`` holds the exceptions. Import
from the package: the names below are its API.

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

from capfilt.config import ReaderConfig
from capfilt.data.shards.base import ShardReader
from capfilt.data.shards.errors import ShardError, ShardReadError, ShardSchemaError, ShardTransientError
from capfilt.data.shards.folder import FolderReader
from capfilt.data.shards.normalise import (
    DUPLICATE_KEY,
    IMAGE_COLUMNS,
    KEY_MISSING,
    NORMALISED_COLUMNS,
    READER_FAULTS,
    RENAMED_PREFIX,
    ROWS_UNREADABLE,
    SUCCESS,
    normalised_batch,
    status_reason,
    with_faults,
)
from capfilt.data.shards.parquet import ParquetShardReader
from capfilt.data.shards.paths import derived_key, expand_braces, expand_paths, file_name, file_stem, make_source_key
from capfilt.data.shards.rejects import REJECT_SCHEMA, reject_rows, reject_table, split_by_status
from capfilt.data.shards.storage import retrying
from capfilt.data.shards.webdataset import WebDatasetShardReader

READERS: dict[str, type[ShardReader]] = {
    "parquet": ParquetShardReader,
    "webdataset": WebDatasetShardReader,
    "folder": FolderReader,
}


def make_reader(config: ReaderConfig) -> ShardReader:
    return READERS[config.format](config)


__all__ = [
    "DUPLICATE_KEY", "IMAGE_COLUMNS", "KEY_MISSING", "NORMALISED_COLUMNS", "READERS", "READER_FAULTS", "REJECT_SCHEMA",
    "RENAMED_PREFIX", "ROWS_UNREADABLE", "SUCCESS", "FolderReader", "ParquetShardReader", "ShardError",
    "ShardReadError", "ShardReader", "ShardSchemaError", "ShardTransientError", "WebDatasetShardReader", "derived_key",
    "expand_braces", "expand_paths", "file_name", "file_stem", "make_reader", "make_source_key", "normalised_batch",
    "reject_rows", "reject_table", "retrying", "split_by_status", "status_reason", "with_faults",
]
