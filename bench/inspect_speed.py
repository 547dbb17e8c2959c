"""Seconds for ``capfilt inspect`` (and ``capfilt report``) on a large CapFilt output.

Writes a synthetic output with the stage's own schemas, commit protocol and manifest code: N pair
rows (default 1,000,000) from images with one web and two synthetic captions each, scores drawn so
some texts fall below the 0.5 threshold (rejects), a few unreadable rows, 10,000 images per input
shard, 100,000 rows per file. Then times the CLI as a user runs it (a fresh process: interpreter
start and imports included), plus filtered runs and a key lookup, and the report.

Source shards are not written (the report shows placeholders for them) unless ``--source-shards``
names real img2dataset Parquet shards to point at.

    python bench/inspect_speed.py                 # 1M pair rows
    python bench/inspect_speed.py --rows 200000 --keep out/   # keep the output for a look
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

try:
    from bench import _common as common
except ImportError:  # run as a script: bench/ is on sys.path
    import _common as common

from capfilt.data.output import Commit, CommittedOutput  # noqa: E402
from capfilt.stages.capfilt import PAIRS_SCHEMA, REJECTS_SCHEMA, ShardTask, build_manifest  # noqa: E402

THRESHOLD = 0.5
TEXTS_PER_IMAGE = 3  # one web caption, two synthetic
WORDS = ("a red blue green yellow purple orange pink white black small large circle square triangle star cross "
         "left right above below of on with and background striped dotted plain photo picture two three").split()
READ_REASONS = ("status: failed_to_download", "decode_error: truncated", "decode_error: not_an_image")


def _captions(rng: np.random.Generator, n: int) -> list[str]:
    lengths = rng.integers(4, 10, n)
    words = rng.integers(0, len(WORDS), int(lengths.sum()))
    out, start = [], 0
    for length in lengths.tolist():
        out.append(" ".join(WORDS[w] for w in words[start:start + length]))
        start += length
    return out


def write_output(root: str, pair_rows: int, images_per_shard: int = 10_000, rows_per_file: int = 100_000,
                 source_shards: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """A finished CapFilt output with exactly ``pair_rows`` pairs; returns what it holds."""
    rng = np.random.default_rng(seed)
    n = int(pair_rows / 1.6) + 1000  # images: ~1.6 kept texts each at these score distributions
    unreadable = rng.random(n) < 0.004
    read_reason = rng.integers(0, len(READ_REASONS), n)
    # Web captions: two thirds match (high scores), a third are noise (low); synthetic ones mostly match.
    web = np.where(rng.random(n) < 0.67, rng.beta(6, 2, n), rng.beta(1.5, 6, n))
    synthetic = rng.beta(4, 2, (n, 2))
    scores = np.column_stack([web, synthetic])
    kept = (scores >= THRESHOLD) & ~unreadable[:, None]
    cut = int(np.searchsorted(np.cumsum(kept.sum(1)), pair_rows))  # the image that reaches pair_rows
    n = cut + 1
    scores, kept, unreadable, read_reason = scores[:n], kept[:n], unreadable[:n], read_reason[:n]
    overshoot = int(kept.sum()) - pair_rows
    for j in range(TEXTS_PER_IMAGE - 1, -1, -1):  # drop the last image's extra texts below the threshold
        if overshoot > 0 and kept[-1, j]:
            scores[-1, j] *= 0.4
            kept[-1, j] = False
            overshoot -= 1

    shard_of, row_of = np.arange(n) // images_per_shard, np.arange(n) % images_per_shard
    num_shards = int(shard_of[-1]) + 1
    if source_shards:
        sizes = [pq.read_metadata(path).num_rows for path in source_shards]
        urls = [source_shards[s % len(source_shards)] for s in range(num_shards)]
        row_of = np.array([r % sizes[s % len(source_shards)] for s, r in zip(shard_of, row_of)])
    else:
        urls = [f"/nonexistent/capfilt-bench/web/{s:05d}.parquet" for s in range(num_shards)]
    keys = np.array([f"{s:05d}{r:04d}" for s, r in zip(shard_of, np.arange(n) % images_per_shard)], dtype=object)
    texts = np.array(_captions(rng, n * TEXTS_PER_IMAGE), dtype=object).reshape(n, TEXTS_PER_IMAGE)

    out = CommittedOutput(root)
    tasks = [ShardTask(url, "web", {}) for url in urls]
    provenance = {"captioners": [{"role": "captioner", "id": "bench-captioner@0"}],
                  "filters": [{"role": "filter", "id": "bench-filter@0"}]}
    out.claim({"capfilt": {"threshold": THRESHOLD, "keep_policy": "threshold", "best_n": 1, "round": 0,
                           "embed_images": False},
               "inputs": [["web", url] for url in urls], "models": provenance})
    commit_id, pending, pending_rows = 0, [], 0
    for s in range(num_shards):
        pending.append(s)
        pending_rows += int(kept[shard_of == s].sum())
        if pending_rows >= rows_per_file or s == num_shards - 1:
            _commit(out, commit_id, pending, shard_of, row_of, urls, keys, texts, scores, kept, unreadable,
                    read_reason, rows_per_file)
            commit_id, pending, pending_rows = commit_id + 1, [], 0
    out.finish(build_manifest(out, tasks, provenance, "nucleus:bench", time.time()))
    return {"images": n, "pairs": int(kept.sum()), "rejects": int((~kept & ~unreadable[:, None]).sum() + unreadable.sum()),
            "input_shards": num_shards, "commits": commit_id, "source_shards_real": bool(source_shards)}


def _commit(out, commit_id, shard_ids, shard_of, row_of, urls, keys, texts, scores, kept, unreadable, read_reason,
            rows_per_file):
    images = np.flatnonzero(np.isin(shard_of, shard_ids))
    sources = np.array(["web", "synthetic", "synthetic"], dtype=object)
    image_i = np.repeat(images, TEXTS_PER_IMAGE)
    text_j = np.tile(np.arange(TEXTS_PER_IMAGE), images.size)
    is_kept = kept[image_i, text_j]
    is_read = unreadable[image_i]

    def columns(mask):
        i, j = image_i[mask], text_j[mask]
        return {"i": i, "key": keys[i], "source_key": [f"{shard_of[k]:05d}.parquet:{row_of[k]}" for k in i],
                "shard": [urls[shard_of[k]] for k in i], "row": row_of[i], "text": texts[i, j],
                "source": sources[j], "score": scores[i, j], "j": j}

    p = columns(is_kept)
    pairs = pa.table({
        "key": p["key"], "source_key": p["source_key"], "text": p["text"], "source": p["source"],
        "itm_prob": p["score"], "itc_sim": p["score"] * 0.6 - 0.2,
        "captioner_id": np.where(p["j"] == 0, None, "bench-captioner@0"), "filter_id": ["bench-filter@0"] * len(p["key"]),
        "sampling": np.where(p["j"] == 0, None, "nucleus:bench"), "round": np.zeros(len(p["key"]), np.int64),
        "sha256": [None] * len(p["key"]), "shard": p["shard"], "row": p["row"], "extra": ["{}"] * len(p["key"]),
        "image": pa.nulls(len(p["key"]), pa.binary()),
    }, schema=PAIRS_SCHEMA)
    dropped = columns(~is_kept & ~is_read)
    read = columns(is_read & (text_j == 0))
    read_reasons = np.array(READ_REASONS, dtype=object)[read_reason[read["i"]]]
    rejects = pa.concat_tables([
        pa.table({"key": dropped["key"], "source_key": dropped["source_key"], "text": dropped["text"],
                  "source": dropped["source"], "reason": ["itm_below_threshold"] * len(dropped["key"]),
                  "detail": [None] * len(dropped["key"]), "score": dropped["score"], "stage": ["filter"] * len(dropped["key"]),
                  "captioner_id": np.where(dropped["j"] == 0, None, "bench-captioner@0"),
                  "round": np.zeros(len(dropped["key"]), np.int64), "shard": dropped["shard"], "row": dropped["row"]},
                 schema=REJECTS_SCHEMA),
        pa.table({"key": read["key"], "source_key": read["source_key"], "text": [None] * len(read["key"]),
                  "source": ["web"] * len(read["key"]), "reason": read_reasons, "detail": ["bench fault"] * len(read["key"]),
                  "score": pa.nulls(len(read["key"]), pa.float64()), "stage": ["read"] * len(read["key"]),
                  "captioner_id": [None] * len(read["key"]), "round": np.zeros(len(read["key"]), np.int64),
                  "shard": read["shard"], "row": read["row"]}, schema=REJECTS_SCHEMA),
    ])
    # The stage's order: by input shard, then row.
    order = lambda table: table.sort_by([("key", "ascending")])  # noqa: E731 -- keys sort as (shard, row)
    files = []
    for name, table in (("pairs", order(pairs)), ("rejects", order(rejects))):
        for part, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
            relative = f"{name}/part-{commit_id:05d}-{part:03d}.parquet"
            out.write_table(relative, table.slice(start, rows_per_file))
            files.append(relative)
    counts = {}
    for s in shard_ids:
        mine = images[shard_of[images] == s]
        k, r = kept[mine], unreadable[mine]
        dropped_texts = int((~k & ~r[:, None]).sum())
        counts[urls[s]] = {
            "rows_in": int(mine.size), "kept": int((k.any(1) & ~r).sum()), "filtered": int((~k.any(1) & ~r).sum()),
            "rejected": int(r.sum()), "images_decoded": int((~r).sum()), "texts_scored": int((~r).sum()) * TEXTS_PER_IMAGE,
            "texts_kept": int(k.sum()), "texts_dropped": dropped_texts,
            "reasons": {"itm_below_threshold": dropped_texts},
        }
        for code in np.unique(read_reason[mine][r]):
            counts[urls[s]]["reasons"][READ_REASONS[code]] = int((read_reason[mine][r] == code).sum())
    out.commit(Commit(commit_id, counts, files))


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="pair rows")
    parser.add_argument("--source-shards", default=None, help="glob of real img2dataset Parquet shards to reference")
    parser.add_argument("--images-per-shard", type=int, default=10_000, help="img2dataset's number_sample_per_shard")
    parser.add_argument("--keep", default=None, help="write the output here and keep it (default: a temp dir)")
    parser.add_argument("--no-report", action="store_true", help="time inspect only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="capfilt-inspect-bench-") as tmp:
        root = args.keep or str(Path(tmp) / "out")
        started = time.perf_counter()
        sources = sorted(glob.glob(args.source_shards)) if args.source_shards else None
        written = write_output(root, args.rows, images_per_shard=args.images_per_shard, source_shards=sources)
        write_seconds = time.perf_counter() - started
        cli = [sys.executable, "-m", "capfilt.cli"]
        seconds, stdout = timed([*cli, "inspect", root, "--json"])
        info = json.loads(stdout)
        assert info["pairs"]["rows"] == written["pairs"], (info["pairs"]["rows"], written["pairs"])
        assert not info["problems"], info["problems"]
        key = info["samples"]["pairs"][0]["key"]
        key_seconds, key_out = timed([*cli, "inspect", root, "--json", "--key", key])
        filtered_seconds, _ = timed([*cli, "inspect", root, "--json", "--source", "synthetic", "--min-score", "0.9"])
        startup_seconds, _ = timed([*cli, "--help"])
        record: dict[str, Any] = {
            "benchmark": "inspect_speed",
            "rows": written["pairs"],
            "reject_rows": written["rejects"],
            "images": written["images"],
            "input_shards": written["input_shards"],
            "seconds": round(seconds, 2),
            "seconds_key_lookup": round(key_seconds, 2),
            "key_lookup_rows": json.loads(key_out)["pairs"]["rows"],
            "seconds_source_and_min_score_filter": round(filtered_seconds, 2),
            "seconds_cli_startup_only": round(startup_seconds, 2),
            "seconds_writing_output": round(write_seconds, 1),
        }
        record["pair_files"] = len(list(Path(root, "pairs").glob("*.parquet")))
        if not args.no_report:
            html = str(Path(tmp) / "report.html")
            report_seconds, _ = timed([*cli, "report", root, "-o", html])
            record["report_seconds"] = round(report_seconds, 2)
            record["report_bytes"] = Path(html).stat().st_size
            record["report_source_images"] = "real shards" if sources else "unreachable (placeholders shown)"
        record["machine"] = common.machine()
        warning = common.busy_warning(record["machine"]["load_average_1_5_15"])
        if warning:
            record["note"] = warning
        common.emit(record)


if __name__ == "__main__":
    main()
