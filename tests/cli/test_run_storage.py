"""`capfilt run` of a pipeline that trains, with its run directory on object storage (a real S3-protocol
server on loopback): every stage's files and records in the bucket, none on the machine that ran it, so
another machine continues the run, and reads its models, from the bucket alone."""

from __future__ import annotations

import json
import os
import subprocess

import yaml

from tests.cli.test_run import CAPFILT

PIPELINE = {
    "synth": {"seed": 1, "num_web": 24, "num_human": 16, "num_test": 6, "image_size": 32, "rows_per_shard": 8},
    "tokenizer": {"vocab_size": 300},
    "model": {"preset": "tiny", "vision": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "heads": 2,
                                           "mlp_dim": 128},
              "text": {"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, "embed_dim": 32, "queue_size": 0},
    # In the driver: Ray Train workers on a stage in the bucket are tests/stages/test_pretrain.py's.
    "pretrain": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "train_in_driver": True},
    "evaluate": {"k_test": 4, "batch_size": 16, "sampling": {"max_length": 12, "min_length": 6}},
}


def _capfilt_run(pipeline, s3_server, scratch, cwd) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    # Credentials and endpoint as a user's environment gives them to fsspec (and to Ray's workers).
    env.update({"FSSPEC_S3": json.dumps(s3_server.storage_options), "CAPFILT_SCRATCH_DIR": str(scratch)})
    return subprocess.run([CAPFILT, "run", str(pipeline)], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_a_training_pipeline_with_its_run_directory_on_s3_continues_on_another_machine(
        s3_server, tmp_path, monkeypatch):
    import fsspec

    from capfilt.models.med import load_med
    from capfilt.training.store import fetch

    run_dir = s3_server.url("runs/small")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({**PIPELINE, "run_dir": run_dir}))
    result = _capfilt_run(pipeline, s3_server, tmp_path / "machine-a", tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for stage in ("synth", "tokenizer", "pretrain_noisy", "evaluate"):
        assert f"[{stage}] done in" in result.stdout, stage

    def record(stage):
        body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=f"runs/small/{stage}/_STAGE.json")["Body"]
        return json.loads(body.read())

    # What later stages (and later runs) read is the bucket's, not machine A's mirror.
    assert record("tokenizer")["outputs"]["tokenizer"] == f"{run_dir}/tokenizer/tokenizer"
    assert record("pretrain_noisy")["outputs"]["med"] == f"{run_dir}/pretrain_noisy/med"
    listing = s3_server.client.list_objects_v2(Bucket=s3_server.bucket, Prefix="runs/small/")["Contents"]
    keys = {entry["Key"] for entry in listing}
    assert {"runs/small/metrics.json", "runs/small/pretrain_noisy/_RESULT.json",
            "runs/small/pretrain_noisy/med/med.safetensors", "runs/small/tokenizer/tokenizer/tokenizer.json"} <= keys
    assert not any("/checkpoints/" in key for key in keys)  # removed once the stage finished

    # Machine B, with nothing of A's: the run is complete there too, and its MED loads from the bucket.
    again = _capfilt_run(pipeline, s3_server, tmp_path / "machine-b", tmp_path)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("complete, skipped") == 4
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.storage_options)
    monkeypatch.setenv("CAPFILT_SCRATCH_DIR", str(tmp_path / "machine-c"))
    med = load_med(fetch(record("pretrain_noisy")["outputs"]["med"]))
    assert med.config.vision.image_size == 32
    metrics = json.loads(s3_server.client.get_object(Bucket=s3_server.bucket, Key="runs/small/metrics.json")["Body"].read())
    assert metrics["models"]["noisy"]["retrieval"]["k_test"] == 4 and metrics["test"]["images"] == 6
