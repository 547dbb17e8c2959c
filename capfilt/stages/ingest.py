"""Ingest: a URL list becomes img2dataset Parquet shards, read later by :mod:`capfilt.data.shards`.

img2dataset does the downloading (threads, resizing, hashing, ``status`` per row). Around it this step
adds what a pipeline stage needs: img2dataset gives up on a shard that keeps failing without raising,
so the rows in the written shards are counted against the rows of the URL list, and the completion
marker (``_SUCCESS``, a JSON summary) is written last, only when they match. A rerun with the marker
present does nothing; without it img2dataset's incremental mode redoes only the shards lacking a
``{shard}_stats.json``.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from importlib.metadata import version
from typing import Any

import fsspec
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from capfilt.config import IngestConfig

SUCCESS_MARKER = "_SUCCESS"


class IngestError(RuntimeError):
    """img2dataset finished but the shards do not account for every input row."""


def url_list_files(config: IngestConfig) -> list[str]:
    """The URL files img2dataset reads: the file itself, or a folder's ``*.{input_format}`` files."""
    fs, path = fsspec.core.url_to_fs(config.url_list)
    if fs.isdir(path):
        files = sorted(fs.glob(path.rstrip("/") + "/*." + config.input_format))
        if not files:
            raise FileNotFoundError(f"no *.{config.input_format} files in {config.url_list}")
        local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
        return [file if local else fs.unstrip_protocol(file) for file in files]
    if not fs.isfile(path):
        raise FileNotFoundError(f"url_list {config.url_list} does not exist")
    return [config.url_list]


def count_url_rows(config: IngestConfig) -> list[int]:
    """Rows of each URL file, parsed as img2dataset parses it (each row becomes one output row)."""
    counts = []
    for file in url_list_files(config):
        fs, path = fsspec.core.url_to_fs(file)
        form = config.input_format
        compression = "gzip" if form.endswith(".gz") else None
        with fs.open(path, "rb", compression=compression) as handle:
            if form == "parquet":
                counts.append(pq.ParquetFile(handle).metadata.num_rows)
            elif form.startswith("txt"):
                counts.append(pa_csv.read_csv(handle, read_options=pa_csv.ReadOptions(column_names=["url"])).num_rows)
            elif form.startswith("csv"):
                counts.append(pa_csv.read_csv(handle).num_rows)
            elif form.startswith("tsv"):
                counts.append(pa_csv.read_csv(handle, parse_options=pa_csv.ParseOptions(delimiter="\t")).num_rows)
            elif form.startswith("jsonl"):
                counts.append(pa_json.read_json(handle).num_rows)
            else:  # json: one array of records (img2dataset reads it with pandas.read_json)
                counts.append(len(json.load(handle)))
    return counts


def shard_summary(output_folder: str, config: IngestConfig) -> dict[str, Any]:
    """Sum img2dataset's ``{shard}_stats.json`` files; raise if a stats file has no shard beside it."""
    fs, path = fsspec.core.url_to_fs(output_folder)
    totals = {"shards": 0, "count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    data_files = (".parquet",) if config.output_format == "parquet" else (".tar", ".parquet")
    for stats_file in sorted(fs.glob(posixpath.join(path, "*_stats.json"))):
        shard = posixpath.basename(stats_file)[: -len("_stats.json")]
        for extension in data_files:
            if not fs.exists(posixpath.join(path, shard + extension)):
                raise IngestError(f"{output_folder}: {shard}_stats.json exists but {shard}{extension} does not")
        with fs.open(stats_file, "r") as handle:
            stats = json.load(handle)
        totals["shards"] += 1
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[name] += int(stats[name])
    return totals


def ingest(config: IngestConfig, output_folder: str) -> str:
    """Download ``config.url_list`` into ``{shard:05d}.parquet`` shards under ``output_folder``; returns it."""
    # img2dataset imports albumentations, which otherwise phones home for updates in every worker.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    fs, path = fsspec.core.url_to_fs(output_folder)
    marker = posixpath.join(path, SUCCESS_MARKER)
    if fs.exists(marker):
        return output_folder
    rows_per_file = count_url_rows(config)
    expected_rows = sum(rows_per_file)
    # img2dataset cuts each URL file into its own ceil(rows / shard size) shards.
    expected_shards = sum(math.ceil(rows / config.number_sample_per_shard) for rows in rows_per_file)
    img2dataset.download(
        url_list=config.url_list,
        output_folder=output_folder,
        input_format=config.input_format,
        url_col=config.url_col,
        caption_col=config.caption_col,
        save_additional_columns=list(config.save_additional_columns) or None,
        output_format=config.output_format,
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_format=config.encode_format,
        encode_quality=config.encode_quality,
        number_sample_per_shard=config.number_sample_per_shard,
        processes_count=config.processes_count,
        thread_count=config.thread_count,
        timeout=config.timeout_s,
        retries=config.retries,
        min_image_size=config.min_image_size,
        max_aspect_ratio=config.max_aspect_ratio or float("inf"),
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=config.disallowed_header_directives,
        compute_hash="sha256",
        extract_exif=True,
        enable_wandb=False,
        distributor="multiprocessing",
        incremental_mode="incremental",
    )
    summary = shard_summary(output_folder, config)
    if summary["count"] != expected_rows or summary["shards"] != expected_shards:
        raise IngestError(
            f"{output_folder}: img2dataset wrote {summary['shards']} shards with {summary['count']} rows, "
            f"expected {expected_shards} shards with {expected_rows} rows from {config.url_list}; "
            "rerun to retry the missing shards"
        )
    record = {
        **summary,
        "url_list": config.url_list,
        "img2dataset_version": version("img2dataset"),
        "config": config.model_dump(mode="json"),
    }
    with fs.open(marker, "w") as handle:  # last: its presence means the shards are complete
        json.dump(record, handle, indent=2)
    return output_folder


def read_marker(output_folder: str) -> dict[str, Any] | None:
    """The completion record, or None when the ingest has not finished."""
    fs, path = fsspec.core.url_to_fs(output_folder)
    marker = posixpath.join(path, SUCCESS_MARKER)
    if not fs.exists(marker):
        return None
    with fs.open(marker, "r") as handle:
        return json.load(handle)
