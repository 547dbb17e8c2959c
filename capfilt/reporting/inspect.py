"""``capfilt inspect``: what a CapFilt output kept, what it dropped and why, and whether it is whole.

Reads a handful of light columns (never texts in bulk, never images): counts by source and reason,
ITM quantiles of web and synthetic texts, the kept fraction a threshold would give, a few sample rows
(whose texts are read from their row groups only) and the per-shard accounting with its problems.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.reporting.reader import FILE, ROW, OutputReader
from capfilt.reporting.texts import (
    PAIRS,
    REJECTS,
    TABLE,
    Scores,
    TextFilter,
    load_texts,
    scores_by_source,
    value_counts,
)

PAIR_SAMPLE_COLUMNS = ["key", "source", "text", "itm_prob", "itc_sim", "captioner_id", "round", "shard", "row"]
REJECT_SAMPLE_COLUMNS = ["key", "source", "text", "reason", "detail", "score", "stage", "shard", "row"]
MAX_SHARDS_IN_TEXT = 20


def inspect_output(path: str, storage_options: dict[str, Any] | None = None, filters: TextFilter = TextFilter(),
                   samples: int = 5, seed: int = 0) -> dict[str, Any]:
    """Everything ``capfilt inspect`` prints, as plain data (the ``--json`` output)."""
    reader = OutputReader(path, storage_options)
    texts = filters.apply(load_texts(reader, keys=filters.keys or None))
    pairs = texts.filter(pc.equal(texts[TABLE], PAIRS))
    rejects = texts.filter(pc.equal(texts[TABLE], REJECTS))
    scores = Scores(scores_by_source(texts))
    statuses = reader.shard_statuses()
    settings = reader.settings
    totals = reader.totals(statuses)
    return {
        "path": reader.url,
        "finished": reader.finished,
        "config_hash": reader.fingerprint.get("hash"),
        "threshold": settings.get("threshold"),
        "keep_policy": settings.get("keep_policy"),
        "models": _model_ids(reader),
        "selection": filters.as_dict(),
        "totals": totals,
        "pairs": {"rows": pairs.num_rows, "by_source": value_counts(pairs["source"])},
        "rejects": {"rows": rejects.num_rows, "by_reason": value_counts(rejects["decision"]),
                    "by_source": value_counts(rejects["source"]), "by_stage": value_counts(rejects["stage"])},
        "scores": scores.summary(),
        "kept_fraction": scores.kept_fractions(),
        "samples": {"pairs": _sample(reader, "pairs", pairs, PAIR_SAMPLE_COLUMNS, samples, seed),
                    "rejects": _sample(reader, "rejects", rejects, REJECT_SAMPLE_COLUMNS, samples, seed)},
        "shards": {"count": len(statuses), "committed": sum(s.committed for s in statuses),
                   "with_problems": sum(bool(s.problems) for s in statuses),
                   "list": [s.as_dict() for s in statuses]},
        "problems": reader.problems(statuses),
    }


def _model_ids(reader: OutputReader) -> dict[str, list[str]]:
    models = (reader.manifest or {}).get("models") or reader.fingerprint.get("fingerprint", {}).get("models", {})
    return {role: [m.get("id") for m in models.get(role, [])] for role in ("captioners", "filters")}


def _sample(reader: OutputReader, table: str, rows: pa.Table, columns: list[str], n: int, seed: int) -> list[dict]:
    if n <= 0 or rows.num_rows == 0:
        return []
    picked = np.sort(np.random.default_rng(seed).choice(rows.num_rows, size=min(n, rows.num_rows), replace=False))
    where = rows.select([FILE, ROW]).take(pa.array(picked))
    return reader.take(table, where[FILE].to_numpy(), where[ROW].to_numpy(), columns).to_pylist()


# --------------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------------


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _short(text: Any, width: int = 70) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _counts(title: str, counts: dict[str, int], total: int) -> list[str]:
    lines = [f"{title} ({total:,})"]
    width = max((len(name) for name in counts), default=0)
    lines += ([f"  {name:<{width}}  {count:>10,}  {count / total:6.1%}" for name, count in counts.items()]
              if total else ["  (none)"])
    return lines


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_output`'s result."""
    lines = [f"CapFilt output {info['path']}",
             f"  {'finished' if info['finished'] else 'NOT FINISHED'}; config {info['config_hash']}; "
             f"threshold {info['threshold']} ({info['keep_policy']})"]
    for role, ids in info["models"].items():
        lines.append(f"  {role}: {', '.join(map(str, ids)) or '-'}")
    active = {name: value for name, value in info["selection"].items() if value not in (None, [], ())}
    if active:
        lines.append("  selection: " + ", ".join(f"{name}={value}" for name, value in active.items()))
    totals = info["totals"]
    if totals:
        lines.append("  rows in {:,}: kept {:,}, filtered {:,}, rejected {:,}; texts kept {:,}, dropped {:,}".format(
            *(totals.get(name, 0) for name in ("rows_in", "kept", "filtered", "rejected", "texts_kept", "texts_dropped"))))
    lines.append("")
    lines += _counts("pairs by source", info["pairs"]["by_source"], info["pairs"]["rows"])
    lines += _counts("rejects by reason", info["rejects"]["by_reason"], info["rejects"]["rows"])
    lines.append("")
    labels = next(iter(info["scores"].values()))["quantiles"].keys() if info["scores"] else []
    lines.append("ITM probability     count  " + "  ".join(f"{label:>6}" for label in labels))
    for source, summary in info["scores"].items():
        lines.append(f"  {source:<12} {summary['count']:>9,}  "
                     + "  ".join(f"{_number(v, 3):>6}" for v in summary["quantiles"].values()))
    lines.append("")
    lines.append("kept fraction if threshold were   " + "  ".join(f"{row['threshold']:>5}" for row in info["kept_fraction"]))
    for series in ("web", "synthetic", "all"):
        lines.append(f"  {series:<31} " + "  ".join(
            f"{'-' if row[series] is None else f'{row[series]:.0%}':>5}" for row in info["kept_fraction"]))
    for table in ("pairs", "rejects"):
        rows = info["samples"][table]
        if rows:
            lines += ["", f"sample {table}"]
        for row in rows:
            score = row.get("itm_prob") if table == "pairs" else row.get("score")
            what = row["source"] if table == "pairs" else f"{row['source']}, {row['reason']}"
            lines.append(f"  {row['key']}  [{what}]  {_number(score, 3)}  {_short(row['text']) or '(no text)'}")
            if table == "rejects" and row.get("detail"):
                lines.append(f"      detail: {_short(row['detail'], 90)}")
    shards = info["shards"]
    lines += ["", f"shards: {shards['count']}, committed {shards['committed']}, with problems {shards['with_problems']}"]
    listed = [s for s in shards["list"] if s["problems"]] + [s for s in shards["list"] if not s["problems"]]
    listed = [s for i, s in enumerate(listed) if s["problems"] or i < MAX_SHARDS_IN_TEXT]
    if listed:
        lines.append(f"  {'rows_in':>8} {'kept':>8} {'filtered':>8} {'rejected':>8}  ok  shard")
    for s in listed:
        ok = "yes" if s["reconciles"] and s["committed"] else "NO"
        lines.append(f"  {_number(s['rows_in']):>8} {_number(s['kept']):>8} {_number(s['filtered']):>8} "
                     f"{_number(s['rejected']):>8}  {ok:<3} {s['shard']}")
        lines += [f"      {problem}" for problem in s["problems"]]
    if len(listed) < shards["count"]:
        lines.append(f"  ... {shards['count'] - len(listed)} more shards, all reconciled (see --json)")
    lines.append("")
    if info["problems"]:
        lines.append(f"PROBLEMS ({len(info['problems'])}):")
        lines += [f"  {problem}" for problem in info["problems"]]
    else:
        lines.append("no problems: finished, every shard committed and reconciled")
    return "\n".join(lines)
