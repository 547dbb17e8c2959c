"""What the parts of CapFilt share: the text sources, the row outcomes and the Arrow schemas of the rows
that cross between them (decoded rows, result rows) and of the rows written (pairs, rejects)."""

from __future__ import annotations

import pyarrow as pa

WEB, HUMAN, SYNTHETIC = "web", "human", "synthetic"
KEPT, FILTERED, REJECTED = "kept", "filtered", "rejected"
MARKER_ROW = -1  # the end-of-shard record: carries the shard's row count or its read error
# Shard-level read outcomes, on the marker. Unreadable: the file itself is broken (not retried; its
# rows are rejected with this reason). Unavailable: storage kept failing after retries (not committed).
SHARD_UNREADABLE, SHARD_UNAVAILABLE = "shard_unreadable", "shard_unavailable"

# What crosses from the CPU tasks to the actors: one row per input row plus one end marker per shard.
DECODED_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("role", pa.string()),
        ("row", pa.int64()),
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("sha256", pa.string()),
        ("caption", pa.string()),
        ("extra", pa.string()),  # the input's other columns, as JSON
        ("reason", pa.string()),  # a row-level reject (status, decode error) or the marker's shard error
        ("detail", pa.string()),
        ("pixels", pa.binary()),  # uint8 HxWx3, resized to the filter's input size
        ("image", pa.binary()),  # original bytes, only when embed_images
        ("shard_rows", pa.int64()),  # on the marker: rows the shard had
    ]
)

_LIST_STR, _LIST_F64 = pa.list_(pa.string()), pa.list_(pa.float64())
RESULT_SCHEMA = pa.schema(
    [
        *[DECODED_SCHEMA.field(name) for name in ("shard", "role", "row", "key", "source_key", "sha256", "extra")],
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("texts", _LIST_STR),
        ("text_sources", _LIST_STR),
        ("captioner_ids", _LIST_STR),
        ("itm_probs", _LIST_F64),
        ("itc_sims", _LIST_F64),
        ("decisions", _LIST_STR),  # "kept" or the reason the text was dropped
        ("image", pa.binary()),
        ("shard_rows", pa.int64()),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("itm_prob", pa.float64()),
        ("itc_sim", pa.float64()),
        ("captioner_id", pa.string()),
        ("filter_id", pa.string()),
        ("sampling", pa.string()),
        ("round", pa.int64()),
        ("sha256", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("extra", pa.string()),
        ("image", pa.binary()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("score", pa.float64()),
        ("stage", pa.string()),
        ("captioner_id", pa.string()),
        ("round", pa.int64()),
        ("shard", pa.string()),
        ("row", pa.int64()),
    ]
)
