"""A training run's records, kept on the driver's node whatever node a worker runs on.

Training workers write no files of the stage: on a cluster without a shared filesystem, a rank on
another node would write into its own disk, where the driver never looks. Rank 0's log lines, every
rank's bad pairs and (``record_samples``) the stream positions each rank trained go through
:class:`RunRecords`, an actor pinned to the driver's node, into the stage's local directory (for a
stage on object storage, its mirror). The same actor

* refuses the writes of a superseded attempt (``CURRENT`` under the checkpoints root), and being
  owned by the driver, dies with it: workers that outlive a killed driver stop at their next write;
* uploads the log and bad pairs to the stage's URL each time rank 0 reports a checkpoint, before
  training goes on, so a run resumed elsewhere from that checkpoint finds the records up to it.

Files, in the stage directory::

    train_log.jsonl          one record per log_every steps, plus start/checkpoint events
    bad_pairs.rank*.jsonl    pairs met in training that could not be used
    samples.rank*.jsonl      the positions each rank trained in each step (record_samples)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from capfilt.training import checkpoint as ckpt

LOG_FILE = "train_log.jsonl"
BAD_PAIRS_GLOB = "bad_pairs.rank*.jsonl"
SAMPLES_GLOB = "samples.rank*.jsonl"
_RANK_FILE = re.compile(r"^(bad_pairs|samples)\.rank\d+\.jsonl$")


def rank_file(glob: str, rank: int) -> str:
    return glob.replace("*", str(rank))


def append_records(path: str | Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a line torn by a kill is skipped."""
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def rewind_log(path: str | Path, step: int) -> None:
    """Keep the records up to ``step`` (a resumed run re-logs the rest); drop a line torn by a kill."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
    os.replace(temporary, path)


def read_bad_pairs(directory: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Every bad pair recorded under ``directory``, once per stream position, in position order."""
    found: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob(BAD_PAIRS_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill
            found.setdefault(record["position"], record)
    return sorted(found.items())


def bad_pairs_summary(directory: str | Path, pairs_trained: int, pairs_indexed: int) -> dict[str, Any]:
    """What the stage records: distinct bad pairs by reason (and how often training met them), a few examples."""
    records = [record for position, record in read_bad_pairs(directory) if position < pairs_trained]
    distinct: dict[tuple[int, int], str] = {}
    for record in records:
        distinct.setdefault((record["unit"], record["ordinal"]), record["reason"])
    reasons: dict[str, int] = {}
    for reason in distinct.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"pairs": len(distinct), "fraction": round(len(distinct) / max(1, pairs_indexed), 6),
            "met": len(records), "by_reason": dict(sorted(reasons.items())),
            "examples": [{key: value for key, value in record.items() if key != "step"} for record in records[:5]]}


class RunRecords:
    """The Ray actor through which workers write a run's records (see the module docstring)."""

    def __init__(self, directory: str, checkpoints_root: str, remote_url: str | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.checkpoints_root = checkpoints_root
        self.remote_url = remote_url.rstrip("/") if remote_url else None
        self.storage_options = storage_options or {}

    def check_current(self, attempt: str) -> None:
        current = ckpt.current_attempt(self.checkpoints_root)
        if current != attempt:
            raise RuntimeError(f"{self.checkpoints_root}: attempt {attempt} was superseded by {current}; stopping")

    def append(self, name: str, records: list[dict], attempt: str) -> None:
        if name != LOG_FILE and not _RANK_FILE.match(name):
            raise ValueError(f"{name}: not a record file of a training run")
        self.check_current(attempt)
        append_records(self.directory / name, records)

    def checkpointed(self, step: int, attempt: str) -> None:
        """Rank 0 has made the checkpoint of ``step`` durable: log it, and upload the records with it."""
        self.append(LOG_FILE, [{"event": "checkpoint", "step": step}], attempt)
        if self.remote_url is None:
            return
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.remote_url, **self.storage_options)
        for pattern in (LOG_FILE, BAD_PAIRS_GLOB):
            for path in sorted(self.directory.glob(pattern)):
                fs.put(str(path), f"{root.rstrip('/')}/{path.name}")

    def bad_pairs_before(self, position: int) -> list[tuple[int, int]]:
        """(unit, ordinal) of the bad pairs recorded at stream positions before ``position``."""
        return [(record["unit"], record["ordinal"]) for found, record in read_bad_pairs(self.directory)
                if found < position]


def start_run_records(name: str, directory: str | Path, checkpoints_root: str | Path, remote_url: str | None = None,
                      storage_options: dict[str, Any] | None = None):
    """A :class:`RunRecords` actor on this (the driver's) node, named ``name`` for the workers to find."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(RunRecords).options(name=name, num_cpus=0, max_concurrency=1, scheduling_strategy=here).remote(
        str(directory), str(checkpoints_root), remote_url, storage_options)
