"""Orders stages, skips the complete ones, owns the run directory.

A stage is a function ``(run, section) -> outputs`` that reads its config section and Parquet, and
writes under ``run.stage_dir(name)``. The runner knows stages only through that contract and a
completion record (``<stage>/_STAGE.json``: the section's hash and the outputs) written last: a stage
whose record matches its section is skipped; one whose section changed is refused, so artifacts of two
configurations never mix. Stages with their own resume (capfilt) run again and redo only what is missing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec

from capfilt.config import PipelineConfig
from capfilt.data.output import _diff, config_hash

STAGE_RECORD = "_STAGE.json"


class StageConflictError(RuntimeError):
    pass


@dataclass
class Run:
    config: PipelineConfig
    root: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def stage_dir(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"


def default_run_dir(config: PipelineConfig) -> str:
    return config.run_dir or os.path.join("runs", config.name)


def _synth(run: Run, section) -> dict[str, Any]:
    from capfilt.data.world import write_world

    paths = write_world(section, run.stage_dir("synth"))
    return {name: str(value) for name, value in vars(paths).items()}


def _ingest(run: Run, section) -> dict[str, Any]:
    from capfilt.stages.ingest import ingest

    return {"web": ingest(section, run.stage_dir("ingest"))}


def _capfilt(run: Run, section) -> dict[str, Any]:
    from capfilt.stages.capfilt import resolve_inputs, run_capfilt

    section = resolve_inputs(section, run)
    output = section.output or run.stage_dir("capfilt")
    manifest = run_capfilt(section, output, log=run.log)
    return {"output": output, "totals": manifest["totals"]}


# The paper's loop, in order. A stage runs when its section is present in the pipeline.
STAGES: list[tuple[str, Callable[[Run, Any], dict[str, Any]], bool]] = [
    # (name, function, has its own resume)
    ("synth", _synth, False),
    ("ingest", _ingest, False),
    ("capfilt", _capfilt, True),
]


def run_pipeline(config: PipelineConfig, run_dir: str | None = None, log: Callable[[str], None] = print) -> Run:
    run = Run(config, run_dir or default_run_dir(config), log=log)
    fs, root = fsspec.core.url_to_fs(run.root)
    fs.makedirs(root, exist_ok=True)
    for name, function, resumable in STAGES:
        section = getattr(config, name)
        if section is None:
            continue
        record_path = f"{root}/{name}/{STAGE_RECORD}"
        section_dump = section.model_dump(mode="json")
        if fs.exists(record_path):
            record = json.loads(fs.cat_file(record_path))
            if record["hash"] != config_hash(section_dump):
                changes = "; ".join(_diff(record["section"], section_dump, name)) or "unknown"
                raise StageConflictError(
                    f"stage {name} in {run.root} was completed with another configuration ({changes}); "
                    "use a new --run-dir, or delete that stage's directory to redo it"
                )
            if not resumable:
                log(f"[{name}] complete, skipped")
                run.outputs[name] = record["outputs"]
                continue
        log(f"[{name}] running")
        started = time.time()
        outputs = function(run, section)
        record = {"hash": config_hash(section_dump), "section": section_dump, "outputs": outputs,
                  "seconds": time.time() - started}
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        fs.pipe_file(record_path, json.dumps(record, indent=2, sort_keys=True).encode())
        run.outputs[name] = outputs
        log(f"[{name}] done in {record['seconds']:.1f}s")
    log(f"run directory: {run.root}")
    return run
