"""capfilt against Data-Juicer, side by side: same input, same exported models, one invocation.

Data-Juicer (``py-data-juicer``, pinned in ``bench/_peer_env.py``) runs in its own virtual environment,
``.bench-peers-venv/`` at the repo root (git-ignored), created on first use and reused after; capfilt's
``.venv`` is untouched. The script launches ``bench/_peer_driver.py`` there as a subprocess, which runs
Data-Juicer's ops through its public API on the same pairs and writes its ITM probabilities, keep
decisions and captions to a temp file.

Per data set (the Flickr8k photos under ../shared/data/flickr8k-1k, read in place, and the generated
world's images):

- ``itm_filter``: Data-Juicer's ``image_text_matching_filter`` (a transformers BLIP ITM model, one pair
  per forward) against capfilt doing the same work: its shard reader (``ReadAndDecode``) and its actor
  (``CapFiltWorker``) with the captioner list emptied, so it scores the web caption only, ITM only,
  batches of ``--batch-size``. Same pairs, same threshold: images/s, their ratio, and agreement
  (probabilities, keep decisions), with a step-by-step account of where the probabilities part.
- ``capfilt_k{K}``: a whole CapFilt pass, K captions per image then ITM over web + K texts: capfilt's
  stage (``run_capfilt`` on a local Ray cluster, as bench/throughput.py runs it, ITM only) against
  Data-Juicer's ``image_captioning_mapper`` (``caption_num=K``, all kept) followed by its ITM filter over
  every sample the mapper returns. capfilt is set to do Data-Juicer's work here: 128 new tokens per
  caption (the mapper's fixed ``max_new_tokens``), no token or word truncation of the texts it scores.

Every model runs on one intra-op thread on both sides (a capfilt CPU actor's setting). Models are
random-weight exports (``--size``, text positions raised to 512, BLIP-base's number, because the
mapper always asks for 128 new tokens) unless ``--filter``/``--captioner`` name exported ones.

    python bench/peers.py                 # makes .bench-peers-venv on first use (1.5-3.5 min), then ~4 min
    python bench/peers.py --skip-peer     # capfilt's side and the JSON shape only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench import _common as common
    from bench import _peer_env as peer_env
except ImportError:  # run as a script: bench/ is on sys.path
    import _common as common
    import _peer_env as peer_env

DRIVER = Path(__file__).resolve().parent / "_peer_driver.py"
DJ_MAX_NEW_TOKENS = 128  # image_captioning_mapper: model.generate(**inputs, max_new_tokens=128, do_sample=True)
TEXT_POSITIONS = 512  # BLIP-base's max_position_embeddings; also Data-Juicer's ITM truncation length


def log(*args) -> None:
    print("[peers]", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Input: img2dataset shards for capfilt, image files for Data-Juicer, the same bytes
# --------------------------------------------------------------------------------------------------


def shard_rows(shards: list[str]) -> list[dict[str, Any]]:
    """Every row of the shards: shard, key, caption, status, image bytes."""
    import pyarrow.parquet as pq

    rows = []
    for shard in shards:
        for row in pq.read_table(shard, columns=["key", "caption", "status", "jpg"]).to_pylist():
            rows.append({"shard": shard, **row})
    return rows


def peer_samples(rows: list[dict[str, Any]], image_paths: dict[str, str]) -> list[dict[str, Any]]:
    """Data-Juicer's input: the rows capfilt can decode (the others it rejects before any model runs)."""
    from capfilt.data.decode import DecodeError, decode_image

    samples = []
    for row in rows:
        if row["status"] != "success" or not row["caption"]:
            continue
        try:
            decode_image(row["jpg"])
        except DecodeError:
            continue
        samples.append({"key": row["key"], "image": image_paths[row["key"]], "text": row["caption"]})
    return samples


