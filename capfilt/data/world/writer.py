"""Writing the world as img2dataset output: ``{split}/{shard:05d}.parquet`` plus ``_stats.json``.

Column names, order and types follow img2dataset's Parquet writer (the caller's columns, then
``caption``, ``url``, ``key``, ``status``, ``error_message``, sizes as int32, ``exif``, ``sha256``,
and the bytes in ``jpg``); keys are computed as img2dataset does (shard id times 10^digits of
``rows_per_shard``, zero-padded to 5 + digits). The caller's columns are the ground truth, which
capfilt's decisions never read: ``gt_noise_type``, ``gt_scene``, ``gt_clean``, ``gt_image_status``
and, for human and test images, ``captions`` (all references; ``caption`` is the first). The
``labelled`` split (empty unless ``num_labelled``) is the world's ImageNet: images with ``labels``, the
shape classes they show, and no caption, for pretraining a ViT as a classifier before it sees text.

Every row draws from its own generator seeded by (seed, split, row), and noise types and failed
rows are exact counts placed by a seeded permutation, so a shard can be written alone (in any order
or process) and the same config gives byte-identical Parquet. ``world.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.config import WorldConfig
from capfilt.data.world.captions import NOISE_TYPES, human_captions, web_pair
from capfilt.data.world.render import encode_jpeg, render
from capfilt.data.world.scene import sample_scene

SPLITS = ("web", "human", "test", "labelled")
SHARD_DIGITS = 5  # img2dataset's oom_shard_count default
_FAILURES = ("HTTP Error 404: Not Found", "HTTP Error 403: Forbidden", "<urlopen error timed out>")
_HTML_ERROR_PAGE = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>"


def _schema(split: str) -> pa.Schema:
    fields = [
        pa.field("gt_noise_type", pa.string()),
        pa.field("gt_scene", pa.string()),
        pa.field("gt_clean", pa.bool_()),
        pa.field("gt_image_status", pa.string()),
    ]
    if split in ("human", "test"):
        fields.append(pa.field("captions", pa.list_(pa.string())))
    if split == "labelled":
        fields.append(pa.field("labels", pa.list_(pa.string())))
    fields += [
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("exif", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("jpg", pa.binary()),
    ]
    return pa.schema(fields)


@dataclass(frozen=True)
class WorldPaths:
    root: str
    web: str
    human: str
    test: str
    labelled: str
    manifest: str  # world.json: the config and per-split counts, written last
    shards: dict[str, tuple[str, ...]] = field(default_factory=dict)


def compute_key(index: int, shard_id: int, rows_per_shard: int) -> str:
    """img2dataset's key: ``rows_per_shard`` 10000 gives shard 1, row 42 -> ``'000010042'``."""
    digits = math.ceil(math.log10(rows_per_shard)) if rows_per_shard > 1 else 0
    return f"{10**digits * shard_id + index:0{digits + SHARD_DIGITS}d}"


def split_size(config: WorldConfig, split: str) -> int:
    return {"web": config.num_web, "human": config.num_human, "test": config.num_test,
            "labelled": config.num_labelled}[split]


def num_shards(config: WorldConfig, split: str) -> int:
    return math.ceil(split_size(config, split) / config.rows_per_shard)


def noise_counts(config: WorldConfig) -> dict[str, int]:
    """Exact rows per noise type for ``num_web`` rows (largest remainder)."""
    fractions = {"clean": config.noise.clean, **config.noise.model_dump()}
    raw = {name: fractions[name] * config.num_web for name in NOISE_TYPES}
    counts = {name: math.floor(value) for name, value in raw.items()}
    by_remainder = sorted(NOISE_TYPES, key=lambda name: (counts[name] - raw[name], NOISE_TYPES.index(name)))
    for name in by_remainder[: config.num_web - sum(counts.values())]:
        counts[name] += 1
    return counts


@lru_cache(maxsize=8)
def _web_plan(config_json: str) -> tuple[tuple[str, ...], dict[int, str]]:
    config = WorldConfig.model_validate_json(config_json)
    noise = [name for name, count in noise_counts(config).items() for _ in range(count)]
    random.Random(f"capfilt-world/{config.seed}/noise").shuffle(noise)
    faulty = random.Random(f"capfilt-world/{config.seed}/faults").sample(
        range(config.num_web), config.failed_rows + config.corrupt_rows
    )
    faults = {index: "failed" for index in faulty[: config.failed_rows]}
    faults.update({index: "corrupt" for index in faulty[config.failed_rows :]})
    return tuple(noise), faults


def web_plan(config: WorldConfig) -> tuple[tuple[str, ...], dict[int, str]]:
    """Noise type of every web row, and which rows are failed or corrupt."""
    return _web_plan(config.model_dump_json())


def _row_rng(config: WorldConfig, split: str, index: int) -> random.Random:
    return random.Random(f"capfilt-world/{config.seed}/{split}/{index}")


