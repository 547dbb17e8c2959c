"""``capfilt export``: a finished CapFilt output as WebDataset tars or Parquet with the images inline.

Layout, as img2dataset writes its own (so open_clip, Hugging Face ``datasets`` and every curation tool
that reads img2dataset read it)::

    DEST/00000.tar        webdataset: {key}.jpg (the input's own bytes, never re-encoded), {key}.txt, {key}.json
    DEST/00000.parquet    webdataset: the tar's index, one row per sample, no image; parquet: the samples, image inline
    DEST/errors/...       references that could not be resolved, one row per pair, with the reason
    DEST/_capfilt.json, DEST/_commits/, DEST/manifest.json, DEST/_SUCCESS   as in every capfilt output

Samples get img2dataset's keys (output shard id, then index in the shard), unique in the export; each
sample's ``.json`` / columns name the input's key, shard and row, its texts' sources, scores, models
and round, and carry the input's extra columns (url, width, ...).

How it runs: a plan counts the samples of each CapFilt pairs file (a Ray task per file, light columns
only) and cuts them into output shards, each within one pairs file; then one Ray task per output
shard reads its slice, fetches the images its pairs refer to (the row groups holding them, as
training does) and writes its files; the driver commits each finished shard (see
:mod:`capfilt.data.output`), so a killed export resumes with the shards no commit covers, never
writing a sample twice. At most ``tasks_in_flight`` shards are in memory at once, whatever the size
of the output. A reference is checked before it is written: the input row must exist and carry the
pair's key and, where both are recorded, its sha256; otherwise the pair is an ``errors`` row
(``input_unreadable``, ``row_missing``, ``key_mismatch``, ``sha256_mismatch``, ``image_missing``).

Counts reconcile: for every pairs file, ``pairs = selected + excluded`` and ``selected texts =
exported texts + errors``; the pairs total equals the CapFilt manifest's ``texts_kept``.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.config import ExportConfig, identity
from capfilt.data.output import Commit, CommittedOutput

PAIR_COLUMNS = ["key", "source_key", "text", "source", "itm_prob", "itc_sim", "captioner_id", "filter_id", "sampling",
                "round", "sha256", "shard", "row", "extra", "image"]
ERRORS_SCHEMA = pa.schema([("input_key", pa.string()), ("input_shard", pa.string()), ("input_row", pa.int64()),
                           ("text", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string()), ("pairs_file", pa.string())])
# img2dataset's columns first (caption, key, status, error_message, sha256), then capfilt's.
SAMPLE_COLUMNS = ["key", "caption", "status", "error_message", "sha256", "texts", "sources", "itm_probs", "itc_sims",
                  "captioner_ids", "filter_id", "sampling", "round", "input_key", "input_source_key", "input_shard",
                  "input_row", "capfilt_output"]
TEXT_LISTS = ("texts", "sources", "itm_probs", "itc_sims", "captioner_ids")
ERRORS_DIR = "errors"


class ExportError(RuntimeError):
    """The export cannot start (its CapFilt output is not finished) or could not resolve references."""


# --------------------------------------------------------------------------------------------------
# Selecting and grouping the pairs of one pairs file (a pure function of the file and the settings)
# --------------------------------------------------------------------------------------------------


def select(pairs: pa.Table, settings: ExportConfig) -> tuple[pa.Table, Counter]:
    """The pairs to export, and the others counted by why they are left out."""
    excluded: Counter = Counter()
    keep = pa.array([True] * pairs.num_rows)
    if settings.sources is not None:
        wanted = pc.is_in(pairs["source"], pa.array(sorted(settings.sources)))
        excluded["source_not_exported"] += int(pc.sum(pc.invert(wanted)).as_py() or 0)
        keep = pc.and_(keep, wanted)
    if settings.min_score is not None:
        # A text without a score (human) passes: the threshold is about the filter's judgement.
        scored_low = pc.fill_null(pc.less(pairs["itm_prob"], settings.min_score), False)
        excluded["below_min_score"] += int(pc.sum(pc.and_(keep, scored_low)).as_py() or 0)
        keep = pc.and_(keep, pc.invert(scored_low))
    return pairs.filter(keep), excluded


def samples_of(pairs: pa.Table, group_by: str) -> list[list[int]]:
    """Row indices of ``pairs`` per sample, in file order: one text each, or every text of one input row.

    A CapFilt pairs file is ordered by (shard, row, text), so an image's texts are contiguous.
    """
    if group_by == "text":
        return [[index] for index in range(pairs.num_rows)]
    samples: list[list[int]] = []
    last = None
    for index, place in enumerate(zip(pairs["shard"].to_pylist(), pairs["row"].to_pylist())):
        if place != last:
            samples.append([])
            last = place
        samples[-1].append(index)
    return samples


def read_pairs_file(path: str, storage_options: dict[str, Any], columns: list[str]) -> pa.Table:
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path, **storage_options)
    with fs.open(fs_path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def count_file(path: str, settings_json: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """A pairs file's counts for the plan (pairs, selected pairs, samples, exclusions) and its extra
    columns' kinds (:func:`extra_kinds`), in one read of its light columns; a Ray task."""
    settings = ExportConfig.model_validate_json(settings_json)
    pairs = read_pairs_file(path, storage_options, ["source", "itm_prob", "shard", "row", "extra"])
    selected, excluded = select(pairs, settings)
    return {"file": path, "pairs": pairs.num_rows, "selected": selected.num_rows,
            "samples": len(samples_of(selected, settings.group_by)), "excluded": dict(excluded),
            "extra": extra_kinds(pairs["extra"].to_pylist())}


