"""A training run's records: written by workers through the driver-side actor, rewound on resume,
refused from a superseded attempt, and uploaded with each checkpoint of a stage on object storage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from capfilt.training import checkpoint as ckpt
from capfilt.training.records import LOG_FILE, RunRecords, bad_pairs_summary, read_log, rewind_log


def test_rewinding_the_log_keeps_records_up_to_the_resume_step(tmp_path):
    path = tmp_path / LOG_FILE
    records = [{"event": "start", "step": 0}] + [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "lo')  # torn by a kill
    rewind_log(str(path), 5)
    assert [r["step"] for r in read_log(str(path))] == [0, 1, 2, 3, 4, 5]


def _bad(position, unit, ordinal, reason="decode_error: truncated"):
    return {"position": position, "unit": unit, "ordinal": ordinal, "reason": reason}


def test_records_of_the_current_attempt_only(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.set_current_attempt(root, "attempt-001")
    records = RunRecords(str(tmp_path), str(root))
    records.append(LOG_FILE, [{"step": 1, "loss": 0.5}], "attempt-001")
    records.append("bad_pairs.rank1.jsonl", [_bad(3, 0, 3), _bad(40, 1, 2)], "attempt-001")
    records.append("bad_pairs.rank0.jsonl", [_bad(3, 0, 3)], "attempt-001")  # met again after a resume
    records.checkpointed(1, "attempt-001")
    assert read_log(tmp_path / LOG_FILE) == [{"step": 1, "loss": 0.5}, {"event": "checkpoint", "step": 1}]
    # A resumed run knows the bad pairs met before its start, once each.
    assert records.bad_pairs_before(40) == [(0, 3)]
    assert sorted(records.bad_pairs_before(41)) == [(0, 3), (1, 2)]
    assert bad_pairs_summary(tmp_path, pairs_trained=64, pairs_indexed=100)["pairs"] == 2

    ckpt.set_current_attempt(root, "attempt-002")  # a resumed run took over
    with pytest.raises(RuntimeError, match="superseded by attempt-002"):
        records.append(LOG_FILE, [{"step": 2, "loss": 0.4}], "attempt-001")
    with pytest.raises(ValueError, match="not a record file"):
        records.append("../_RESULT.json", [{}], "attempt-002")
    assert len(read_log(tmp_path / LOG_FILE)) == 2


def test_a_checkpoint_uploads_the_records_of_a_stage_on_object_storage(tmp_path, s3_server):
    root = tmp_path / "checkpoints"
    ckpt.set_current_attempt(root, "attempt-000")
    url = s3_server.url("runs/r/pretrain")
    records = RunRecords(str(tmp_path), str(root), url, s3_server.storage_options)
    records.append(LOG_FILE, [{"step": 4, "loss": 0.5}], "attempt-000")
    records.append("bad_pairs.rank0.jsonl", [_bad(3, 0, 3)], "attempt-000")
    records.checkpointed(4, "attempt-000")

    def uploaded(name: str) -> list[dict]:
        body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=f"runs/r/pretrain/{name}")["Body"].read()
        return [json.loads(line) for line in body.decode().splitlines()]

    assert uploaded(LOG_FILE) == [{"step": 4, "loss": 0.5}, {"event": "checkpoint", "step": 4}]
    assert uploaded("bad_pairs.rank0.jsonl")[0]["position"] == 3


def test_the_records_actor_starts_without_torch():
    # It is one more Ray worker process per training run: torch would add seconds of imports to it.
    code = ("import sys, capfilt.training.records, capfilt.training.store\n"
            "print(','.join(name for name in ('torch', 'transformers') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
