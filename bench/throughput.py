"""Images per second: capfilt's CapFilt stage, a per-sample loop as peer tools run it, and the model ceiling.

Same model (random weights), same data, one run:

- ``capfilt``: ``run_capfilt`` end to end on a local Ray cluster over img2dataset-layout Parquet shards
  (read, decode, caption, filter, commit); total and steady-state rates (first to last commit).
- ``per_sample_loop``: what peer tools do: decode one image, one transformers ``generate`` for its K
  captions, then one ``BlipForImageTextRetrieval`` ITM forward per (image, text) pair.
- ``model_ceiling``: the CapFiltWorker's own captioner and scorer on pre-decoded, pre-batched, normalised
  tensors: no I/O, no table plumbing.

``capfilt`` and ``model_ceiling`` score like the loop, ITM only (``itc_similarity: false``), so the
three do the same work; ``with_itc_similarity`` repeats both with capfilt's default, which also
records every text's ITC similarity (one more text-encoder pass per text), and says what that costs.

Every model runs on one intra-op thread, as a capfilt CPU actor does (decode tasks get the other CPU).

    python bench/throughput.py            # flickr8k-1k photos + generated-world images, K=1 and K=4
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench import _common as common
except ImportError:  # run as a script: bench/ is on sys.path
    import _common as common


def decoded_rows(shards: list[str], image_size: int, limit: int) -> tuple[Any, list[str], list[str], list[bytes]]:
    """Up to ``limit`` decodable web rows: uint8 pixels [N, S, S, 3], keys, captions and the raw bytes."""
    import numpy as np
    import pyarrow.parquet as pq

    from capfilt.data.decode import DecodeError, decode_image
    from capfilt.stages.capfilt import resize_uint8

    pixels, keys, captions, raw = [], [], [], []
    for path in shards:
        for row in pq.read_table(path, columns=["key", "caption", "status", "jpg"]).to_pylist():
            if len(keys) >= limit:
                break
            if row["status"] != "success":
                continue
            try:
                image = decode_image(row["jpg"])
            except DecodeError:
                continue
            pixels.append(resize_uint8(image, image_size))
            keys.append(row["key"])
            captions.append(row["caption"] or "")
            raw.append(row["jpg"])
    return np.stack(pixels), keys, captions, raw


def best_of(rounds: list[tuple[int, float]]) -> dict[str, Any]:
    """The fastest of several timed rounds (images, seconds): on a shared machine, the least disturbed one."""
    rates = [images / seconds for images, seconds in rounds]
    images, seconds = rounds[rates.index(max(rates))]
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(max(rates), 2),
            "rounds_images_per_s": [round(rate, 2) for rate in rates]}


def model_ceiling(worker, pixels, keys: list[str], captions: list[str], batch_size: int,
                  repeats: int = 3) -> dict[str, Any]:
    """The worker's captioner + scorer alone, on batches normalised before the clock starts (best round)."""
    from capfilt.data.text import pre_caption

    (_, caption_processor, captioner), = worker.captioners
    (_, filter_processor, scorer), = worker.filters
    batches = []
    for start in range(0, len(keys), batch_size):
        chunk = slice(start, start + batch_size)
        batches.append((worker.pixel_values(pixels[chunk], caption_processor),
                        worker.pixel_values(pixels[chunk], filter_processor), keys[chunk], captions[chunk]))
    warm, timed = batches[:1], batches[1:] or batches

    def run(batch_list) -> int:
        done = 0
        for caption_pixels, filter_pixels, batch_keys, web in batch_list:
            synthetic = captioner.generate(caption_pixels, batch_keys, round=0)
            texts = [[pre_caption(w)] + [pre_caption(c) for c in caps] for w, caps in zip(web, synthetic)]
            scorer.score(filter_pixels, texts)
            done += len(batch_keys)
        return done

    run(warm)
    rounds = []
    for _ in range(repeats):
        started = time.perf_counter()
        images = run(timed)
        rounds.append((images, time.perf_counter() - started))
    return {**best_of(rounds), "batch_size": batch_size}


