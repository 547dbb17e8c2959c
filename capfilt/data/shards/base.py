"""What every reader shares: retried reading of one shard, reading many with keys unique across them, and
the choice of extra columns."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator, Sequence

import fsspec
import pyarrow as pa

from capfilt.config import ReaderConfig
from capfilt.data.shards.errors import ShardSchemaError, ShardTransientError
from capfilt.data.shards.normalise import DUPLICATE_KEY, SUCCESS, with_faults
from capfilt.data.shards.paths import expand_paths
from capfilt.data.shards.storage import StorageError


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
            except StorageError as error:
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
