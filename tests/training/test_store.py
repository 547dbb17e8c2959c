"""Checkpoints at a URL: uploaded whole (``state.json`` last), found whole, the oldest deleted."""

from __future__ import annotations

import json
from pathlib import Path

from capfilt.training import checkpoint as ckpt
from capfilt.training.store import SCRATCH_ENV, fetch, forget, remote_checkpoints, upload_checkpoint


def _checkpoint(directory, step: int):
    directory.mkdir(parents=True)
    (directory / "med.safetensors").write_bytes(bytes(range(256)) * (step + 1))
    (directory / "optimizer.pt").write_bytes(b"moments" * step)
    files = {path.name: path.stat().st_size for path in sorted(directory.iterdir())}
    (directory / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "files": files}))
    return directory


def test_uploaded_checkpoints_are_found_whole_and_the_oldest_go(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    url, options = s3_server.url("runs/r/pretrain"), s3_server.storage_options
    assert remote_checkpoints(url, options) == []
    for step in (2, 4, 6):
        upload_checkpoint(_checkpoint(tmp_path / f"c{step}", step), step, url, 2, options)
    found = remote_checkpoints(url, options)
    assert found == [(4, f"{url}/checkpoints/step_00000004"), (6, f"{url}/checkpoints/step_00000006")]
    # A torn upload (its weights not all there) does not count.
    key = "runs/r/pretrain/checkpoints/step_00000008"
    torn = _checkpoint(tmp_path / "c8", 8)
    s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"{key}/med.safetensors", Body=b"short")
    s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"{key}/{ckpt.STATE_FILE}",
                                Body=(torn / ckpt.STATE_FILE).read_bytes())
    assert [step for step, _ in remote_checkpoints(url, options)] == [4, 6]
    # What a worker reads: a local copy of the newest whole one.
    local = fetch(found[-1][1], options)
    assert ckpt.read_state(local)["step"] == 6 and str(local).startswith(str(tmp_path / "scratch"))
    forget(found[-1][1])  # once loaded, the copy goes
    assert not Path(local).exists()