# --------------------------------------------------------------------------------------------------
# Writing one output shard (a Ray task)
# --------------------------------------------------------------------------------------------------


def image_extension(data: bytes) -> str:
    """The file extension of image bytes by their signature (the bytes are written as they are)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] in (b"BM",):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "jpg"


def resolve_images(pairs: pa.Table, storage_options: dict[str, Any], reader_of: Callable | None = None
                   ) -> tuple[list[bytes | None], list[tuple[str, str] | None]]:
    """The image bytes of every pair (embedded, or fetched from its input row), or why it cannot be had.

    The input row must be there and carry the pair's key and, where both are known, its sha256: an
    input shard rewritten since CapFilt read it must not lend its images to the old pairs.
    """
    from capfilt.data.pairs import fetch_rows, reader_for
    from capfilt.data.shards import ShardError

    reader_of = reader_of or (lambda shard: reader_for(shard, storage_options))
    images = pairs["image"].to_pylist()
    keys, sha256s = pairs["key"].to_pylist(), pairs["sha256"].to_pylist()
    shards, rows = pairs["shard"].to_pylist(), pairs["row"].to_pylist()
    problems: list[tuple[str, str] | None] = [None] * pairs.num_rows
    wanted: dict[str, set[int]] = {}
    for index, image in enumerate(images):
        if image is None:
            wanted.setdefault(shards[index], set()).add(rows[index])
    found: dict[str, dict[int, dict[str, Any]] | str] = {}
    for shard, shard_rows in wanted.items():
        try:
            found[shard] = fetch_rows(shard, sorted(shard_rows), reader_of(shard))
        except (ShardError, OSError, ValueError) as error:
            found[shard] = f"{type(error).__name__}: {error}"[:500]
    for index, image in enumerate(images):
        if image is not None:
            continue
        shard, row = shards[index], rows[index]
        got = found[shard]
        if isinstance(got, str):
            problems[index] = ("input_unreadable", got)
        elif row not in got:
            problems[index] = ("row_missing", f"{shard} has no row {row}")
        elif got[row]["key"] != keys[index]:
            problems[index] = ("key_mismatch", f"{shard} row {row} has key {got[row]['key']!r}, the pair {keys[index]!r}")
        elif sha256s[index] and got[row]["sha256"] and got[row]["sha256"] != sha256s[index]:
            problems[index] = ("sha256_mismatch", f"{shard} row {row}: sha256 {got[row]['sha256']}, recorded "
                                                  f"{sha256s[index]}")
        elif not got[row]["image"]:
            problems[index] = ("image_missing", f"{shard} row {row} has no image bytes")
        else:
            images[index] = got[row]["image"]
    return images, problems


def _extra(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def build_samples(pairs: pa.Table, groups: list[list[int]], images: list[bytes | None],
                  problems: list[tuple[str, str] | None], shard_id: int, key_width: int,
                  capfilt_output: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sample records (image bytes, img2dataset's and capfilt's fields, the input's extras) and error rows."""
    columns = pairs.to_pydict()
    samples, errors = [], []
    for group in groups:
        good = [i for i in group if problems[i] is None]
        for i in group:
            if problems[i] is not None:
                errors.append({"input_key": columns["key"][i], "input_shard": columns["shard"][i],
                               "input_row": columns["row"][i], "text": columns["text"][i],
                               "source": columns["source"][i], "reason": problems[i][0], "detail": problems[i][1]})
        if not good:
            continue
        # The best-scoring text is the caption (unscored human texts first: they are the reference).
        good.sort(key=lambda i: (columns["itm_prob"][i] is not None, -(columns["itm_prob"][i] or 0.0), i))
        first = good[0]
        record = {
            "key": f"{shard_id:05d}{len(samples):0{key_width}d}",
            "caption": columns["text"][first],
            "status": "success",
            "error_message": None,
            "sha256": columns["sha256"][first],
            "texts": [columns["text"][i] for i in good],
            "sources": [columns["source"][i] for i in good],
            "itm_probs": [columns["itm_prob"][i] for i in good],
            "itc_sims": [columns["itc_sim"][i] for i in good],
            "captioner_ids": [columns["captioner_id"][i] for i in good],
            "filter_id": columns["filter_id"][first],
            "sampling": columns["sampling"][first],
            "round": columns["round"][first],
            "input_key": columns["key"][first],
            "input_source_key": columns["source_key"][first],
            "input_shard": columns["shard"][first],
            "input_row": columns["row"][first],
            "capfilt_output": capfilt_output,
            "image": images[first],
            "extra": _extra(columns["extra"][first]),
        }
        samples.append(record)
    return samples, errors


