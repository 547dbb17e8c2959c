"""Orchestration: plan the input shards, run the Ray Data stream (read tasks, actor pool, driver), write the manifest."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from capfilt.config import CapFiltConfig, ModelRef, identity
from capfilt.data.output import CommittedOutput
from capfilt.stages.capfilt.assemble import ShardAssembler
from capfilt.stages.capfilt.read import ReadAndDecode, ShardTask
from capfilt.stages.capfilt.schemas import HUMAN, WEB
from capfilt.stages.capfilt.worker import CapFiltWorker, model_id, sampling_label


def _read_task(tasks: dict[str, np.ndarray], **settings) -> Iterator[pa.Table]:
    # A plain function, so Ray Data runs reads as tasks that give their CPU back between shards.
    yield from ReadAndDecode(**settings)(tasks)


def actor_pool(config: CapFiltConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Actor count and per-actor resources from the cluster, never taking the CPUs reads need."""
    gpus = resources.get("GPU", 0.0)
    if gpus >= config.gpus_per_actor:
        room = int(gpus // config.gpus_per_actor)
        per_actor = {"num_gpus": config.gpus_per_actor, "num_cpus": min(config.cpus_per_actor, 1.0)}
        where = f"{gpus:g} GPUs at {config.gpus_per_actor:g} per actor"
    else:
        spare = resources.get("CPU", 0.0) - config.reserve_cpus_for_reading
        room = int(spare // config.cpus_per_actor) if spare > 0 else 0
        per_actor = {"num_cpus": config.cpus_per_actor}
        where = (f"{resources.get('CPU', 0):g} CPUs, {config.reserve_cpus_for_reading:g} reserved for reading, "
                 f"{config.cpus_per_actor:g} per actor")
    if room < 1:
        raise ValueError(f"capfilt.actors: no room for an actor on this cluster ({where}); "
                         "lower capfilt.cpus_per_actor or capfilt.reserve_cpus_for_reading")
    if config.actors == "auto":
        # An autoscaling pool: it keeps working with fewer actors when a node is lost.
        concurrency: int | tuple[int, int] = (1, room)
    elif config.actors > room:
        raise ValueError(f"capfilt.actors: {config.actors} requested but the cluster fits {room} ({where})")
    else:
        concurrency = config.actors
    threads = max(1, int(per_actor["num_cpus"])) if "num_gpus" not in per_actor else None
    return {"concurrency": concurrency, "threads": threads, **per_actor}


def image_settings(ref: ModelRef) -> dict[str, Any]:
    from capfilt.models.export import read_image_processor

    return read_image_processor(ref.path, revision=ref.revision)


def fingerprint(config: CapFiltConfig, shards: list[ShardTask], provenance: dict[str, Any]) -> dict[str, Any]:
    """What determines the output. Batch sizes, actor counts and file sizes do not, so they may change on resume."""
    settings = identity(config)
    for name in ("web", "human", "output"):  # the inputs are listed per shard below; output is where, not what
        settings.pop(name, None)
    return {"capfilt": settings, "inputs": [[task.role, task.url] for task in shards], "models": provenance}


def plan(config: CapFiltConfig) -> list[ShardTask]:
    from capfilt.data.shards import expand_paths

    tasks = []
    for role, reader in ((WEB, config.web), (HUMAN, config.human)):
        if reader is None:
            continue
        reader_dump = reader.model_dump(mode="json")
        for url in expand_paths(reader.paths, reader.storage_options):
            tasks.append(ShardTask(url, role, reader_dump))
    if not tasks:
        raise ValueError("capfilt.web: no input shards configured")
    return tasks


def run_capfilt(config: CapFiltConfig, output: str, log=print) -> dict[str, Any]:
    """Run (or resume) CapFilt into ``output``; returns the manifest."""
    import ray

    if not config.captioners or not config.filters:
        raise ValueError("capfilt.captioners and capfilt.filters: at least one of each is needed")
    started = time.time()
    tasks = plan(config)
    provenance = {"captioners": [provenance_of(ref, "captioner") for ref in config.captioners],
                  "filters": [provenance_of(ref, "filter") for ref in config.filters]}
    out = CommittedOutput(output, config.output_storage_options)
    out.claim(fingerprint(config, tasks, provenance))
    next_id = out.recover(["pairs", "rejects"])
    done = out.done_shards()
    todo = [task for task in tasks if task.url not in done]
    filter_id = "+".join(p["id"] for p in provenance["filters"])
    label = sampling_label(config.sampling)
    if todo:
        log(f"capfilt: {len(todo)} of {len(tasks)} input shards to process into {output}")
        if not ray.is_initialized():
            ray.init()
        pool = actor_pool(config, ray.cluster_resources())
        image_size = image_settings(config.filters[0])["image_size"]
        worker_config = config.model_dump(mode="json")
        items = [{"url": t.url, "role": t.role, "reader": json.dumps(t.reader)} for t in todo]
        dataset = (
            ray.data.from_items(items, override_num_blocks=len(items))
            # max_retries: a read on a lost node is redone elsewhere. Being a task-only argument, it also
            # keeps Ray Data from fusing reads into the actors, which would serialise decode and model.
            .map_batches(_read_task, batch_size=1, batch_format="numpy", num_cpus=1, max_retries=3,
                         fn_kwargs={"image_size": image_size, "max_pixels": config.max_pixels,
                                    "decode_batch_size": config.decode_batch_size,
                                    "embed_images": config.embed_images})
            .map_batches(CapFiltWorker, batch_size=config.batch_size, batch_format="pyarrow",
                         concurrency=pool["concurrency"], num_cpus=pool["num_cpus"], num_gpus=pool.get("num_gpus", 0),
                         fn_constructor_kwargs={"config": worker_config,
                                                "captioners": [r.model_dump() for r in config.captioners],
                                                "filters": [r.model_dump() for r in config.filters],
                                                "threads": pool["threads"]})
        )
        assembler = ShardAssembler(out, next_id, config.rows_per_file, filter_id, label, config.round,
                                   max_buffer_bytes=config.max_buffer_bytes)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            assembler.add(batch)
        assembler.flush()
        if assembler.pending():
            raise RuntimeError(f"capfilt: shards did not complete: {assembler.pending()[:5]}")
    manifest = build_manifest(out, tasks, provenance, label, started)
    out.finish(manifest)
    return manifest


def provenance_of(ref: ModelRef, role: str) -> dict[str, Any]:
    from capfilt.models.export import model_provenance

    record = model_provenance(ref.path, revision=ref.revision)
    return {"role": role, "id": model_id(ref, record), **record}


def build_manifest(out: CommittedOutput, tasks: list[ShardTask], provenance: dict, sampling: str, started: float) -> dict:
    from capfilt.provenance import library_versions

    shards = {}
    for commit in out.commits():
        shards.update(commit.shards)
    totals: dict[str, Any] = {}
    for counts in shards.values():
        for name, value in counts.items():
            if name == "reasons":
                merged = totals.setdefault("reasons", {})
                for reason, count in value.items():
                    merged[reason] = merged.get(reason, 0) + count
            elif isinstance(value, int):
                totals[name] = totals.get(name, 0) + value
    fingerprint_record = json.loads(out.fs.cat_file(out.path("_capfilt.json")))
    return {
        "shards": shards,
        "totals": totals,
        "unreadable_shards": sorted(s for s, c in shards.items() if c.get("error")),
        "config_hash": fingerprint_record["hash"],
        "models": provenance,
        "sampling": sampling,
        "libraries": library_versions(),
        "finished_at": time.time(),
        "seconds_this_run": time.time() - started,
        "roles": {t.url: t.role for t in tasks},
    }
