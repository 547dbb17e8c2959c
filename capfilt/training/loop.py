"""MED training on Ray Train: one optimiser step, the worker loop, and the driver that runs it.

The driver (:func:`train`) picks the resume point (the newest complete checkpoint under
``<out_dir>/checkpoints``) and runs a ``TorchTrainer`` (gloo on CPU, NCCL on GPU). Each worker
(:func:`train_loop_per_worker`) builds or loads the MED, wraps it in DDP (``prepare_model``), and runs
steps: ``grad_accumulation`` micro-batches, AdamW, the learning rate of
:func:`~capfilt.training.optim.lr_at`, bf16 autocast where the hardware has bf16 matmuls; Ray tasks decode each rank's batches
ahead of it (:mod:`capfilt.training.data`). Every ``checkpoint_every`` steps (and at the end) rank 0
writes a checkpoint (:mod:`capfilt.training.checkpoint`): reported to Ray Train, which copies it into
the stage directory, or, for a stage on object storage, uploaded by rank 0 itself to the stage's URL.
With ``train_in_driver`` the one rank runs in the driver's process (Ray Train's local mode: no
controller or worker processes, whose start-up costs ~20 s a stage on two cores) and copies its
checkpoints into the stage directory itself, where Ray Train would have put them.
Every random draw of step ``s`` on rank ``r`` comes from a generator seeded by (seed, s, r), and the
data of step ``s`` is fixed by (seed, s), so a resumed run continues exactly.

Workers write no files of the stage: their log lines, bad pairs and samples go to an actor on the
driver's node (:mod:`capfilt.training.records`), and what they read (tokenizer, initial MED, resume
checkpoint) they fetch by URL when the stage is on object storage. So a stage on object storage
trains on nodes that share no filesystem; a local stage directory needs one shared by every node that
runs a worker. The driver follows ``train_log.jsonl`` and passes each record to its ``log`` callable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from capfilt.config import MedConfig, PairSource, TrainConfig
from capfilt.training import checkpoint as ckpt
from capfilt.training.precision import autocast_for, precision_name
from capfilt.training.records import (
    BAD_PAIRS_GLOB,
    LOG_FILE,
    SAMPLES_GLOB,
    append_records,
    bad_pairs_summary,
    rank_file,
    read_log,
    rewind_log,
    start_run_records,
)

CHECKPOINTS_DIR = "checkpoints"
LOSS_NAMES = ("loss", "loss_itc", "loss_itm", "loss_lm")


# --------------------------------------------------------------------------------------------------
# One step (no Ray: unit-testable)
# --------------------------------------------------------------------------------------------------


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    lr: float,
    alpha: float,
    objectives: tuple[str, ...],
    prompt_length: int = 0,
    autocast=None,
) -> dict[str, torch.Tensor]:
    """One optimiser step over ``micro_batches`` (gradients averaged); returns the mean losses (detached).

    Under DDP only the last micro-batch synchronises gradients (``no_sync`` for the others).
    """
    from capfilt.training.optim import set_lr

    set_lr(optimizer, lr)
    count = len(micro_batches)
    totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        last = index == count - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast or nullcontext():
                losses = model(**batch, alpha=alpha, objectives=objectives, prompt_length=prompt_length)
            (losses["loss"] / count).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / count
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A decoded batch → MED.forward arguments (which cuts the texts to the batch's longest).

    Copied: arrays fetched with ``ray.get`` are read-only views of the object store.
    """
    names = ("pixel_values", "input_ids", "attention_mask", "image_ids")
    return {name: torch.tensor(batch[name]).to(device, non_blocking=True) for name in names}


def prompt_length_of(tokenizer, prompt: str) -> int:
    """Tokens of the mode token plus the prompt, as BLIP: ``len(tokenizer(prompt).input_ids) - 1``."""
    return len(tokenizer(prompt).input_ids) - 1 if prompt else 0


def with_image_size(med_config: MedConfig, image_size: int | None) -> MedConfig:
    """The model config at another input resolution (validated: it must stay a multiple of the patch)."""
    if image_size is None or image_size == med_config.vision.image_size:
        return med_config
    dump = med_config.model_dump()
    return MedConfig.model_validate({**dump, "vision": {**dump["vision"], "image_size": image_size}})


