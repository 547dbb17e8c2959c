"""BLIP-base CapFilt on one accelerator, without Ray: images per second, FLOPs per image, utilisation.

A random BLIP-base captioner and filter (ViT-B/16 at 384 px + BERT-base text, vocabulary 30,524) are
exported as capfilt exports them and loaded by ``CapFiltWorker`` exactly as a Ray actor loads them
(bf16 on GPU). Then, for each K:

- ``captioning``: ``Captioner.generate`` on pre-normalised batches (ViT + K nucleus captions per image,
  the reference's settings: top_p 0.9, top_k 50, repetition penalty 1.1, lengths 10-30);
- ``filtering``: ``Scorer.score`` of the web caption and the K captions of each image (ViT + ITM, + ITC
  unless ``--no-itc-similarity``, which scores as the per-sample loop does);
- ``capfilt``: ``CapFiltWorker.__call__`` on decoded-row tables as the read tasks hand them over
  (uint8 pixels in Arrow) - the actor's whole job, tables in and out;
- ``per_sample_loop``: the peer-tool baseline on the same device and dtype (JPEG decode, one
  ``generate`` per image, one ``BlipForImageTextRetrieval`` ITM forward per pair), and
  ``capfilt_over_loop``.

FLOPs per image are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one batch (matmuls and
attention; random weights sample to the full 30 tokens, so this is the long-caption cost), and the
utilisation is achieved FLOP/s over the device's dense bf16 peak. Imports nothing from Ray.

    python bench/gpu.py                     # BLIP-base, batch 256, K=1 and K=4, ~60 s of timed work
    python bench/gpu.py --tiny              # test-size model on CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench import _common as common
    from bench.throughput import PerSampleLoop
except ImportError:  # run as a script: bench/ is on sys.path
    import _common as common
    from throughput import PerSampleLoop

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device-name fragment; the first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # same compute as the H100 SXM
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((peak for fragment, peak in PEAK_BF16 if fragment in device_name), None)


def synthetic_words(count: int) -> list[str]:
    """``count`` distinct lowercase pseudo-words, so a tokenizer reaches BLIP-base's vocabulary size."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = []
    for index in range(count):
        word, n = "", index + 26 * 27  # at least three letters
        while n:
            n, digit = divmod(n, 26)
            word = letters[digit] + word
        words.append(word)
    return words


