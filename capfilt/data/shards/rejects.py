"""The split every stage makes: rows passed on, and one reject row (with its reason) for each row that is not."""

from __future__ import annotations

from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.data.shards.normalise import SUCCESS, as_array, status_reason

REJECT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("text", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("score", pa.float64()),
        ("stage", pa.string()),
    ]
)


def reject_table(
    batch: pa.Table,
    reasons: Sequence[str] | str,
    details: Sequence[str | None] | str | None,
    stage: str,
    scores: Sequence[float | None] | None = None,
) -> pa.Table:
    """Reject rows (:data:`REJECT_SCHEMA`) for every row of ``batch``; ``text`` is its raw caption."""
    n = batch.num_rows
    reasons = [reasons] * n if isinstance(reasons, str) else list(reasons)
    details = [details] * n if details is None or isinstance(details, str) else list(details)
    if len(reasons) != n or len(details) != n:
        raise ValueError(f"{n} rows but {len(reasons)} reasons and {len(details)} details")
    text = batch["caption"] if "caption" in batch.column_names else batch["text"]
    return pa.table(
        {
            "key": as_array(batch["key"], pa.string(), n),
            "source_key": as_array(batch["source_key"], pa.string(), n),
            "text": as_array(text, pa.string(), n),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
            "score": pa.array(scores if scores is not None else [None] * n, pa.float64()),
            "stage": pa.array([stage] * n, pa.string()),
        },
        schema=REJECT_SCHEMA,
    )


def reject_rows(batch: pa.Table, failures: Iterable[tuple[int, str, str | None]], stage: str) -> pa.Table:
    """Reject rows for per-row failures ``(index in batch, reason, detail)``, e.g. ``decode_batch``'s."""
    failures = list(failures)
    picked = batch.take(pa.array([index for index, _, _ in failures], pa.int64()))
    return reject_table(picked, [reason for _, reason, _ in failures], [detail for _, _, detail in failures], stage)


def split_by_status(batch: pa.Table, stage: str = "read") -> tuple[pa.Table, pa.Table]:
    """(rows with status ``success``, reject rows ``status: <status>`` with the error message as detail).

    A null status counts as a failure (``status: null``). ``good.num_rows + rejects.num_rows == batch.num_rows``.
    """
    succeeded = pc.fill_null(pc.equal(batch["status"], SUCCESS), False)
    good = batch.filter(succeeded)
    failed = batch.filter(pc.invert(succeeded))
    reasons = [status_reason(status) for status in failed["status"].to_pylist()]
    details = failed["error_message"].to_pylist() if "error_message" in failed.column_names else None
    return good, reject_table(failed, reasons, details, stage)