def write_webdataset(samples: list[dict[str, Any]], tar_handle, extra_types: dict[str, str]) -> pa.Table:
    """The tar (img2dataset's member names) and its index table (no image bytes)."""
    with tarfile.open(fileobj=tar_handle, mode="w") as tar:
        for sample in samples:
            metadata = json_fields(sample, extra_types)
            members = {image_extension(sample["image"]): sample["image"], "txt": sample["caption"].encode("utf-8"),
                       "json": json.dumps(metadata, ensure_ascii=False, default=str).encode("utf-8")}
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{sample['key']}.{extension}")
                info.size = len(data)
                info.mtime = 0  # the same samples give the same bytes
                tar.addfile(info, io.BytesIO(data))
    return sample_table(samples, extra_types, image_column=None)


def sample_table(samples: list[dict[str, Any]], extra_types: dict[str, str], image_column: str | None) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    types = {"texts": pa.list_(pa.string()), "sources": pa.list_(pa.string()), "itm_probs": pa.list_(pa.float64()),
             "itc_sims": pa.list_(pa.float64()), "captioner_ids": pa.list_(pa.string()), "round": pa.int64(),
             "input_row": pa.int64()}
    for name in SAMPLE_COLUMNS:
        columns[name] = pa.array([sample[name] for sample in samples], types.get(name, pa.string()))
    if image_column is not None:
        columns[image_column] = pa.array([sample["image"] for sample in samples], pa.binary())
    for name, kind in extra_types.items():
        if name in columns:
            continue  # capfilt's own field of that name wins (as in the .json)
        values = [sample["extra"].get(name) for sample in samples]
        if kind == "str":
            values = [value if value is None or isinstance(value, str) else json.dumps(value) for value in values]
        columns[name] = pa.array(values, _arrow_type(kind))
    return pa.table(columns)


def export_shard(spec: dict[str, Any], settings_json: str, dest: str, capfilt_output: str,
                 capfilt_storage_options: dict[str, Any], extra_types: dict[str, str]) -> dict[str, Any]:
    """Write output shard ``spec["id"]`` (samples ``start:stop`` of one pairs file); a Ray task.

    Returns the shard's counts, its files (relative to ``dest``) and its error rows.
    """
    settings = ExportConfig.model_validate_json(settings_json)
    types = extra_types
    pairs = read_pairs_file(spec["file"], capfilt_storage_options, PAIR_COLUMNS)
    selected, _ = select(pairs, settings)
    groups = samples_of(selected, settings.group_by)[spec["start"]:spec["stop"]]
    rows = [index for group in groups for index in group]
    part = selected.take(pa.array(rows, pa.int64()))
    renumbered, at = [], 0
    for group in groups:
        renumbered.append(list(range(at, at + len(group))))
        at += len(group)
    images, problems = resolve_images(part, settings.input_storage_options)
    samples, errors = build_samples(part, renumbered, images, problems, spec["id"], spec["key_width"], capfilt_output)
    out = CommittedOutput(dest, settings.output_storage_options)
    name = f"{spec['id']:05d}"
    if settings.format == "webdataset":
        with out.open_atomic(f"{name}.tar") as handle:
            index = write_webdataset(samples, handle, types)
        files = [f"{name}.tar", f"{name}.parquet"]
    else:
        index = sample_table(samples, types, image_column=settings.image_column)
        files = [f"{name}.parquet"]
    out.write_table(f"{name}.parquet", index)
    for error in errors:
        error["pairs_file"] = spec["file"]
    return {"shard": name, "files": files, "errors": errors,
            "counts": {"pairs_file": spec["file"], "samples": len(samples),
                       "texts": sum(len(sample["texts"]) for sample in samples),
                       "texts_by_source": dict(Counter(source for sample in samples for source in sample["sources"])),
                       "errors": len(errors), "errors_by_reason": dict(Counter(error["reason"] for error in errors))}}


