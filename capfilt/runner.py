"""Orders stages, skips the complete ones, owns the run directory.

The pipeline YAML names sections; the runner expands them into the paper's loop of stage runs::

    synth | ingest                       the data (generated world, or img2dataset from URLs)
    pretrain_vision                      the ViT as a classifier on labelled images (the demo's ImageNet)
    tokenizer                            trained on the captions, or a hub id / directory
    pretrain_noisy                       MED on raw web + human pairs (the baseline, and round 0's init),
                                         from model.init's weights or pretrain_vision's ViT
    round_R/finetune_captioner           LM on human pairs, from the round's MED
    round_R/finetune_filter              ITC+ITM on human pairs, from the round's MED
    round_R/capfilt                      caption + filter the web shards (human pairs pass through)
    round_R/pretrain                     MED on the bootstrapped pairs: round R+1's MED, from the same
                                         initialisation as pretrain_noisy (or the previous round's MED)
    evaluate                             noisy vs bootstrapped on the held-out split; metrics.json

A stage run is a function ``(run, step) -> outputs`` writing under its own directory. Its completion
record (``<dir>/_STAGE.json``: a hash of its section and inputs, and its outputs) is written last: a
stage whose record matches is skipped, one whose configuration changed is refused, and so is a complete
stage made from a stage that would be redone (its directory deleted), so artifacts of two configurations
never mix. Nothing is redone automatically: the user deletes those directories or picks a new run dir.
Stages with their own resume (training checkpoints, CapFilt commits) are called again when unfinished
and redo only what is missing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec

from capfilt.config import PipelineConfig, ReaderConfig, identity
from capfilt.data.output import _diff, config_hash

STAGE_RECORD = "_STAGE.json"


class StageConflictError(RuntimeError):
    pass


@dataclass
class Step:
    name: str  # also the directory under the run dir
    function: Callable[["Run", "Step"], dict[str, Any]]
    section: Any  # the pydantic section(s) this step reads
    inputs: dict[str, Any] = field(default_factory=dict)  # names of earlier steps it consumes


@dataclass
class Run:
    config: PipelineConfig
    root: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def stage_dir(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def output(self, step_name: str) -> dict[str, Any]:
        return self.outputs[step_name]


def default_run_dir(config: PipelineConfig) -> str:
    return config.run_dir or os.path.join("runs", config.name)


# --------------------------------------------------------------------------------------------------
# Data the pipeline reads, wherever it came from
# --------------------------------------------------------------------------------------------------


def data_reader(run: Run, split: str) -> ReaderConfig | None:
    """The reader for ``split`` (web, human, test): the data section, else synth's or ingest's output."""
    configured = getattr(run.config.data, split)
    if configured is not None:
        return configured
    if "synth" in run.outputs:
        return ReaderConfig(paths=f"{run.outputs['synth'][split]}/*.parquet")
    if split == "web" and "ingest" in run.outputs:
        return ReaderConfig(paths=f"{run.outputs['ingest']['web']}/*.parquet")
    return None


def _require(reader: ReaderConfig | None, what: str) -> ReaderConfig:
    if reader is None:
        raise ValueError(f"data.{what}: not set, and no synth or ingest stage in this pipeline provides it")
    return reader


# --------------------------------------------------------------------------------------------------
# Stage functions: thin adapters from the runner's context to each stage's own API
# --------------------------------------------------------------------------------------------------


def _synth(run: Run, step: Step) -> dict[str, Any]:
    from capfilt.data.world import write_world

    paths = write_world(step.section, run.stage_dir(step.name))
    outputs = {split: str(getattr(paths, split)) for split in ("web", "human", "test")}
    if step.section.num_labelled:
        outputs["labelled"] = str(paths.labelled)
    return outputs


def _pretrain_vision(run: Run, step: Step) -> dict[str, Any]:
    from capfilt.stages.pretrain_vision import run_pretrain_vision

    reader = step.section.data
    if reader is None and "labelled" in run.outputs.get("synth", {}):
        reader = ReaderConfig(paths=f"{run.outputs['synth']['labelled']}/*.parquet")
    if reader is None:
        raise ValueError("pretrain_vision.data: not set, and no synth stage with num_labelled > 0 provides it")
    return run_pretrain_vision(step.section, run.config.model.vision, reader, run.stage_dir(step.name), log=run.log)


def _ingest(run: Run, step: Step) -> dict[str, Any]:
    from capfilt.stages.ingest import ingest

    return {"web": ingest(step.section, run.stage_dir(step.name))}


def _shard_sources(run: Run, splits: tuple[str, ...]):
    from capfilt.data.pairs import PairSource

    return [PairSource(kind="shards", reader=_require(data_reader(run, split), split), role=split) for split in splits]


def _local(path: str) -> str:
    """An earlier stage's output where this process can read files: the path itself, or for a run directory
    on object storage a local copy (capfilt/training/store.py ``fetch``)."""
    from capfilt.training.store import fetch

    return fetch(path)


def _tokenizer_dir(run: Run) -> str:
    return _local(run.output("tokenizer")["tokenizer"])


def _uploaded(result: dict[str, Any]) -> dict[str, Any]:
    """A training stage's result with its models' URLs (where the run directory is on object storage) in
    place of the paths of this machine's mirror, so that any machine can resume the run."""
    return {**result, **result.get("remote", {})}