def prepare_datasets(args, workdir: Path, notes: list[str]) -> dict[str, dict[str, Any]]:
    datasets: dict[str, dict[str, Any]] = {}
    pairs = common.flickr_pairs(Path(args.flickr), limit=args.flickr_images) if args.flickr_images else None
    if pairs:
        shards = common.write_photo_shards(pairs, workdir / "flickr", args.rows_per_shard)
        rows = shard_rows(shards)
        # write_photo_shards keeps the photos' order: Data-Juicer reads each photo in place.
        paths = {row["key"]: str(photo) for row, (photo, _) in zip(rows, pairs)}
        datasets["flickr8k"] = {"shards": shards, "rows": rows, "samples": peer_samples(rows, paths)}
    elif args.flickr_images:
        notes.append(f"flickr8k skipped: no photos under {args.flickr}/images (the shared data set is absent)")
    if args.world_images:
        shards = common.write_world_shards(workdir / "world", args.world_images, args.world_image_size,
                                           args.rows_per_shard)
        rows = shard_rows(shards)
        images = workdir / "world-images"  # the same bytes as the shards, as files for Data-Juicer
        images.mkdir(parents=True, exist_ok=True)
        paths = {}
        for row in rows:
            if row["jpg"]:
                path = images / f"{row['key']}.jpg"
                path.write_bytes(row["jpg"])
                paths[row["key"]] = str(path)
        datasets["world"] = {"shards": shards, "rows": rows, "samples": peer_samples(rows, paths)}
    return datasets


# --------------------------------------------------------------------------------------------------
# capfilt's side
# --------------------------------------------------------------------------------------------------


def capfilt_config(shards: list[str], models: dict[str, str], **overrides):
    from capfilt.config import CapFiltConfig, ReaderConfig

    settings = dict(web=ReaderConfig(paths=shards), itc_similarity=False, captioners=[{"path": models["captioner"]}],
                    filters=[{"path": models["filter"]}], rows_per_file=1, actors=1, cpus_per_actor=1.0,
                    reserve_cpus_for_reading=1.0)
    settings.update(overrides)
    return CapFiltConfig(**settings)


def capfilt_itm_only(shards: list[str], models: dict[str, str], batch_size: int, repeats: int = 1) -> dict[str, Any]:
    """capfilt's reader and actor doing the ITM filter's work alone: read, decode, resize, normalise,
    score each web caption (ITM only), decide. One process, one thread, no Ray (the stage always captions)."""
    import torch

    from capfilt.models.export import read_image_processor
    from capfilt.stages.capfilt import CapFiltWorker, ReadAndDecode, ShardTask
    from capfilt.stages.capfilt.schemas import MARKER_ROW, WEB

    config = capfilt_config(shards, models, batch_size=batch_size)
    torch.set_num_threads(1)
    started = time.perf_counter()
    worker = CapFiltWorker(config.model_dump(mode="json"), [r.model_dump() for r in config.captioners],
                           [r.model_dump() for r in config.filters], threads=1)
    worker.captioners = []  # its filters alone: the web caption is the only text each image has
    load_s = time.perf_counter() - started
    image_size = read_image_processor(models["filter"])["image_size"]
    reader = ReadAndDecode(image_size, config.max_pixels, batch_size, embed_images=False)
    reader_config = config.web.model_dump(mode="json")
    load_before = common.load_average()
    rounds = []
    for _ in range(repeats):
        probs: dict[str, float] = {}
        rejected = 0
        started = time.perf_counter()
        for shard in shards:
            for table in reader.read_shard(ShardTask(shard, WEB, reader_config)):
                rows = table.filter(table.column("row").to_numpy(zero_copy_only=False) != MARKER_ROW)
                if rows.num_rows == 0:
                    continue
                result = worker(rows)
                for key, outcome, row_probs in zip(result.column("key").to_pylist(),
                                                   result.column("outcome").to_pylist(),
                                                   result.column("itm_probs").to_pylist()):
                    if outcome == "rejected" or not row_probs:
                        rejected += 1
                        continue
                    probs[key] = row_probs[0]
        rounds.append((time.perf_counter() - started, probs, rejected))
    seconds, probs, rejected = min(rounds, key=lambda r: r[0])
    images = len(probs)
    return {"images": images, "rows_rejected": rejected, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 3), "rounds_images_per_s": [round(images / r[0], 3) for r in rounds],
            "load_s": round(load_s, 3), "batch_size": batch_size,
            "load_average_before_after": [load_before, common.load_average()], "probs": probs}


def text_positions(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config["text_config"]["max_position_embeddings"])