def _arrow_type(kind: str) -> pa.DataType:
    return {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}.get(kind, pa.string())


def extra_kinds(texts: list[str | None]) -> dict[str, Any]:
    """The extra input columns of a pairs file (its ``extra`` JSON texts): the kinds of each one's values
    (int, float, bool, str, json) and in how many of the file's rows it has a value."""
    kinds: dict[str, set[str]] = {}
    present: Counter = Counter()
    for text in texts:
        for name, value in _extra(text).items():
            kinds.setdefault(name, set())
            if value is None:
                continue
            present[name] += 1
            kinds[name].add("bool" if isinstance(value, bool) else "int" if isinstance(value, int)
                            else "float" if isinstance(value, float) else "str" if isinstance(value, str) else "json")
    return {"rows": len(texts), "columns": {name: {"kinds": sorted(found), "present": present[name]}
                                            for name, found in kinds.items()}}


def merge_kinds(found: list[dict[str, Any]]) -> dict[str, str]:
    """One type per extra column over the whole export, so that every shard has the same schema and every
    sample's ``.json`` the same fields with the same types (JSON readers that infer a schema from the
    first samples, as Hugging Face ``datasets`` does, would otherwise meet a field they typed as null)."""
    rows = sum(part["rows"] for part in found)
    kinds: dict[str, set[str]] = {}
    present: Counter = Counter()
    for part in found:
        for name, column in part["columns"].items():
            kinds.setdefault(name, set()).update(column["kinds"])
            present[name] += column["present"]
    result = {}
    for name in sorted(kinds):
        found_kinds, gaps = kinds[name], present[name] < rows
        if found_kinds == {"int"} and not gaps:
            result[name] = "int"
        elif found_kinds and found_kinds <= {"int", "float"}:
            result[name] = "float"  # a missing number is NaN in the .json, null in Parquet
        elif found_kinds == {"bool"} and not gaps:
            result[name] = "bool"
        else:
            result[name] = "str"  # text (missing: ""), or JSON text for lists, objects and mixed kinds
    return result


def json_fields(sample: dict[str, Any], extra_types: dict[str, str]) -> dict[str, Any]:
    """A sample's ``.json``: the input's extra columns (all of the export's, typed as ``extra_types``), then
    capfilt's fields. Every sample has every field with one type: a missing number is NaN, a missing
    text "" (the Parquet index and the Parquet export keep real nulls)."""
    fields: dict[str, Any] = {}
    for name, kind in extra_types.items():
        fields[name] = _typed(sample["extra"].get(name), kind)
    for name in SAMPLE_COLUMNS:
        value = sample[name]
        if name in ("itm_probs", "itc_sims"):
            value = [float("nan") if item is None else item for item in value]
        elif name in ("sources", "captioner_ids", "texts"):
            value = ["" if item is None else item for item in value]
        elif value is None and name != "error_message":  # error_message: null, as img2dataset's successes have
            value = ""
        fields[name] = value
    return fields


def _typed(value: Any, kind: str) -> Any:
    if kind in ("int", "bool"):
        return value
    if kind == "float":
        return float("nan") if value is None else float(value)
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def plan_shards(counts: list[dict[str, Any]], samples_per_shard: int) -> list[dict[str, Any]]:
    """Output shards in pairs-file order, each within one file: ``{id, file, start, stop, key_width}``."""
    specs = []
    for count in counts:
        for start in range(0, count["samples"], samples_per_shard):
            specs.append({"id": len(specs), "file": count["file"], "start": start,
                          "stop": min(count["samples"], start + samples_per_shard)})
    key_width = len(str(max(samples_per_shard - 1, 1)))
    for spec in specs:
        spec["key_width"] = key_width
    return specs


