import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest
import yaml

from capfilt.config import CapFiltConfig, ReaderConfig
from capfilt.data.output import OutputConflictError
from capfilt.stages.capfilt import decide, run_capfilt

K = 2


def _config(world, models, **overrides):
    values = dict(
        web=ReaderConfig(paths=f"{world.web}/*.parquet"),
        human=ReaderConfig(paths=f"{world.human}/*.parquet"),
        captioners=[{"path": models["captioner"]}],
        filters=[{"path": models["filter"]}],
        sampling={"num_captions": K, "max_length": 12, "min_length": 6},
        batch_size=4,
        decode_batch_size=8,
        cpus_per_actor=1.0,
        rows_per_file=20,
    )
    values.update(overrides)
    return CapFiltConfig.model_validate(values)


def _rows(output):
    pairs = pq.read_table(f"{output}/pairs").to_pylist()
    rejects = pq.read_table(f"{output}/rejects").to_pylist()
    pair_view = sorted((r["shard"].rsplit("/", 2)[-2:].__str__(), r["row"], r["source"], r["text"], round(r["itm_prob"] or 0, 5)) for r in pairs)
    reject_view = sorted((r["shard"].rsplit("/", 2)[-2:].__str__(), r["row"], r["source"] or "", r["text"] or "", r["reason"]) for r in rejects)
    return pair_view, reject_view


def test_decide_threshold_and_best_n():
    assert decide([0.9, 0.4, 0.5], 0.5, "threshold", 1) == ["kept", "itm_below_threshold", "kept"]
    assert decide([0.6, 0.9, 0.7, 0.1], 0.5, "best_n", 2) == ["not_in_best_n", "kept", "kept", "itm_below_threshold"]


@pytest.fixture(scope="module")
def baseline(ray_cluster, small_world, tiny_models, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("capfilt") / "out")
    manifest = run_capfilt(_config(small_world, tiny_models), output)
    return output, manifest


def test_accounting_reconciles_per_shard_and_in_total(baseline, small_world):
    output, manifest = baseline
    web_rows = sum(pq.read_metadata(p).num_rows for p in small_world.shards["web"])
    human_rows = sum(pq.read_metadata(p).num_rows for p in small_world.shards["human"])
    totals = manifest["totals"]
    assert totals["rows_in"] == web_rows + human_rows
    for shard, counts in manifest["shards"].items():
        assert counts["rows_in"] == counts["kept"] + counts["filtered"] + counts["rejected"], shard
    assert totals["rows_in"] == totals["kept"] + totals["filtered"] + totals["rejected"]
    # The world's faults: failed downloads and undecodable bytes are rejected with their reasons.
    assert totals["reasons"]["status: failed_to_download"] == 2
    assert sum(v for r, v in totals["reasons"].items() if r.startswith("decode_error")) == 2

    pairs = pq.read_table(f"{output}/pairs")
    rejects = pq.read_table(f"{output}/rejects")
    # Every decoded web image had 1 web + K synthetic texts: each is a pair or a text reject.
    text_rejects = sum(1 for r in rejects.column("stage").to_pylist() if r != "read")
    web_texts = (web_rows - totals["rejected"]) * (1 + K)
    assert pairs.num_rows + text_rejects == web_texts + human_rows
    assert pairs.num_rows == totals["texts_kept"]
    assert set(pairs.column("source").to_pylist()) <= {"web", "synthetic", "human"}
    assert pairs.filter(pa.compute.equal(pairs["source"], "human")).num_rows == human_rows
    synthetic = pairs.filter(pa.compute.equal(pairs["source"], "synthetic")).to_pylist()
    for row in synthetic:
        assert row["itm_prob"] >= 0.5 and row["captioner_id"] and row["filter_id"] and row["sampling"].startswith("nucleus")
    for row in rejects.to_pylist():
        if row["reason"] == "itm_below_threshold":
            assert row["score"] < 0.5
    assert (Path(output) / "_SUCCESS").exists()
    assert manifest["models"]["filters"][0]["weights_sha256"]


def test_rerunning_a_finished_output_does_nothing(baseline, small_world, tiny_models):
    output, _ = baseline
    commits = sorted(os.listdir(f"{output}/_commits"))
    run_capfilt(_config(small_world, tiny_models), output)
    assert sorted(os.listdir(f"{output}/_commits")) == commits


def test_changed_config_is_refused(baseline, small_world, tiny_models):
    output, _ = baseline
    with pytest.raises(OutputConflictError, match="threshold: 0.5 -> 0.7"):
        run_capfilt(_config(small_world, tiny_models, threshold=0.7), output)


def test_batch_size_and_actor_count_do_not_change_the_output(baseline, small_world, tiny_models, tmp_path):
    output, _ = baseline
    other = str(tmp_path / "b16")
    run_capfilt(_config(small_world, tiny_models, batch_size=16, decode_batch_size=5, actors=2, cpus_per_actor=0.5), other)
    assert _rows(other) == _rows(output)


def test_resume_after_the_driver_is_killed(baseline, small_world, tiny_models, tmp_path, ray_cluster):
    ray_address = ray_cluster.get_runtime_context().gcs_address
    output, _ = baseline
    pipeline = tmp_path / "pipeline.yaml"
    killed = tmp_path / "killed"
    config = _config(small_world, tiny_models, rows_per_file=1, batch_size=1).model_dump(mode="json")
    config["output"] = str(killed)
    pipeline.write_text(yaml.safe_dump({"name": "kill", "run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 2},
                                        "capfilt": config}))
    # The driver joins the test's cluster, as `ray job submit` drivers do.
    command = [sys.executable, "-m", "capfilt.cli", "run", str(pipeline), "--address", ray_address]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "_commits").exists():
        time.sleep(0.05)
    assert (killed / "_commits").exists(), "the run never committed a shard"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "_SUCCESS").exists()
    done_before = len(os.listdir(killed / "_commits"))
    assert done_before < len(list(small_world.shards["web"])) + len(list(small_world.shards["human"]))

    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert (killed / "_SUCCESS").exists()
    assert _rows(str(killed)) == _rows(output)
    keys = pq.read_table(killed / "pairs", columns=["shard", "row", "text", "source"]).to_pylist()
    assert len(keys) == len({tuple(k.values()) for k in keys})  # no duplicates