def capfilt_stage(shards: list[str], models: dict[str, str], k: int, threshold: float, args, output: Path,
                  prompt_tokens: int) -> dict[str, Any]:
    """run_capfilt as bench/throughput.py runs it, set to Data-Juicer's amount of work (see the module doc):
    128 new tokens and texts truncated at the model's positions, as far as the models' positions allow."""
    import pyarrow.parquet as pq

    positions = min(text_positions(models["captioner"]), text_positions(models["filter"]))
    config = capfilt_config(
        shards, models, batch_size=args.caption_batch_size, threshold=threshold, max_text_length=positions,
        max_caption_words=10_000,
        sampling={"num_captions": k, "max_length": min(prompt_tokens + DJ_MAX_NEW_TOKENS, positions)},
    )
    load_before = common.load_average()
    stage = common.run_stage(config, str(output))
    stage["load_average_before_after"] = [load_before, common.load_average()]
    stage["settings"] = {"num_captions": k, "max_length": config.sampling.max_length, "min_length": config.sampling.min_length,
                         "max_text_length": config.max_text_length, "max_caption_words": config.max_caption_words,
                         "itc_similarity": False}
    pairs = [pq.read_table(path) for path in sorted((output / "pairs").glob("**/*.parquet"))]
    texts: dict[str, list[dict[str, Any]]] = {}
    for table in pairs:
        names = table.column_names
        columns = {name: table.column(name).to_pylist() for name in ("key", "text", "source", "itm_prob") if name in names}
        for i, key in enumerate(columns.get("key", [])):
            texts.setdefault(key, []).append({name: columns[name][i] for name in columns if name != "key"})
    stage["kept_texts"] = sum(len(v) for v in texts.values())
    stage["_kept"] = texts
    return stage


# --------------------------------------------------------------------------------------------------
# Where the probabilities part: capfilt's inputs changed one at a time into Data-Juicer's
# --------------------------------------------------------------------------------------------------


def diagnose(rows: list[dict[str, Any]], samples: list[dict[str, Any]], models: dict[str, str], capfilt_probs: dict[str, float],
             limit: int, max_text_length: int) -> dict[str, Any]:
    """transformers' BlipForImageTextRetrieval (the exported filter) on ``limit`` pairs, changing capfilt's
    inputs into Data-Juicer's one step at a time; each step's probabilities against the previous step's.

    Steps: ``enc_first`` (capfilt's pixels and token ids, [ENC] first: capfilt's own inputs through
    transformers' forward), ``cls_first`` ([CLS] first, as Data-Juicer's processor gives them),
    ``raw_text`` (no pre_caption), ``dj_truncation`` (max_length = max_position_embeddings instead of
    capfilt's 35), ``dj_pixels`` (PIL decode + BlipProcessor instead of capfilt's decode, resize and
    normalisation: this last step is Data-Juicer's computation exactly).
    """
    import io

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    from capfilt.data.decode import decode_image
    from capfilt.data.text import load_tokenizer, pre_caption
    from capfilt.models.export import read_image_processor
    from capfilt.models.tokens import itm_ids
    from capfilt.stages.capfilt.read import resize_uint8

    torch.set_num_threads(1)
    model = BlipForImageTextRetrieval.from_pretrained(models["filter"]).eval()
    processor = AutoProcessor.from_pretrained(models["filter"])
    tokenizer = load_tokenizer(models["filter"])
    pre = read_image_processor(models["filter"])
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    positions = model.config.text_config.max_position_embeddings
    by_key = {row["key"]: row for row in rows}
    chosen = [s for s in samples if s["key"] in capfilt_probs][:limit]
    steps = ("enc_first", "cls_first", "raw_text", "dj_truncation", "dj_pixels")
    probs: dict[str, list[float]] = {step: [] for step in steps}
    changed = {step: 0 for step in steps}

    def itm(input_ids, attention_mask, pixel_values) -> float:
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_itm_head=True)
        return float(out.itm_score.float().softmax(dim=-1)[0, 1])

    with torch.inference_mode():
        for sample in chosen:
            raw = by_key[sample["key"]]
            pixels = resize_uint8(decode_image(raw["jpg"]), pre["image_size"])
            ours = (torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() - mean * 255) / (std * 255)
            clean = pre_caption(sample["text"])
            short = tokenizer(clean, truncation=True, max_length=max_text_length, return_tensors="pt")
            raw_short = tokenizer(sample["text"], truncation=True, max_length=max_text_length, return_tensors="pt")
            raw_long = tokenizer(sample["text"], truncation=True, max_length=positions, return_tensors="pt")
            image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")  # data_juicer.utils.mm_utils.load_image
            theirs = processor(text=sample["text"], images=image, return_tensors="pt", truncation=True,
                               max_length=positions, padding=True)
            probs["enc_first"].append(itm(itm_ids(short.input_ids, tokenizer), short.attention_mask, ours))
            probs["cls_first"].append(itm(short.input_ids, short.attention_mask, ours))
            probs["raw_text"].append(itm(raw_short.input_ids, raw_short.attention_mask, ours))
            probs["dj_truncation"].append(itm(raw_long.input_ids, raw_long.attention_mask, ours))
            probs["dj_pixels"].append(itm(theirs.input_ids, theirs.attention_mask, theirs.pixel_values))
            changed["enc_first"] += 1
            changed["cls_first"] += 1
            changed["raw_text"] += int(short.input_ids.tolist() != raw_short.input_ids.tolist())
            changed["dj_truncation"] += int(raw_short.input_ids.tolist() != raw_long.input_ids.tolist())
            changed["dj_pixels"] += int(not torch.equal(theirs.input_ids, raw_long.input_ids)
                                        or not torch.allclose(theirs.pixel_values, ours, atol=1e-6))
    keys = [s["key"] for s in chosen]
    report: dict[str, Any] = {"pairs": len(chosen), "max_position_embeddings": positions,
                              "capfilt_max_text_length": max_text_length, "steps": {}}
    previous = [capfilt_probs[key] for key in keys]
    for step in steps:
        report["steps"][step] = {"pairs_whose_input_changes": changed[step], **abs_diff(previous, probs[step])}
        previous = probs[step]
    report["_replica"] = dict(zip(keys, probs["dj_pixels"]))
    return report


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