def _tokenizer(run: Run, step: Step) -> dict[str, Any]:
    from capfilt.stages.pretrain import prepare_tokenizer
    from capfilt.training.store import StageStore

    sources = _shard_sources(run, ("human", "web"))
    out_dir = run.stage_dir(step.name)
    if "://" not in out_dir:
        return {"tokenizer": str(prepare_tokenizer(step.section, sources, out_dir))}
    store = StageStore(out_dir)  # made in a local mirror, then uploaded
    prepare_tokenizer(step.section, sources, str(store.local / "tokenizer"))
    return {"tokenizer": store.push("tokenizer")}


def _pretrain(run: Run, step: Step) -> dict[str, Any]:
    from capfilt.data.pairs import PairSource
    from capfilt.stages.pretrain import run_pretrain

    if "capfilt" in step.inputs:
        # The bootstrapped pairs: CapFilt's output already holds the human pairs, passed through.
        sources = [PairSource(kind="capfilt", path=run.output(step.inputs["capfilt"])["output"])]
    else:
        sources = _shard_sources(run, ("web", "human"))
    model = run.config.model
    if "vision" in step.inputs:
        vision = _local(run.output(step.inputs["vision"])["vit"])
        model = model.model_copy(update={"init": model.init.model_copy(update={"vision": vision})})
    # The MED and tokenizer by their URLs where the run is on object storage: the workers fetch them.
    init_from = run.output(step.inputs["continue"])["med"] if "continue" in step.inputs else None
    return _uploaded(run_pretrain(step.section, model, run.output("tokenizer")["tokenizer"], sources,
                                  run.stage_dir(step.name), init_from=init_from, log=run.log))


def _model_init(run: Run, step: Step) -> dict[str, Any]:
    from pathlib import Path

    from capfilt.training.stage import materialise_init
    from capfilt.training.store import StageStore

    store = StageStore(run.stage_dir(step.name))  # on object storage: a local mirror, uploaded
    med, report = materialise_init(step.section, _tokenizer_dir(run), 0, store.local)
    run.log(f"[{step.name}] {report['log_line']}")
    return {"med": store.push(str(Path(med).relative_to(store.local))), "init": report}


def _finetune(kind: str) -> Callable[[Run, Step], dict[str, Any]]:
    def finetune(run: Run, step: Step) -> dict[str, Any]:
        from capfilt.stages import finetune as stage

        return _uploaded(stage.run_finetune(kind, step.section, run.output(step.inputs["init"])["med"],
                                            run.output("tokenizer")["tokenizer"], _shard_sources(run, ("human",)),
                                            run.stage_dir(step.name), log=run.log))

    return finetune