def smooth_jpeg(rng, size: int) -> bytes:
    """A photo-like JPEG (smooth colour fields, not noise) for the per-sample loop to decode."""
    import io

    import numpy as np
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Clock:
    """Wall time with the device drained, so queued kernels are charged to the work that queued them."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def timed_rate(run, batches: list, images_per_batch: int, seconds: float, clock: Clock) -> dict[str, Any]:
    """Run batches in turn (after one warm-up) until ``seconds`` have passed; images per second."""
    run(batches[0])
    started = clock()
    done = calls = 0
    while True:
        run(batches[calls % len(batches)])
        calls += 1
        done += images_per_batch
        elapsed = clock() - started
        if elapsed >= seconds:
            break
    return {"images": done, "calls": calls, "seconds": round(elapsed, 3), "images_per_s": round(done / elapsed, 2)}


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def count_flops(fn) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode has no formula for the CPU's fused attention kernel; the math backend runs the
    # same attention as matmuls it does count (on a GPU the fused kernels are counted alike).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="test-size model, small batches: runs on a CPU in seconds")
    parser.add_argument("--size", default=None, choices=sorted(common.MODEL_SIZES), help="default: base (tiny: test)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per call (default 256; tiny: 4)")
    parser.add_argument("--ks", default="1,4", help="captions per image, comma separated")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timed seconds in all, split over the measurements (default 60; tiny: 3)")
    parser.add_argument("--batches", type=int, default=2, help="distinct input batches cycled through")
    parser.add_argument("--loop-images", type=int, default=64, help="most images through the per-sample loop")
    parser.add_argument("--flop-batch", type=int, default=None, help="images in the FLOP-counting batch (default 8)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    parser.add_argument("--no-itc-similarity", dest="itc_similarity", action="store_false",
                        help="ITM only (capfilt's itc_similarity: false): the work the per-sample loop does")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    args.size = args.size or ("test" if args.tiny else "base")
    args.batch_size = args.batch_size or (4 if args.tiny else 256)
    args.seconds = args.seconds if args.seconds is not None else (3.0 if args.tiny else 60.0)
    args.flop_batch = args.flop_batch or (2 if args.tiny else 8)
    args.ks = [int(k) for k in str(args.ks).split(",") if k]
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.time()
    import numpy as np
    import torch

    from capfilt.config import CapFiltConfig
    from capfilt.data.text import pre_caption
    from capfilt.models.export import read_image_processor
    from capfilt.stages.capfilt import CapFiltWorker, resolve_device

    device, dtype = resolve_device(args.dtype)
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    clock = Clock(device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as temporary:
        workdir = Path(args.workdir or temporary)
        vocab = common.BLIP_BASE_VOCAB if args.size == "base" else None
        words = synthetic_words(30_000 if vocab else 300)
        tokenizer = common.bench_tokenizer(workdir / "tokenizer", [" ".join(words)], vocab_size=(vocab or 1000) - 2)
        models = common.build_models(args.size, tokenizer, workdir / "models", vocab_size=vocab,
                                     dtype=torch.bfloat16 if dtype == torch.bfloat16 else None)
        image_size = read_image_processor(models["filter"])["image_size"]
        setup_s = time.time() - started

        batch = args.batch_size
        pixels = [rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8) for _ in range(args.batches)]
        keys = [[f"{b:03d}{i:06d}" for i in range(batch)] for b in range(args.batches)]
        web = [[" ".join(rng.choice(words, 12)) for _ in range(batch)] for _ in range(args.batches)]
        share = args.seconds / (4 * len(args.ks))
        jpegs = [smooth_jpeg(rng, image_size) for _ in range(args.loop_images)]
        results: dict[str, Any] = {}
        for k in args.ks:
            config = CapFiltConfig(captioners=[{"path": models["captioner"]}], filters=[{"path": models["filter"]}],
                                   sampling={"num_captions": k}, batch_size=batch, dtype=args.dtype,
                                   itc_similarity=args.itc_similarity)
            loaded = time.time()
            worker = CapFiltWorker(config.model_dump(mode="json"), [r.model_dump() for r in config.captioners],
                                   [r.model_dump() for r in config.filters])
            load_s = time.time() - loaded
            (_, caption_processor, captioner), = worker.captioners
            (_, filter_processor, scorer), = worker.filters
            caption_inputs = [(worker.pixel_values(p, caption_processor), ks) for p, ks in zip(pixels, keys)]
            filter_pixels = [worker.pixel_values(p, filter_processor) for p in pixels]
            texts = []
            for (caption_pixels, batch_keys), batch_web in zip(caption_inputs, web):
                synthetic = captioner.generate(caption_pixels, batch_keys)
                texts.append([[pre_caption(w)] + [pre_caption(c) for c in caps] for w, caps in zip(batch_web, synthetic)])
            tables = [common.decoded_table(p, ks, w) for p, ks, w in zip(pixels, keys, web)]

            captioning = timed_rate(lambda b: captioner.generate(*caption_inputs[b]), list(range(args.batches)),
                                    batch, share, clock)
            filtering = timed_rate(lambda b: scorer.score(filter_pixels[b], texts[b]), list(range(args.batches)),
                                   batch, share, clock)
            capfilt = timed_rate(lambda b: worker(tables[b]), list(range(args.batches)), batch, share, clock)
            loop = PerSampleLoop(models, config.sampling, config.max_text_length, device, dtype).measure(
                jpegs, [w for batch_web in web for w in batch_web][: len(jpegs)], seconds=share)

            n = min(args.flop_batch, batch)
            flops_caption = count_flops(lambda: captioner.generate(caption_inputs[0][0][:n], keys[0][:n])) / n
            flops_filter = count_flops(lambda: scorer.score(filter_pixels[0][:n], texts[0][:n])) / n
            flops = {"captioning": flops_caption, "filtering": flops_filter, "capfilt": flops_caption + flops_filter}
            mean_text_tokens = float(np.mean([len(tokenizer(t).input_ids) for image in texts[0] for t in image]))
            results[f"k{k}"] = {
                "captioning": captioning,
                "filtering": filtering,
                "capfilt": capfilt,
                "per_sample_loop": loop,
                "capfilt_over_loop": round(capfilt["images_per_s"] / loop["images_per_s"], 2),
                "gflops_per_image": {name: significant(value / 1e9) for name, value in flops.items()},
                "mean_scored_text_tokens": round(mean_text_tokens, 1),
                "model_load_s": round(load_s, 2),
            }
            worker = caption_inputs = filter_pixels = tables = None  # free this K's models and inputs before the next
            if device == "cuda":
                torch.cuda.empty_cache()

    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(gpu_name)
    for entry in results.values():
        achieved = {name: entry["gflops_per_image"][name] * 1e9 * entry[name]["images_per_s"]
                    for name in ("captioning", "filtering", "capfilt")}
        entry["achieved_tflops"] = {name: significant(value / 1e12) for name, value in achieved.items()}
        entry["utilisation"] = {name: significant(value / peak) for name, value in achieved.items()} if peak else None
    result = {
        "benchmark": "gpu",
        "machine": common.machine(),
        "device": gpu_name or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "peak_bf16_tflops": round(peak / 1e12, 1) if peak else None,
        "settings": {"model_size": args.size, "image_size": image_size, "batch_size": args.batch_size, "ks": args.ks,
                     "sampling": "nucleus top_p=0.9 top_k=50 rep=1.1 len=10-30", "seconds_budget": args.seconds,
                     "itc_similarity": args.itc_similarity},
        "results": results,
        "ray_imported": "ray" in sys.modules,
        "setup_s": round(setup_s, 1),
        "seconds": round(time.time() - started, 1),
    }
    if device == "cuda":
        result["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