def abs_diff(a: list[float], b: list[float]) -> dict[str, float | None]:
    diffs = [abs(x - y) for x, y in zip(a, b)]
    if not diffs:
        return {"max_abs_diff": None, "mean_abs_diff": None}
    return {"max_abs_diff": float(f"{max(diffs):.3g}"), "mean_abs_diff": float(f"{statistics.fmean(diffs):.3g}")}


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": round(min(values), 6), "median": round(statistics.median(values), 6), "max": round(max(values), 6),
            "stdev": round(statistics.pstdev(values), 6)}


def agreement(ours: dict[str, float], theirs: dict[str, float], their_kept: set[str] | None, threshold: float) -> dict[str, Any]:
    """Probabilities and keep decisions on the pairs both scored. capfilt keeps a text iff prob >= threshold;
    Data-Juicer iff min_score <= prob <= max_score (1.0): the same rule. ``their_kept``: its own filter's output."""
    from capfilt.stages.capfilt.worker import decide

    keys = sorted(set(ours) & set(theirs))
    a, b = [ours[k] for k in keys], [theirs[k] for k in keys]
    ours_keep = dict(zip(keys, (d == "kept" for d in decide(a, threshold, "threshold", 1))))
    theirs_keep = {k: (k in their_kept) if their_kept is not None else threshold <= theirs[k] <= 1.0 for k in keys}
    same = sum(ours_keep[k] == theirs_keep[k] for k in keys)
    diffs = abs_diff(a, b)
    margin = diffs["max_abs_diff"] or 0.0
    return {
        "pairs": len(keys), **diffs,
        "threshold": threshold,
        "keep_identical_fraction": round(same / len(keys), 4) if keys else None,
        "kept_capfilt": sum(ours_keep.values()), "kept_data_juicer": sum(theirs_keep.values()),
        "pairs_within_max_diff_of_threshold": sum(abs(x - threshold) <= margin for x in a),
        "capfilt_probs": summary(a), "data_juicer_probs": summary(b),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run_peer(job: dict[str, Any], workdir: Path, python: Path, timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    job_file, out_file = workdir / "peer-job.json", workdir / "peer-out.json"
    job_file.write_text(json.dumps(job))
    started = time.time()
    try:
        done = subprocess.run([str(python), str(DRIVER), str(job_file), str(out_file)], capture_output=True, text=True,
                              timeout=timeout, cwd=workdir)
        error = None if done.returncode == 0 else f"driver exited {done.returncode}: {done.stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        error = f"driver timed out after {timeout} s"
    log(f"Data-Juicer driver: {time.time() - started:.1f} s")
    result = json.loads(out_file.read_text()) if out_file.exists() else None
    if result is not None:
        result["driver_wall_s"] = round(time.time() - started, 1)
    return result, error


def caption_shards(args, k: int) -> int:
    """``--caption-shards`` at the largest K, proportionally more at smaller K: Data-Juicer's time per image
    grows with K, capfilt's steady-state rate needs commits a second or more apart."""
    return -(-args.caption_shards * max(args.ks) // k)


def choose_threshold(setting: str, probs: list[float]) -> float:
    if setting == "median":
        return round(statistics.median(probs), 6) if probs else 0.5
    return float(setting)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(common.MODEL_SIZES), help="model size (random weights)")
    parser.add_argument("--filter", default=None, help="an exported filter to use instead of a random one")
    parser.add_argument("--captioner", default=None, help="an exported captioner to use instead of a random one")
    parser.add_argument("--flickr", default=str(common.FLICKR), help="flickr8k-1k folder (images/*.jpg, captions.csv)")
    parser.add_argument("--flickr-images", type=int, default=500, help="photos in the ITM comparison")
    parser.add_argument("--world-images", type=int, default=500, help="generated rows in the ITM comparison")
    parser.add_argument("--world-image-size", type=int, default=96)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--caption-shards", type=int, default=3,
                        help="shards (the first ones) in the captioning comparison at the largest K, per data set; "
                             "K=k gets max(K)/k times as many")
    parser.add_argument("--ks", default="1,4", help="captions per image in the captioning comparison ('' for none)")
    parser.add_argument("--batch-size", type=int, default=32, help="capfilt images per actor call, ITM comparison")
    parser.add_argument("--caption-batch-size", type=int, default=16,
                        help="capfilt images per actor call in the captioning comparison: one shard per commit, so "
                             "three shards give a steady-state rate (on one CPU thread the batch size hardly matters)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of each ITM-only run (both tools; best kept)")
    parser.add_argument("--threshold", default="median",
                        help="ITM keep threshold for both tools; 'median': capfilt's median web-pair probability "
                             "per data set (random weights put every probability near one value)")
    parser.add_argument("--diagnose-pairs", type=int, default=200, help="pairs per data set in the step-by-step account")
    parser.add_argument("--peer-venv", default=str(peer_env.PEER_VENV))
    parser.add_argument("--peer-timeout", type=float, default=1800)
    parser.add_argument("--skip-peer", action="store_true", help="capfilt's side only (no peer environment)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--workdir", default=None, help="keep shards, models and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in str(args.ks).split(",") if k]
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.time()
    notes: list[str] = []
    load_start = common.load_average()
    peer: dict[str, Any] = {"tool": "data-juicer", "package": peer_env.DATA_JUICER, "venv": args.peer_venv}
    if args.skip_peer:
        peer.update(ok=False, skipped=True, error=None)
        notes.append("--skip-peer: Data-Juicer not run; its fields are null")
    else:
        log(f"peer environment {args.peer_venv}")
        peer.update(peer_env.ensure_peer_env(Path(args.peer_venv), log=log))
        if not peer.get("ok"):
            notes.append(f"Data-Juicer could not be installed, so only capfilt's side ran: {peer.get('error')}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="capfilt-peers-") as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        datasets = prepare_datasets(args, workdir, notes)
        if args.filter or args.captioner:
            if not (args.filter and args.captioner):
                raise SystemExit("--filter and --captioner go together")
            models = {"filter": args.filter, "captioner": args.captioner}
        else:
            tokenizer = common.bench_tokenizer(workdir / "tokenizer", [r["caption"] for d in datasets.values()
                                                                       for r in d["rows"] if r["caption"]])
            models = common.build_models(args.size, tokenizer, workdir / "models",
                                         text_overrides={"max_position_embeddings": TEXT_POSITIONS})
        from capfilt.data.text import load_tokenizer

        tokenizer = load_tokenizer(models["captioner"])
        prompt = capfilt_config([], models).sampling.prompt
        prompt_tokens = len(tokenizer(prompt).input_ids) - 1  # [CLS] -> [DEC], [SEP] dropped: as both tools do

        # 1. capfilt, ITM only, every pair (no Ray)
        thresholds = {}
        for name, data in datasets.items():
            log(f"{name}: capfilt ITM only over {len(data['rows'])} rows")
            data["capfilt_itm"] = capfilt_itm_only(data["shards"], models, args.batch_size, args.repeats)
            thresholds[name] = choose_threshold(args.threshold, list(data["capfilt_itm"]["probs"].values()))

        # 2. capfilt's stage, K captions + ITM (Ray), on the first shards
        if args.ks and datasets:
            started_ray = common.start_ray(args.num_cpus)
            for name, data in datasets.items():
                for k in args.ks:
                    shards = data["shards"][: caption_shards(args, k)]
                    data[f"caption_keys_k{k}"] = {r["key"] for r in data["rows"] if r["shard"] in shards}
                    log(f"{name}: capfilt stage K={k} over {len(shards)} shards")
                    data[f"capfilt_k{k}"] = capfilt_stage(shards, models, k, thresholds[name], args,
                                                          workdir / f"out-{name}-k{k}", prompt_tokens)
            if started_ray:
                import ray

                ray.shutdown()

        # 3. Data-Juicer, in its own environment (after Ray is down: nothing else of ours runs meanwhile)
        peer_out = None
        if peer.get("ok"):
            job = {"threads": 1, "filter": models["filter"], "captioner": models["captioner"], "prompt": prompt,
                   "tasks": []}
            for name, data in datasets.items():
                job["tasks"].append({"name": f"{name}/itm", "kind": "itm", "threshold": thresholds[name],
                                     "repeats": args.repeats, "samples": data["samples"]})
                for k in args.ks:
                    job["tasks"].append({"name": f"{name}/k{k}", "kind": "caption_filter", "k": k,
                                         "threshold": thresholds[name],
                                         "samples": [s for s in data["samples"] if s["key"] in data[f"caption_keys_k{k}"]]})
            log(f"Data-Juicer: {len(job['tasks'])} tasks in {args.peer_venv}")
            load_before = common.load_average()
            peer_out, error = run_peer(job, workdir, peer_env.peer_python(Path(args.peer_venv)), args.peer_timeout)
            peer["load_average_before_after"] = [load_before, common.load_average()]
            if error:
                peer["error"] = error
                notes.append(f"Data-Juicer's driver failed: {error[:300]}")
            if peer_out:
                peer["versions"] = peer_out["versions"]
                peer["source"] = peer_out.get("source")
                peer["driver_wall_s"] = peer_out.get("driver_wall_s")
        peer_tasks = (peer_out or {}).get("tasks", {})

        # 4. Assemble, and account for the differences
        for name, data in datasets.items():
            log(f"{name}: comparing")
            ours = data["capfilt_itm"]
            theirs = peer_tasks.get(f"{name}/itm")
            entry: dict[str, Any] = {"rows": len(data["rows"]), "shards": len(data["shards"]),
                                     "pairs": len(data["samples"]), "threshold": thresholds[name]}
            itm: dict[str, Any] = {"capfilt": {k: v for k, v in ours.items() if k != "probs"}}
            if theirs and "error" not in theirs:
                itm["data_juicer"] = {k: v for k, v in theirs.items() if k not in ("probs", "kept")}
                itm["capfilt_over_data_juicer"] = ratio(ours["images_per_s"], theirs["images_per_s"])
                itm["agreement"] = agreement(ours["probs"], theirs["probs"], set(theirs["kept"]), thresholds[name])
                itm["agreement_at_0.5"] = agreement(ours["probs"], theirs["probs"], None, 0.5)
            else:
                itm["data_juicer"] = theirs  # None when skipped, {"error": ...} when it failed
                itm["capfilt_over_data_juicer"] = None
                itm["agreement"] = None
            if args.diagnose_pairs:
                max_text_length = capfilt_config([], models).max_text_length
                account = diagnose(data["rows"], data["samples"], models, ours["probs"], args.diagnose_pairs, max_text_length)
                replica = account.pop("_replica")
                if theirs and "error" not in theirs:
                    same = agreement(replica, theirs["probs"], set(theirs["kept"]) & set(replica), thresholds[name])
                    account["dj_pixels_vs_data_juicer"] = {
                        name_: same[name_] for name_ in ("pairs", "max_abs_diff", "mean_abs_diff", "keep_identical_fraction")}
                itm["where_they_differ"] = account
            entry["itm_filter"] = itm

            for k in args.ks:
                stage = data.get(f"capfilt_k{k}")
                if stage is None:
                    continue
                kept = stage.pop("_kept")
                peer_k = peer_tasks.get(f"{name}/k{k}")
                images = len(data[f"caption_keys_k{k}"])
                capfilt_rate = stage["images_per_s_steady"] or stage["images_per_s_total"]
                ours_synthetic = [t["text"] for texts in kept.values() for t in texts if t.get("source") == "synthetic"]
                block: dict[str, Any] = {"images": images, "capfilt": stage}
                block["capfilt"]["kept_synthetic_words_mean"] = (
                    round(statistics.fmean(map(words, ours_synthetic)), 1) if ours_synthetic else None)
                if peer_k and "error" not in peer_k:
                    texts = peer_k.pop("texts")
                    kept_counts = peer_k.pop("kept_per_key")
                    synthetic = [t["text"] for entries in texts.values() for t in entries[1:]]
                    peer_k["kept_texts"] = sum(kept_counts.values())
                    peer_k["synthetic_words_mean"] = round(statistics.fmean(map(words, synthetic)), 1) if synthetic else None
                    peer_k["synthetic_tokens_mean"] = (
                        round(statistics.fmean(len(tokenizer(t).input_ids) - 2 for t in synthetic), 1) if synthetic else None)
                    web_ours = {key: ours["probs"][key] for key in texts if key in ours["probs"]}
                    web_theirs = {key: entries[0]["prob"] for key, entries in texts.items()}
                    block["data_juicer"] = peer_k
                    block["capfilt_steady_over_data_juicer"] = ratio(capfilt_rate, peer_k["images_per_s"])
                    block["capfilt_total_over_data_juicer"] = ratio(stage["images_per_s_total"], peer_k["images_per_s"])
                    block["web_text_agreement"] = agreement(web_ours, web_theirs, None, thresholds[name])
                else:
                    block["data_juicer"] = peer_k
                    block["capfilt_steady_over_data_juicer"] = None
                    block["capfilt_total_over_data_juicer"] = None
                entry[f"capfilt_k{k}"] = block
            results[name] = entry

    load_end = common.load_average()
    warning = common.busy_warning(max(load_start, load_end), args.num_cpus)
    if warning:
        notes.append(warning)
    speedups = [e["itm_filter"]["capfilt_over_data_juicer"] for e in results.values()
                if e["itm_filter"]["capfilt_over_data_juicer"] is not None]
    keeps = [e["itm_filter"]["agreement"]["keep_identical_fraction"] for e in results.values()
             if e["itm_filter"].get("agreement")]
    keeps_05 = [e["itm_filter"]["agreement_at_0.5"]["keep_identical_fraction"] for e in results.values()
                if e["itm_filter"].get("agreement_at_0.5")]
    result = {
        "benchmark": "peers",
        "machine": common.machine(),
        "load_average_start_end": [load_start, load_end],
        "peer": peer,
        "settings": {"model_size": None if args.filter else args.size, "models": "given" if args.filter else "random",
                     "text_max_position_embeddings": TEXT_POSITIONS, "batch_size": args.batch_size,
                     "caption_batch_size": args.caption_batch_size, "repeats": args.repeats,
                     "rows_per_shard": args.rows_per_shard, "ks": args.ks,
                     "caption_shards": {f"k{k}": caption_shards(args, k) for k in args.ks},
                     "threshold": args.threshold, "threads_per_model": 1, "ray_cpus": args.num_cpus,
                     "prompt": prompt, "data_juicer_max_new_tokens": DJ_MAX_NEW_TOKENS,
                     "capfilt_itm_filter": "ReadAndDecode + CapFiltWorker without captioners, ITM only, no Ray",
                     "capfilt_stage": "run_capfilt, ITM only, 128 new tokens, no text truncation"},
        "datasets": results,
        "targets": {
            "itm_speedup_target": 10.0,
            "itm_speedup_min": min(speedups) if speedups else None,
            "itm_speedup_met": (min(speedups) >= 10.0) if speedups else None,
            "keep_agreement_target": 0.99,
            "keep_agreement_min": min(keeps) if keeps else None,  # at each data set's `threshold`
            "keep_agreement_at_0.5_min": min(keeps_05) if keeps_05 else None,
            "keep_agreement_met": (min(keeps + keeps_05) >= 0.99) if keeps else None,
        },
        "notes": notes,
        "seconds": round(time.time() - started, 1),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
