"""What the benchmarks share: the machine record, models built in code, input shards, memory sampling.

Nothing here is timed; the scripts time what they measure themselves.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# Real photographs, read in place and never copied into the repo (see its SOURCE.md).
FLICKR = REPO.parent / "shared" / "data" / "flickr8k-1k"

# Model sizes, as capfilt.config.MedConfig overrides. "test" is the test suite's smallest model.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "test": {"preset": "tiny", "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2,
                                          "mlp_dim": 128},
             "text": {"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, "embed_dim": 32},
    "tiny": {"preset": "tiny"},  # 64 px ViT/8 + 3-layer 128-wide text: the demo's model
    "base": {"preset": "base"},  # ViT-B/16 at 384 px + BERT-base: BLIP-base
}
BLIP_BASE_VOCAB = 30524  # bert-base-uncased plus [DEC] and [ENC]


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    record = {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1_5_15": load_average(),
    }
    try:
        import transformers

        record["transformers"] = transformers.__version__
    except ImportError:
        pass
    return record


def busy_warning(load: list[float], cpus: int | None = None) -> str | None:
    """A note for the JSON when other work shared the CPUs, so the figures read as lower bounds."""
    cpus = cpus or os.cpu_count() or 1
    if load[0] > 0.5 * cpus:
        return (f"1-minute load average {load[0]} on {cpus} CPUs: other processes shared the machine, "
                "so rates are lower bounds; rerun when it is idle")
    return None


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2, sort_keys=False, default=str), flush=True)


# --------------------------------------------------------------------------------------------------
# Models, built in code (random weights: throughput does not depend on what the weights are)
# --------------------------------------------------------------------------------------------------


def bench_tokenizer(out_dir: str | Path, corpus: Iterable[str], vocab_size: int = 4000):
    """A capfilt tokenizer ([DEC]/[ENC] included) trained on ``corpus`` (the captions being processed)."""
    from capfilt.data.text import train_tokenizer

    return train_tokenizer(["a picture of", *corpus], Path(out_dir), vocab_size=vocab_size)


def shard_captions(paths: Iterable[str]) -> list[str]:
    import pyarrow.parquet as pq

    return [c for path in paths for c in pq.read_table(path, columns=["caption"]).column(0).to_pylist() if c]


def build_models(size: str, tokenizer, out_dir: str | Path, vocab_size: int | None = None, seed: int = 0,
                 dtype=None, text_overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """A random captioner and filter of ``size`` (:data:`MODEL_SIZES`), exported as capfilt exports them.

    ``vocab_size`` above the tokenizer's gives the LM head its real cost (BLIP-base: 30524); sampled ids
    past the tokenizer decode to nothing. ``text_overrides``: fields of the text tower to change
    (e.g. ``max_position_embeddings``).
    """
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.config import MedConfig
    from capfilt.models.export import image_processor
    from capfilt.models.med import text_config, vision_config
    from capfilt.models.tokens import special_ids

    sizes = dict(MODEL_SIZES[size])
    if text_overrides:
        sizes["text"] = {**sizes.get("text", {}), **text_overrides}  # MedConfig merges it into the preset's
    med = MedConfig(**sizes)
    vocab = max(vocab_size or 0, len(tokenizer))
    config = BlipConfig(
        text_config=text_config(med, vocab, special_ids(tokenizer)).to_dict(),
        vision_config=vision_config(med).to_dict(),
        image_text_hidden_size=med.embed_dim,
    )
    paths = {}
    for role, cls in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        torch.manual_seed(seed)
        model = cls(config).eval()
        if dtype is not None:  # bf16 halves what BLIP-base writes and reads back
            model = model.to(dtype)
        target = Path(out_dir) / f"{size}-{role}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        image_processor(med.vision.image_size).save_pretrained(target)
        paths[role] = str(target)
    return paths


# --------------------------------------------------------------------------------------------------
# Input shards in img2dataset's Parquet layout
# --------------------------------------------------------------------------------------------------


def flickr_pairs(root: Path = FLICKR, limit: int | None = None) -> list[tuple[Path, str]] | None:
    """(photo, its first caption) for each photo, or None when the data set is absent."""
    images = root / "images"
    if not images.is_dir():
        return None
    captions: dict[str, str] = {}
    captions_file = root / "captions.csv"
    if captions_file.exists():
        with open(captions_file, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                captions.setdefault(row["image"], row["caption"])
    photos = sorted(images.glob("*.jpg"))[:limit]
    return [(photo, captions.get(photo.name, "a photo")) for photo in photos]


def write_photo_shards(pairs: list[tuple[Path, str]], out_dir: str | Path, rows_per_shard: int) -> list[str]:
    """img2dataset-layout Parquet shards (key, caption, url, status, ..., sha256, jpg) of the given photos."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(pairs), rows_per_shard)):
        rows = []
        for index, (photo, caption) in enumerate(pairs[start : start + rows_per_shard]):
            data = photo.read_bytes()
            width, height = Image.open(io.BytesIO(data)).size
            rows.append({"key": f"{shard:05d}{index:04d}", "caption": caption, "url": photo.as_uri(),
                         "status": "success", "error_message": None, "width": width, "height": height,
                         "original_width": width, "original_height": height, "exif": None,
                         "sha256": hashlib.sha256(data).hexdigest(), "jpg": data})
        path = out_dir / f"{shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        paths.append(str(path))
    return paths


