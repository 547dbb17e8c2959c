"""run_evaluate end to end: two tiny MEDs on a tiny world's test split and a hand-made CapFilt output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import CaptionSampling, EvaluateConfig, MedConfig, ReaderConfig, WorldConfig
from capfilt.evaluation.report import format_table
from capfilt.stages.evaluate import run_evaluate

TINY = MedConfig(
    preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2, "mlp_dim": 128},
    text={"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, embed_dim=32, queue_size=64,
)
CONFIG = EvaluateConfig(
    k_test=4, batch_size=8,
    sampling=CaptionSampling(method="beam", num_beams=2, max_length=10, min_length=5, repetition_penalty=1.0),
)
SYNTHETIC_TEXT = "a red circle"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from capfilt.data.world import write_world

    config = WorldConfig(seed=5, num_web=16, num_human=0, num_test=6, image_size=32, rows_per_shard=8,
                         failed_rows=1, corrupt_rows=1)
    return write_world(config, str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def med_dirs(tmp_path_factory, tokenizer):
    import torch

    from capfilt.models.med import MED, save_med

    root = tmp_path_factory.mktemp("meds")
    dirs = {}
    for seed, name in enumerate(("noisy", "bootstrapped")):
        torch.manual_seed(seed)
        dirs[name] = str(save_med(MED.from_config(TINY, tokenizer), root / name, tokenizer))
    return dirs


@pytest.fixture(scope="module")
def capfilt_output(world, tmp_path_factory):
    """A perfect filter's output: clean web texts kept (ITM 0.9), noisy ones filtered (0.1); one
    synthetic text per decoded image, kept."""
    from capfilt.data.output import Commit, CommittedOutput
    from capfilt.stages.capfilt import PAIRS_SCHEMA, REJECTS_SCHEMA

    pairs, rejects, counts = [], [], {"rows_in": 0, "kept": 0, "filtered": 0, "rejected": 0}
    for shard in world.shards["web"]:
        for row, record in enumerate(pq.read_table(shard).to_pylist()):
            common = {"key": record["key"], "source_key": f"x:{row}", "shard": shard, "row": row, "round": 0}
            counts["rows_in"] += 1
            if record["gt_image_status"] != "ok":
                rejects.append({**common, "source": "web", "reason": "status: failed_to_download", "stage": "read"})
                counts["rejected"] += 1
                continue
            pairs.append({**common, "text": SYNTHETIC_TEXT, "source": "synthetic", "itm_prob": 0.8})
            if record["gt_clean"]:
                pairs.append({**common, "text": record["caption"], "source": "web", "itm_prob": 0.9})
            else:
                rejects.append({**common, "text": record["caption"], "source": "web", "reason": "itm_below_threshold",
                                "score": 0.1, "stage": "filter"})
            counts["kept"] += 1
    out = CommittedOutput(str(tmp_path_factory.mktemp("capfilt") / "out"))
    out.write_table("pairs/part-00000-000.parquet", pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA))
    out.write_table("rejects/part-00000-000.parquet", pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))
    out.commit(Commit(0, {s: {} for s in world.shards["web"]},
                      ["pairs/part-00000-000.parquet", "rejects/part-00000-000.parquet"]))
    out.finish({"totals": counts, "roles": {s: "web" for s in world.shards["web"]}})
    return out.url, sum(1 for p in pairs if p["source"] == "web"), sum(1 for r in rejects if r.get("score"))


def test_run_evaluate_writes_every_metric(world, med_dirs, capfilt_output, tmp_path):
    output, kept_web, filtered_web = capfilt_output
    out_dir = tmp_path / "eval"
    logged = []
    metrics = run_evaluate(CONFIG, med_dirs, ReaderConfig(paths=f"{world.test}/*.parquet"), str(out_dir),
                           capfilt_outputs={"round_0": output}, log=logged.append)

    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["test"] == {"images": 6, "texts": 30, "skipped": {}}
    for name in ("noisy", "bootstrapped"):
        result = metrics["models"][name]
        retrieval = {k: result["retrieval"][k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
        assert all(0.0 <= value <= 1.0 for value in retrieval.values()), retrieval
        assert result["retrieval"]["k_test"] == 4
        captioning = result["captioning"]
        assert 0.0 <= captioning["bleu4"] <= 1.0 and captioning["cider"] >= 0.0
        assert 0.0 <= captioning["caption_accuracy"] <= 1.0  # the world has scenes
        lines = (out_dir / "captions" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 6 and {"key", "caption", "references", "accurate"} <= set(json.loads(lines[0]))
    # Two random models of different seeds do not caption alike.
    assert (out_dir / "captions" / "noisy.jsonl").read_text() != (out_dir / "captions" / "bootstrapped.jsonl").read_text()

    # The perfect filter: web shards found through the manifest, joined by (shard, row).
    filter_ = metrics["filter"]
    assert filter_["web_texts_with_truth"] == kept_web + filtered_web
    assert filter_["roc_auc"] == 1.0 and filter_["precision"] == 1.0 and filter_["recall"] == 1.0
    assert filter_["clean_kept"] == 1.0
    assert sum(v["count"] for v in filter_["by_noise_type"].values()) == filtered_web
    assert all(v["recall"] == 1.0 for v in filter_["by_noise_type"].values())
    captioner = metrics["captioner"]
    assert captioner["distinct_captions_per_image"] == 1.0
    assert 0.0 <= captioner["synthetic_caption_accuracy"] <= 1.0
    capfilt = metrics["capfilt"]
    assert capfilt["input_rows"] == 16 and capfilt["kept_by_source"] == {"synthetic": 14, "web": kept_web}

    table = format_table(metrics)
    assert "noisy" in table and "bootstrapped" in table and table in "\n".join(logged)


def test_run_evaluate_on_real_style_data_degrades_to_null(world, med_dirs, tmp_path):
    # Real data: one caption per image, no scenes, no CapFilt output; a row without bytes is skipped.
    rows = pq.read_table(world.shards["test"][0], columns=["key", "caption", "jpg"]).to_pylist()
    rows.append({"key": "broken", "caption": "a lost image", "jpg": None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "real.parquet")

    metrics = run_evaluate(CONFIG.model_copy(update={"max_test_images": 5}), {"noisy": med_dirs["noisy"]},
                           ReaderConfig(paths=str(tmp_path / "real.parquet")), str(tmp_path / "eval"), log=lambda _: None)
    assert metrics["test"]["images"] == 5 and metrics["test"]["texts"] == 5
    captioning = metrics["models"]["noisy"]["captioning"]
    assert captioning["caption_accuracy"] is None and captioning["bleu4"] is not None
    assert metrics["filter"] is None and metrics["captioner"] is None and metrics["capfilt"] is None
    assert "n/a" in format_table(metrics)

    metrics = run_evaluate(CONFIG, {"noisy": med_dirs["noisy"]}, ReaderConfig(paths=str(tmp_path / "real.parquet")),
                           str(tmp_path / "eval2"), log=lambda _: None)
    assert metrics["test"]["skipped"] == {"decode_error: missing": 1} and metrics["test"]["images"] == 6


def test_run_evaluate_names_a_model_without_tokenizer(world, tmp_path, tokenizer):
    import torch

    from capfilt.models.med import MED, save_med

    torch.manual_seed(0)
    bare = save_med(MED.from_config(TINY, tokenizer), tmp_path / "bare")
    with pytest.raises(ValueError, match="models.bare: .* has no tokenizer"):
        run_evaluate(CONFIG, {"bare": str(bare)}, ReaderConfig(paths=f"{world.test}/*.parquet"), str(tmp_path / "e"),
                     log=lambda _: None)


def test_a_partial_sampling_section_keeps_the_beam_defaults():
    config = EvaluateConfig.model_validate({"sampling": {"num_beams": 5}})
    assert config.sampling.method == "beam" and config.sampling.num_beams == 5
    assert config.sampling.max_length == 20 and config.sampling.repetition_penalty == 1.0
    assert EvaluateConfig().sampling.method == "beam"
