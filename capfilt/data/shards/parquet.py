"""img2dataset Parquet shards."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.data.shards.base import ShardReader
from capfilt.data.shards.errors import ShardError, ShardReadError, ShardSchemaError
from capfilt.data.shards.normalise import IMAGE_COLUMNS, ROWS_UNREADABLE, KeyBook, check_type, describe_error, normalised_batch
from capfilt.data.shards.storage import StorageError, open_guarded

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
                check_type(path, column, schema.field(column).type, _EXPECTED_TYPES[role])
        return plan

    def read_once(self, path: str) -> Iterator[pa.Table]:
        fs, fs_path = self._fs(path)
        with open_guarded(fs, fs_path, path) as handle:
            try:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
            except StorageError:
                raise
            except (pa.ArrowException, OSError, ValueError) as error:
                raise ShardReadError(path, f"not a readable Parquet file ({describe_error(error)})") from None
            try:
                plan = self._plan(path, schema)
                consumed = {column for column in plan.values() if column is not None}
                extras = self._extra_names(path, schema.names, consumed)
            except ShardError as error:
                error.rows = parquet.metadata.num_rows  # the footer is readable: its rows can be accounted for
                raise
            columns = [name for name in schema.names if name in consumed or name in extras]
            key_book = KeyBook(path)
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
                    except StorageError:
                        raise
                    except (pa.ArrowException, OSError, ValueError) as error:
                        yield self._unreadable_rows(path, first_row, group_end - first_row, schema, extras,
                                                    f"row group {group}: {describe_error(error)}")
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
