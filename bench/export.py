"""``capfilt export``: peak memory of the driver and of every export task at the demo's size and at 10x,
and samples/s.

The CapFilt output exported is built here, not by running CapFilt (export only reads its pairs files,
commit records and manifest): every usable row of the generated world's web shards gets its web
caption and one synthetic caption, each pair referring to its input row by (shard, row), as CapFilt's
default output does (``embed_images: false``), so export fetches every image from the input shards.
The larger size repeats the same shards (symlinks): the same images, more of them. Each size runs in
a fresh driver process with its own local Ray cluster; a sampler thread reads /proc for it and every
Ray worker (the kernel's per-process peak, VmHWM, and the peaks of private and shared pages). The
target: under 15% growth of each role's peak private memory from 1x to 10x. Memory per export task
is bounded by ``samples_per_shard`` (one output shard's images), not by the output's size.

    python bench/export.py                          # the demo's 4,000 web rows and 40,000, webdataset
    python bench/export.py --sizes 1000 --format parquet   # a quick look
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402

ROLES = ("driver", "export_tasks")
GROWTH_TARGET = 0.15


def export_role(command: str) -> str | None:
    if not command.startswith("ray::"):
        return None
    return "export_tasks" if "export_shard" in command else "other_ray_workers"


def capfilt_output(shards: list[str], out: Path) -> int:
    """A finished CapFilt output over ``shards``: per usable row its web caption and a synthetic one."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.data.output import Commit, CommittedOutput
    from capfilt.stages.capfilt.schemas import PAIRS_SCHEMA

    if (out / "_SUCCESS").exists():
        return json.loads((out / "manifest.json").read_text())["totals"]["texts_kept"]
    shutil.rmtree(out, ignore_errors=True)
    output = CommittedOutput(str(out))
    output.claim({"bench": "export", "shards": shards})
    generator = random.Random(0)
    kept = 0
    per_commit = 4
    for commit_id, first in enumerate(range(0, len(shards), per_commit)):
        rows, counts = [], {}
        for shard in shards[first:first + per_commit]:
            table = pq.read_table(shard, columns=["key", "caption", "status", "sha256", "url"]).to_pylist()
            usable = 0
            for row, record in enumerate(table):
                if record["status"] != "success":
                    continue
                usable += 1
                for source, text in (("web", record["caption"]), ("synthetic", f"a synthetic caption of {record['key']}")):
                    rows.append({"key": record["key"], "source_key": f"{Path(shard).name}:{row}", "text": text,
                                 "source": source, "itm_prob": generator.random(), "itc_sim": generator.random(),
                                 "captioner_id": "captioner" if source == "synthetic" else None,
                                 "filter_id": "filter", "sampling": "nucleus" if source == "synthetic" else None,
                                 "round": 0, "sha256": record["sha256"], "shard": shard, "row": row,
                                 "extra": json.dumps({"url": record["url"]}), "image": None})
            counts[shard] = {"rows_in": len(table), "kept": usable, "filtered": 0, "rejected": len(table) - usable,
                             "texts_kept": 2 * usable, "reasons": {}}
        relative = f"pairs/part-{commit_id:05d}-000.parquet"
        output.write_table(relative, pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA))
        output.commit(Commit(commit_id, counts, [relative]))
        kept += len(rows)
    fingerprint = json.loads((out / "_capfilt.json").read_text())
    output.finish({"totals": {"texts_kept": kept}, "config_hash": fingerprint["hash"]})
    return kept


def child(args) -> dict[str, Any]:
    """One export of ``spec["capfilt"]`` into ``spec["dest"]``, sampling memory throughout."""
    from capfilt.config import ExportConfig
    from capfilt.stages.export import run_export

    spec = json.loads(Path(args.spec).read_text())
    sampler = common.MemorySampler(interval_s=0.25, role_of=export_role, roles=(*ROLES, "other_ray_workers"))
    sampler.start()
    common.start_ray(args.num_cpus)
    load_before = common.load_average()
    started = time.time()
    manifest = run_export(spec["capfilt"], spec["dest"], ExportConfig(**spec["settings"]), log=lambda _: None)
    wall = time.time() - started
    memory = sampler.stop()
    import ray

    ray.shutdown()
    written = sum(path.stat().st_size for path in Path(spec["dest"]).iterdir() if path.is_file())
    return {"samples": manifest["totals"]["samples"], "texts": manifest["totals"]["texts"],
            "shards": manifest["planned_shards"], "errors": manifest["totals"]["errors"], "wall_s": round(wall, 1),
            "samples_per_s": round(manifest["totals"]["samples"] / wall, 1), "bytes_written_mb": round(written / 2**20, 1),
            "memory": memory, "load_average_before_after": [load_before, common.load_average()]}


def run_child(label: str, spec: dict[str, Any], work: Path, num_cpus: int) -> dict[str, Any]:
    shutil.rmtree(spec["dest"], ignore_errors=True)  # a fresh export, never one found complete
    spec_file = work / f"{label}.json"
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, __file__, "--child", "--spec", str(spec_file), "--num-cpus", str(num_cpus)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(common.REPO)},
                          cwd=common.REPO)
    if done.returncode:
        raise RuntimeError(f"{label}: the export failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4_000, 40_000], help="web rows: the demo's, then 10x")
    parser.add_argument("--format", choices=["webdataset", "parquet"], default="webdataset")
    parser.add_argument("--samples-per-shard", type=int, default=2_000)
    parser.add_argument("--rows-per-shard", type=int, default=500, help="the demo world's shard size")
    parser.add_argument("--base-rows", type=int, default=4_000, help="distinct generated rows the shards repeat")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="keep the shards and outputs here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args), default=str))
        return
    sys.path.insert(0, str(common.REPO))
    from train_stream import repeated_shards

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="capfilt-export-"))
    work.mkdir(parents=True, exist_ok=True)
    base = common.write_world_shards(work / "world", min(args.base_rows, max(args.sizes)), image_size=48,
                                     rows_per_shard=args.rows_per_shard)
    runs = {}
    for rows in args.sizes:
        shards = repeated_shards(base, args.rows_per_shard, rows, work / f"shards-{rows}")
        pairs = capfilt_output(shards, work / f"capfilt-{rows}")
        settings = {"format": args.format, "samples_per_shard": args.samples_per_shard}
        runs[f"rows_{rows}"] = {"pairs": pairs, **run_child(f"rows_{rows}", {
            "capfilt": str(work / f"capfilt-{rows}"), "dest": str(work / f"export-{rows}"), "settings": settings},
            work, args.num_cpus)}
    result: dict[str, Any] = {"benchmark": "export", "format": args.format, "samples_per_shard": args.samples_per_shard,
                              "machine": common.machine(), "runs": runs}
    if len(args.sizes) > 1:
        small, large = runs[f"rows_{args.sizes[0]}"], runs[f"rows_{args.sizes[-1]}"]
        growth = common.memory_growth(small, large, ROLES, ("peak_anon_mb", "peak_rss_mb"))
        private = {key: value for key, value in growth.items() if key.endswith("peak_anon_mb")}
        result["memory_growth"] = growth
        result["targets"] = {"private_memory_growth_below": GROWTH_TARGET,
                             "private_memory_growth_met": bool(private) and max(private.values()) < GROWTH_TARGET}
    warning = common.busy_warning(common.load_average())
    if warning:
        result["warning"] = warning
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    common.emit(result)


if __name__ == "__main__":
    main()
