"""ROC-AUC against a pairwise count; filter, captioner and count metrics on a hand-made CapFilt output."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from capfilt.evaluation.filtering import (
    CapFiltOutput,
    Truth,
    average_ranks,
    capfilt_counts,
    captioner_metrics,
    filter_metrics,
    read_capfilt_output,
    roc_auc,
    shard_id,
)


def test_average_ranks_share_ties():
    assert average_ranks([0.3, 0.1, 0.3, 0.2]).tolist() == [3.5, 1.0, 3.5, 2.0]


def _pairwise_auc(scores, labels):
    positives = [s for s, label in zip(scores, labels) if label]
    negatives = [s for s, label in zip(scores, labels) if not label]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_roc_auc_matches_the_pairwise_count_with_ties():
    generator = np.random.default_rng(0)
    for _ in range(20):
        scores = generator.integers(0, 5, size=40) / 4  # many ties
        labels = generator.random(40) < 0.4
        assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
    assert roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert roc_auc([0.1, 0.2], [False, False]) is None  # one class only


SHARD = "/data/web/00000.parquet"


def _world_scene():
    from capfilt.data.world import sample_scene

    return sample_scene(random.Random(1), 1, 1, 0.0)


def _output():
    """Six web rows: 0-2 clean, 3 mismatched, 4 boilerplate, 5 hard_attribute; plus synthetic texts."""
    from capfilt.data.world import human_captions

    scene = _world_scene()
    true_text = human_captions(scene, random.Random(2), 1)[0]
    pairs = [
        # kept web texts: rows 0, 1 (clean) and 5 (hard_attribute, missed)
        {"text": "w0", "source": "web", "itm_prob": 0.9, "shard": SHARD, "row": 0},
        {"text": "w1", "source": "web", "itm_prob": 0.7, "shard": SHARD, "row": 1},
        {"text": "w5", "source": "web", "itm_prob": 0.6, "shard": SHARD, "row": 5},
        {"text": true_text, "source": "synthetic", "itm_prob": 0.8, "shard": SHARD, "row": 0},
        {"text": "h", "source": "human", "itm_prob": None, "shard": "/data/human/00000.parquet", "row": 0},
    ]
    rejects = [
        # filtered web texts: row 2 (clean, wrongly), rows 3 and 4 (noisy, rightly)
        {"text": "w2", "source": "web", "reason": "itm_below_threshold", "score": 0.4, "shard": SHARD, "row": 2},
        {"text": "w3", "source": "web", "reason": "itm_below_threshold", "score": 0.1, "shard": SHARD, "row": 3},
        {"text": "w4", "source": "web", "reason": "itm_below_threshold", "score": 0.2, "shard": SHARD, "row": 4},
        # not filter decisions
        {"text": None, "source": "web", "reason": "status: failed_to_download", "score": None, "shard": SHARD, "row": 6},
        {"text": "w7", "source": "web", "reason": "duplicate_text", "score": None, "shard": SHARD, "row": 7},
        # synthetic texts dropped: one false caption, one repeat of the kept one
        {"text": "click to enlarge", "source": "synthetic", "reason": "itm_below_threshold", "score": 0.2,
         "shard": SHARD, "row": 0},
        {"text": true_text, "source": "synthetic", "reason": "duplicate_text", "score": None, "shard": SHARD, "row": 0},
        {"text": "a picture", "source": "synthetic", "reason": "itm_below_threshold", "score": 0.3, "shard": SHARD, "row": 1},
    ]
    noise = ["clean", "clean", "clean", "mismatched", "boilerplate", "hard_attribute", "clean", "clean"]
    truth = {(SHARD, row): Truth(kind, kind == "clean", scene.to_json()) for row, kind in enumerate(noise)}
    manifest = {"totals": {"rows_in": 9, "kept": 4, "filtered": 3, "rejected": 2, "reasons": {"x": 1}},
                "roles": {SHARD: "web", "/data/human/00000.parquet": "human"}}
    return CapFiltOutput(pa.Table.from_pylist(pairs), pa.Table.from_pylist(rejects), manifest), truth


def test_filter_metrics_on_known_labels():
    output, truth = _output()
    metrics = filter_metrics(output, truth, threshold=0.5)
    # Removed: rows 2, 3, 4; noisy: 3, 4, 5.
    assert metrics["web_texts_scored"] == 6 and metrics["web_texts_with_truth"] == 6
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["clean_kept"] == pytest.approx(2 / 3)
    # 1 - prob for noisy (0.9, 0.8, 0.4) vs clean (0.1, 0.3, 0.6): 8 of 9 pairs ordered right.
    assert metrics["roc_auc"] == pytest.approx(8 / 9)
    # Against the clean texts (0.9, 0.7, 0.4): boilerplate (0.2) and mismatched (0.1) rank below all three;
    # hard_attribute (0.6) below two of them.
    assert metrics["by_noise_type"] == {
        "boilerplate": {"recall": 1.0, "roc_auc_vs_clean": 1.0, "count": 1, "mean_itm_prob": 0.2},
        "hard_attribute": {"recall": 0.0, "roc_auc_vs_clean": pytest.approx(2 / 3), "count": 1, "mean_itm_prob": 0.6},
        "mismatched": {"recall": 1.0, "roc_auc_vs_clean": 1.0, "count": 1, "mean_itm_prob": 0.1},
    }
    # A stricter threshold removes row 5 too.
    assert filter_metrics(output, truth, threshold=0.65)["recall"] == 1.0


def test_filter_metrics_without_ground_truth_are_null():
    output, truth = _output()
    for missing in (None, {key: Truth(None, None, None) for key in truth}):
        metrics = filter_metrics(output, missing, threshold=0.5)
        assert metrics["web_texts_scored"] == 6
        assert all(metrics[key] is None for key in ("roc_auc", "precision", "recall", "clean_kept"))
        assert metrics["by_noise_type"] == {}


def test_captioner_metrics():
    output, truth = _output()
    metrics = captioner_metrics(output, truth)
    assert metrics["synthetic_texts"] == 4 and metrics["synthetic_kept"] == 1
    # Image 0 has two distinct texts, image 1 one.
    assert metrics["distinct_captions_per_image"] == 1.5
    # The true caption twice (kept and its duplicate), two false ones.
    assert metrics["synthetic_caption_accuracy"] == 0.5
    assert metrics["kept_synthetic_caption_accuracy"] == 1.0
    bare = captioner_metrics(output, None)
    assert bare["synthetic_caption_accuracy"] is None and bare["distinct_captions_per_image"] == 1.5


def test_capfilt_counts():
    output, _ = _output()
    counts = capfilt_counts(output)
    assert {k: counts[k] for k in ("input_rows", "kept", "filtered", "rejected")} == {
        "input_rows": 9, "kept": 4, "filtered": 3, "rejected": 2}
    assert counts["kept_by_source"] == {"human": 1, "synthetic": 1, "web": 3}
    output.manifest = None  # an unfinished run: counts from the manifest are unknown
    assert capfilt_counts(output)["input_rows"] is None


def test_read_capfilt_output_reads_committed_files_only(tmp_path):
    from capfilt.data.output import Commit, CommittedOutput
    from capfilt.stages.capfilt import PAIRS_SCHEMA, REJECTS_SCHEMA

    output, _ = _output()
    out = CommittedOutput(str(tmp_path / "out"))
    pairs = pa.Table.from_pylist(output.pairs.to_pylist(), schema=PAIRS_SCHEMA)
    rejects = pa.Table.from_pylist(output.rejects.to_pylist(), schema=REJECTS_SCHEMA)
    out.write_table("pairs/part-00000-000.parquet", pairs)
    out.write_table("rejects/part-00000-000.parquet", rejects)
    out.commit(Commit(0, {SHARD: {}}, ["pairs/part-00000-000.parquet", "rejects/part-00000-000.parquet"]))
    out.write_table("pairs/part-00001-000.parquet", pairs)  # a killed run's leftover: no commit names it
    out.finish(output.manifest)

    read = read_capfilt_output(str(tmp_path / "out"))
    assert read.pairs.num_rows == pairs.num_rows and read.rejects.num_rows == rejects.num_rows
    assert read.manifest["totals"]["rows_in"] == 9
    with pytest.raises(ValueError, match="not a CapFilt output"):
        read_capfilt_output(str(tmp_path / "empty"))


def test_shard_id_resolves_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shard_id("web/0.parquet") == shard_id(str(tmp_path / "web" / "0.parquet"))
    assert shard_id(f"file://{tmp_path}/web/0.parquet") == shard_id("web/0.parquet")
    assert shard_id("s3://bucket/web/0.parquet") == "s3://bucket/web/0.parquet"
