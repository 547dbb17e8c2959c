"""What the pretrain and fine-tune stages share: bind the stage directory to its inputs, count
the pairs, train (resuming), save the MED, record the result last.

Stage directory::

    OUT/_capfilt.json        the inputs' fingerprint (claimed first; another configuration is refused)
    OUT/init/                a fresh MED with model.init's pretrained weights (init/_init.json: what
                             was loaded and what stayed fresh), when the stage starts from them
    OUT/_pairs_index.json    pairs per unit of the sources (capfilt.data.pairs.index_pairs); the pairs
                             themselves are read from the sources while training
    OUT/checkpoints/         checkpoints while training (removed once the result is recorded)
    OUT/train_log.jsonl      one record per log_every steps, plus start/checkpoint events
    OUT/bad_pairs.rank*.jsonl  pairs met in training that could not be used (summed in the result)
    OUT/med/                 the final MED (save_med) with its tokenizer (and the exported models)
    OUT/_RESULT.json         the stage's result, written last: a rerun returns it without training
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from capfilt.config import InitConfig, MedConfig, PairSource, TrainConfig, identity

RESULT_FILE = "_RESULT.json"
MED_DIR = "med"
INIT_DIR = "init"
INIT_RECORD = "_init.json"


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_digest(directory: str | Path, names: Sequence[str] | None = None) -> str:
    """SHA-256 over the (name, content) of the given files, or of every file directly in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    paths = [directory / name for name in names] if names else sorted(p for p in directory.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def med_digest(model_dir: str | Path) -> str:
    from capfilt.models.med import CONFIG_FILE, WEIGHTS_FILE

    return directory_digest(model_dir, [CONFIG_FILE, WEIGHTS_FILE])


def source_identity(source: str, revision: str | None = None) -> dict[str, Any]:
    """A weights source as content where it is local (a file or directory digest; not its path, which
    differs between machines that fetch the same run's files), else as a hub id."""
    path = Path(source)
    if path.is_file():
        return {"sha256": file_digest(path)}
    if path.is_dir():
        return {"sha256": directory_digest(path)}
    return {"hub_id": source, "revision": revision}


def fingerprint(stage: str, train: TrainConfig, sources: Sequence[PairSource], tokenizer_dir: str,
                model: MedConfig | None, init_med: str | None) -> dict[str, Any]:
    init = model.init if model is not None and init_med is None else InitConfig()
    return {
        "stage": stage,
        "train": identity(train),  # RUNTIME fields (workers, logging...) may differ on resume
        "sources": [source.model_dump(mode="json") for source in sources],
        "tokenizer": directory_digest(tokenizer_dir),
        "model": model.model_dump(mode="json", exclude={"init"}) if model is not None and init_med is None else None,
        "model_init": {name: source_identity(value, init.revision) for name, value in init.model_dump().items()
                       if value and name != "revision"} or None,
        "init_med": {"sha256": med_digest(init_med)} if init_med else None,
    }


def materialise_init(model: MedConfig, tokenizer_dir: str, seed: int, out: Path) -> tuple[str, dict[str, Any]]:
    """A fresh MED of size ``model`` with ``model.init``'s weights loaded, saved under ``out/init``.

    Built once, in the driver, so every worker (and a resumed run) starts from the same weights and the
    report of what stayed fresh is made once. Returns the MED directory and that report.
    """
    import torch

    from capfilt.data.text import load_tokenizer
    from capfilt.models.init import apply_init
    from capfilt.models.med import MED, save_med

    directory = out / INIT_DIR
    record = directory / INIT_RECORD
    if record.exists():
        return str(directory), json.loads(record.read_text())
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)  # the fresh parts, as a from-scratch run of the same seed draws them
    med = MED.from_config(model, tokenizer)
    loaded = apply_init(med, model.init, tokenizer)
    report = {**loaded.summary(), "log_line": loaded.as_log_line()}
    save_med(med, directory, tokenizer)
    _write_json(record, report)
    return str(directory), report


