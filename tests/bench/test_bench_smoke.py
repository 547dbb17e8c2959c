"""Smoke runs of the benchmark scripts at tiny sizes: each runs and prints JSON with its documented fields.

Nothing here asserts a speed: these prove the commands in bench/README.md work, not how fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import _common as common  # noqa: E402
from bench import peers, scaling, throughput  # noqa: E402


def _printed_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def _run_script(name: str, *args: str, timeout: int = 240) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "bench" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def local_ray():
    """One local cluster for the in-process runs (or the session's, when another test module started one)."""
    import ray

    started = common.start_ray(2)
    yield ray
    if started:
        ray.shutdown()


def _assert_machine(record: dict) -> None:
    assert record["cpus"] >= 1 and len(record["load_average_1_5_15"]) == 3


def test_throughput_reports_all_three_ways_and_their_ratios(local_ray, capsys, tmp_path):
    result = throughput.main(["--size", "test", "--flickr-images", "4", "--world-images", "8", "--world-image-size", "32",
                              "--rows-per-shard", "4", "--ks", "1", "--batch-size", "4", "--loop-images", "2",
                              "--ceiling-images", "4", "--repeats", "2", "--workdir", str(tmp_path)])
    assert _printed_json(capsys) == json.loads(json.dumps(result, default=str))
    assert result["benchmark"] == "throughput"
    _assert_machine(result["machine"])
    assert len(result["load_average_start_end"]) == 2
    if (common.FLICKR / "images").is_dir():
        assert "flickr8k" in result["datasets"]
    else:
        assert any("flickr8k skipped" in note for note in result["notes"])
    world = result["datasets"]["world"]
    assert world["rows"] == 8 and world["shards"] == 2
    k1 = world["k1"]
    assert k1["capfilt"]["images"] == 8 and k1["capfilt"]["images_per_s_total"] > 0
    assert k1["capfilt"]["images_decoded"] == 8 and k1["capfilt"]["texts_scored"] == 16  # web + 1 synthetic each
    assert {"wall_s", "startup_s", "steady_s", "images_per_s_steady", "commits"} <= set(k1["capfilt"])
    assert k1["per_sample_loop"]["images"] == 2 and k1["per_sample_loop"]["images_per_s"] > 0
    assert k1["model_ceiling"]["images"] > 0 and k1["model_ceiling"]["images_per_s"] > 0
    assert len(k1["model_ceiling"]["rounds_images_per_s"]) == 2 and len(k1["per_sample_loop"]["rounds_images_per_s"]) == 2
    assert set(k1["ratios"]) == {"capfilt_steady_over_loop", "capfilt_steady_over_ceiling",
                                 "capfilt_total_over_ceiling", "ceiling_over_loop"}
    assert k1["ratios"]["ceiling_over_loop"] > 0
    # capfilt's default (ITC similarity recorded too) measured beside the like-for-like ITM-only run
    with_itc = k1["with_itc_similarity"]
    assert with_itc["capfilt"]["images"] == 8 and with_itc["capfilt"]["texts_scored"] == 16
    assert with_itc["model_ceiling"]["images_per_s"] > 0 and set(with_itc["ratios"]) == set(k1["ratios"])


def test_scaling_runs_each_pool_size(local_ray, capsys, tmp_path):
    result = scaling.main(["--size", "test", "--images", "8", "--image-size", "32", "--rows-per-shard", "4",
                           "--actors", "1,2", "--batch-size", "4", "--workdir", str(tmp_path)])
    assert _printed_json(capsys)["benchmark"] == "scaling"
    assert set(result["runs"]) == {"1", "2"}
    for run in result["runs"].values():
        assert run["images"] == 8 and run["images_per_s_total"] > 0
    assert result["speedup_over_first"]["images_per_s_total"]["1"] == 1.0
    assert result["runs"]["2"]["cpus_per_actor"] == 0.5


def test_memory_measures_driver_actors_and_readers_per_size():
    result = _run_script("memory.py", "--rows", "8,16", "--rows-per-shard", "4", "--batch-size", "4",
                         "--max-length", "8", "--min-length", "2", "--interval", "0.05")
    assert result["benchmark"] == "memory"
    assert [run["rows"] for run in result["runs"]] == [8, 16]
    for run in result["runs"]:
        memory = run["memory"]
        assert memory["driver"]["peak_rss_mb"] > 0
        assert memory["actors"]["processes"] >= 1 and memory["actors"]["peak_rss_mb"] > 0
        assert memory["rss_timeline_mb"]
        assert run["stage"]["images"] == run["rows"]
    assert "driver.peak_rss_mb" in result["growth"] and "actors.peak_rss_mb" in result["growth"]
    assert isinstance(result["within_target"], bool) and result["growth_target"] == 0.15


def test_train_stream_measures_every_training_process_per_size(tmp_path):
    # Two sizes of 2 and 4 shards, each a fresh driver and Ray cluster: that start-up is most of the time.
    result = _run_script("train_stream.py", "--sizes", "100", "200", "--demo-pairs", "100", "--steps", "4",
                         "--batch-size", "8", "--rows-per-shard", "50", "--base-rows", "100", "--baseline-commit",
                         "none", "--work-dir", str(tmp_path), timeout=600)
    assert result["benchmark"] == "train_stream"
    assert set(result["runs"]) == {"streaming_100", "streaming_200"}  # no baseline: no step-rate runs
    for run in result["runs"].values():
        assert run["steps"] == 4 and run["steps_per_s_steady"] > 0
        for role in ("driver", "trainer", "data_tasks", "unit_cache"):
            assert run["memory"][role]["peak_anon_mb"] > 0, role
    assert result["runs"]["streaming_200"]["pairs"] == 2 * result["runs"]["streaming_100"]["pairs"]
    assert result["runs"]["streaming_200"]["units"] == 4
    assert "trainer.peak_anon_mb" in result["memory_growth_streaming"]
    assert isinstance(result["targets"]["private_memory_growth_met"], bool)
    assert result["targets"]["step_rate_met"] is None and "no in-memory runs" not in json.dumps(result["notes"])


def test_gpu_benchmark_runs_tiny_on_cpu_without_ray():
    result = _run_script("gpu.py", "--tiny", "--seconds", "0.6", "--ks", "1,2", "--no-itc-similarity")
    assert result["benchmark"] == "gpu"
    assert result["settings"]["itc_similarity"] is False
    assert result["ray_imported"] is False
    assert result["settings"]["model_size"] == "test"
    for k in ("k1", "k2"):
        entry = result["results"][k]
        for measure in ("captioning", "filtering", "capfilt"):
            assert entry[measure]["images_per_s"] > 0
            assert entry["gflops_per_image"][measure] > 0
        assert entry["gflops_per_image"]["capfilt"] == pytest.approx(
            entry["gflops_per_image"]["captioning"] + entry["gflops_per_image"]["filtering"], rel=1e-3)
    # More captions per image cost more FLOPs.
    assert result["results"]["k2"]["gflops_per_image"]["captioning"] > result["results"]["k1"]["gflops_per_image"]["captioning"]
    if result["device"] == "cpu":
        assert result["peak_bf16_tflops"] is None and result["results"]["k1"]["utilisation"] is None


def test_train_step_benchmark_times_each_precision_and_thread_count_without_ray():
    result = _run_script("train_step.py", "--size", "test", "--steps", "2", "--warmup", "1", "--repeats", "2",
                         "--batch-size", "4", "--text-length", "8", "--threads", "1", "--adamw", "fused,loop")
    assert result["benchmark"] == "train_step" and result["ray_imported"] is False
    _assert_machine(result["machine"])
    assert set(result["results"]) == {"fp32_threads1", "bf16_threads1", "fp32_threads1_adamw_loop", "bf16_threads1_adamw_loop"}
    for entry in result["results"].values():
        assert len(entry["steps_per_s"]) == 2 and entry["steps_per_s_median"] > 0
        assert 0 < entry["optimizer_ms_median"] < entry["ms_per_step_median"]
        assert set(entry["first_step_losses"]) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    # Same model, same batch: bf16 autocast moves the first step's loss by rounding only.
    fp32, bf16 = (result["results"][f"{p}_threads1"]["first_step_losses"]["loss"] for p in ("fp32", "bf16"))
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert result["bf16_over_fp32"]["threads1"] > 0
    # Training's fused AdamW and torch's per-tensor loop take the same steps.
    fused, loop = (result["results"][name]["last_step_loss"] for name in ("fp32_threads1", "fp32_threads1_adamw_loop"))
    assert fused == pytest.approx(loop, rel=1e-3)
    assert set(result["fused_adamw_over_loop"]) == {"fp32_threads1", "bf16_threads1"}


def test_peak_table_and_steady_state_rates():
    from bench import gpu

    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops(None) is None
    # Steady state runs from the first commit to the last and leaves the first commit's rows out.
    rates = common.stage_rates(0.0, 12.0, [(2.0, 10), (4.0, 10), (6.0, 10), (10.0, 10)], 40)
    assert rates["startup_s"] == 2.0 and rates["steady_s"] == 8.0
    assert rates["images_per_s_steady"] == 30 / 8 and rates["images_per_s_total"] == round(40 / 12, 2)
    assert common.stage_rates(0.0, 1.0, [(0.5, 4)], 4)["images_per_s_steady"] is None


def test_export_reports_memory_at_two_sizes():
    result = _run_script("export.py", "--sizes", "100", "200", "--samples-per-shard", "60", "--rows-per-shard", "50",
                         "--base-rows", "100")
    assert result["benchmark"] == "export"
    _assert_machine(result["machine"])
    small, large = result["runs"]["rows_100"], result["runs"]["rows_200"]
    assert large["samples"] == large["pairs"] > small["samples"] == small["pairs"] > 0 and large["errors"] == 0
    assert {"driver.peak_anon_mb", "export_tasks.peak_anon_mb"} <= set(result["memory_growth"])
    assert "private_memory_growth_met" in result["targets"]


# bench/peers.py at tiny sizes, capfilt's side alone (--skip-peer): the peer environment
# (.bench-peers-venv, Data-Juicer from PyPI) takes minutes to create, so the peer side is checked by
# running the benchmark (bench/README.md section 7), not here.
PEERS_TINY = ["--size", "test", "--flickr-images", "4", "--world-images", "8", "--world-image-size", "32",
              "--rows-per-shard", "4", "--caption-shards", "1", "--ks", "1", "--batch-size", "4", "--caption-batch-size", "4",
              "--diagnose-pairs", "3"]


def _assert_peers_capfilt_side(result: dict, with_flickr: bool) -> None:
    assert result["benchmark"] == "peers"
    _assert_machine(result["machine"])
    assert result["settings"]["data_juicer_max_new_tokens"] == 128 and result["settings"]["ks"] == [1]
    expected = {"world"} | ({"flickr8k"} if with_flickr and (common.FLICKR / "images").is_dir() else set())
    assert set(result["datasets"]) == expected
    world = result["datasets"]["world"]
    assert world["rows"] == 8 and world["shards"] == 2 and world["pairs"] == 8
    assert 0.0 < world["threshold"] < 1.0  # capfilt's median probability
    itm = world["itm_filter"]
    assert itm["capfilt"]["images"] == 8 and itm["capfilt"]["images_per_s"] > 0 and itm["capfilt"]["rows_rejected"] == 0
    account = itm["where_they_differ"]
    assert account["pairs"] == 3 and account["capfilt_max_text_length"] == 35 and account["max_position_embeddings"] == 512
    assert list(account["steps"]) == ["enc_first", "cls_first", "raw_text", "dj_truncation", "dj_pixels"]
    # capfilt's own inputs through transformers' forward give capfilt's probabilities.
    assert account["steps"]["enc_first"]["max_abs_diff"] < 1e-4
    stage = world["capfilt_k1"]["capfilt"]
    assert world["capfilt_k1"]["images"] == 4 and stage["images"] == 4 and stage["texts_scored"] == 8  # web + 1 each
    assert stage["settings"]["max_length"] > 128 and stage["settings"]["max_text_length"] == 512
    assert set(result["targets"]) >= {"itm_speedup_target", "itm_speedup_met", "keep_agreement_target", "keep_agreement_met"}


def test_peers_capfilt_side_without_the_peer(local_ray, capsys, tmp_path):
    result = peers.main([*PEERS_TINY, "--skip-peer", "--workdir", str(tmp_path)])
    assert _printed_json(capsys) == json.loads(json.dumps(result, default=str))
    _assert_peers_capfilt_side(result, with_flickr=True)
    assert result["peer"]["skipped"] is True and result["peer"]["ok"] is False
    world = result["datasets"]["world"]
    assert world["itm_filter"]["data_juicer"] is None and world["itm_filter"]["capfilt_over_data_juicer"] is None
    assert world["capfilt_k1"]["data_juicer"] is None
    assert result["targets"]["itm_speedup_met"] is None and any("--skip-peer" in note for note in result["notes"])

