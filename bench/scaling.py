"""CapFilt images per second with one actor versus two on this machine's local Ray cluster.

Same shards, same model, same output rows (outputs do not depend on the actor count); only the pool
changes. One actor gets ``cpus/2`` CPUs' worth of Ray resources; two actors split the same share, so
both runs leave the other CPUs to read and decode tasks. On a machine with fewer cores than
actors + readers this shows contention, not scaling: read ``machine.cpus`` with the figures.

    python bench/scaling.py                 # generated-world images, tiny model, K=1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench import _common as common
except ImportError:  # run as a script: bench/ is on sys.path
    import _common as common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(common.MODEL_SIZES))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--rows-per-shard", type=int, default=50)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", default="1,2", help="pool sizes to compare, comma separated")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    args.actors = [int(n) for n in str(args.actors).split(",") if n]
    return args


def main(argv=None) -> dict[str, Any]:
    from capfilt.config import CapFiltConfig, ReaderConfig

    args = parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as temporary:
        workdir = Path(args.workdir or temporary)
        shards = common.write_world_shards(workdir / "world", args.images, args.image_size, args.rows_per_shard)
        tokenizer = common.bench_tokenizer(workdir / "tokenizer", common.shard_captions(shards))
        models = common.build_models(args.size, tokenizer, workdir / "models")
        # Actors share what reading leaves: half the CPUs (at least 1) whatever the pool size.
        actor_cpus = max(1.0, args.num_cpus / 2)
        started_ray = common.start_ray(args.num_cpus)
        runs = {}
        for actors in args.actors:
            config = CapFiltConfig(
                web=ReaderConfig(paths=shards),
                captioners=[{"path": models["captioner"]}],
                filters=[{"path": models["filter"]}],
                sampling={"num_captions": args.k},
                batch_size=args.batch_size,
                rows_per_file=1,
                actors=actors,
                cpus_per_actor=actor_cpus / actors,
                reserve_cpus_for_reading=args.num_cpus - actor_cpus,
            )
            load_before = common.load_average()
            stage = common.run_stage(config, str(workdir / f"actors-{actors}"))
            stage["load_average_before_after"] = [load_before, common.load_average()]
            stage["cpus_per_actor"] = actor_cpus / actors
            runs[str(actors)] = stage
        if started_ray:
            import ray

            ray.shutdown()
    base = runs[str(args.actors[0])]
    speedups = {}
    for actors, stage in runs.items():
        for rate in ("images_per_s_steady", "images_per_s_total"):
            if stage.get(rate) and base.get(rate):
                speedups.setdefault(rate, {})[actors] = round(stage[rate] / base[rate], 3)
    loads = [load for stage in runs.values() for load in stage["load_average_before_after"]]
    warning = common.busy_warning(max(loads), args.num_cpus)
    result = {
        "benchmark": "scaling",
        "machine": common.machine(),
        "settings": {"model_size": args.size, "images": args.images, "image_size": args.image_size, "k": args.k,
                     "batch_size": args.batch_size, "ray_cpus": args.num_cpus, "actor_cpus_total": actor_cpus},
        "runs": runs,
        "speedup_over_first": speedups,
        "notes": [warning] if warning else [],
        "seconds": round(time.time() - started, 1),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
