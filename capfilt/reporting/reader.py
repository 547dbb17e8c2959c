"""Read a CapFilt output directory cheaply: committed files only, only the columns asked for.

The layout is :mod:`capfilt.data.output`'s: ``pairs/`` and ``rejects/`` hold Parquet files that count
only once a record in ``_commits/`` names them (files a killed run left behind are ignored), the
commit records carry per-input-shard counts, ``manifest.json`` and ``_SUCCESS`` are written at the
end. Rows are addressed by *position* (file index, row within the file), so a light first pass over
a few columns can pick rows whose heavier columns (texts) are then read from their row groups only.
The image column of ``pairs/`` is never read unless a caller names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.data.output import FINGERPRINT, CommittedOutput

TABLES = ("pairs", "rejects")
FILE, ROW = "_file", "_row"  # position columns added to every scan
STORAGE_OPTIONS_ENV = "CAPFILT_STORAGE_OPTIONS"


class OutputError(ValueError):
    """The path is not a readable CapFilt output; the message names it."""


def parse_storage_options(pairs: Sequence[str], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``key=value`` strings (values parsed as JSON when they are, e.g. ``anon=true``) over the JSON object
    in ``$CAPFILT_STORAGE_OPTIONS``. fsspec backends also read their own variables (``AWS_*`` for s3fs)."""
    environ = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    if environ.get(STORAGE_OPTIONS_ENV):
        try:
            options.update(json.loads(environ[STORAGE_OPTIONS_ENV]))
        except json.JSONDecodeError as error:
            raise ValueError(f"${STORAGE_OPTIONS_ENV}: not a JSON object ({error})") from None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option {pair!r}: expected key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@dataclass
class ShardStatus:
    """One input shard's accounting, and what is wrong with it."""

    shard: str
    role: str | None
    counts: dict[str, Any] | None  # rows_in, kept, filtered, rejected, ... as the stage recorded them
    committed: bool
    problems: list[str] = field(default_factory=list)

    @property
    def reconciles(self) -> bool | None:
        if self.counts is None:
            return None
        c = self.counts
        return c.get("rows_in", 0) == c.get("kept", 0) + c.get("filtered", 0) + c.get("rejected", 0)

    def as_dict(self) -> dict[str, Any]:
        counts = self.counts or {}
        return {
            "shard": self.shard,
            "role": self.role,
            **{name: counts.get(name) for name in ("rows_in", "kept", "filtered", "rejected")},
            "reconciles": self.reconciles,
            "committed": self.committed,
            "error": counts.get("error"),
            "problems": self.problems,
        }


