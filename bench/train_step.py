"""One MED training step (AdamW; ITC + ITM + LM by default), without Ray: steps per second by precision and threads.

What ``mixed_precision`` buys on this machine, apart from everything Ray Train adds around a step. The
model is built in code (random weights), the batch is random pixels and token ids of a fixed length,
and the step is ``capfilt.training.loop.train_step`` itself, under ``capfilt.training.precision``'s
autocast. The configurations are timed in turn, ``--repeats`` rounds, so drift in the machine's load
spreads over all of them; each round builds the model afresh from one seed.

    python bench/train_step.py                        # the demo's MED (48 px ViT/16, 3-layer 128-wide text)
    python bench/train_step.py --size base --device cuda --threads 0 --batch-size 64
    python bench/train_step.py --precisions bf16 --threads 2 --thread caller,second

``--thread second`` times the step in a new thread after the main thread has used torch, which is how
``train_in_driver`` trained before it kept training in the caller's thread: torch's OpenMP pool is per
thread, and with two pools in the process libgomp stops spinning between parallel regions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any

try:
    from bench import _common as common
except ImportError:  # run as a script: bench/ is on sys.path
    import _common as common

# The demo's MED (pipelines/demo.yaml's model section), beside the shared sizes.
SIZES: dict[str, dict[str, Any]] = {
    **common.MODEL_SIZES,
    "demo": {"preset": "tiny", "vision": {"image_size": 48, "patch_size": 16}, "text": {"dropout": 0.0},
             "queue_size": 0, "momentum": 0.95},
}
PRECISIONS = {"fp32": "off", "bf16": "bf16"}


def _model(size: str, vocab_size: int, device):
    import torch

    from capfilt.config import MedConfig
    from capfilt.models.med import MED

    torch.manual_seed(0)
    config = MedConfig.model_validate({**SIZES[size], "vocab_size": vocab_size})
    return MED(config, vocab_size, {"cls": 1, "enc": 2, "dec": 3, "sep": 4, "pad": 0}).to(device).train(), config


def _batch(config, batch_size: int, text_length: int, vocab_size: int, device) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1)
    size = config.vision.image_size
    ids = torch.randint(5, vocab_size, (batch_size, text_length), generator=generator)
    ids[:, 0] = 1
    batch = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "image_ids": torch.arange(batch_size)}
    return {name: value.to(device) for name, value in batch.items()}


def measure(size: str, precision: str, threads: int, objectives: tuple[str, ...], adamw_kind: str, args,
            device) -> dict[str, Any]:
    import torch

    from capfilt.training.loop import train_step
    from capfilt.training.optim import adamw, param_groups
    from capfilt.training.precision import autocast_for

    if threads:
        torch.set_num_threads(threads)
    model, config = _model(size, args.vocab_size, device)
    batch = _batch(config, args.batch_size, args.text_length, args.vocab_size, device)
    # Training's own optimiser (capfilt.training.optim.adamw), or AdamW's per-tensor loop to compare.
    groups = param_groups(model, weight_decay=0.05)
    optimizer = adamw(groups, 1e-4) if adamw_kind == "fused" else torch.optim.AdamW(groups, lr=1e-4, foreach=False)
    autocast = autocast_for(device, PRECISIONS[precision])

    def step() -> dict:
        return train_step(model, optimizer, [batch], lr=1e-4, alpha=0.4, objectives=objectives, autocast=autocast)

    first = step()
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    # The optimiser's share of a step, alone (on stand-in gradients: train_step clears its own): steady
    # where the whole step's rate drifts with the machine's load.
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.full_like(param, 1e-3)
    optimizer_started = time.perf_counter()
    for _ in range(args.steps):
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    optimizer_ms = (time.perf_counter() - optimizer_started) / args.steps * 1000
    return {"steps_per_s": args.steps / seconds, "optimizer_ms": optimizer_ms,
            "first_step_losses": {name: round(float(value), 5) for name, value in first.items()},
            "last_step_loss": round(float(last["loss"]), 5)}


def _measure_in(placement: str, *args) -> dict[str, Any]:
    if placement == "caller":
        return measure(*args)
    import torch

    torch.ones(256, 256) @ torch.ones(256, 256)  # the main thread's pool exists, as in a pipeline's driver
    found: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: found.update(measure(*args)))
    thread.start()
    thread.join()
    if not found:
        raise RuntimeError("the second thread's measurement failed (its traceback is above)")
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", choices=sorted(SIZES))
    parser.add_argument("--precisions", default="fp32,bf16", help=f"comma separated, of {sorted(PRECISIONS)}")
    parser.add_argument("--threads", default="1,2", help="torch threads, comma separated; 0: torch's default")
    parser.add_argument("--objectives", default="itc,itm,lm",
                        help="comma separated: itc,itm,lm pretraining; lm the captioner's fine-tune; itc,itm the filter's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text-length", type=int, default=30, help="tokens per text (the demo's longest: 30)")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all configurations")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--adamw", default="fused", help="comma separated, of fused (training's) and loop "
                        "(torch's per-tensor AdamW)")
    parser.add_argument("--thread", default="caller", help="comma separated, of caller (training's) and second "
                        "(a new thread, the main one having used torch)")
    args = parser.parse_args(argv)

    import torch

    from capfilt.training.precision import native_bf16

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precisions = [name.strip() for name in args.precisions.split(",")]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; choose from {sorted(PRECISIONS)}")
    adamw_kinds = [name.strip() for name in args.adamw.split(",")]
    unknown = sorted(set(adamw_kinds) - {"fused", "loop"})
    if unknown:
        parser.error(f"--adamw: unknown {unknown}; choose from fused, loop")
    placements = [name.strip() for name in args.thread.split(",")]
    unknown = sorted(set(placements) - {"caller", "second"})
    if unknown:
        parser.error(f"--thread: unknown {unknown}; choose from caller, second")
    thread_counts = [int(count) for count in args.threads.split(",")]
    objectives = tuple(name.strip() for name in args.objectives.split(","))
    load_before = common.load_average()
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for threads in thread_counts:
            for precision in precisions:
                for adamw_kind in adamw_kinds:
                    for placement in placements:
                        name = (f"{precision}_threads{threads}" + ("" if adamw_kind == "fused" else "_adamw_loop")
                                + ("" if placement == "caller" else "_second_thread"))
                        rounds.setdefault(name, []).append(_measure_in(
                            placement, args.size, precision, threads, objectives, adamw_kind, args, device))
    results = {}
    for name, runs in rounds.items():
        rates = [run["steps_per_s"] for run in runs]
        results[name] = {"steps_per_s_median": round(statistics.median(rates), 3),
                         "steps_per_s": [round(rate, 3) for rate in rates],
                         "ms_per_step_median": round(1000 / statistics.median(rates), 1),
                         "optimizer_ms_median": round(statistics.median(run["optimizer_ms"] for run in runs), 2),
                         "first_step_losses": runs[0]["first_step_losses"],
                         "last_step_loss": runs[0]["last_step_loss"]}
    speedups = {}
    for threads in thread_counts:
        fp32, bf16 = results.get(f"fp32_threads{threads}"), results.get(f"bf16_threads{threads}")
        if fp32 and bf16:
            speedups[f"threads{threads}"] = round(bf16["steps_per_s_median"] / fp32["steps_per_s_median"], 3)
    fused_speedups = {name: round(results[name]["steps_per_s_median"] / results[name + "_adamw_loop"]["steps_per_s_median"], 3)
                      for name in results if name + "_adamw_loop" in results}
    second_thread_slowdowns = {
        name: round(results[name]["steps_per_s_median"] / results[name + "_second_thread"]["steps_per_s_median"], 3)
        for name in results if name + "_second_thread" in results}
    load = common.load_average()
    result = {
        "benchmark": "train_step",
        "machine": common.machine(),
        "device": device.type,
        "native_bf16": native_bf16(device),
        "settings": {"size": args.size, "model": SIZES[args.size], "batch_size": args.batch_size,
                     "text_length": args.text_length, "vocab_size": args.vocab_size, "steps": args.steps,
                     "warmup": args.warmup, "repeats": args.repeats, "threads": thread_counts,
                     "objectives": list(objectives),
                     "precisions": precisions, "adamw": adamw_kinds, "thread": placements},
        "results": results,
        "bf16_over_fp32": speedups,
        "fused_adamw_over_loop": fused_speedups,
        "caller_thread_over_second_thread": second_thread_slowdowns,
        "ray_imported": "ray" in sys.modules,
        "load_average_before_after": [load_before, load],
        "warning": common.busy_warning(max(load_before, load)),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