def _write_json(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(temporary, path)


def run_training_stage(
    stage: str,
    train: TrainConfig,
    sources: Sequence[PairSource],
    tokenizer_dir: str,
    out_dir: str,
    *,
    model: MedConfig | None = None,
    init_med: str | None = None,
    export: Callable[[Any, Any, Path], dict[str, str]] | None = None,
    log: Callable[[str], None] = print,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one MED into ``out_dir`` (see the module docstring); ``export(med, tokenizer, out_dir)``
    adds its model directories to the result.

    ``out_dir`` may be a URL (``s3://``, ``gs://``: fsspec with ``storage_options``): the driver then
    works in a local mirror, rank 0 uploads the checkpoints to the URL as they are made, and the MED, the
    exported models and the result follow at the end (:mod:`capfilt.training.store`); a run killed on
    one machine resumes from the URL on another, and its workers need no filesystem shared with the
    driver. ``tokenizer_dir`` and ``init_med`` may be URLs too (the workers fetch them). The returned
    paths are the mirror's, loadable as they are.
    """
    from capfilt.data.output import CommittedOutput, config_hash
    from capfilt.data.pairs import PAIRS_INDEX, index_pairs
    from capfilt.data.text import load_tokenizer
    from capfilt.models.med import load_med, save_med
    from capfilt.training import checkpoint as ckpt
    from capfilt.training.loop import CHECKPOINTS_DIR, TrainJob
    from capfilt.training.loop import train as run_train
    from capfilt.training.records import BAD_PAIRS_GLOB, LOG_FILE
    from capfilt.training.store import StageStore, fetch, forget

    if not sources:
        raise ValueError(f"{stage}: no pair sources given")
    store = StageStore(str(out_dir), storage_options)
    out = store.local
    tokenizer_url, tokenizer_dir = tokenizer_dir, fetch(tokenizer_dir, storage_options)
    inputs = fingerprint(stage, train, sources, tokenizer_dir, model, init_med and fetch(init_med, storage_options))
    # Refuses a directory trained with other inputs.
    CommittedOutput(store.out_dir if store.remote else str(out), storage_options).claim(inputs)
    record = store.read_json(RESULT_FILE)
    if record is not None and record.get("hash") == config_hash(inputs):
        result = record["result"]
        if store.remote:  # another machine's mirror, or none: bring the models here
            store.pull((), tuple(result.get("outputs", {}).values()))
            result.update({name: str(out / relative) for name, relative in result.get("outputs", {}).items()})
        log(f"[{stage}] complete in {out_dir}, skipped")
        return result

    store.pull((PAIRS_INDEX, LOG_FILE, BAD_PAIRS_GLOB), (INIT_DIR,))
    started = time.time()
    init_report = None
    if init_med is None and model is not None and model.init.is_set():
        init_med, init_report = materialise_init(model, tokenizer_dir, train.seed, out)
        init_med = store.push(INIT_DIR)  # its URL when remote: the workers fetch it from there
        model = None
        log(f"[{stage}] starting from {init_report['log_line']}")
    import ray

    if not ray.is_initialized():
        ray.init()
    index = index_pairs(sources, str(out), data_cpus=train.data_cpus)
    store.push(PAIRS_INDEX)
    pairs = {key: index[key] for key in ("total", "by_source", "rejects")}
    pairs["units"] = len(index["units"])
    log(f"[{stage}] {pairs['total']} pairs in {pairs['units']} shards {pairs['by_source']}; "
        f"rejected {pairs['rejects'] or 'none'}")
    unreadable = [unit["error"] for unit in index["units"] if "error" in unit]
    if unreadable:
        log(f"[{stage}] warning: {len(unreadable)} shard(s) could not be read and are left out: {unreadable[0]}")
    job = TrainJob(config=train, out_dir=str(out), tokenizer_dir=str(tokenizer_url), sources=list(sources),
                   units=[unit for unit in index["units"] if unit["pairs"]],
                   model=model if init_med is None else None, init_med=init_med,
                   fingerprint=config_hash(inputs), name=stage,
                   remote_url=store.out_dir if store.remote else None, storage_options=storage_options)
    trained = run_train(job, log)

    tokenizer = load_tokenizer(tokenizer_dir)
    med = load_med(fetch(trained["checkpoint"], storage_options))
    forget(trained["checkpoint"])  # a checkpoint's copy (weights and optimizer state) is not kept here
    save_med(med, out / MED_DIR, tokenizer)
    outputs = {"med": MED_DIR}
    if export is not None:
        outputs.update({name: str(Path(path).relative_to(out)) for name, path in export(med, tokenizer, out).items()})
    result: dict[str, Any] = {
        **{name: str(out / relative) for name, relative in outputs.items()},
        "steps": train.steps,
        "pairs": pairs,
        "bad_pairs": trained["bad_pairs"],
        "resumed_from_step": trained["start_step"] or None,
        "log": trained["log"],
        "outputs": outputs,  # relative to the stage directory
    }
    if store.remote:
        result["remote"] = {name: store.push(relative) for name, relative in outputs.items()}
        store.push(LOG_FILE)
    if init_report is not None:
        result["init"] = init_report
    result["seconds"] = round(time.time() - started, 1)
    _write_json(out / RESULT_FILE, {"hash": config_hash(inputs), "result": result})
    store.push(RESULT_FILE)
    ckpt.remove_all(out / CHECKPOINTS_DIR)
    store.remove_checkpoints()
    log(f"[{stage}] done: {store.url(MED_DIR) if store.remote else result['med']}")
    return result
