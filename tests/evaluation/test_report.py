"""The text table: models side by side, values x100, n/a where a metric does not exist."""

from __future__ import annotations

from capfilt.evaluation.report import format_table


def _model(r1, acc):
    return {"retrieval": {"i2t_r1": r1, "i2t_r5": 0.5, "i2t_r10": 0.6, "t2i_r1": 0.2, "t2i_r5": 0.4, "t2i_r10": 0.5},
            "captioning": {"bleu4": 0.123, "cider": 1.333, "caption_accuracy": acc}}


def test_table_rows_are_models_and_values_are_percent():
    metrics = {"models": {"noisy": _model(0.25, None), "bootstrapped": _model(0.375, 0.8)},
               "filter": None, "captioner": None, "capfilt": None}
    lines = format_table(metrics).splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert ["TR@1", "TR@5", "IR@1", "IR@5", "B@4", "CIDEr", "Acc"] == header.split()[1:]
    noisy = next(line for line in lines if line.startswith("noisy")).split()
    boot = next(line for line in lines if line.startswith("bootstrapped")).split()
    assert noisy[1:] == ["25.0", "50.0", "20.0", "40.0", "12.3", "133.3", "n/a"]
    assert boot[1] == "37.5" and boot[-1] == "80.0"
    assert "filter" not in format_table(metrics)


def test_summary_lines_for_capfilt():
    metrics = {
        "models": {},
        "filter": {"roc_auc": 0.91, "precision": 0.8, "recall": None, "clean_kept": 0.95, "threshold": 0.5,
                   "by_noise_type": {"mismatched": {"recall": 0.9, "roc_auc_vs_clean": 0.97, "count": 12},
                                     "hard_relation": {"recall": 0.4, "count": 3}}},
        "captioner": {"synthetic_caption_accuracy": 0.6, "kept_synthetic_caption_accuracy": 0.7,
                      "distinct_captions_per_image": 2.5},
        "capfilt": {"input_rows": 100, "kept": 80, "filtered": 15, "rejected": 5, "kept_by_source": {"web": 70}},
    }
    text = format_table(metrics)
    assert "ROC-AUC 0.910" in text and "recall n/a" in text and "mismatched 0.90 / 0.97 (n=12)" in text
    assert "hard_relation 0.40 / n/a (n=3)" in text
    assert "synthetic caption accuracy 0.600" in text and "distinct captions per image 2.50" in text
    assert "100 input rows: 80 kept, 15 filtered, 5 rejected; kept texts by source: web 70" in text
