"""Every text of a CapFilt output in one light table, and the statistics inspect and report share.

A text is either a pair (kept) or a reject (dropped, with its reason); both become one row here with
``decision`` = ``"kept"`` or the reason and ``score`` = the ITM match probability when the text was
scored (``itm_prob`` of pairs, ``score`` of rejects). Unreadable input rows are rejects too, with no
text and no score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.reporting.reader import FILE, ROW, OutputReader

KEPT = "kept"
TABLE = "_table"  # 0: pairs, 1: rejects
PAIRS, REJECTS = 0, 1
SCORED_SOURCES = ("web", "synthetic")
QUANTILES = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)
THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


@dataclass(frozen=True)
class TextFilter:
    """Which texts to look at; empty means all. ``decisions`` holds reject reasons and/or ``"kept"``."""

    sources: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ()
    min_score: float | None = None
    max_score: float | None = None
    keys: tuple[str, ...] = ()

    def mask(self, texts: pa.Table) -> pa.ChunkedArray | None:
        conditions = []
        if self.sources:
            conditions.append(pc.is_in(texts["source"], value_set=pa.array(self.sources, pa.string())))
        if self.decisions:
            conditions.append(pc.is_in(texts["decision"], value_set=pa.array(self.decisions, pa.string())))
        if self.min_score is not None:
            conditions.append(pc.greater_equal(texts["score"], self.min_score))
        if self.max_score is not None:
            conditions.append(pc.less_equal(texts["score"], self.max_score))
        if not conditions:
            return None
        mask = conditions[0]
        for condition in conditions[1:]:
            mask = pc.and_(mask, condition)
        return pc.fill_null(mask, False)  # a score bound excludes unscored texts

    def apply(self, texts: pa.Table) -> pa.Table:
        mask = self.mask(texts)
        return texts if mask is None else texts.filter(mask)

    def as_dict(self) -> dict[str, Any]:
        return {"source": list(self.sources), "reason": list(self.decisions), "min_score": self.min_score,
                "max_score": self.max_score, "key": list(self.keys)}


def load_texts(reader: OutputReader, extra: Sequence[str] = (), keys: Sequence[str] | None = None) -> pa.Table:
    """One row per text: ``_table, source, decision, score, stage`` + ``extra`` columns + position.

    The string columns with few distinct values (source, decision, stage and ``shard`` when asked for)
    are dictionary-encoded, which keeps a million texts in tens of megabytes.
    """
    wanted = list(dict.fromkeys(extra))
    encoded = ["source", "reason", "stage", "shard"]
    pairs = reader.scan("pairs", ["source", "itm_prob", *wanted], keys=keys, dictionary=encoded)
    rejects = reader.scan("rejects", ["source", "reason", "score", "stage", *wanted], keys=keys, dictionary=encoded)
    common = [*wanted, FILE, ROW]
    return pa.concat_tables([
        pa.table({TABLE: pa.array(np.full(pairs.num_rows, PAIRS, np.int8)),
                  "source": _encoded(pairs["source"]),
                  "decision": _encoded(pa.chunked_array([pa.DictionaryArray.from_arrays(
                      np.zeros(pairs.num_rows, np.int32), pa.array([KEPT]))])),
                  "score": pairs["itm_prob"].cast(pa.float64()),
                  "stage": _encoded(pa.chunked_array([pa.nulls(pairs.num_rows, pa.string())])),
                  **{name: _encoded(pairs[name]) if name in encoded else pairs[name] for name in common}}),
        pa.table({TABLE: pa.array(np.full(rejects.num_rows, REJECTS, np.int8)),
                  "source": _encoded(rejects["source"]),
                  "decision": _encoded(rejects["reason"]),
                  "score": rejects["score"].cast(pa.float64()),
                  "stage": _encoded(rejects["stage"]),
                  **{name: _encoded(rejects[name]) if name in encoded else rejects[name] for name in common}}),
    ])


def _encoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column as dictionary<int32, string> chunks (each chunk may carry its own dictionary)."""
    target = pa.dictionary(pa.int32(), pa.string())
    if column.type == target:
        return column
    if pa.types.is_dictionary(column.type):
        return column.cast(target)
    return pc.dictionary_encode(column.cast(pa.string())).cast(target)


def scores_by_source(texts: pa.Table) -> dict[str, np.ndarray]:
    """ITM probabilities of the scored web and synthetic texts, kept and dropped alike."""
    scored = texts.filter(pc.is_valid(texts["score"]))
    out = {}
    for source in SCORED_SOURCES:
        chosen = scored.filter(pc.equal(scored["source"], source))["score"]
        out[source] = chosen.to_numpy() if chosen.num_chunks else np.zeros(0)
    return out


def quantiles(scores: np.ndarray, qs: Sequence[float] = QUANTILES) -> dict[str, float | None]:
    labels = [f"p{round(q * 100)}" for q in qs]
    if scores.size == 0:
        return dict.fromkeys(labels)
    return {label: float(value) for label, value in zip(labels, np.quantile(scores, qs))}


def kept_fraction(scores: np.ndarray, thresholds: Sequence[float]) -> list[float | None]:
    """The fraction of ``scores`` that a threshold keeps (score >= t), for each t."""
    if scores.size == 0:
        return [None] * len(thresholds)
    ordered = np.sort(scores)
    below = np.searchsorted(ordered, np.asarray(thresholds, dtype=np.float64), side="left")
    return (1.0 - below / ordered.size).tolist()


def value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    """Counts of each value, largest first (nulls counted as ``"null"``)."""
    merged: dict[str, int] = {}
    for count in pc.value_counts(column).to_pylist():
        label = "null" if count["values"] is None else str(count["values"])
        merged[label] = merged.get(label, 0) + count["counts"]
    return dict(sorted(merged.items(), key=lambda item: (-item[1], item[0])))


def codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Integer codes of a string or dictionary column and the values they stand for (null: ``len(values)``)."""
    column = _encoded(column).unify_dictionaries()
    if column.num_chunks == 0:
        return np.zeros(0, np.int64), []
    values = column.chunk(0).dictionary.to_pylist()
    indices = pa.chunked_array([chunk.indices for chunk in column.chunks], pa.int32())
    return pc.fill_null(indices, len(values)).to_numpy().astype(np.int64), values


@dataclass
class Scores:
    """Scored texts by source, and their statistics."""

    by_source: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def all(self) -> np.ndarray:
        return np.concatenate(list(self.by_source.values())) if self.by_source else np.zeros(0)

    def summary(self) -> dict[str, Any]:
        return {source: {"count": int(values.size), "quantiles": quantiles(values)}
                for source, values in self.by_source.items()}

    def kept_fractions(self, thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, Any]]:
        series = {name: kept_fraction(values, thresholds) for name, values in {**self.by_source, "all": self.all}.items()}
        return [{"threshold": t, **{name: values[i] for name, values in series.items()}} for i, t in enumerate(thresholds)]
