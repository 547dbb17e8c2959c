"""Peak resident memory of the driver, the CapFilt actors and the read tasks, for N versus 10 N input rows.

Each size runs in a fresh driver process with its own local Ray cluster, so peaks do not carry over;
a sampler thread in that driver reads /proc for it and every Ray worker it started (the kernel's
per-process peak, VmHWM). Memory that stays flat as the input grows is what lets one job run for days:
the target is under 15% growth from 5,000 to 50,000 rows, judged on each role's peak private memory
(RssAnon): a Ray worker's RSS also counts the shared object-store pages it touched, which grow with
the run up to the store's fixed size whatever the input size (both are reported).

    python bench/memory.py                  # 5,000 and 50,000 generated rows, test-size model
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench import _common as common
except ImportError:  # run as a script: bench/ is on sys.path
    import _common as common

GROWTH_TARGET = 0.15


def child(args) -> dict[str, Any]:
    """One size: run CapFilt over the first shards holding ``args.child`` rows, sampling memory throughout."""
    from capfilt.config import CapFiltConfig, ReaderConfig

    shards = json.loads(Path(args.shards_file).read_text())
    models = json.loads(Path(args.models_file).read_text())
    rows_wanted, chosen, rows = args.child, [], 0
    for path, count in shards:
        if rows >= rows_wanted:
            break
        chosen.append(path)
        rows += count
    config = CapFiltConfig(
        web=ReaderConfig(paths=chosen),
        captioners=[{"path": models["captioner"]}],
        filters=[{"path": models["filter"]}],
        sampling={"num_captions": args.k, "max_length": args.max_length, "min_length": args.min_length},
        batch_size=args.batch_size,
        **({"rows_per_file": args.rows_per_file} if args.rows_per_file else {}),
        **({"max_buffer_bytes": args.max_buffer_bytes} if args.max_buffer_bytes else {}),
    )
    sampler = common.MemorySampler(interval_s=args.interval)
    sampler.start()  # before Ray starts, so the baseline is in the driver's peak
    common.start_ray(args.num_cpus)
    load_before = common.load_average()
    stage = common.run_stage(config, str(Path(args.output) / f"rows-{rows}"))
    memory = sampler.stop()
    import ray

    ray.shutdown()
    return {"rows": rows, "shards": len(chosen), "stage": stage, "memory": memory,
            "load_average_before_after": [load_before, common.load_average()]}


def growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """Relative growth of each peak from the small run to the large one."""
    return common.memory_growth(small, large, ("driver", "actors", "read_tasks"),
                                ("peak_rss_mb", "peak_sum_rss_mb", "peak_anon_mb", "peak_shmem_mb"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="5000,50000", help="input sizes, comma separated, smallest first")
    parser.add_argument("--size", default="test", choices=sorted(common.MODEL_SIZES))
    parser.add_argument("--image-size", type=int, default=32, help="side of the generated images")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--rows-per-file", type=int, default=None,
                        help="capfilt.rows_per_file (default: capfilt's own); the driver buffers this many rows")
    parser.add_argument("--max-buffer-bytes", type=int, default=None,
                        help="capfilt.max_buffer_bytes (default: capfilt's own); or this many bytes of finished shards")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    parser.add_argument("--workdir", default=None)
    # Internal: one size in a fresh process.
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards-file", help=argparse.SUPPRESS)
    parser.add_argument("--models-file", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = [int(n) for n in str(args.rows).split(",") if n]
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child is not None:
        result = child(args)
        print(json.dumps(result), flush=True)
        return result

    import pyarrow.parquet as pq

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as temporary:
        workdir = Path(args.workdir or temporary)
        shards = common.write_world_shards(workdir / "world", max(args.rows), args.image_size, args.rows_per_shard)
        counted = [(path, pq.read_metadata(path).num_rows) for path in shards]
        tokenizer = common.bench_tokenizer(workdir / "tokenizer", common.shard_captions(shards[:5]))
        models = common.build_models(args.size, tokenizer, workdir / "models")
        shutil.rmtree(workdir / "out", ignore_errors=True)  # a finished output would make the runs no-ops
        (workdir / "shards.json").write_text(json.dumps(counted))
        (workdir / "models.json").write_text(json.dumps(models))
        runs = []
        for rows in args.rows:
            command = [sys.executable, str(Path(__file__).resolve()), "--child", str(rows),
                       "--shards-file", str(workdir / "shards.json"), "--models-file", str(workdir / "models.json"),
                       "--output", str(workdir / "out"), "--k", str(args.k), "--batch-size", str(args.batch_size),
                       "--max-length", str(args.max_length), "--min-length", str(args.min_length),
                       "--num-cpus", str(args.num_cpus), "--interval", str(args.interval)]
            if args.rows_per_file:
                command += ["--rows-per-file", str(args.rows_per_file)]
            if args.max_buffer_bytes:
                command += ["--max-buffer-bytes", str(args.max_buffer_bytes)]
            done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {
        "benchmark": "memory",
        "machine": common.machine(),
        "settings": {"model_size": args.size, "image_size": args.image_size, "rows_per_shard": args.rows_per_shard,
                     "batch_size": args.batch_size, "k": args.k, "lengths": [args.min_length, args.max_length],
                     "rows_per_file": args.rows_per_file or "capfilt default",
                     "max_buffer_bytes": args.max_buffer_bytes or "capfilt default",
                     "ray_cpus": args.num_cpus},
        "runs": runs,
    }
    if len(runs) >= 2:
        table = growth(runs[0], runs[-1])
        result["growth"] = table
        result["growth_target"] = GROWTH_TARGET
        # Judged on private memory: RSS also counts shared object-store pages, bounded by the store's size.
        headline = ("driver.peak_anon_mb", "actors.peak_anon_mb", "read_tasks.peak_anon_mb")
        result["target_measures"] = list(headline)
        result["within_target"] = all(table.get(name) is not None and table[name] < GROWTH_TARGET for name in headline)
    loads = [load for run in runs for load in run["load_average_before_after"]]
    warning = common.busy_warning(max(loads), args.num_cpus) if loads else None
    result["notes"] = [warning] if warning else []
    result["seconds"] = round(time.time() - started, 1)
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