def run_export(capfilt_output: str, dest: str, settings: ExportConfig,
               capfilt_storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export (or resume exporting) ``capfilt_output`` into ``dest``; returns the export's manifest."""
    import ray

    started = time.time()
    source = CommittedOutput(capfilt_output, capfilt_storage_options)
    if not source.is_finished():
        raise ExportError(f"{capfilt_output}: not a finished CapFilt output (no _SUCCESS); run or resume CapFilt first")
    capfilt_manifest = source.manifest()
    files = source.data_files("pairs")
    options = capfilt_storage_options or {}
    if not ray.is_initialized():
        ray.init()
    counts = ray.get([ray.remote(count_file).options(num_cpus=1).remote(path, settings.model_dump_json(), options)
                      for path in files])
    kinds = merge_kinds([count["extra"] for count in counts])
    specs = plan_shards(counts, settings.samples_per_shard)
    out = CommittedOutput(dest, settings.output_storage_options)
    out.claim({"export": identity(settings), "capfilt_output": capfilt_output,
               "capfilt_config_hash": capfilt_manifest["config_hash"], "pairs_files": files, "extra_columns": kinds})
    next_id = out.recover_files([ERRORS_DIR], suffixes=(".tar", ".parquet"))
    done = out.done_shards()
    todo = [spec for spec in specs if f"{spec['id']:05d}" not in done]
    if todo:
        log(f"export: {len(todo)} of {len(specs)} shards to write into {dest}")
    in_flight_limit = settings.tasks_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(export_shard).options(num_cpus=1)
    pending: dict[Any, dict[str, Any]] = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < in_flight_limit:
            spec = queue.pop(0)
            ref = task.remote(spec, settings.model_dump_json(), dest, capfilt_output, options, kinds)
            pending[ref] = spec
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            result = ray.get(ref)
            commit_files = list(result["files"])
            if result["errors"]:
                relative = f"{ERRORS_DIR}/part-{next_id:05d}-000.parquet"
                out.write_table(relative, pa.Table.from_pylist(result["errors"], schema=ERRORS_SCHEMA))
                commit_files.append(relative)
            out.commit(Commit(next_id, {result["shard"]: result["counts"]}, commit_files))
            next_id += 1
    manifest = export_manifest(out, counts, specs, capfilt_manifest, settings, capfilt_output, started)
    out.finish(manifest)
    errors = manifest["totals"]["errors"]
    log(f"export: {manifest['totals']['samples']} samples ({manifest['totals']['texts']} texts) in {len(specs)} shards"
        + (f"; {errors} pairs could not be resolved ({manifest['totals']['errors_by_reason']}), listed in "
           f"{dest}/{ERRORS_DIR}" if errors else ""))
    return manifest


def export_manifest(out: CommittedOutput, counts: list[dict[str, Any]], specs: list[dict[str, Any]],
                    capfilt_manifest: dict[str, Any], settings: ExportConfig, capfilt_output: str,
                    started: float) -> dict[str, Any]:
    shards: dict[str, dict[str, Any]] = {}
    for commit in out.commits():
        shards.update(commit.shards)
    totals: dict[str, Any] = {"pairs": sum(c["pairs"] for c in counts), "selected": sum(c["selected"] for c in counts),
                              "excluded": {}, "samples": 0, "texts": 0, "errors": 0, "errors_by_reason": {},
                              "texts_by_source": {}}
    for count in counts:
        for reason, number in count["excluded"].items():
            totals["excluded"][reason] = totals["excluded"].get(reason, 0) + number
    for shard in shards.values():
        totals["samples"] += shard["samples"]
        totals["texts"] += shard["texts"]
        totals["errors"] += shard["errors"]
        for name in ("errors_by_reason", "texts_by_source"):
            for key, number in shard[name].items():
                totals[name][key] = totals[name].get(key, 0) + number
    kept = capfilt_manifest["totals"].get("texts_kept", 0)
    reconciled = (totals["pairs"] == kept and totals["pairs"] == totals["selected"] + sum(totals["excluded"].values())
                  and totals["selected"] == totals["texts"] + totals["errors"])
    if not reconciled:
        raise ExportError(f"export counts do not reconcile: {totals} against CapFilt's texts_kept {kept}")
    return {"capfilt_output": capfilt_output, "capfilt_config_hash": capfilt_manifest["config_hash"],
            "settings": settings.model_dump(mode="json", exclude={"input_storage_options", "output_storage_options"}),
            "shards": shards, "planned_shards": len(specs), "totals": totals, "capfilt_texts_kept": kept,
            "finished_at": time.time(), "seconds_this_run": time.time() - started}