def effective_med_config(med_config: MedConfig, config: TrainConfig) -> MedConfig:
    """The model's alpha settings, overridden where the training config sets them."""
    update = {}
    if config.alpha is not None:
        update["alpha"] = config.alpha
    if config.alpha_rampup_steps is not None:
        update["alpha_rampup_steps"] = config.alpha_rampup_steps
    return med_config.model_copy(update=update) if update else med_config


# --------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """What the driver hands every worker: plain data."""

    config: dict  # TrainConfig dump
    tokenizer_dir: str  # a path, or a URL each worker fetches (capfilt.training.store.fetch)
    records: str  # the name of the run's RunRecords actor (capfilt.training.records)
    start_step: int
    attempt: str  # the attempt this run is; RunRecords refuses a superseded one's writes
    model: dict | None = None  # MedConfig dump: a fresh MED of this size
    init_med: str | None = None  # or a MED directory (path or URL) to start from
    resume: str | None = None  # a checkpoint directory, path or URL (wins over both)
    fingerprint: str = ""
    data: dict | None = None  # make_batch's keyword arguments
    stream: dict | None = None  # unit_pairs (one count per unit) and the UnitCache actor's name
    upload_checkpoints: str | None = None  # a stage URL: rank 0 uploads checkpoints there instead of reporting them
    checkpoint_dir: str | None = None  # training in the driver: checkpoints go straight into this attempt directory
    storage_options: dict | None = None  # fsspec options for the URLs above