class OutputReader:
    """A CapFilt output directory (local path or fsspec URL), read-only."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        try:
            self.output = CommittedOutput(url, storage_options)
            if not self.output.exists(FINGERPRINT):
                raise OutputError(f"{url}: not a CapFilt output (no {FINGERPRINT})")
            self.fingerprint: dict[str, Any] = json.loads(self.output.fs.cat_file(self.output.path(FINGERPRINT)))
            self.commits = self.output.commits()
            self.finished = self.output.is_finished()
            self.manifest: dict[str, Any] | None = self.output.manifest() if self.output.exists("manifest.json") else None
        except OutputError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise OutputError(f"{url}: cannot read the output ({type(error).__name__}: {error})") from None
        self.fs = self.output.fs
        self._files = {table: [self.output.path(f) for c in self.commits for f in c.files if f.startswith(f"{table}/")]
                       for table in TABLES}
        self._schemas: dict[str, pa.Schema] = {}

    # -- what produced it ----------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        """The CapFilt settings that determine the output (threshold, keep_policy, sampling, ...)."""
        return self.fingerprint.get("fingerprint", {}).get("capfilt", {})

    @property
    def inputs(self) -> list[tuple[str, str]]:
        """(role, shard URL) of every input shard the run planned."""
        return [(role, url) for role, url in self.fingerprint.get("fingerprint", {}).get("inputs", [])]

    # -- accounting ----------------------------------------------------------------------------

    def shard_statuses(self) -> list[ShardStatus]:
        """Every planned or recorded shard, in input order, with the manifest's counts (the commit
        records' when there is no manifest) and its problems: no commit record, counts that do not
        reconcile, an unreadable shard."""
        committed: dict[str, dict[str, Any]] = {}
        for commit in self.commits:
            committed.update(commit.shards)
        recorded = self.manifest.get("shards", {}) if self.manifest else committed
        roles = dict((url, role) for role, url in self.inputs)
        if self.manifest:
            roles.update({url: role for url, role in self.manifest.get("roles", {}).items() if url not in roles})
        order = list(roles) + [s for s in {**recorded, **committed} if s not in roles]
        statuses = []
        for shard in order:
            counts = recorded.get(shard, committed.get(shard))
            status = ShardStatus(shard, roles.get(shard), counts, shard in committed)
            if not status.committed:
                status.problems.append("not finished: no commit record")
            if status.reconciles is False:
                c = counts
                status.problems.append(f"does not reconcile: rows_in {c.get('rows_in')} != kept {c.get('kept')} + "
                                       f"filtered {c.get('filtered')} + rejected {c.get('rejected')}")
            if counts and counts.get("error"):
                status.problems.append(f"unreadable: {counts['error']}")
            elif counts and counts.get("reasons", {}).get("rows_unreadable"):
                status.problems.append(f"{counts['reasons']['rows_unreadable']} rows unreadable (see the rejects)")
            statuses.append(status)
        return statuses

    def problems(self, statuses: Iterable[ShardStatus] | None = None) -> list[str]:
        """Output-level problems first, then one line per shard with a problem."""
        statuses = self.shard_statuses() if statuses is None else statuses
        found = [] if self.finished else ["not finished: no _SUCCESS"]
        if self.finished and self.manifest is None:
            found.append("no manifest.json")
        found += [f"{s.shard}: {problem}" for s in statuses for problem in s.problems]
        return found

    def totals(self, statuses: Iterable[ShardStatus] | None = None) -> dict[str, Any]:
        """The manifest's totals; summed from the shard records while there is no manifest."""
        if self.manifest and self.manifest.get("totals"):
            return self.manifest["totals"]
        totals: dict[str, Any] = {}
        for status in self.shard_statuses() if statuses is None else statuses:
            for name, value in (status.counts or {}).items():
                if isinstance(value, int):
                    totals[name] = totals.get(name, 0) + value
        return totals

    # -- rows ----------------------------------------------------------------------------------

    def files(self, table: str) -> list[str]:
        return self._files[table]

    def schema(self, table: str) -> pa.Schema:
        """The schema of the table's files; the stage's own when none is committed yet."""
        if table not in self._schemas:
            from capfilt.stages.capfilt import PAIRS_SCHEMA, REJECTS_SCHEMA

            files = self.files(table)
            written = {"pairs": PAIRS_SCHEMA, "rejects": REJECTS_SCHEMA}[table]
            self._schemas[table] = pq.read_schema(files[0], filesystem=self.fs) if files else written
        return self._schemas[table]

    def scan(self, table: str, columns: Sequence[str], keys: Sequence[str] | None = None,
             dictionary: Sequence[str] = ()) -> pa.Table:
        """``columns`` of every committed row of ``table`` plus its position (``_file``, ``_row``).

        With ``keys``, row groups whose ``key`` statistics exclude every wanted key are not read at all,
        and only rows with those keys come back. ``dictionary`` columns (few distinct strings: source,
        reason, shard) stay dictionary-encoded, a few bytes a row instead of the string's length.
        """
        wanted = sorted(set(keys)) if keys else None
        schema = self.schema(table)
        encoded = [name for name in dictionary if name in schema.names]
        parts = []
        for index, path in enumerate(self.files(table)):
            parquet = pq.ParquetFile(path, filesystem=self.fs, read_dictionary=encoded)
            present = [name for name in columns if name in parquet.schema_arrow.names]
            if wanted is not None:
                present = list(dict.fromkeys([*present, "key"]))
            start = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if wanted is None or _may_hold(parquet.metadata.row_group(group), "key", wanted):
                    part = parquet.read_row_group(group, columns=present, use_threads=False)
                    part = _with_positions(part, index, start)
                    if wanted is not None:
                        part = part.filter(pc.is_in(part["key"], value_set=pa.array(wanted, pa.string())))
                    parts.append(part)
                start += rows
        return _conform(parts, [*columns, FILE, ROW], schema, encoded)

    def take(self, table: str, files: np.ndarray, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """``columns`` of the rows at positions (``files[i]``, ``rows[i]``), in that order; only the row
        groups holding them are read."""
        files, rows = np.asarray(files, dtype=np.int64), np.asarray(rows, dtype=np.int64)
        parts, order = [], []
        for index in np.unique(files):
            path = self.files(table)[index]
            parquet = pq.ParquetFile(path, filesystem=self.fs)
            present = [name for name in columns if name in parquet.schema_arrow.names]
            bounds = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            here = np.flatnonzero(files == index)
            groups = np.searchsorted(bounds, rows[here], side="right") - 1
            for group in np.unique(groups):
                picked = here[groups == group]
                part = parquet.read_row_group(int(group), columns=present, use_threads=False)
                parts.append(part.take(pa.array(rows[picked] - bounds[group])))
                order.append(picked)
        if not parts:
            return _conform([], list(columns), self.schema(table))
        taken = _conform(parts, list(columns), self.schema(table))
        inverse = np.empty(len(files), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(files))
        return taken.take(pa.array(inverse))


def _may_hold(group_meta: pq.RowGroupMetaData, column: str, wanted: list[str]) -> bool:
    for i in range(group_meta.num_columns):
        chunk = group_meta.column(i)
        if chunk.path_in_schema != column:
            continue
        stats = chunk.statistics
        if stats is None or not stats.has_min_max:
            return True
        low, high = stats.min, stats.max
        return any(low <= key <= high for key in wanted)
    return True


def _with_positions(part: pa.Table, file_index: int, start: int) -> pa.Table:
    part = part.append_column(FILE, pa.array(np.full(part.num_rows, file_index, dtype=np.int32)))
    return part.append_column(ROW, pa.array(np.arange(start, start + part.num_rows, dtype=np.int64)))


def _conform(parts: list[pa.Table], columns: list[str], schema: pa.Schema,
             dictionary: Sequence[str] = ()) -> pa.Table:
    """One table with exactly ``columns``; absent columns are typed nulls."""
    def field_type(name: str) -> pa.DataType:
        if name in dictionary:
            return pa.dictionary(pa.int32(), pa.string())
        if name == FILE:
            return pa.int32()
        if name == ROW:
            return pa.int64()
        return schema.field(name).type if name in schema.names else pa.null()

    names = list(dict.fromkeys(columns))
    if not parts:
        return pa.table({name: pa.array([], field_type(name)) for name in names})
    aligned = []
    for part in parts:
        arrays = [part[name] if name in part.column_names else pa.nulls(part.num_rows, field_type(name)) for name in names]
        aligned.append(pa.table(arrays, names=names))
    return pa.concat_tables(aligned, promote_options="permissive")
