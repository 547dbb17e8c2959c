"""CPU side: read a shard, split off bad rows, decode and resize."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from capfilt.config import ReaderConfig
from capfilt.stages.capfilt.schemas import DECODED_SCHEMA, MARKER_ROW, SHARD_UNAVAILABLE, SHARD_UNREADABLE, WEB


@dataclass(frozen=True)
class ShardTask:
    url: str
    role: str  # web | human
    reader: dict[str, Any]  # a ReaderConfig dump, so the task is plain data


def resize_uint8(image, image_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """BLIP's test-time resize (bicubic, antialiased, square, no crop) kept in uint8 HxWx3 for transport.

    ``out``: write into this array (e.g. a row of a batch buffer) instead of a new one.
    """
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    pixels = tvF.pil_to_tensor(image)
    pixels = tvF.resize(pixels, [image_size, image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if out is None:
        out = np.empty((image_size, image_size, 3), dtype=np.uint8)
    torch.from_numpy(out).copy_(pixels.permute(1, 2, 0))  # torch transposes uint8 about twice as fast as numpy
    return out


def binary_rows(values: np.ndarray, present: np.ndarray) -> pa.Array:
    """A binary column over ``present`` rows: row i holds the next of ``values`` (stacked, equal-sized) or null.

    Built on ``values``' own memory: no bytes object per image and no copy until Ray stores the block.
    """
    size = values[0].nbytes if len(values) else 0
    if size * len(values) >= 2**31:
        raise ValueError(f"{len(values)} decoded images of {size} bytes exceed Arrow's 2 GiB binary column; "
                         "lower capfilt.decode_batch_size")
    offsets = np.zeros(len(present) + 1, dtype=np.int32)
    np.cumsum(present * size, out=offsets[1:])
    validity = pa.array(present, pa.bool_()).buffers()[1]
    data = pa.py_buffer(np.ascontiguousarray(values))
    return pa.Array.from_buffers(pa.binary(), len(present), [validity, pa.py_buffer(offsets), data],
                                 null_count=int(len(present) - present.sum()))


class ReadAndDecode:
    """Ray Data UDF over shard tasks (batch_size=1): yields decoded row tables, then the end marker."""

    def __init__(self, image_size: int, max_pixels: int, decode_batch_size: int, embed_images: bool):
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.decode_batch_size = decode_batch_size
        self.embed_images = embed_images

    def __call__(self, tasks: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for url, role, reader in zip(tasks["url"], tasks["role"], tasks["reader"]):
            yield from self.read_shard(ShardTask(str(url), str(role), json.loads(reader)))

    def read_shard(self, task: ShardTask) -> Iterator[pa.Table]:
        from capfilt.data.shards import ShardError, ShardTransientError, make_reader

        rows_seen = 0
        try:
            for rows in make_reader(ReaderConfig(**task.reader)).read_shard(task.url):
                rows_seen += rows.num_rows
                for start in range(0, rows.num_rows, self.decode_batch_size):
                    yield self.decode(rows.slice(start, self.decode_batch_size), task)
        except ShardTransientError as error:
            # Storage failed after the reader's retries: the shard is not done, so it is not committed
            # (its rows already sent are dropped by the driver) and the next run reads it again.
            yield _marker(task, rows=rows_seen, reason=SHARD_UNAVAILABLE, detail=error.message)
            return
        except (ShardError, FileNotFoundError, PermissionError) as error:
            detail = error.message if isinstance(error, ShardError) else f"{type(error).__name__}: {error}"
            # Rows the footer counts but that could not be read are rejected one by one, so the shard's
            # rows_in is the rows it has; without a footer count, the rows read before the problem.
            total = max(getattr(error, "rows", None) or 0, rows_seen)
            for start in range(rows_seen, total, 65536):
                yield _unread_rows(task, start, min(total, start + 65536), detail)
            yield _marker(task, rows=total, reason=SHARD_UNREADABLE, detail=detail)
            return
        yield _marker(task, rows=rows_seen)

    def decode(self, rows: pa.Table, task: ShardTask) -> pa.Table:
        from capfilt.data.decode import DecodeError, decode_image
        from capfilt.data.shards import status_reason

        n = rows.num_rows
        status = rows.column("status").to_pylist()
        error_message = rows.column("error_message").to_pylist()
        images = rows.column("image").to_pylist() if task.role == WEB else [None] * n
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        # Decoded web images are written straight into one buffer, which becomes the pixels column.
        pixels = np.empty((n, self.image_size, self.image_size, 3), dtype=np.uint8)
        decoded = np.zeros(n, dtype=bool)
        filled = 0
        for i in range(n):
            if status[i] != "success":
                reason[i], detail[i] = status_reason(status[i]), error_message[i]
            elif task.role == WEB:
                try:
                    image = decode_image(images[i], self.max_pixels)
                except DecodeError as error:
                    reason[i], detail[i] = error.reason, error.detail
                    continue
                resize_uint8(image, self.image_size, out=pixels[filled])
                decoded[i] = True
                filled += 1
        extra_names = [name for name in rows.column_names if name not in NORMALISED_COLUMNS]
        extras = {name: rows.column(name).to_pylist() for name in extra_names}
        columns = {name: rows.column(name) for name in ("row", "key", "source_key", "sha256", "caption")}
        columns.update(
            shard=[task.url] * n,
            role=[task.role] * n,
            extra=[json.dumps({name: extras[name][i] for name in extra_names}, default=str) for i in range(n)],
            reason=reason,
            detail=detail,
            pixels=binary_rows(pixels[:filled], decoded),
            image=rows.column("image") if self.embed_images else pa.nulls(n, pa.binary()),
            shard_rows=pa.nulls(n, pa.int64()),
        )
        return pa.Table.from_pydict({name: columns[name] for name in DECODED_SCHEMA.names}, schema=DECODED_SCHEMA)


NORMALISED_COLUMNS = {"key", "source_key", "shard", "row", "image", "caption", "status", "error_message", "sha256"}


def _unread_rows(task: ShardTask, first: int, stop: int, detail: str) -> pa.Table:
    from capfilt.data.shards import make_source_key

    n = stop - first
    record = {name: pa.nulls(n, DECODED_SCHEMA.field(name).type) for name in DECODED_SCHEMA.names}
    record.update(shard=pa.array([task.url] * n), role=pa.array([task.role] * n),
                  row=pa.array(range(first, stop), pa.int64()),
                  source_key=pa.array([make_source_key(task.url, row) for row in range(first, stop)]),
                  reason=pa.array([SHARD_UNREADABLE] * n), detail=pa.array([detail] * n))
    return pa.Table.from_pydict(record, schema=DECODED_SCHEMA)


def _marker(task: ShardTask, rows: int, reason: str | None = None, detail: str | None = None) -> pa.Table:
    record = {name: [None] for name in DECODED_SCHEMA.names}
    record.update(shard=[task.url], role=[task.role], row=[MARKER_ROW], shard_rows=[rows], reason=[reason], detail=[detail])
    return pa.Table.from_pydict(record, schema=DECODED_SCHEMA)