def _capfilt(run: Run, step: Step) -> dict[str, Any]:
    from capfilt.config import ModelRef
    from capfilt.stages.capfilt import run_capfilt

    section = step.section
    update: dict[str, Any] = {"round": step.inputs["round"]}
    if section.web is None:
        update["web"] = _require(data_reader(run, "web"), "web")
    if section.human is None and data_reader(run, "human") is not None:
        update["human"] = data_reader(run, "human")
    for role, kind in (("captioners", "captioner"), ("filters", "filter")):
        if not getattr(section, role) and kind in step.inputs:
            update[role] = [ModelRef(path=run.output(stage)["model"], name=model_id)
                            for model_id, stage in step.inputs[kind].items()]
    section = section.model_copy(update=update)
    output = section.output or run.stage_dir(step.name)
    if section.output and run.config.rounds > 1:
        output = f"{section.output.rstrip('/')}/round_{section.round}"  # each round's pairs in their own place
    manifest = run_capfilt(section, output, log=run.log)
    unread = manifest["could_not_read"]
    return {"output": output, "totals": manifest["totals"],
            "could_not_read": {"shards": len(unread["shards"]), "of_shards": unread["input_shards"],
                               "rows": unread["rows"]}}


def _evaluate(run: Run, step: Step) -> dict[str, Any]:
    from capfilt.stages.evaluate import run_evaluate

    models = {label: _local(run.output(name)["med"]) for label, name in step.inputs["models"].items()}
    capfilt_outputs = {label: run.output(name)["output"] for label, name in step.inputs.get("capfilt", {}).items()}
    run_evaluate(step.section, models, _require(data_reader(run, "test"), "test"), run.stage_dir(step.name),
                 capfilt_outputs=capfilt_outputs, web=data_reader(run, "web"), log=run.log)
    return {"metrics": f"{run.stage_dir(step.name)}/metrics.json"}


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def plan(config: PipelineConfig) -> list[Step]:
    """The stage runs a pipeline asks for, in order, with which earlier outputs each consumes."""
    steps: list[Step] = []
    if config.synth is not None:
        steps.append(Step("synth", _synth, config.synth))
    if config.ingest is not None:
        steps.append(Step("ingest", _ingest, config.ingest))
    if config.pretrain_vision is not None:
        steps.append(Step("pretrain_vision", _pretrain_vision, config.pretrain_vision))
    trains = config.pretrain is not None or config.finetune_captioner is not None or config.finetune_filter is not None
    if trains:
        steps.append(Step("tokenizer", _tokenizer, config.tokenizer))
    # Every pretraining from the model's initialisation starts from the same weights.
    init_inputs = {"vision": "pretrain_vision"} if config.pretrain_vision is not None else {}
    current_med = None
    if config.pretrain is not None:
        steps.append(Step("pretrain_noisy", _pretrain, config.pretrain, dict(init_inputs)))
        current_med = "pretrain_noisy"
    elif trains and config.model.init.is_set():
        # Fine-tuning straight from pretrained weights (a published BLIP, a MED): no pretraining first.
        steps.append(Step("model_init", _model_init, config.model))
        current_med = "model_init"
    for round_ in range(config.rounds if config.capfilt is not None else 0):
        prefix = f"round_{round_}"
        inputs: dict[str, Any] = {"round": round_}
        for kind, section in (("captioner", config.finetune_captioner), ("filter", config.finetune_filter)):
            if section is None or (kind == "captioner" and not config.capfilt.writes_captions):
                continue  # the filter alone (capfilt.sampling.num_captions: 0) needs no captioner
            if current_med is None:
                raise ValueError(f"finetune_{kind}: needs a pretrain section or model.init to start from")
            members = {}
            for member in range(section.ensemble):
                # Member m is a plain fine-tune with seed + m: member 0 is the single model, same stage.
                name = f"{prefix}/finetune_{kind}" + (f"_{member}" if member else "")
                member_section = section.model_copy(update={"ensemble": 1, "seed": section.seed + member})
                steps.append(Step(name, _finetune(kind), member_section, {"init": current_med}))
                members[f"{kind}-round{round_}" + (f"-{member}" if member else "")] = name
            inputs[kind] = members
        steps.append(Step(f"{prefix}/capfilt", _capfilt, config.capfilt, inputs))
        if config.pretrain is not None:
            start = {"continue": current_med} if config.round_pretrain_start == "previous_round" else init_inputs
            steps.append(Step(f"{prefix}/pretrain", _pretrain, config.pretrain, {"capfilt": f"{prefix}/capfilt", **start}))
            current_med = f"{prefix}/pretrain"
    if config.evaluate is not None:
        models = {}
        rounds = config.rounds if config.capfilt is not None else 0
        if config.pretrain is not None:
            models["noisy"] = "pretrain_noisy"
            # Every round's MED; the last one is "bootstrapped" whatever the number of rounds.
            models.update({f"round_{r}": f"round_{r}/pretrain" for r in range(rounds - 1)})
            if current_med != "pretrain_noisy":
                models["bootstrapped"] = current_med
        inputs = {"models": models}
        if rounds > 0:
            inputs["capfilt"] = {f"round_{r}": f"round_{r}/capfilt" for r in range(rounds)}
        steps.append(Step("evaluate", _evaluate, config.evaluate, inputs))
    return steps