def make_rows(config: WorldConfig, split: str, shard_id: int) -> list[dict]:
    """The rows of one shard, in img2dataset's columns."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    start = shard_id * config.rows_per_shard
    stop = min(start + config.rows_per_shard, split_size(config, split))
    if split == "web":
        noise, faults = web_plan(config)
    size = config.image_size
    rows = []
    for index in range(start, stop):
        rng = _row_rng(config, split, index)
        key = compute_key(index - start, shard_id, config.rows_per_shard)
        row = {"key": key, "url": f"https://world.invalid/{split}/{key}.jpg", "gt_image_status": "ok"}
        if split == "web":
            noise_type = noise[index]
            scene, caption = web_pair(
                noise_type, rng, config.min_objects, config.max_objects, config.duplicate_probability
            )
            row.update(gt_noise_type=noise_type, gt_clean=noise_type == "clean", caption=caption)
            fault = faults.get(index)
        elif split == "labelled":
            # Object classes only, as ImageNet's labels: no colours, sizes, positions or relations.
            scene = sample_scene(rng, config.min_objects, config.max_objects, config.duplicate_probability)
            row.update(gt_noise_type="clean", gt_clean=True, caption=None,
                       labels=sorted({obj.shape for obj in scene.objects}))
            fault = None
        else:
            scene = sample_scene(rng, config.min_objects, config.max_objects, config.duplicate_probability)
            count = config.captions_per_human_image if split == "human" else config.captions_per_test_image
            captions = human_captions(scene, rng, count)
            row.update(gt_noise_type="clean", gt_clean=True, captions=captions, caption=captions[0])
            fault = None
        row["gt_scene"] = scene.to_json()
        if fault == "failed":
            row.update(
                gt_image_status="failed", status="failed_to_download", error_message=rng.choice(_FAILURES),
                width=None, height=None, original_width=None, original_height=None, exif=None, sha256=None, jpg=None,
            )
        else:
            jpg = encode_jpeg(render(scene, size), config.jpeg_quality)
            if fault == "corrupt":
                # Damaged after download: a cut-off JPEG, or an error page served with status 200.
                jpg = jpg[: len(jpg) // 2] if index % 2 == 0 else _HTML_ERROR_PAGE
                row["gt_image_status"] = "corrupt"
            row.update(
                status="success", error_message=None, width=size, height=size, original_width=size,
                original_height=size, exif="{}", sha256=hashlib.sha256(jpg).hexdigest(), jpg=jpg,
            )
        rows.append(row)
    return rows


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def write_shard(config: WorldConfig, split: str, shard_id: int, split_dir: str) -> tuple[str, dict]:
    """Write ``{shard:05d}.parquet`` and ``{shard:05d}_stats.json``; returns the path and the stats."""
    start_time = time.time()
    rows = make_rows(config, split, shard_id)
    schema = _schema(split)
    table = pa.Table.from_pylist(rows, schema=schema)
    name = f"{shard_id:0{SHARD_DIGITS}d}"
    path = _join(split_dir, f"{name}.parquet")
    with fsspec.open(path, "wb") as handle:
        pq.write_table(table, handle)
    status_dict: dict[str, int] = {}
    for row in rows:
        outcome = row["status"] if row["status"] == "success" else row["error_message"]
        status_dict[outcome] = status_dict.get(outcome, 0) + 1
    failed = sum(row["status"] == "failed_to_download" for row in rows)
    end_time = time.time()
    stats = {
        "count": len(rows),
        "successes": len(rows) - failed,
        "failed_to_download": failed,
        "failed_to_resize": 0,
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": status_dict,
    }
    with fsspec.open(_join(split_dir, f"{name}_stats.json"), "w") as handle:
        json.dump(stats, handle, indent=4)
    return path, stats


def write_world(config: WorldConfig, out_dir: str) -> WorldPaths:
    """Generate the web, human, test and labelled splits under ``out_dir`` (a local path or fsspec URL)."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    base = out_dir if "://" in out_dir else root
    shards: dict[str, tuple[str, ...]] = {}
    summary: dict[str, dict] = {}
    for split in SPLITS:
        split_dir = _join(base, split)
        fs.makedirs(_join(root, split), exist_ok=True)
        paths = []
        for shard_id in range(num_shards(config, split)):
            path, _ = write_shard(config, split, shard_id, split_dir)
            paths.append(path)
        shards[split] = tuple(paths)
        summary[split] = {"rows": split_size(config, split), "shards": len(paths)}
    noise, faults = web_plan(config)
    summary["web"]["noise_counts"] = noise_counts(config)
    summary["web"]["image_status_counts"] = {
        status: sum(1 for fault in faults.values() if fault == status) for status in ("failed", "corrupt")
    }
    manifest = _join(base, "world.json")
    with fsspec.open(manifest, "w") as handle:
        json.dump({"config": config.model_dump(), "splits": summary}, handle, indent=2, sort_keys=True)
    return WorldPaths(base, *(_join(base, split) for split in SPLITS), manifest, shards)
