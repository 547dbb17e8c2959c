"""Streaming MED pretraining: peak private memory of every training process at 10,000 versus 100,000
pairs, and steps/s at the demo's size against the in-memory loader it replaced.

Each run is a fresh driver process with its own local Ray cluster (peaks do not carry over), running
``run_pretrain`` with the demo's model and batch on the generated world's web shards; the larger
sizes repeat the same shards (symlinks), so every size has the same images, only more of them. A
sampler thread in that driver reads /proc for it and every Ray worker it starts (the kernel's per-
process peak, VmHWM, and the peaks of private (RssAnon) and shared pages). The target: under 15%
growth of each role's peak private memory from 10,000 to 100,000 pairs.

The baseline is the loader itself, not a re-creation of it: the runs marked ``in_memory`` import
capfilt from a git worktree of ``--baseline-commit`` (the last commit that copied every pair into
local Parquet and loaded the whole table in each decoding task), in the same invocation, on the
same shards, model and steps.

    python bench/train_stream.py                     # 10,000 and 100,000 pairs; demo size, each loader 3x
    python bench/train_stream.py --sizes 2000 --demo-pairs 1000 --steps 20    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:  # this file's _common first: a baseline run puts an older checkout (with its own bench/) on the path
    import _common as common
except ImportError:  # imported as bench.train_stream
    from bench import _common as common

GROWTH_TARGET = 0.15
STEP_RATE_TARGET = 0.10  # streaming may be at most 10% slower than the in-memory loader
BASELINE_COMMIT = "49a50d8"  # the in-memory loader (capfilt/training/data.py: load_pair_table)
ROLES = ("driver", "trainer", "data_tasks", "unit_cache")


def training_role(command: str) -> str | None:
    if not command.startswith("ray::"):
        return None
    if "RayTrainWorker" in command or "train_loop" in command:
        return "trainer"
    if "UnitCache" in command:
        return "unit_cache"
    if any(name in command for name in ("make_batch", "read_unit", "_index_unit")):
        return "data_tasks"
    return "other_ray_workers"


def child(args) -> dict[str, Any]:
    """One run: pretrain on ``args.shards`` for ``args.steps`` steps, sampling memory throughout."""
    if args.capfilt_root:
        sys.path.insert(0, args.capfilt_root)
    from capfilt.config import MedConfig, PairSource, ReaderConfig, TrainConfig
    from capfilt.stages.pretrain import run_pretrain

    spec = json.loads(Path(args.spec).read_text())
    sampler = common.MemorySampler(interval_s=0.25, role_of=training_role, roles=(*ROLES, "other_ray_workers"))
    sampler.start()
    common.start_ray(args.num_cpus)
    load_before = common.load_average()
    started = time.time()
    result = run_pretrain(TrainConfig(**spec["train"]), MedConfig(**spec["model"]), spec["tokenizer_dir"],
                          [PairSource(kind="shards", role="web", reader=ReaderConfig(paths=spec["shards"]))],
                          spec["out_dir"], log=lambda _: None)
    wall = time.time() - started
    memory = sampler.stop()
    import ray

    ray.shutdown()
    records = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    start = next(record for record in records if record.get("event") == "start")
    warm = [record for record in steps if record["step"] >= 0.2 * spec["train"]["steps"]]
    steady = (warm[-1]["step"] - warm[0]["step"]) / (warm[-1]["time"] - warm[0]["time"])
    return {
        "pairs": result["pairs"]["total"], "units": len(spec["shards"]), "steps": result["steps"],
        "wall_s": round(wall, 1), "before_training_s": round(start["time"] - started, 1),
        "training_s": round(steps[-1]["time"] - start["time"], 1), "steps_per_s_steady": round(steady, 3),
        "final_loss": steps[-1]["loss"], "bad_pairs": result.get("bad_pairs"),
        "memory": memory, "load_average_before_after": [load_before, common.load_average()],
    }


def run_child(label: str, spec: dict[str, Any], work: Path, num_cpus: int, capfilt_root: str | None) -> dict:
    shutil.rmtree(spec["out_dir"], ignore_errors=True)  # a fresh run, never one found complete
    spec_file = work / f"{label}.json"
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, __file__, "--child", "--spec", str(spec_file), "--num-cpus", str(num_cpus)]
    if capfilt_root:
        command += ["--capfilt-root", capfilt_root]
    env = {**os.environ, "PYTHONPATH": capfilt_root or str(common.REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=capfilt_root or common.REPO)
    if done.returncode:
        raise RuntimeError(f"{label}: the run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def repeated_shards(base: list[str], pairs_per_shard: int, pairs: int, directory: Path) -> list[str]:
    """``pairs`` worth of shards: the base shards again and again, as symlinks (same bytes, more pairs)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(max(1, round(pairs / pairs_per_shard))):
        link = directory / f"{index:05d}.parquet"
        if not link.exists():
            link.symlink_to(base[index % len(base)])
        paths.append(str(link))
    return paths


def baseline_tree(commit: str, work: Path) -> str:
    tree = work / f"capfilt-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", str(tree), commit],
                       check=True, capture_output=True)
    return str(tree)


def growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float]:
    return common.memory_growth(small, large, ROLES, ("peak_anon_mb", "peak_rss_mb"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="pairs, for memory")
    parser.add_argument("--demo-pairs", type=int, default=5_000, help="pairs for the step-rate comparison")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows-per-shard", type=int, default=500, help="the demo world's shard size")
    parser.add_argument("--base-rows", type=int, default=4000, help="distinct generated rows the shards repeat")
    parser.add_argument("--rate-repeats", type=int, default=3, help="runs of each loader at the demo's size")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT, help="'none': streaming runs only")
    parser.add_argument("--baseline-sizes", action="store_true",
                        help="also run the in-memory loader at every memory size (it copies every image first)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="keep the shards, tokenizer and runs here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--capfilt-root", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args), default=str))
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="capfilt-train-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    base = common.write_world_shards(work / "world", args.base_rows, image_size=48,
                                     rows_per_shard=args.rows_per_shard)
    tokenizer_dir = work / "tokenizer"
    if not tokenizer_dir.exists():
        common.bench_tokenizer(tokenizer_dir, common.shard_captions(base), vocab_size=1000)
    # The demo's pretraining: its model, batch and data settings (pipelines/demo.yaml).
    model = {"preset": "tiny", "vision": {"image_size": 48, "patch_size": 16}, "queue_size": 0, "momentum": 0.95}
    train = {"steps": args.steps, "batch_size": args.batch_size, "lr": 5e-4, "warmup_steps": 10,
             "schedule": "cosine", "image": {"hflip_p": 0.0, "randaugment_ops": 0, "train_scale": [1.0, 1.0]},
             "checkpoint_every": args.steps, "cpus_per_worker": 1.5, "data_cpus": 0.5,
             "log_every": max(1, min(5, args.steps // 10)),
             "max_bad_fraction": 0.05}
    baseline_train = {key: value for key, value in train.items() if key != "max_bad_fraction"}

    def spec(label, pairs, streaming=True):
        shards = repeated_shards(base, args.rows_per_shard, pairs, work / f"shards-{pairs}")
        return {"train": train if streaming else baseline_train, "model": model,
                "tokenizer_dir": str(tokenizer_dir), "shards": shards, "out_dir": str(work / "runs" / label)}

    started = time.time()
    notes = []
    old_root = None
    if args.baseline_commit != "none":
        known = subprocess.run(["git", "-C", str(common.REPO), "cat-file", "-e", f"{args.baseline_commit}^{{commit}}"],
                               capture_output=True)
        if known.returncode == 0:
            old_root = baseline_tree(args.baseline_commit, work)
        else:
            notes.append(f"baseline commit {args.baseline_commit} is not in this clone (shallow?): no in-memory runs")
    runs: dict[str, Any] = {}
    # Step rate: the two loaders alternate, so load from elsewhere on the machine falls on both alike.
    rates: dict[str, list[float]] = {"streaming": [], "in_memory": []}
    for repeat in range(args.rate_repeats if old_root else 0):  # nothing to compare with: memory only
        for loader, root in (("streaming", None), ("in_memory", old_root)):
            label = f"demo_{loader}" + (f"_{repeat + 1}" if repeat else "")
            runs[label] = run_child(label, spec(label, args.demo_pairs, loader == "streaming"), work,
                                    args.num_cpus, root)
            rates[loader].append(runs[label]["steps_per_s_steady"])
    for pairs in args.sizes:
        runs[f"streaming_{pairs}"] = run_child(f"streaming_{pairs}", spec(f"streaming_{pairs}", pairs), work,
                                               args.num_cpus, None)
        if args.baseline_sizes and old_root:
            runs[f"in_memory_{pairs}"] = run_child(f"in_memory_{pairs}", spec(f"in_memory_{pairs}", pairs, False),
                                                   work, args.num_cpus, old_root)

    small, large = (runs[f"streaming_{size}"] for size in (min(args.sizes), max(args.sizes)))
    memory_growth = growth(small, large)
    private = {key: value for key, value in memory_growth.items() if key.endswith("peak_anon_mb")}
    rate_change = (sum(rates["streaming"]) / sum(rates["in_memory"]) - 1) if old_root else None
    result = {
        "benchmark": "train_stream",
        "machine": common.machine(),
        "settings": {key: value for key, value in vars(args).items() if key not in ("child", "spec", "capfilt_root")},
        "runs": runs,
        "demo_steps_per_s": rates,
        "memory_growth_streaming": memory_growth,
        "targets": {
            "private_memory_growth_below": GROWTH_TARGET,
            "private_memory_growth_met": bool(private) and max(private.values()) < GROWTH_TARGET,
            "step_rate_change_vs_in_memory": round(rate_change, 4) if old_root else None,
            "step_rate_met": rate_change > -STEP_RATE_TARGET if old_root else None,
        },
        "notes": notes,
        "wall_s": round(time.time() - started, 1),
    }
    if args.baseline_sizes and old_root:
        result["memory_growth_in_memory"] = growth(*(runs[f"in_memory_{size}"]
                                                     for size in (min(args.sizes), max(args.sizes))))
    warning = common.busy_warning(common.load_average())
    if warning:
        notes.append(warning)
    common.emit(result)


if __name__ == "__main__":
    main()