def run_pipeline(config: PipelineConfig, run_dir: str | None = None, log: Callable[[str], None] = print,
                 reuse_from: tuple[str, ...] | list[str] = ()) -> Run:
    """Run ``config``'s stages in ``run_dir``. A stage not complete there but complete with the same
    identity in one of the ``reuse_from`` run directories, made from the very outputs this run uses
    (same data, tokenizer and inputs), is taken from there: its record is copied, its files stay put."""
    root = run_dir or default_run_dir(config)
    if "://" not in root:
        # Stages hand paths to Ray workers, whose working directory is not this one.
        root = os.path.abspath(root)
    run = Run(config, root, log=log)
    fs, root = fsspec.core.url_to_fs(run.root)
    fs.makedirs(root, exist_ok=True)
    steps = plan(config)
    stale = _stale_stages(steps, {step.name for step in steps if fs.exists(f"{root}/{step.name}/{STAGE_RECORD}")})
    if stale:
        made_from = "; ".join(f"{name} (from {', '.join(sources)})" for name, sources in stale.items())
        raise StageConflictError(
            f"stages complete in {run.root} were made from earlier outputs of stages that are not complete any "
            f"more and would be redone: {made_from}; delete the directories of {', '.join(stale)} too, or use a "
            "new --run-dir"
        )
    started = time.time()
    for step in steps:
        record_path = f"{root}/{step.name}/{STAGE_RECORD}"
        record_identity = {"section": identity(step.section), "inputs": step.inputs,
                    "upstream": {name: run.outputs.get(name) for name in _upstream(step)}}
        if "pretrain" in step.name or "finetune" in step.name or step.name in ("tokenizer", "model_init"):
            record_identity["model"] = identity(config.model)
        if fs.exists(record_path):
            record = json.loads(fs.cat_file(record_path))
            if record["hash"] == config_hash(record_identity):
                log(f"[{step.name}] complete, skipped")
                run.outputs[step.name] = record["outputs"]
                run.seconds[step.name] = record["seconds"]
                continue
            changes = "; ".join(_diff(record["identity"], record_identity, step.name)) or "unknown"
            raise StageConflictError(
                f"stage {step.name} in {run.root} was completed with another configuration ({changes}); "
                "use a new --run-dir, or delete that stage's directory to redo it"
            )
        reused = _reusable(step, run, record_identity, reuse_from, {s.name for s in steps})
        if reused is not None:
            source, record = reused
            fs.makedirs(f"{root}/{step.name}", exist_ok=True)
            fs.pipe_file(record_path, json.dumps({**record, "reused_from": source}, indent=2, sort_keys=True,
                                                 default=str).encode())
            run.outputs[step.name] = record["outputs"]
            run.seconds[step.name] = record["seconds"]
            log(f"[{step.name}] complete in {source}, reused")
            continue
        log(f"[{step.name}] running")
        step_started = time.time()
        outputs = step.function(run, step)
        seconds = time.time() - step_started
        record = {"hash": config_hash(record_identity), "identity": record_identity, "outputs": outputs, "seconds": seconds}
        fs.makedirs(f"{root}/{step.name}", exist_ok=True)
        fs.pipe_file(record_path, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        run.outputs[step.name] = outputs
        run.seconds[step.name] = seconds
        log(f"[{step.name}] done in {seconds:.1f}s")
    _finish_metrics(run, fs, root, time.time() - started)
    for name, outputs in run.outputs.items():
        unread = outputs.get("could_not_read") if isinstance(outputs, dict) else None
        if unread and unread["shards"]:  # allowed by max_unreadable_fraction, but never silent
            log(f"[{name}] warning: {unread['shards']} of {unread['of_shards']} input shards could not be read in "
                f"full ({unread['rows']} rows rejected as unreadable); `capfilt inspect` lists them")
    log(f"run directory: {run.root}")
    return run


def _reusable(step: Step, run: Run, record_identity: dict[str, Any], reuse_from, planned: set[str]):
    """(run dir, record) of the first ``reuse_from`` run whose ``step`` has this identity and whose inputs,
    data and tokenizer are the outputs this run holds, else None."""
    needs = set(_upstream(step)) | ({"synth", "ingest", "tokenizer"} & set(run.outputs) & planned)
    for source in reuse_from:
        fs, other = fsspec.core.url_to_fs(source if "://" in source else os.path.abspath(source))
        records = {}
        for name in (step.name, *needs):
            path = f"{other}/{name}/{STAGE_RECORD}"
            records[name] = json.loads(fs.cat_file(path)) if fs.exists(path) else None
        record = records[step.name]
        if record is None or record["hash"] != config_hash(record_identity):
            continue
        if all(records[name] is not None and records[name]["outputs"] == run.outputs.get(name) for name in needs):
            return source, record
    return None


def _stale_stages(steps: list[Step], complete: set[str]) -> dict[str, list[str]]:
    """Complete stages that depend on one that will run (its directory deleted to redo it): name -> those.

    Besides its declared inputs, a stage may read the data (synth, ingest) and the tokenizer: counted as
    inputs of every later stage, so a redone one is never mixed with what was made from the old one.
    """
    redo: set[str] = set()
    stale: dict[str, list[str]] = {}
    earlier: set[str] = set()
    for step in steps:
        needs = set(_upstream(step)) | ({"synth", "ingest", "tokenizer"} & earlier)
        if step.name not in complete:
            redo.add(step.name)
        elif needs & redo:
            stale[step.name] = sorted(needs & redo)
            redo.add(step.name)
        earlier.add(step.name)
    return stale


def _upstream(step: Step) -> list[str]:
    names = []
    for value in step.inputs.values():
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, dict):
            names.extend(v for v in value.values() if isinstance(v, str))
    return names


def _finish_metrics(run: Run, fs, root: str, total: float) -> None:
    """Copy the evaluation's metrics to the run directory, with seconds per stage."""
    if "evaluate" not in run.outputs:
        return
    metrics = json.loads(fs.cat_file(fsspec.core.url_to_fs(run.outputs["evaluate"]["metrics"])[1]))
    if "pretrain_vision" in run.outputs:
        vision = run.outputs["pretrain_vision"]
        metrics["pretrain_vision"] = {name: vision[name] for name in ("classes", "images", "rejects", "metrics")}
    metrics["seconds"] = {**run.seconds, "total": sum(run.seconds.values())}
    fs.pipe_file(f"{root}/metrics.json", json.dumps(metrics, indent=2, sort_keys=True).encode())
