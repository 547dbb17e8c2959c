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
from capfilt.stages.capfilt.schemas import HUMAN, SHARD_UNREADABLE, WEB
from capfilt.stages.capfilt.worker import CapFiltWorker, model_id, sampling_label


def _read_task(tasks: dict[str, np.ndarray], **settings) -> Iterator[pa.Table]:
    # A plain function, so Ray Data runs reads as tasks that give their CPU back between shards.
    yield from ReadAndDecode(**settings)(tasks)


def _room(config: CapFiltConfig, resources: dict[str, float]) -> tuple[int, dict[str, float], str]:
    """How many actors ``resources`` hold beside the CPUs reserved for reading, each actor's resources, and why."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    spare = cpus - config.reserve_cpus_for_reading
    reading = f"{cpus:g} CPUs, {config.reserve_cpus_for_reading:g} reserved for reading"
    if gpus >= config.gpus_per_actor:
        per_actor = {"num_gpus": config.gpus_per_actor, "num_cpus": min(config.cpus_per_actor, 1.0)}
        # The actors' host CPUs leave the reserved ones to the reads, as on CPU-only clusters.
        by_cpus = int(spare // per_actor["num_cpus"]) if spare > 0 else 0
        room = min(int(gpus // config.gpus_per_actor), by_cpus)
        where = f"{gpus:g} GPUs at {config.gpus_per_actor:g} per actor; {reading}, {per_actor['num_cpus']:g} per actor"
    else:
        per_actor = {"num_cpus": config.cpus_per_actor}
        room = int(spare // config.cpus_per_actor) if spare > 0 else 0
        where = f"{reading}, {config.cpus_per_actor:g} per actor"
    return room, per_actor, where


def actor_pool(config: CapFiltConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Actor count and per-actor resources from the cluster, never taking the CPUs reads need."""
    room, per_actor, where = _room(config, resources)
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


def resource_request(config: CapFiltConfig, resources: dict[str, float]) -> tuple[list[dict[str, float]], str]:
    """What the pool needs, for Ray's autoscaler: a bundle per actor (one for ``auto``) and a CPU per reserved
    CPU for reading (reads take one each, on any node); and the same in words.

    The actors' shape is the one ``actor_pool`` would choose on ``resources``: GPU actors once the
    cluster has GPUs, CPU actors before (a cold cluster's first node then brings its GPUs, if it has any).
    """
    _, per_actor, _ = _room(config, resources)
    count = 1 if config.actors == "auto" else config.actors
    actor = {"CPU": per_actor["num_cpus"]}
    each = " each" if count > 1 else ""
    if "num_gpus" in per_actor:
        actor["GPU"] = per_actor["num_gpus"]
        shape = f"GPU actor ({_count(per_actor['num_gpus'], 'GPU')}, {_count(per_actor['num_cpus'], 'CPU')}{each})"
    else:
        shape = f"CPU actor ({_count(per_actor['num_cpus'], 'CPU')}{each})"
    reserve = config.reserve_cpus_for_reading
    reading = [{"CPU": 1.0}] * int(reserve) + ([{"CPU": reserve - int(reserve)}] if reserve > int(reserve) else [])
    what = f"{count} {shape}".replace("actor ", "actors " if count > 1 else "actor ", 1)
    what += f" + {_count(reserve, 'CPU')} for reading" if reserve else ""
    return [actor] * count + reading, what


def _count(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}{'' if amount == 1 else 's'}"


def _have(resources: dict[str, float]) -> str:
    gpus = resources.get("GPU", 0.0)
    return (f"{_count(gpus, 'GPU')}, " if gpus else "") + _count(resources.get("CPU", 0.0), "CPU")