def write_world_shards(out_dir: str | Path, rows: int, image_size: int, rows_per_shard: int, seed: int = 0) -> list[str]:
    """Web shards of the generated world (a few failed and corrupt rows included, as the world has them)."""
    from capfilt.config import WorldConfig
    from capfilt.data.world import write_world

    faults = min(4, rows // 100)
    config = WorldConfig(seed=seed, num_web=rows, num_human=0, num_test=0, image_size=image_size,
                         rows_per_shard=rows_per_shard, failed_rows=faults, corrupt_rows=faults)
    return list(write_world(config, str(out_dir)).shards["web"])


def decoded_table(pixels, keys: list[str], captions: list[str], shard: str = "memory://bench"):
    """Rows as ReadAndDecode hands them to the actors: uint8 [N, S, S, 3] pixels in capfilt's DECODED_SCHEMA."""
    import pyarrow as pa

    from capfilt.stages.capfilt import DECODED_SCHEMA, WEB

    n = len(keys)
    columns = {name: [None] * n for name in DECODED_SCHEMA.names}
    columns.update(shard=[shard] * n, role=[WEB] * n, row=list(range(n)), key=list(keys),
                   source_key=[f"{shard}:{i}" for i in range(n)], caption=list(captions), extra=["{}"] * n,
                   pixels=[image.tobytes() for image in pixels])
    return pa.Table.from_pydict(columns, schema=DECODED_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Running the stage and reading its timeline
# --------------------------------------------------------------------------------------------------


def commit_timeline(output: str) -> list[tuple[float, int]]:
    """(commit time, input rows it covers) for each commit of a local output, in time order."""
    commits = Path(output) / "_commits"
    timeline = []
    for record_file in commits.glob("*.json"):
        record = json.loads(record_file.read_text())
        rows = sum(counts["rows_in"] for counts in record["shards"].values())
        timeline.append((record_file.stat().st_mtime, rows))
    return sorted(timeline)


def stage_rates(started: float, finished: float, timeline: list[tuple[float, int]], images: int) -> dict[str, Any]:
    """Total and steady-state rates of one run.

    Steady state runs from the first commit to the last: actor start, model load and the first batch
    through the pipe fall before it; the rows of the first commit are left out with them.
    """
    result = {"images": images, "wall_s": round(finished - started, 3),
              "images_per_s_total": round(images / (finished - started), 2), "commits": len(timeline)}
    first, last = (timeline[0][0], timeline[-1][0]) if timeline else (finished, finished)
    if len(timeline) >= 3 and last - first >= 1.0:
        steady_rows = sum(rows for _, rows in timeline[1:])
        result.update(startup_s=round(first - started, 3), steady_s=round(last - first, 3),
                      images_per_s_steady=round(steady_rows / max(last - first, 1e-9), 2))
    else:
        result.update(startup_s=None, steady_s=None, images_per_s_steady=None,
                      steady_note="under 3 commits or 1 s between first and last: use more shards for a steady-state rate")
    return result


def run_stage(config, output: str) -> dict[str, Any]:
    """run_capfilt once, with its total and steady-state rates and the manifest's totals."""
    from capfilt.stages.capfilt import run_capfilt

    started = time.time()
    manifest = run_capfilt(config, output, log=lambda *args: None)
    finished = time.time()
    totals = manifest["totals"]
    result = stage_rates(started, finished, commit_timeline(output), totals["rows_in"])
    result["images_decoded"] = totals.get("images_decoded", 0)
    result["texts_scored"] = totals.get("texts_scored", 0)
    result["texts_kept"] = totals.get("texts_kept", 0)
    return result


def start_ray(num_cpus: int) -> bool:
    """A fresh local cluster of ``num_cpus`` (never one that another process started); False if one is up."""
    import ray

    if ray.is_initialized():
        return False
    # address="local": a bare init() joins any cluster `ray start` left on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


# --------------------------------------------------------------------------------------------------
# Memory: resident set sizes of this process and of its Ray workers, from /proc
# --------------------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "PPid"):
                values[name] = int(rest.split()[0])  # kB, or the pid
    return values


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()


def process_role(command: str) -> str | None:
    """The part a process plays in a CapFilt run, from its Ray title; None for Ray's own daemons."""
    if not command.startswith("ray::"):
        return None
    if "CapFiltWorker" in command:
        return "actors"
    if "ReadAndDecode" in command or "_read_task" in command:
        return "read_tasks"
    return "other_ray_workers"  # idle pool workers, Ray Data's own tasks


class MemorySampler(threading.Thread):
    """Samples every ``interval_s`` the RSS of this process and of every Ray worker descended from it.

    Linux /proc only (psutil is not installed in capfilt's environment; Ray only vendors a private
    copy). Per process it keeps the kernel's own peak (VmHWM), so spikes between samples are not
    missed, and the peaks of its private (RssAnon) and shared (RssShmem) parts: a Ray worker's RSS
    also counts every page of the shared object store it has touched, which grows with the run
    until it reaches the store's size, without the process holding more memory of its own. Per role
    it keeps the largest single process and the largest simultaneous sum of RSS.
    """

    def __init__(self, interval_s: float = 0.25, role_of=None,
                 roles: tuple[str, ...] = ("driver", "actors", "read_tasks", "other_ray_workers")):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.role_of = role_of or process_role
        self.report_roles = roles
        self.available = os.path.isdir(f"/proc/{os.getpid()}")
        self.stop_event = threading.Event()
        self.peak_kb: dict[int, int] = {}  # pid -> VmHWM
        self.peak_anon_kb: dict[int, int] = {}
        self.peak_shmem_kb: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self.sum_peak_kb: dict[str, int] = {}
        self.samples = 0
        self.started = time.time()
        self.timeline: list[tuple[float, dict[str, int]]] = []  # (seconds, role -> summed VmRSS kB)

    def descendants(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    parents[int(entry)] = _proc_status(int(entry))["PPid"]
                except (OSError, KeyError, ValueError):
                    continue
        found, frontier = [], [os.getpid()]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent]
            found.extend(children)
            frontier.extend(children)
        return found

    def sample(self) -> None:
        sums: dict[str, int] = {}
        for pid in [os.getpid(), *self.descendants()]:
            try:
                status = _proc_status(pid)
                role = "driver" if pid == os.getpid() else self.role_of(_cmdline(pid))
            except (OSError, KeyError, ValueError):
                continue
            if role is None:
                continue
            if role != "other_ray_workers" or pid not in self.roles:
                self.roles[pid] = role  # a pooled worker that ran a read task stays a reader when idle
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), status.get("VmHWM", 0))
            self.peak_anon_kb[pid] = max(self.peak_anon_kb.get(pid, 0), status.get("RssAnon", 0))
            self.peak_shmem_kb[pid] = max(self.peak_shmem_kb.get(pid, 0), status.get("RssShmem", 0))
            sums[role] = sums.get(role, 0) + status.get("VmRSS", 0)
        for role, total in sums.items():
            self.sum_peak_kb[role] = max(self.sum_peak_kb.get(role, 0), total)
        self.timeline.append((time.time() - self.started, sums))
        self.samples += 1

    def run(self) -> None:
        while self.available and not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval_s)

    def stop(self, timeline_points: int = 20) -> dict[str, Any]:
        self.stop_event.set()
        self.join()
        if not self.available:
            return {"sampler": "unavailable (no /proc on this system)"}
        self.sample()
        report: dict[str, Any] = {"sampler": "/proc VmHWM per process, VmRSS sums", "samples": self.samples}
        for role in self.report_roles:
            pids = [pid for pid, r in self.roles.items() if r == role]
            if not pids:
                continue
            report[role] = {
                "processes": len(pids),
                "peak_rss_mb": round(max(self.peak_kb[pid] for pid in pids) / 1024, 1),
                "peak_anon_mb": round(max(self.peak_anon_kb[pid] for pid in pids) / 1024, 1),
                "peak_shmem_mb": round(max(self.peak_shmem_kb[pid] for pid in pids) / 1024, 1),
                "peak_sum_rss_mb": round(self.sum_peak_kb.get(role, 0) / 1024, 1),
            }
        step = max(1, len(self.timeline) // timeline_points)
        report["rss_timeline_mb"] = [
            {"t": round(t, 1), **{role: round(kb / 1024) for role, kb in sorted(sums.items())}}
            for t, sums in self.timeline[::step]
        ]
        return report


def memory_growth(small: dict[str, Any], large: dict[str, Any], roles: Iterable[str],
                  measures: Iterable[str]) -> dict[str, float]:
    """Relative growth of each role's peaks (``run["memory"][role][measure]``) from the small run to the large one."""
    table = {}
    for role in roles:
        for measure in measures:
            before = small["memory"].get(role, {}).get(measure)
            after = large["memory"].get(role, {}).get(measure)
            if before and after is not None:
                table[f"{role}.{measure}"] = round(after / before - 1.0, 4)
    return table
