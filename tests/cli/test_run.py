"""The demo end to end at reduced size: `capfilt run pipelines/demo.yaml` as a user runs it.

The shipped pipeline is loaded and only its sizes are cut (world rows, steps, image size), so the
stages, their order and their settings are the demo's own. A second run finds every stage complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CAPFILT = str(Path(sys.executable).with_name("capfilt"))

REDUCED = {
    "synth": {"num_web": 48, "num_human": 16, "num_test": 8, "num_labelled": 24, "image_size": 32, "rows_per_shard": 16},
    "pretrain_vision": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "cpus": 1},
    "tokenizer": {"vocab_size": 300},
    "model": {"vision": {"image_size": 32, "width": 64, "layers": 1, "heads": 2, "mlp_dim": 128},
              "text": {"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, "embed_dim": 32},
    "pretrain": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2},
    "finetune_captioner": {"steps": 2, "batch_size": 8, "checkpoint_every": 2},
    "finetune_filter": {"steps": 2, "batch_size": 8, "checkpoint_every": 2},
    "capfilt": {"batch_size": 8, "sampling": {"max_length": 12, "min_length": 6}},
    "evaluate": {"k_test": 4, "batch_size": 16, "sampling": {"max_length": 12, "min_length": 6}},
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _run(pipeline: Path, run_dir: Path) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a local cluster
    # A relative --run-dir, as `make demo` gives (runs/demo): Ray workers do not share the driver's cwd.
    return subprocess.run([CAPFILT, "run", str(pipeline), "--run-dir", run_dir.name], capture_output=True,
                          text=True, timeout=900, cwd=run_dir.parent, env=env)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    pipeline = root / "demo-small.yaml"
    pipeline.write_text(yaml.safe_dump(_merge(demo, REDUCED)))
    run_dir = root / "run"
    result = _run(pipeline, run_dir)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return pipeline, run_dir, result


def test_metrics_file_has_the_documented_shape(demo_run):
    _, run_dir, result = demo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for model in ("noisy", "bootstrapped"):
        assert set(metrics["models"][model]["retrieval"]) >= {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
        assert set(metrics["models"][model]["captioning"]) >= {"bleu4", "cider", "caption_accuracy"}
        for value in (*metrics["models"][model]["retrieval"].values(), *metrics["models"][model]["captioning"].values()):
            assert value >= 0
    assert set(metrics["filter"]) >= {"roc_auc", "precision", "recall", "clean_kept", "by_noise_type"}
    for noise in metrics["filter"]["by_noise_type"].values():
        assert set(noise) >= {"recall", "count"} and noise["count"] > 0
    assert set(metrics["captioner"]) >= {"synthetic_caption_accuracy", "distinct_captions_per_image"}
    stages = {"synth", "pretrain_vision", "tokenizer", "pretrain_noisy", "round_0/finetune_captioner", "round_0/finetune_filter",
              "round_0/capfilt", "round_0/pretrain", "evaluate"}
    assert set(metrics["seconds"]) == stages | {"total"}
    assert metrics["seconds"]["total"] == pytest.approx(sum(metrics["seconds"][s] for s in stages))
    assert "noisy" in result.stdout and "bootstrapped" in result.stdout and str(run_dir) in result.stdout
    vision = metrics["pretrain_vision"]
    assert vision["images"] == 24 and set(vision["classes"]) <= {"circle", "square", "triangle", "star", "cross"}


def test_both_pretrainings_start_from_the_classifier_vit(demo_run):
    from safetensors.torch import load_file

    from capfilt.models.med import load_med

    _, run_dir, _ = demo_run
    vit = load_file(run_dir / "pretrain_vision" / "vit.safetensors")
    for stage in ("pretrain_noisy", "round_0/pretrain"):
        result = json.loads((run_dir / stage / "_RESULT.json").read_text())["result"]
        assert result["init"]["loaded"] > 0 and not any(name.startswith("visual_encoder") for name in result["init"]["fresh"])
        init = load_med(run_dir / stage / "init")
        assert init.visual_encoder.encoder.layers[0].mlp.fc1.weight.equal(vit["blocks.0.mlp.fc1.weight"])


def test_accounting_reconciles_with_the_generated_world(demo_run):
    pipeline, run_dir, _ = demo_run
    counts = json.loads((run_dir / "metrics.json").read_text())["capfilt"]
    world = yaml.safe_load(pipeline.read_text())["synth"]
    assert counts["input_rows"] == world["num_web"] + world["num_human"]
    assert counts["input_rows"] == counts["kept"] + counts["filtered"] + counts["rejected"]
    assert counts["kept_by_source"]["human"] == world["num_human"]  # human pairs pass through
    out = run_dir / "round_0" / "capfilt"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["rows_in"] == counts["input_rows"]
    pairs, rejects = pq.read_table(out / "pairs"), pq.read_table(out / "rejects")
    assert pairs.num_rows == sum(counts["kept_by_source"].values())
    # Every input row is in the output or the rejects: rows with a kept text plus rows with none.
    rows_kept = {(s, r) for s, r in zip(pairs["shard"].to_pylist(), pairs["row"].to_pylist())}
    assert len(rows_kept) == counts["kept"]
    assert rejects.num_rows >= counts["rejected"] + counts["filtered"]


def test_exported_captioner_and_filter_load_as_transformers_models(demo_run):
    from capfilt.models.export import load_captioner, load_filter

    _, run_dir, _ = demo_run
    captioner = load_captioner(str(run_dir / "round_0" / "finetune_captioner" / "captioner"))
    assert type(captioner.model).__name__ == "BlipForConditionalGeneration"
    filter_ = load_filter(str(run_dir / "round_0" / "finetune_filter" / "filter"))
    assert type(filter_.model).__name__ == "BlipForImageTextRetrieval"


def test_a_second_run_skips_every_complete_stage(demo_run):
    pipeline, run_dir, _ = demo_run
    before = (run_dir / "metrics.json").read_text()
    result = _run(pipeline, run_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("complete, skipped") == 9
    assert json.loads((run_dir / "metrics.json").read_text())["models"] == json.loads(before)["models"]


def test_compare_two_rows_reusing_the_demo_and_a_second_round_in_its_own_output(demo_run, tmp_path):
    """The paper table at reduced size: the demo's row (every stage reused from the demo run) and two
    rounds with capfilt.output set, each round's output in its own place, every round evaluated."""
    pipeline, run_dir, _ = demo_run
    output = tmp_path / "bootstrapped"
    comparison = tmp_path / "paper-small.yaml"
    comparison.write_text(yaml.safe_dump({
        "name": "paper-small", "base": str(pipeline),
        "rows": {"both": {}, "two_rounds": {"rounds": 2, "capfilt": {"output": str(output)}}},
    }))
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    result = subprocess.run([CAPFILT, "compare", str(comparison), "--run-dir", str(tmp_path / "table"),
                             "--reuse-stages-from", str(run_dir)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # The demo's row is the demo: all nine stages reused, its metrics the demo's.
    both = tmp_path / "table" / "both"
    demo_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((both / "metrics.json").read_text())["models"] == demo_metrics["models"]
    assert result.stdout.count(f"complete in {run_dir}, reused") == 9
    # The second row redoes CapFilt (its output moved) and what follows; the noisy MED, round 0's
    # captioner and filter come from the first row.
    log = result.stdout[result.stdout.index("== row two_rounds =="):]
    for stage in ("synth", "pretrain_vision", "tokenizer", "pretrain_noisy", "round_0/finetune_captioner",
                  "round_0/finetune_filter"):
        assert f"[{stage}] complete in {both}, reused" in log, stage
    for stage in ("round_0/capfilt", "round_0/pretrain", "round_1/finetune_captioner", "round_1/finetune_filter",
                  "round_1/capfilt", "round_1/pretrain", "evaluate"):
        assert f"[{stage}] running" in log, stage

    for round_ in (0, 1):
        manifest = json.loads((output / f"round_{round_}" / "manifest.json").read_text())
        assert manifest["totals"]["rows_in"] == demo_metrics["capfilt"]["input_rows"]
        pairs = pq.read_table(output / f"round_{round_}" / "pairs")
        assert set(pairs.column("round").to_pylist()) == {round_}
        models = manifest["models"]
        assert [m["id"].split("@")[0] for m in models["captioners"]] == [f"captioner-round{round_}"]
        assert [m["id"].split("@")[0] for m in models["filters"]] == [f"filter-round{round_}"]
        if round_:  # round 1's models are fine-tuned from round 0's bootstrapped MED, not the noisy one
            assert models != json.loads((output / "round_0" / "manifest.json").read_text())["models"]
    metrics = json.loads((tmp_path / "table" / "two_rounds" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"noisy", "round_0", "bootstrapped"}
    assert set(metrics["rounds"]) == {"round_0", "round_1"}
    for round_metrics in metrics["rounds"].values():
        assert round_metrics["filter"]["roc_auc"] is not None and round_metrics["captioner"]["synthetic_texts"] > 0
    assert metrics["filter"] == metrics["rounds"]["round_0"]["filter"]
    captions = tmp_path / "table" / "two_rounds" / "evaluate" / "captions"
    assert sorted(path.name for path in captions.iterdir()) == ["bootstrapped.jsonl", "noisy.jsonl", "round_0.jsonl"]

    table = json.loads((tmp_path / "table" / "table.json").read_text())
    assert list(table["rows"]) == ["both", "two_rounds"]
    assert table["rows"]["both"]["values"]["TR@1"] == demo_metrics["models"]["bootstrapped"]["retrieval"]["i2t_r1"]
    second = table["rows"]["two_rounds"]
    assert second["rounds"] == 2
    assert second["values"]["synthetic acc"] == metrics["rounds"]["round_1"]["captioner"]["synthetic_caption_accuracy"]
    assert second["values"]["minutes"] == pytest.approx(metrics["seconds"]["total"] / 60)
    markdown = (tmp_path / "table" / "table.md").read_text()
    assert markdown.splitlines()[0].startswith("| row | TR@1 | IR@1 |") and "| two_rounds |" in markdown