def ask_autoscaler(bundles: list[dict[str, float]], log=print) -> bool:
    """Ray's autoscaler SDK ``request_resources(bundles=...)`` (an empty list withdraws the request); whether it
    took. It is a hint: a cluster without an autoscaler ignores it, and over Ray Client it may fail (logged)."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as error:  # noqa: BLE001 -- waiting goes on: nodes may still join
        log(f"capfilt: could not ask Ray's autoscaler for resources ({type(error).__name__}: {error})")
        return False
    return True


def wait_for_actor_pool(config: CapFiltConfig, log=print, poll_s: float = 1.0) -> tuple[dict[str, Any], bool]:
    """The actor pool (``actor_pool``), once the cluster has room for it, and whether the autoscaler was asked.

    Until one actor (``actors: auto``) or ``actors`` of them fit beside the CPUs reserved for reading,
    asks Ray's autoscaler for them (``request_resources``: a standing request, which the caller
    withdraws when it is done) and polls the cluster's resources, for up to
    ``config.wait_for_resources_s``: on a cold autoscaling cluster (a head with no CPUs,
    ``min_workers: 0``) the worker nodes come up only when asked for.
    """
    import ray

    wanted = 1 if config.actors == "auto" else config.actors
    started = time.monotonic()
    requested: list[dict[str, float]] | None = None
    while True:
        resources = ray.cluster_resources()
        if _room(config, resources)[0] >= wanted:
            return actor_pool(config, resources), requested is not None
        bundles, what = resource_request(config, resources)
        waited = time.monotonic() - started
        if waited >= config.wait_for_resources_s:
            if requested is not None:
                ask_autoscaler([], log)  # withdrawn: nothing will use them
            raise TimeoutError(
                f"capfilt: waited {config.wait_for_resources_s:g} s for {what}; the cluster has {_have(resources)}. "
                "Add nodes (an autoscaling cluster adds them when asked, given time: raise "
                "capfilt.wait_for_resources_s), or lower capfilt.actors, capfilt.cpus_per_actor or "
                "capfilt.reserve_cpus_for_reading")
        if bundles != requested:  # the shape changes when the first GPU node joins
            asked = ask_autoscaler(bundles, log)
            if requested is None:
                log(f"capfilt: waiting up to {config.wait_for_resources_s:g} s (capfilt.wait_for_resources_s) for "
                    f"{what}; the cluster has {_have(resources)}" + ("; asked Ray's autoscaler for them" if asked else ""))
            requested = bundles
        time.sleep(max(0.0, min(poll_s, config.wait_for_resources_s - waited)))


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


def stream(config: CapFiltConfig, todo: list[ShardTask], pool: dict[str, Any], image_size: int):
    """The Ray Data stream: a read task per shard (CPU decode), then the CapFilt actors (``pool``)."""
    import ray

    items = [{"url": t.url, "role": t.role, "reader": json.dumps(t.reader)} for t in todo]
    concurrency = pool["concurrency"]
    actors = (ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
              if isinstance(concurrency, tuple) else ray.data.ActorPoolStrategy(size=concurrency))
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        # Reads are Ray Data tasks, which it retries until they succeed when their worker or node is
        # lost (max_retries=-1, its default): a read on a lost node is redone elsewhere. max_calls=0 is
        # Ray's default too (a worker runs any number of reads), but being a task-only argument it keeps
        # Ray Data from fusing the reads into the actors, which would serialise decode and model
        # (tests/stages/test_capfilt.py checks the plan).
        .map_batches(_read_task, batch_size=1, batch_format="numpy", num_cpus=1, max_calls=0,
                     fn_kwargs={"image_size": image_size, "max_pixels": config.max_pixels,
                                "decode_batch_size": config.decode_batch_size,
                                "embed_images": config.embed_images})
        .map_batches(CapFiltWorker, batch_size=config.batch_size, batch_format="pyarrow",
                     compute=actors, num_cpus=pool["num_cpus"], num_gpus=pool.get("num_gpus", 0),
                     fn_constructor_kwargs={"config": config.model_dump(mode="json"),
                                            "captioners": [r.model_dump() for r in config.captioners],
                                            "filters": [r.model_dump() for r in config.filters],
                                            "threads": pool["threads"]})
    )


def run_capfilt(config: CapFiltConfig, output: str, log=print) -> dict[str, Any]:
    """Run (or resume) CapFilt into ``output``; returns the manifest."""
    import ray

    if not config.filters:
        raise ValueError("capfilt.filters: at least one filter is needed")
    if config.writes_captions and not config.captioners:
        raise ValueError("capfilt.captioners: at least one captioner is needed (or capfilt.sampling.num_captions: 0 "
                         "for the filter alone)")
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
    unavailable: dict[str, str] = {}
    if todo:
        log(f"capfilt: {len(todo)} of {len(tasks)} input shards to process into {output}")
        if not ray.is_initialized():
            ray.init()
        pool, asked = wait_for_actor_pool(config, log)
        try:
            dataset = stream(config, todo, pool, image_settings(config.filters[0])["image_size"])
            assembler = ShardAssembler(out, next_id, config.rows_per_file, filter_id, label, config.round,
                                       max_buffer_bytes=config.max_buffer_bytes)
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                assembler.add(batch)
            assembler.flush()
        finally:
            if asked:  # a standing request: withdrawn, so the autoscaler may let the nodes go when idle
                ask_autoscaler([], log)
        if assembler.pending():
            raise RuntimeError(f"capfilt: shards did not complete: {assembler.pending()[:5]}")
        unavailable = assembler.unavailable
    manifest = build_manifest(out, tasks, provenance, label, started, unavailable)
    for line in unread_summary(manifest["could_not_read"]):
        log(line)
    problem = input_problem(manifest["could_not_read"], config.max_unreadable_fraction, output)
    if problem:
        out.write_manifest(manifest)  # for capfilt inspect; no _SUCCESS: the stage is not finished
        raise InputReadError(problem)
    out.finish(manifest)
    return manifest


class InputReadError(RuntimeError):
    """Input that could not be read: shards still failing after retries, or more unreadable than allowed."""


def unread_summary(unread: dict[str, Any]) -> list[str]:
    """Log lines naming what could not be read (nothing when everything was)."""
    lines = []
    if unread["shards"]:
        lines.append(f"capfilt: {len(unread['shards'])} of {unread['input_shards']} input shards could not be read "
                     f"in full; {unread['rows']} rows rejected as unreadable (shard_unreadable, rows_unreadable)")
        lines.extend(f"  {shard}: {error}" for shard, error in list(unread["errors"].items())[:10])
    if unread["unavailable"]:
        lines.append(f"capfilt: {len(unread['unavailable'])} input shards failed with storage errors after retries "
                     "and are not committed")
        lines.extend(f"  {shard}: {error}" for shard, error in list(unread["unavailable"].items())[:10])
    return lines


def input_problem(unread: dict[str, Any], max_fraction: float, output: str) -> str | None:
    """Why the stage must not finish, or None."""
    if unread["unavailable"]:
        first, error = next(iter(unread["unavailable"].items()))
        return (f"capfilt: {len(unread['unavailable'])} input shards could not be read after retries (storage "
                f"errors): {', '.join(list(unread['unavailable'])[:5])}; e.g. {first}: {error}. Everything else "
                f"is committed in {output}: run again to retry them")
    if unread["fraction"] > max_fraction:
        return (f"capfilt: {len(unread['shards'])} of {unread['input_shards']} input shards "
                f"({unread['fraction']:.1%}) could not be read in full, more than capfilt.max_unreadable_fraction "
                f"= {max_fraction:g}: {', '.join(unread['shards'][:5])}; their {unread['rows']} unreadable rows are "
                f"rejected with the reason and everything read is committed in {output}. Replace those shards "
                "(and delete the output), or raise capfilt.max_unreadable_fraction and run again")
    return None


def provenance_of(ref: ModelRef, role: str) -> dict[str, Any]:
    from capfilt.models.export import model_provenance

    record = model_provenance(ref.path, revision=ref.revision)
    return {"role": role, "id": model_id(ref, record), **record}


def build_manifest(out: CommittedOutput, tasks: list[ShardTask], provenance: dict, sampling: str, started: float,
                   unavailable: dict[str, str] | None = None) -> dict:
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
        "could_not_read": could_not_read(shards, len(tasks), unavailable or {}),
        "config_hash": fingerprint_record["hash"],
        "models": provenance,
        "sampling": sampling,
        "libraries": library_versions(),
        "finished_at": time.time(),
        "seconds_this_run": time.time() - started,
        "roles": {t.url: t.role for t in tasks},
    }


UNREAD_REASONS = (SHARD_UNREADABLE, "rows_unreadable")


def could_not_read(shards: dict[str, dict[str, Any]], input_shards: int, unavailable: dict[str, str]) -> dict[str, Any]:
    """The input that could not be read: committed shards with a read error or unreadable rows, and the
    shards left uncommitted after storage errors. ``fraction`` counts shards of the input."""
    errors = {}
    for shard, counts in sorted(shards.items()):
        partly = {reason: counts["reasons"][reason] for reason in UNREAD_REASONS if counts["reasons"].get(reason)}
        if counts.get("error") or partly:
            errors[shard] = counts.get("error") or ", ".join(f"{count} {reason}" for reason, count in partly.items())
    rows = sum(counts["reasons"].get(reason, 0) for counts in shards.values() for reason in UNREAD_REASONS)
    unread = sorted(set(errors) | set(unavailable))
    return {"input_shards": input_shards, "shards": unread, "rows": rows, "errors": errors,
            "unavailable": dict(sorted(unavailable.items())), "fraction": len(unread) / max(input_shards, 1)}
