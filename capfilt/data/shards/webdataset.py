"""img2dataset WebDataset tars, with the Parquet sidecar that lists the rows the tar lacks."""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.data.shards.base import ShardReader
from capfilt.data.shards.errors import ShardReadError, ShardSchemaError
from capfilt.data.shards.normalise import ROWS_UNREADABLE, SUCCESS, KeyBook, check_type, describe_error, normalised_batch
from capfilt.data.shards.paths import make_source_key
from capfilt.data.shards.storage import StorageError, open_guarded

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
        key_book = KeyBook(path)
        samples: list[dict[str, Any]] = []
        first_row = 0
        with open_guarded(fs, fs_path, path) as handle:
            try:
                with tarfile.open(fileobj=handle, mode="r|*") as tar:
                    for key, members in self._samples(tar):
                        samples.append(self._sample(path, key, members))
                        if len(samples) == self.config.batch_size:
                            yield self._batch(path, first_row, samples, key_book, types)
                            first_row += len(samples)
                            samples = []
            except StorageError:
                raise
            except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
                where = f" after {first_row + len(samples)} samples" if first_row or samples else ""
                raise ShardReadError(path, f"not a readable tar file{where} ({describe_error(error)})") from None
        if samples:
            yield self._batch(path, first_row, samples, key_book, types)
            first_row += len(samples)
        if sidecar is not None:
            yield from self._sidecar_rows(path, sidecar_path, sidecar, key_book, first_row)

    @staticmethod
    def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
        # Members of a sample are contiguous; a key that comes back later is a duplicate (reported by KeyBook).
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
        key_book: KeyBook,
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
        with open_guarded(fs, fs_path, sidecar) as handle:
            try:
                table = pq.read_table(handle)
            except StorageError:
                raise
            except (pa.ArrowException, OSError, ValueError) as error:
                raise ShardReadError(sidecar, f"not a readable Parquet file ({describe_error(error)})") from None
        if "key" not in table.column_names:
            raise ShardSchemaError(sidecar, f"missing column 'key'; columns are {table.column_names}")
        for column in (self.config.caption_column, "status", "error_message", "sha256"):
            if column in table.column_names:
                check_type(sidecar, column, table.schema.field(column).type, "string")
        return sidecar, table

    def _sidecar_rows(self, path: str, sidecar: str, table: pa.Table, tar_keys: KeyBook,
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
