"""Images in a folder (or any fsspec store) listed by a captions file."""

from __future__ import annotations

import hashlib
import posixpath
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from capfilt.data.shards.base import ShardReader
from capfilt.data.shards.errors import ShardSchemaError
from capfilt.data.shards.normalise import SUCCESS, KeyBook, check_type, describe_error, normalised_batch
from capfilt.data.shards.paths import file_name
from capfilt.data.shards.storage import PERMANENT_OS_ERRORS, open_guarded


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
            with open_guarded(fs, fs_path, path, compression="infer") as handle:
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
        check_type(path, config.caption_column, table.schema.field(config.caption_column).type, "string")
        check_type(path, config.image_path_column, table.schema.field(config.image_path_column).type, "string")
        if config.key_column in table.column_names:
            check_type(path, config.key_column, table.schema.field(config.key_column).type, "string or integer")
        return table

    def read_once(self, path: str) -> Iterator[pa.Table]:
        config = self.config
        table = self.read_captions(path)
        root = config.images_root or posixpath.dirname(path)
        key_column = config.key_column if config.key_column in table.column_names else None
        consumed = {config.image_path_column, config.caption_column, key_column} - {None}
        extras = self._extra_names(path, table.column_names, consumed)
        key_book = KeyBook(path)
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
            except PERMANENT_OS_ERRORS as error:
                return None, f"{location}: {describe_error(error)}"
            except (OSError, ValueError) as error:
                if isinstance(error, ValueError) or attempt == self.config.read_retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    return None, f"{location}: {describe_error(error)}{tries}"
                time.sleep(self.config.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")
