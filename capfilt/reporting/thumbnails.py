"""Small inline thumbnails of the source images a CapFilt output points to.

Outputs reference images by (input shard URL, row). Reading them back costs one open per shard and,
for Parquet shards, only the image column of the row groups holding the wanted rows. A shard that
cannot be opened, or a row whose bytes do not decode, gives a :class:`Thumbnail` with a ``problem``
instead of an exception, so a report on a half-reachable output still renders.
"""

from __future__ import annotations

import base64
import io
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.data.shards import IMAGE_COLUMNS

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CAPTION_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".csv.gz", ".tsv.gz", ".jsonl.gz", ".json.gz")

Ref = tuple[str, int]  # (input shard URL, row)


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str | None  # data:image/jpeg;base64,...
    problem: str | None = None
    width: int = 0
    height: int = 0


def make_thumbnail(data: bytes | None, size: int, quality: int = 80) -> Thumbnail:
    """Decode untrusted bytes (capfilt's robust decoder) and shrink them to an inline JPEG."""
    from PIL import Image

    from capfilt.data.decode import DecodeError, decode_image

    try:
        image = decode_image(data)
    except DecodeError as error:
        return Thumbnail(None, str(error))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Thumbnail(f"data:image/jpeg;base64,{encoded}", None, image.width, image.height)


class SourceImages:
    """Reads the image bytes of given rows from input shards: img2dataset Parquet, WebDataset tars, or
    captions files listing image paths (relative to the file's folder)."""

    def __init__(self, storage_options: dict[str, Any] | None = None):
        self.storage_options = storage_options or {}

    def read(self, shard: str, rows: Iterable[int]) -> dict[int, bytes | None]:
        """Bytes per wanted row (None: the row has no image); raises when the shard cannot be read."""
        wanted = sorted(set(int(row) for row in rows))
        fs, path = fsspec.core.url_to_fs(shard, **self.storage_options)
        name = path.lower()
        if name.endswith(TAR_SUFFIXES):
            return self._from_tar(fs, path, wanted)
        if name.endswith(CAPTION_FILE_SUFFIXES):
            return self._from_captions_file(shard, wanted)
        return self._from_parquet(fs, path, wanted)

    @staticmethod
    def _from_parquet(fs, path: str, wanted: list[int]) -> dict[int, bytes | None]:
        parquet = pq.ParquetFile(path, filesystem=fs)
        column = _image_column(parquet.schema_arrow)
        bounds = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        found: dict[int, bytes | None] = {}
        rows = np.asarray(wanted, dtype=np.int64)
        groups = np.searchsorted(bounds, rows, side="right") - 1
        for group in np.unique(groups):
            if group < 0 or group >= parquet.num_row_groups:
                continue  # rows beyond the shard: left out, reported as missing
            picked = rows[groups == group]
            part = parquet.read_row_group(int(group), columns=[column], use_threads=False)
            for row, value in zip(picked, part[column].take(pa.array(picked - bounds[group])).to_pylist()):
                found[int(row)] = value
        return found

    @staticmethod
    def _from_tar(fs, path: str, wanted: list[int]) -> dict[int, bytes | None]:
        from capfilt.data.shards import WebDatasetShardReader

        remaining, found = set(wanted), {}
        extensions = WebDatasetShardReader.image_extensions
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            # The reader's own grouping of members into samples, so sample indices agree with its rows.
            for index, (_, members) in enumerate(WebDatasetShardReader._samples(tar)):
                if index in remaining:
                    found[index] = next((members[e] for e in extensions if e in members), None)
                    remaining.discard(index)
                    if not remaining:
                        break
        return found

    def _from_captions_file(self, shard: str, wanted: list[int]) -> dict[int, bytes | None]:
        from capfilt.config import ReaderConfig
        from capfilt.data.shards import FolderReader

        config = ReaderConfig(format="folder", storage_options=self.storage_options)
        names = FolderReader(config).read_captions(shard)[config.image_path_column].to_pylist()
        found: dict[int, bytes | None] = {}
        for row in wanted:
            if row >= len(names) or not names[row]:
                continue
            name = names[row]
            location = name if "://" in name or name.startswith("/") else posixpath.join(posixpath.dirname(shard), name)
            fs, path = fsspec.core.url_to_fs(location, **self.storage_options)
            try:
                found[row] = fs.cat_file(path)
            except (OSError, ValueError):
                found[row] = None
        return found


def _image_column(schema: pa.Schema) -> str:
    for name in (*IMAGE_COLUMNS, "image"):
        if name in schema.names:
            return name
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if not binary:
        raise ValueError(f"no image column (one of {list(IMAGE_COLUMNS)} or a binary column); columns are {schema.names}")
    return binary[0]


def fetch_thumbnails(refs: Iterable[Ref], size: int, storage_options: dict[str, Any] | None = None,
                     known: dict[Ref, bytes] | None = None,
                     progress: Callable[[str], None] = lambda message: None) -> dict[Ref, Thumbnail]:
    """A thumbnail (or the reason there is none) for every (shard, row); ``known`` holds bytes already at
    hand (images embedded in the output), which are not read again."""
    known = known or {}
    by_shard: dict[str, set[int]] = {}
    for shard, row in refs:
        if (shard, row) not in known:
            by_shard.setdefault(shard, set()).add(int(row))
    thumbnails = {ref: make_thumbnail(data, size) for ref, data in known.items()}
    source = SourceImages(storage_options)
    for number, (shard, rows) in enumerate(sorted(by_shard.items()), 1):
        progress(f"thumbnails: shard {number}/{len(by_shard)} ({len(rows)} images) {shard}")
        try:
            images = source.read(shard, rows)
        except Exception as error:  # noqa: BLE001 -- any storage or format failure: say so, keep going
            problem = f"source shard unreachable: {type(error).__name__}: {error}"
            thumbnails.update({(shard, row): Thumbnail(None, problem) for row in rows})
            continue
        for row in rows:
            if row not in images:
                thumbnails[(shard, row)] = Thumbnail(None, f"row {row} not found in {shard}")
            else:
                thumbnails[(shard, row)] = make_thumbnail(images[row], size)
    return thumbnails
