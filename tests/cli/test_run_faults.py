"""`capfilt run` on input it cannot fully read: it says so at the end, and fails unless a fraction is allowed."""

from __future__ import annotations

import shutil

import yaml

from tests.cli.test_run import _run


def test_unreadable_input_is_reported_and_fails_the_run_unless_allowed(tmp_path, small_world, tiny_models):
    web = tmp_path / "web"
    web.mkdir()
    shutil.copy(small_world.shards["web"][0], web / "00000.parquet")
    (web / "00001.parquet").write_bytes(b"PAR1 but not really")
    capfilt = {"captioners": [{"path": tiny_models["captioner"]}], "filters": [{"path": tiny_models["filter"]}],
               "batch_size": 8, "sampling": {"num_captions": 1, "max_length": 8, "min_length": 4}}
    pipeline = {"data": {"web": {"paths": f"{web}/*.parquet"}}, "capfilt": capfilt, "rounds": 1}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))

    failed = _run(path, tmp_path / "run")
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]
    assert "1 of 2 input shards could not be read in full" in output
    assert "00001.parquet" in output and "max_unreadable_fraction" in output
    assert "Traceback" not in output  # the input's fault: a message, not a crash
    assert "[round_0/capfilt] done" not in output

    capfilt["max_unreadable_fraction"] = 0.5
    path.write_text(yaml.safe_dump(pipeline))
    allowed = _run(path, tmp_path / "run")  # the same run directory: nothing is redone
    output = allowed.stdout + allowed.stderr
    assert allowed.returncode == 0, output[-3000:]
    assert "[round_0/capfilt] warning: 1 of 2 input shards could not be read in full" in output
    assert "input shards to process" not in output  # every shard was already committed