class _Meter:
    """Loss sums and timing between two log lines; ``waited``: seconds spent waiting for batches."""

    def __init__(self, start_step: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.since = time.time()
        self.since_step = start_step
        self.waited = 0.0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def summary(self, step: int, total: int, lr: float, alpha: float) -> dict[str, Any]:
        import torch.distributed as dist

        names = sorted(self.sums)
        values = torch.stack([self.sums[name] for name in names]) / max(1, self.count)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        elapsed = time.time() - self.since
        rate = (step - self.since_step) / elapsed if elapsed > 0 else 0.0
        record = {name: round(float(value), 6) for name, value in zip(names, values.cpu())}
        # data_wait: the share of rank 0's time spent waiting for decoded batches (input-bound when high).
        record.update(step=step, lr=lr, alpha=alpha, steps_per_s=round(rate, 4),
                      eta_s=round((total - step) / rate, 1) if rate > 0 else None, time=time.time(),
                      data_wait=round(min(1.0, self.waited / elapsed), 4) if elapsed > 0 else 0.0)
        self.sums, self.count, self.since, self.since_step, self.waited = {}, 0, time.time(), step, 0.0
        return record


def _build_med(spec: WorkerSpec, config: TrainConfig, tokenizer):
    from capfilt.models.med import MED, load_med
    from capfilt.training.store import fetch

    if spec.resume:
        return load_med(fetch(spec.resume, spec.storage_options))
    if spec.init_med:
        return load_med(fetch(spec.init_med, spec.storage_options), image_size=config.image_size)
    model_config = with_image_size(MedConfig.model_validate(spec.model), config.image_size)
    torch.manual_seed(config.seed)  # the same fresh weights on every rank (DDP also broadcasts rank 0's)
    return MED.from_config(model_config, tokenizer)


class BadPairs:
    """One rank's pairs that training met but could not use, recorded in ``bad_pairs.rank{r}.jsonl``
    (a resumed run meets the same positions again: readers dedupe by position). The run stops once the
    distinct pairs a rank has found unusable exceed ``max_bad_fraction`` of the data's."""

    def __init__(self, spec: WorkerSpec, config: TrainConfig, rank: int, records):
        import ray

        self.name = rank_file(BAD_PAIRS_GLOB, rank)
        self.records, self.attempt = records, spec.attempt
        self.pairs = {tuple(pair) for pair in
                      ray.get(records.bad_pairs_before.remote(spec.start_step * config.batch_size))}
        self.total = sum(spec.stream["unit_pairs"])
        self.allowed = config.max_bad_fraction * self.total
        self.reasons: dict[str, int] = {}

    def add(self, found: list[dict[str, Any]], step: int) -> None:
        import ray

        if not found:
            return
        ray.get(self.records.append.remote(self.name, [{**record, "step": step} for record in found], self.attempt))
        for record in found:
            self.reasons[record["reason"]] = self.reasons.get(record["reason"], 0) + 1
            self.pairs.add((record["unit"], record["ordinal"]))
        if len(self.pairs) > self.allowed:
            raise RuntimeError(
                f"{len(self.pairs)} of the {self.total} pairs could not be used in training ({self.reasons}; "
                f"e.g. {found[0]}): more than max_bad_fraction {self.allowed / self.total:g} allows; "
                f"see {self.name} in the stage directory"
            )


def train_loop_per_worker(spec_dict: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: steps ``[start_step, steps)`` of one run."""
    import ray.train
    import ray.train.torch

    from capfilt.training.data import BatchPrefetcher, StreamPlan, derived_seed, rank_positions

    spec = WorkerSpec(**spec_dict)
    config = TrainConfig.model_validate(spec.config)
    torch.set_num_threads(math.ceil(config.cpus_per_worker))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    positions = rank_positions(spec.start_step, config.steps, config.batch_size, config.workers, rank)
    plan = StreamPlan(spec.stream["unit_pairs"], config.seed, config.shuffle_shards, spec.stream["unit_groups"])
    # The first micro-batches are submitted now, so their decode workers start (seconds of imports each)
    # while this worker imports the model code and builds the MED.
    batches = BatchPrefetcher(positions, config.micro_batch, plan, ray.get_actor(spec.stream["cache"]), rank,
                              spec.data, config.data_cpus)
    batches.submit_ahead()

    from capfilt.data.text import load_tokenizer
    from capfilt.models.med import alpha_at
    from capfilt.training.optim import load_state, lr_at, make_optimizer
    from capfilt.training.store import fetch, upload_checkpoint

    records = ray.get_actor(spec.records)
    tokenizer = load_tokenizer(fetch(spec.tokenizer_dir, spec.storage_options))

    med = _build_med(spec, config, tokenizer)
    med_config = effective_med_config(med.config, config)
    objectives = tuple(config.objectives)
    # DDP must not wait for gradients of heads an objective subset leaves unused; the queues and
    # momentum encoders are the same on every rank (features are all-gathered), so no buffer broadcast.
    model = ray.train.torch.prepare_model(
        med, parallel_strategy_kwargs={"find_unused_parameters": len(objectives) < 3, "broadcast_buffers": False}
    )
    optimizer = make_optimizer(med, config)
    if spec.resume:
        load_state(optimizer, ckpt.load_optimizer_state(fetch(spec.resume, spec.storage_options), device))
    autocast = autocast_for(device, config.mixed_precision, min(med.config.vision.width, med.config.text.width))
    prompt_length = prompt_length_of(tokenizer, config.prompt)
    if rank == 0:
        ray.get(records.append.remote(LOG_FILE, [{
            "event": "worker", "device": str(device), "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
            "precision": precision_name(autocast)}], spec.attempt))

    bad = BadPairs(spec, config, rank, records)
    samples = rank_file(SAMPLES_GLOB, rank)
    meter = _Meter(spec.start_step)
    last_metrics: dict[str, Any] = {}
    med.train()
    for step in range(spec.start_step, config.steps):
        torch.manual_seed(derived_seed("step", config.seed, step, rank))  # dropout, ITM negatives
        micro = []
        for _ in range(config.grad_accumulation):
            waiting = time.perf_counter()
            batch = next(batches)
            meter.waited += time.perf_counter() - waiting
            bad.add(batch["bad"], step)
            micro.append(model_inputs(batch, device))
            if config.record_samples:
                ray.get(records.append.remote(samples, [{"step": step, "rank": rank, "attempt": spec.attempt,
                                                         "positions": batch["position"].tolist()}], spec.attempt))
        lr, alpha = lr_at(step, config), alpha_at(step, med_config)
        losses = train_step(model, optimizer, micro, lr=lr, alpha=alpha, objectives=objectives,
                            prompt_length=prompt_length, autocast=autocast)
        meter.add(losses)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            metrics = meter.summary(done, config.steps, lr, alpha)
            if rank == 0:
                ray.get(records.append.remote(LOG_FILE, [metrics], spec.attempt))
            last_metrics = metrics
        # Only checkpoints go through ray.train.report: the controller takes one report per poll
        # (about 2 s), so reporting every log step would throttle training to that pace.
        if done % config.checkpoint_every == 0 or done == config.steps:
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if rank == 0:
                    ckpt.write(directory, med, optimizer, done, {"fingerprint": spec.fingerprint})
                    if spec.upload_checkpoints:
                        ray.get(records.check_current.remote(spec.attempt))
                        upload_checkpoint(directory, done, spec.upload_checkpoints, config.keep_checkpoints,
                                          spec.storage_options)
                    elif spec.checkpoint_dir:  # Ray Train's local mode keeps a reported checkpoint nowhere
                        ckpt.install(directory, Path(spec.checkpoint_dir), done, config.keep_checkpoints)
                    else:
                        checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report({**last_metrics, "step": done}, checkpoint=checkpoint,
                                 checkpoint_dir_name=ckpt.checkpoint_name(done))
            if rank == 0:
                ray.get(records.checkpointed.remote(done, spec.attempt))


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainJob:
    """One training run: its config, where it lives, and the MED it starts from."""

    config: TrainConfig
    out_dir: str  # holds checkpoints/, train_log.jsonl, bad_pairs.rank*.jsonl
    tokenizer_dir: str
    sources: list[PairSource]  # where the pairs are
    units: list[dict[str, Any]]  # {source, path, pairs}: index_pairs' units of those sources
    model: MedConfig | None = None  # pretraining from scratch: a fresh MED of this size
    init_med: str | None = None  # fine-tuning / continued pretraining: this MED directory
    fingerprint: str = ""
    name: str = "train"  # prefix of progress lines
    remote_url: str | None = None  # the stage's URL when it lives on object storage (see the module docstring)
    storage_options: dict | None = None


def med_config_of(model_dir: str) -> MedConfig:
    from capfilt.models.med import CONFIG_FILE

    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a MED directory written by save_med")
    return MedConfig.model_validate(json.loads(path.read_text())["config"])


def check_job(job: TrainJob, cluster: dict[str, float]) -> tuple[MedConfig, bool]:
    """The model config the run trains and whether it uses GPUs; clear errors for impossible settings."""
    config = job.config
    if (job.model is None) == (job.init_med is None):
        raise ValueError("a training job starts from exactly one of a model config (fresh) or init_med")
    if job.model is None:
        from capfilt.training.store import fetch

        med_config = with_image_size(med_config_of(fetch(job.init_med, job.storage_options)), config.image_size)
    else:
        med_config = with_image_size(job.model, config.image_size)
    if config.max_text_length > med_config.text.max_position_embeddings:
        raise ValueError(f"max_text_length {config.max_text_length} exceeds the model's "
                         f"max_position_embeddings {med_config.text.max_position_embeddings}")
    global_micro = config.micro_batch * config.workers
    if "itc" in config.objectives and med_config.queue_size and med_config.queue_size % global_micro:
        raise ValueError(f"the ITC queue ({med_config.queue_size}) must be a multiple of the global micro-batch "
                         f"{global_micro} (batch_size {config.batch_size} / grad_accumulation {config.grad_accumulation})")
    # Trained in the driver, the rank's GPU is the one torch sees in this process, not the cluster's.
    gpus = float(torch.cuda.is_available()) if config.train_in_driver else cluster.get("GPU", 0.0)
    use_gpu = gpus >= config.workers if config.use_gpu == "auto" else bool(config.use_gpu)
    if use_gpu and gpus < config.workers:
        where = "the driver's process sees none" if config.train_in_driver else f"the cluster has {gpus:g}"
        raise ValueError(f"use_gpu: {config.workers} workers need a GPU each; {where}")
    # Training in the driver still holds its CPUs (a placement group in _run_attempt) so decoding cannot take them.
    cpus_needed = config.workers * config.cpus_per_worker + config.data_cpus
    if cluster.get("CPU", 0.0) < cpus_needed:
        raise ValueError(
            f"the cluster has {cluster.get('CPU', 0.0):g} CPUs; training needs {cpus_needed:g} "
            f"({config.workers} workers x {config.cpus_per_worker:g} + {config.data_cpus:g} for decoding)"
        )
    return med_config, use_gpu


def format_record(name: str, record: dict, total: int) -> str:
    losses = " ".join(f"{key[5:]} {record[key]:.4f}" for key in LOSS_NAMES[1:] if key in record)
    eta = record.get("eta_s")
    eta_text = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None else "?"
    wait = f" ({record['data_wait']:.0%} waiting for data)" if record.get("data_wait") else ""
    return (f"[{name}] step {record['step']}/{total} loss {record.get('loss', float('nan')):.4f} ({losses}) "
            f"lr {record['lr']:.2e} {record.get('steps_per_s', 0):.2f} steps/s{wait} eta {eta_text}")


def _fit_following(trainer, log_path: str, offset: int, name: str, total: int, log: Callable[[str], None]):
    """``trainer.fit()`` in this thread while a helper thread passes new log records to ``log``.

    Training stays in the calling thread because in local mode (``train_in_driver``) it trains right here, and
    torch's OpenMP pool belongs to the thread that uses it: training in a second thread beside a main thread
    that has used torch puts two pools in the process, more pool threads than cores, and libgomp then stops
    spinning between parallel regions and wakes its threads for each op instead. The demo's step took
    334 ms that way against 204 ms in the caller's thread (bench/README.md section 8, "One thread for torch").
    """
    stop = threading.Event()
    failed: list[BaseException] = []

    def follow() -> None:
        nonlocal offset
        while not stop.wait(0.5):
            try:
                offset = _emit_new(log_path, offset, name, total, log)
            except Exception as error:  # noqa: BLE001 -- progress lines must never stop training
                failed.append(error)
                return

    follower = threading.Thread(target=follow, name="capfilt-train-log", daemon=True)
    follower.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        follower.join()
        if failed:
            log(f"[{name}] progress lines stopped: {type(failed[0]).__name__}: {failed[0]}")
        else:  # the records written since the follower's last look
            _emit_new(log_path, offset, name, total, log)


def _emit_new(path: str, offset: int, name: str, total: int, log: Callable[[str], None]) -> int:
    if not os.path.exists(path):
        return offset
    with open(path, encoding="utf-8") as handle:
        handle.seek(offset)
        while True:
            line = handle.readline()
            if not line.endswith("\n"):
                break  # not yet completely written
            offset += len(line.encode("utf-8"))
            record = json.loads(line)
            if "loss" in record:
                log(format_record(name, record, total))
            elif record.get("event") == "worker":
                where = " (in the driver)" if record.get("pid") == os.getpid() else ""
                log(f"[{name}] rank 0 on {record['device']}{where}: {record['precision']}, "
                    f"{record['torch_threads']} torch threads")
    return offset


def lost_workers(error: BaseException) -> str | None:
    """What was lost when ``error`` comes from a training worker, a decoding task or the unit cache
    dying with its process or node (worth a restart from the last checkpoint); None for an error the
    code raised, which a restart would only raise again."""
    import ray.exceptions
    from ray.train import WorkerGroupError

    dead = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError,
            ray.exceptions.WorkerCrashedError)
    if isinstance(error, WorkerGroupError):
        failures = error.worker_failures.values()
        lost = [failure for failure in failures
                if isinstance(failure, dead) or type(failure).__name__ == "WorkerHealthCheckFailedError"
                or isinstance(getattr(failure, "cause", None), dead)]
        if lost:
            return f"{len(lost)} worker(s) ({type(lost[0]).__name__})"
        return None
    return type(error).__name__ if isinstance(error, dead) else None


def latest_checkpoint(job: TrainJob) -> tuple[int, str] | None:
    """The newest complete checkpoint of the job as (step, path or URL): in the stage's URL when the stage
    is on object storage (rank 0 uploads them there), else under its local ``checkpoints/``."""
    if job.remote_url:
        from capfilt.training.store import remote_checkpoints

        found = remote_checkpoints(job.remote_url, job.storage_options)
        return found[-1] if found else None
    found = ckpt.latest(Path(job.out_dir).resolve() / CHECKPOINTS_DIR)
    return (found[0], str(found[1])) if found else None


def _run_attempt(job: TrainJob, med_config: MedConfig, use_gpu: bool, root: Path, log_path: str,
                 found: tuple[int, str] | None, log: Callable[[str], None]) -> None:
    """One Ray Train run from the checkpoint ``found`` (or from the start) to the last step."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from capfilt.training.data import UnitCache

    config = job.config
    start_step = found[0] if found else 0
    # Attempt names stay unique across machines: a run resumed elsewhere pulled the log naming earlier ones.
    attempt = ckpt.next_attempt(root, [record["attempt"] for record in read_log(log_path)
                                       if record.get("event") == "start"])
    ckpt.set_current_attempt(root, attempt)  # from now on an earlier run's workers stop writing
    ckpt.prune(root, keep=Path(found[1]) if found and not job.remote_url else None)
    rewind_log(log_path, start_step)
    offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    append_records(log_path, [{"event": "start", "step": start_step, "attempt": attempt, "time": time.time(),
                               "resumed_from": found[1] if found else None}])
    where = f"{job.remote_url.rstrip('/')}/{CHECKPOINTS_DIR}" if job.remote_url else root / attempt
    log(f"[{job.name}] {'resuming from step ' + str(start_step) if found else 'starting'}: "
        f"{config.steps} steps of {config.batch_size} pairs "
        f"{'in the driver' if config.train_in_driver else f'on {config.workers} worker(s)'}"
        f"{' with GPUs' if use_gpu else ''}; checkpoints in {where}")

    udf_kwargs = {"tokenizer_dir": str(job.tokenizer_dir), "image_size": med_config.vision.image_size,
                  "image_config_json": config.image.model_dump_json(), "max_text_length": config.max_text_length,
                  "prompt": config.prompt, "seed": config.seed,
                  "storage_options_json": json.dumps(job.storage_options or {}, sort_keys=True)}
    run_id = f"{job.fingerprint[:12] or 'train'}-{attempt}-{os.getpid()}"
    cache_name, records_name = f"capfilt-units-{run_id}", f"capfilt-records-{run_id}"
    cache = ray.remote(UnitCache).options(name=cache_name, num_cpus=0, max_concurrency=config.workers + 2).remote(
        [source.model_dump_json() for source in job.sources], job.units, config.seed,
        config.shuffle_shards, config.workers)
    records = start_run_records(records_name, Path(log_path).parent, root, job.remote_url, job.storage_options)
    spec = WorkerSpec(
        # The workers read a TrainConfig: a subclass's own fields (a fine-tune's ensemble size) stay here.
        config=config.model_dump(mode="json", include=set(TrainConfig.model_fields)),
        tokenizer_dir=str(job.tokenizer_dir), records=records_name,
        start_step=start_step, attempt=attempt,
        model=job.model.model_dump(mode="json") if job.model is not None else None, init_med=job.init_med,
        resume=found[1] if found else None, fingerprint=job.fingerprint, data=udf_kwargs,
        stream={"unit_pairs": [unit["pairs"] for unit in job.units],
                "unit_groups": [unit["source"] for unit in job.units], "cache": cache_name},
        upload_checkpoints=job.remote_url,
        checkpoint_dir=str(root / attempt) if config.train_in_driver and not job.remote_url else None,
        storage_options=job.storage_options,
    )
    if config.train_in_driver:
        for name in _LOCAL_MODE_CHATTER:
            logging.getLogger(name).setLevel(logging.WARNING)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(spec),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=0 if config.train_in_driver else config.workers,
                                               use_gpu=use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker},
                                               placement_strategy=config.placement_strategy),
        run_config=ray.train.RunConfig(
            # Ray Train's own run state; the checkpoints too unless rank 0 uploads them (remote stages).
            name=attempt, storage_path=str(root),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            # Restarts are the driver's (train): each resumes from the checkpoint it chooses, as a new attempt.
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    held = None
    threads = torch.get_num_threads()  # the loop sets its own; in the driver, give the caller's back
    try:
        if config.train_in_driver:
            held = _hold_driver_cpus(config, use_gpu)
        _fit_following(trainer, log_path, offset, job.name, config.steps, log)
    finally:
        torch.set_num_threads(threads)
        if held is not None:
            ray.util.remove_placement_group(held)
        ray.kill(cache)
        ray.kill(records)


# In local mode Ray Train logs its start, the model's device and every report at INFO on the driver's
# console, between capfilt's own progress lines that say the same.
_LOCAL_MODE_CHATTER = ("ray.train.v2.api.config", "ray.train.v2._internal.execution.train_fn_utils",
                       "ray.train.torch.train_loop_utils")


def _hold_driver_cpus(config: TrainConfig, use_gpu: bool):
    """A placement group of the rank's resources on the driver's node, held while it trains there, so Ray
    schedules no decoding task onto the CPUs (or GPU) the driver's torch threads use. None where that node
    offers Ray none (a head node started with 0 CPUs runs no tasks anyway)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    offered = next((node["Resources"] for node in ray.nodes() if node["NodeID"] == node_id), {})
    bundle = {"CPU": config.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    if any(offered.get(name, 0.0) < amount for name, amount in bundle.items()):
        return None
    group = ray.util.placement_group([bundle], strategy="STRICT_PACK", _soft_target_node_id=node_id)
    if not group.wait(timeout_seconds=120):
        ray.util.remove_placement_group(group)
        raise RuntimeError(f"train_in_driver: {bundle} on the driver's node were not free within 120 s")
    return group


def train(job: TrainJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume, or find finished) the training job; returns the final checkpoint and what ran.

    A worker, decoding task or node lost mid-run (``lost_workers``) restarts the run from its last
    checkpoint, up to ``max_restarts`` times: the data of each step is fixed by (seed, step), so the
    restarted run trains the same samples in the same steps."""
    import ray

    config = job.config
    if not ray.is_initialized():
        ray.init()
    med_config, use_gpu = check_job(job, ray.cluster_resources())
    root = Path(job.out_dir).resolve() / CHECKPOINTS_DIR
    log_path = str(Path(job.out_dir).resolve() / LOG_FILE)

    found = latest_checkpoint(job)
    start_step = found[0] if found else 0
    if start_step > config.steps:
        raise ValueError(f"{found[1]}: a checkpoint of step {start_step}, beyond steps {config.steps}")
    started = time.time()
    restarts = 0
    while True:
        found = latest_checkpoint(job)
        if found is not None and found[0] >= config.steps:
            break
        try:
            _run_attempt(job, med_config, use_gpu, root, log_path, found, log)
            break
        except Exception as error:  # noqa: BLE001 -- re-raised unless a worker or its node was lost
            lost = lost_workers(error)
            if not lost or restarts >= config.max_restarts:
                raise
            restarts += 1
            log(f"[{job.name}] lost {lost}; restarting from the last checkpoint "
                f"(restart {restarts} of at most {config.max_restarts})")
    final = latest_checkpoint(job)
    if final is None or final[0] != config.steps:
        raise RuntimeError(f"{job.remote_url or root}: training ended without a checkpoint of step {config.steps} "
                           f"(found {final})")
    return {"checkpoint": final[1], "steps": config.steps, "start_step": start_step,
            "seconds": round(time.time() - started, 1), "log": log_path, "restarts": restarts,
            "bad_pairs": bad_pairs_summary(Path(job.out_dir).resolve(), config.steps * config.batch_size,
                                           sum(unit["pairs"] for unit in job.units))}
