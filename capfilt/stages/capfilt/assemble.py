"""Driver side: whole shards in, committed Parquet out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.config import CapFiltConfig
from capfilt.data.output import Commit, CommittedOutput
from capfilt.stages.capfilt.schemas import (
    FILTERED,
    HUMAN,
    KEPT,
    MARKER_ROW,
    PAIRS_SCHEMA,
    REJECTED,
    REJECTS_SCHEMA,
    RESULT_SCHEMA,
    SHARD_UNAVAILABLE,
    SYNTHETIC,
    WEB,
)


def explode(results: pa.Table, filter_id: str, sampling: str, round_: int) -> tuple[pa.Table, pa.Table]:
    """Result rows (one per input row) -> pair rows (one per kept text) and reject rows.

    Ordered by (shard, row), then by text within a row; a rejected input row gives one ``read`` reject
    and no texts. Built with Arrow kernels (flatten the list columns, take the row columns by parent
    index), so no Python object per value is made: memory stays a small multiple of the result bytes.
    """
    if results.num_rows == 0:
        return PAIRS_SCHEMA.empty_table(), REJECTS_SCHEMA.empty_table()
    order = pc.sort_indices(results, sort_keys=[("shard", "ascending"), ("row", "ascending")])
    table = results.take(order)
    column = {name: table.column(name).combine_chunks() for name in table.column_names}

    lengths = pc.fill_null(pc.list_value_length(column["texts"]), 0)
    for name in _TEXT_LISTS[1:]:
        if not pc.all(pc.equal(pc.fill_null(pc.list_value_length(column[name]), 0), lengths)).as_py():
            raise ValueError(f"result rows whose {name} and texts differ in length")
    flat = {name: pc.list_flatten(column[name]) for name in _TEXT_LISTS}
    parent = pc.list_parent_indices(column["texts"])  # the (sorted) result row of every text
    rejected_row = pc.fill_null(pc.equal(column["outcome"], REJECTED), False)
    live = pc.invert(pc.take(rejected_row, parent))  # a rejected row's texts, if any, are not exploded
    is_kept = pc.fill_null(pc.equal(flat["decisions"], "kept"), False)
    kept, dropped = pc.and_(live, is_kept), pc.and_(live, pc.invert(is_kept))

    def by_row(names: Sequence[str], rows: pa.Array) -> dict[str, pa.Array]:
        return {name: pc.take(column[name], rows) for name in names}

    def constant(value: Any, type_: pa.DataType, length: int) -> pa.Array:
        return pa.repeat(pa.scalar(value, type_), length)

    rows = pc.filter(parent, kept)
    source = pc.filter(flat["text_sources"], kept)
    m = len(rows)
    pairs = {
        **by_row(("key", "source_key", "sha256", "shard", "row", "extra", "image"), rows),
        "text": pc.filter(flat["texts"], kept),
        "source": source,
        "itm_prob": pc.filter(flat["itm_probs"], kept),
        "itc_sim": pc.filter(flat["itc_sims"], kept),
        "captioner_id": pc.filter(flat["captioner_ids"], kept),
        "filter_id": pc.if_else(pc.fill_null(pc.equal(source, HUMAN), False), pa.scalar(None, pa.string()),
                                pa.scalar(filter_id, pa.string())),
        "sampling": pc.if_else(pc.fill_null(pc.equal(source, SYNTHETIC), False), pa.scalar(sampling, pa.string()),
                               pa.scalar(None, pa.string())),
        "round": constant(round_, pa.int64(), m),
    }

    # Rejects: one per rejected input row (stage "read") and one per dropped text, in (row, text) order.
    read_rows = pc.indices_nonzero(rejected_row)
    r = len(read_rows)
    read_rejects = {
        **by_row(("key", "source_key", "shard", "row", "reason", "detail"), read_rows),
        "text": constant(None, pa.string(), r),
        "source": pc.take(column["role"], read_rows),
        "score": constant(None, pa.float64(), r),
        "stage": constant("read", pa.string(), r),
        "captioner_id": constant(None, pa.string(), r),
        "round": constant(round_, pa.int64(), r),
    }
    text_rows = pc.filter(parent, dropped)
    t = len(text_rows)
    score = pc.filter(flat["itm_probs"], dropped)
    text_rejects = {
        **by_row(("key", "source_key", "shard", "row"), text_rows),
        "text": pc.filter(flat["texts"], dropped),
        "source": pc.filter(flat["text_sources"], dropped),
        "reason": pc.filter(flat["decisions"], dropped),
        "detail": constant(None, pa.string(), t),
        "score": score,
        "stage": pc.if_else(pc.is_null(score), pa.scalar("caption", pa.string()), pa.scalar("filter", pa.string())),
        "captioner_id": pc.filter(flat["captioner_ids"], dropped),
        "round": constant(round_, pa.int64(), t),
    }
    rejects = pa.concat_tables([pa.Table.from_pydict(read_rejects, schema=REJECTS_SCHEMA),
                                pa.Table.from_pydict(text_rejects, schema=REJECTS_SCHEMA)])
    # Sort key: the result row, then the text's place (-1 for a read reject, which has no texts).
    text_place = pc.filter(pa.array(np.arange(len(parent), dtype=np.int64)), dropped)
    place = pa.chunked_array([constant(-1, pa.int64(), r), text_place], pa.int64())
    row_of = pa.chunked_array([read_rows.cast(pa.int64()), text_rows.cast(pa.int64())], pa.int64())
    keyed = pa.table({"row_of": row_of, "place": place})
    rejects = rejects.take(pc.sort_indices(keyed, sort_keys=[("row_of", "ascending"), ("place", "ascending")]))
    return pa.Table.from_pydict(pairs, schema=PAIRS_SCHEMA), rejects.combine_chunks()


_TEXT_LISTS = ("texts", "text_sources", "captioner_ids", "itm_probs", "itc_sims", "decisions")
_COUNTED = ("outcome", "reason", "role", "itm_probs", "decisions")


def shard_counts(results: pa.Table, shard_rows: int, error: str | None) -> dict[str, Any]:
    """Per-shard accounting: rows by outcome, texts by decision; rows_in == kept + filtered + rejected."""
    columns = results.select(list(_COUNTED)).to_pydict()  # only what is counted becomes Python
    counts: dict[str, Any] = {"rows_in": shard_rows, KEPT: 0, FILTERED: 0, REJECTED: 0, "images_decoded": 0,
                              "texts_scored": 0, "texts_kept": 0, "texts_dropped": 0, "reasons": {}}
    if error:
        counts["error"] = error
    for i in range(results.num_rows):
        outcome = columns["outcome"][i]
        counts[outcome] += 1
        if outcome == REJECTED:
            reason = columns["reason"][i]
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
            continue
        if columns["role"][i] == WEB:
            counts["images_decoded"] += 1
        for prob, decision in zip(columns["itm_probs"][i], columns["decisions"][i]):
            counts["texts_scored"] += prob is not None
            if decision == "kept":
                counts["texts_kept"] += 1
            else:
                counts["texts_dropped"] += 1
                counts["reasons"][decision] = counts["reasons"].get(decision, 0) + 1
    return counts


class ShardAssembler:
    """Collects result rows per input shard and commits whole shards once complete.

    A shard is exploded into pair and reject rows (Arrow) as soon as its last row arrives, and its
    results are dropped. Exploded shards wait in ``ready`` until they hold ``rows_per_file`` input rows
    or ``max_buffer_bytes`` of pair and reject rows, whichever comes first, and are then committed
    together. So the driver holds at most about ``max_buffer_bytes`` of finished shards (plus the last
    one: a shard is never split) and the shards still in flight, whatever the input size. Which shards
    share a commit depends on arrival order; each commit's rows are ordered by (shard, row, text).
    """

    def __init__(self, output: CommittedOutput, next_commit_id: int, rows_per_file: int, filter_id: str,
                 sampling: str, round_: int,
                 max_buffer_bytes: int = CapFiltConfig.model_fields["max_buffer_bytes"].default):
        self.output = output
        self.commit_id = next_commit_id
        self.rows_per_file = rows_per_file
        self.max_buffer_bytes = max_buffer_bytes
        self.labels = (filter_id, sampling, round_)
        self.partial: dict[str, list[pa.Table]] = {}
        self.expected: dict[str, tuple[int, str | None]] = {}
        self.seen: dict[str, int] = {}
        self.ready: dict[str, ReadyShard] = {}
        self.ready_rows = 0  # input rows of the ready shards
        self.ready_bytes = 0  # Arrow bytes of their pair and reject rows
        self.committed: set[str] = set()
        self.unavailable: dict[str, str] = {}  # shards whose storage failed after retries: not committed

    def add(self, batch: pa.Table) -> None:
        rows = batch.column("row").to_pylist()
        shards = batch.column("shard").to_pylist()
        markers = [i for i, row in enumerate(rows) if row == MARKER_ROW]
        for i in markers:
            reason, detail = batch.column("reason")[i].as_py(), batch.column("detail")[i].as_py()
            self.expected[shards[i]] = (batch.column("shard_rows")[i].as_py(), reason and f"{reason}: {detail}")
        data = batch.filter(pa.array([row != MARKER_ROW for row in rows])) if markers else batch
        for shard in set(data.column("shard").to_pylist()):
            part = data.filter(pc.equal(data.column("shard"), shard))
            self.partial.setdefault(shard, []).append(part)
            self.seen[shard] = self.seen.get(shard, 0) + part.num_rows
        for shard in sorted(set(shards)):
            self._maybe_complete(shard)
        if self.ready_rows >= self.rows_per_file or self.ready_bytes >= self.max_buffer_bytes:
            self.flush()

    def _maybe_complete(self, shard: str) -> None:
        if shard not in self.expected or self.seen.get(shard, 0) < self.expected[shard][0]:
            return
        if self.seen.get(shard, 0) > self.expected[shard][0]:
            raise RuntimeError(f"{shard}: {self.seen[shard]} result rows for {self.expected[shard][0]} input rows")
        if shard in self.ready or shard in self.committed or shard in self.unavailable:
            return  # complete already (a repeated end marker)
        tables = self.partial.pop(shard, [])
        error = self.expected[shard][1]
        if error and error.startswith(f"{SHARD_UNAVAILABLE}: "):
            self.unavailable[shard] = error  # its rows so far are dropped: a later run reads the whole shard
            return
        table = pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()
        pairs, rejects = explode(table, *self.labels)
        self.ready[shard] = ReadyShard(shard, shard_counts(table, *self.expected[shard]), pairs, rejects)
        self.ready_rows += table.num_rows
        self.ready_bytes += pairs.nbytes + rejects.nbytes

    def flush(self) -> None:
        if not self.ready:
            return
        # Shards in name order, each already in (row, text) order: the commit is ordered by (shard, row, text).
        ready = [self.ready[shard] for shard in sorted(self.ready)]
        shards = {done.name: done.counts for done in ready}
        files = []
        for name in ("pairs", "rejects"):
            table = pa.concat_tables([getattr(done, name) for done in ready])  # no copy: one chunk per shard
            for part, start in enumerate(range(0, max(table.num_rows, 1), self.rows_per_file)):
                relative = f"{name}/part-{self.commit_id:05d}-{part:03d}.parquet"
                self.output.write_table(relative, table.slice(start, self.rows_per_file))
                files.append(relative)
        self.output.commit(Commit(self.commit_id, shards, files))
        self.committed.update(shards)
        self.commit_id += 1
        self.ready, self.ready_rows, self.ready_bytes = {}, 0, 0

    def pending(self) -> list[str]:
        finished = self.committed | set(self.ready) | set(self.unavailable)
        return sorted(set(self.partial) | {shard for shard in self.expected if shard not in finished})


@dataclass(frozen=True)
class ReadyShard:
    """A complete input shard waiting for its commit: its accounting and its exploded rows."""

    name: str
    counts: dict[str, Any]
    pairs: pa.Table
    rejects: pa.Table