class PerSampleLoop:
    """One image at a time, as peer tools do: PIL decode, processor, ``generate``, one ITM forward per pair."""

    def __init__(self, models: dict[str, str], sampling, max_text_length: int, device: str = "cpu", dtype=None):
        import torch
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipImageProcessor

        from capfilt.data.text import load_tokenizer

        self.device, self.dtype = device, dtype or torch.float32
        self.captioner = BlipForConditionalGeneration.from_pretrained(models["captioner"], dtype=self.dtype)
        self.filter = BlipForImageTextRetrieval.from_pretrained(models["filter"], dtype=self.dtype)
        self.captioner.to(device).eval()
        self.filter.to(device).eval()
        self.processor = BlipImageProcessor.from_pretrained(models["filter"])
        self.tokenizer = load_tokenizer(models["captioner"])
        self.prompt_ids = self.tokenizer(sampling.prompt, return_tensors="pt").input_ids.to(device)
        self.sampling = sampling
        self.max_text_length = max_text_length
        self.torch = torch

    def __call__(self, image_bytes: bytes, web_caption: str) -> list[float]:
        from PIL import Image

        s = self.sampling
        with self.torch.inference_mode():
            image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
            pixel_values = self.processor(images=image, return_tensors="pt").pixel_values.to(self.device, self.dtype)
            ids = self.captioner.generate(
                pixel_values, input_ids=self.prompt_ids.clone(), do_sample=True, top_p=s.nucleus_top_p,
                top_k=s.top_k, repetition_penalty=s.repetition_penalty, max_length=s.max_length,
                min_length=s.min_length, num_return_sequences=s.num_captions,
            )
            texts = [web_caption, *self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            probs = []
            for text in texts:
                tokens = self.tokenizer(text, truncation=True, max_length=self.max_text_length,
                                        return_tensors="pt").to(self.device)
                out = self.filter(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                  pixel_values=pixel_values, use_itm_head=True)
                probs.append(float(out.itm_score.softmax(dim=-1)[0, 1]))
        return probs

    def measure(self, raw: list[bytes], captions: list[str], seconds: float | None = None,
                repeats: int = 1) -> dict[str, Any]:
        """Images per second over ``raw`` (after one warm-up image), best of ``repeats`` rounds; a round
        stops early once ``seconds`` pass."""
        self(raw[0], captions[0])
        rounds = []
        for _ in range(repeats):
            started = time.perf_counter()
            images = 0
            for image_bytes, caption in zip(raw, captions):
                self(image_bytes, caption)
                images += 1
                if seconds is not None and time.perf_counter() - started >= seconds:
                    break
            if self.device == "cuda":
                self.torch.cuda.synchronize()
            rounds.append((images, time.perf_counter() - started))
        return best_of(rounds)


def capfilt_config(shards: list[str], models: dict[str, str], k: int, batch_size: int, actors: int = 1,
                   itc_similarity: bool = False):
    from capfilt.config import CapFiltConfig, ReaderConfig

    return CapFiltConfig(
        web=ReaderConfig(paths=shards),
        itc_similarity=itc_similarity,  # off: ITM only, the work the per-sample loop does
        captioners=[{"path": models["captioner"]}],
        filters=[{"path": models["filter"]}],
        sampling={"num_captions": k},  # the reference's nucleus settings: top_p 0.9, lengths 10-30
        batch_size=batch_size,
        rows_per_file=1,  # commit every shard as it completes: the commit times give the steady-state rate
        actors=actors,
        cpus_per_actor=1.0 if actors == 1 else 0.5,
        reserve_cpus_for_reading=1.0,
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def ratios(stage: dict[str, Any], ceiling: dict[str, Any], loop: dict[str, Any]) -> dict[str, float | None]:
    steady = stage["images_per_s_steady"] or stage["images_per_s_total"]
    return {
        "capfilt_steady_over_loop": ratio(steady, loop["images_per_s"]),
        "capfilt_steady_over_ceiling": ratio(steady, ceiling["images_per_s"]),
        "capfilt_total_over_ceiling": ratio(stage["images_per_s_total"], ceiling["images_per_s"]),
        "ceiling_over_loop": ratio(ceiling["images_per_s"], loop["images_per_s"]),
    }


def measure_dataset(name: str, shards: list[str], models: dict[str, str], args, workdir: Path) -> dict[str, Any]:
    import torch

    from capfilt.models.export import read_image_processor
    from capfilt.stages.capfilt import CapFiltWorker

    image_size = read_image_processor(models["filter"])["image_size"]
    pixels, keys, captions, raw = decoded_rows(shards, image_size, max(args.ceiling_images, args.loop_images + 1))
    report: dict[str, Any] = {"shards": len(shards), "rows": sum(_rows(p) for p in shards)}
    for k in args.ks:
        measured = {}
        for itc_similarity in (False, True):
            config = capfilt_config(shards, models, k, args.batch_size, itc_similarity=itc_similarity)
            load_before = common.load_average()
            stage = common.run_stage(config, str(workdir / f"{name}-k{k}-itc{int(itc_similarity)}"))
            torch.set_num_threads(1)
            worker = CapFiltWorker(config.model_dump(mode="json"), [r.model_dump() for r in config.captioners],
                                   [r.model_dump() for r in config.filters], threads=1)
            ceiling = model_ceiling(worker, pixels[: args.ceiling_images], keys[: args.ceiling_images],
                                    captions[: args.ceiling_images], args.batch_size, args.repeats)
            measured[itc_similarity] = (stage, ceiling, load_before)
        loop = PerSampleLoop(models, config.sampling, config.max_text_length).measure(
            raw[1 : args.loop_images + 1], captions[1 : args.loop_images + 1], repeats=args.repeats)
        (stage, ceiling, load_before), (itc_stage, itc_ceiling, _) = measured[False], measured[True]
        report[f"k{k}"] = {
            "capfilt": stage,
            "per_sample_loop": loop,
            "model_ceiling": ceiling,
            "ratios": ratios(stage, ceiling, loop),
            "with_itc_similarity": {"capfilt": itc_stage, "model_ceiling": itc_ceiling,
                                    "ratios": ratios(itc_stage, itc_ceiling, loop)},
            "load_average_before_after": [load_before, common.load_average()],
        }
    return report


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(common.MODEL_SIZES), help="model size (random weights)")
    parser.add_argument("--flickr", default=str(common.FLICKR), help="flickr8k-1k folder (images/*.jpg, captions.csv)")
    parser.add_argument("--flickr-images", type=int, default=1000)
    parser.add_argument("--world-images", type=int, default=1000)
    parser.add_argument("--world-image-size", type=int, default=96, help="rendered side of generated images")
    parser.add_argument("--rows-per-shard", type=int, default=50)
    parser.add_argument("--ks", default="1,4", help="captions per image to measure, comma separated")
    parser.add_argument("--batch-size", type=int, default=32, help="images per actor call (capfilt.batch_size)")
    parser.add_argument("--loop-images", type=int, default=32, help="images through the per-sample loop")
    parser.add_argument("--ceiling-images", type=int, default=256, help="images through the model ceiling")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the loop and the ceiling (best kept)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--workdir", default=None, help="keep shards and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in str(args.ks).split(",") if k]
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as temporary:
        workdir = Path(args.workdir or temporary)
        datasets: dict[str, list[str]] = {}
        notes = []
        pairs = common.flickr_pairs(Path(args.flickr), limit=args.flickr_images) if args.flickr_images else None
        if pairs:
            datasets["flickr8k"] = common.write_photo_shards(pairs, workdir / "flickr", args.rows_per_shard)
        elif args.flickr_images:
            notes.append(f"flickr8k skipped: no photos under {args.flickr}/images (the shared data set is absent)")
        if args.world_images:
            datasets["world"] = common.write_world_shards(workdir / "world", args.world_images, args.world_image_size,
                                                          args.rows_per_shard)
        tokenizer = common.bench_tokenizer(workdir / "tokenizer",
                                           common.shard_captions([p for s in datasets.values() for p in s]))
        models = common.build_models(args.size, tokenizer, workdir / "models")
        started_ray = common.start_ray(args.num_cpus)
        load_start = common.load_average()
        results = {name: measure_dataset(name, shards, models, args, workdir) for name, shards in datasets.items()}
        load_end = common.load_average()
        warning = common.busy_warning(max(load_start, load_end), args.num_cpus)
        if warning:
            notes.append(warning)
        if started_ray:
            import ray

            ray.shutdown()
    result = {
        "benchmark": "throughput",
        "machine": common.machine(),
        "load_average_start_end": [load_start, load_end],
        "settings": {"model_size": args.size, "ks": args.ks, "batch_size": args.batch_size,
                     "rows_per_shard": args.rows_per_shard, "ray_cpus": args.num_cpus, "actors": 1,
                     "threads_per_model": 1, "repeats": args.repeats,
                     "sampling": "nucleus top_p=0.9 top_k=50 rep=1.1 len=10-30",
                     "filter_scores": "itm (with_itc_similarity: itm + itc)"},
        "datasets": results,
        "notes": notes,
        "seconds": round(time.time() - started, 1),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
