"""Comparison files: rows as overrides of a base pipeline, errors that name the row and key, the table."""

from __future__ import annotations

import json

import pytest
import yaml

from capfilt.compare import format_markdown, load_comparison, merge, read_table
from capfilt.config import ConfigError


def test_merge_overrides_key_by_key_and_null_removes():
    base = {"capfilt": {"threshold": 0.5, "sampling": {"num_captions": 1, "nucleus_top_p": 0.9}}, "rounds": 1}
    assert merge(base, {"capfilt": {"sampling": {"num_captions": 0}}, "rounds": 2}) == {
        "capfilt": {"threshold": 0.5, "sampling": {"num_captions": 0, "nucleus_top_p": 0.9}}, "rounds": 2}
    assert merge(base, {"capfilt": None}) == {"rounds": 1}
    assert base["capfilt"]["sampling"]["num_captions"] == 1  # the base is not modified


def _write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_rows_are_validated_against_the_base_relative_to_the_file(tmp_path):
    (tmp_path / "pipes").mkdir()
    _write(tmp_path / "pipes" / "base.yaml", {"pretrain": {"steps": 5}, "finetune_captioner": {}, "finetune_filter": {},
                                              "capfilt": {}, "evaluate": {}})
    path = _write(tmp_path / "pipes" / "table.yaml", {"base": "base.yaml", "rows": {
        "noisy": {"capfilt": None}, "filter": {"capfilt": {"sampling": {"num_captions": 0}}}, "both": {}}})
    comparison, rows = load_comparison(path)
    assert list(rows) == ["noisy", "filter", "both"]
    assert rows["noisy"].capfilt is None and rows["filter"].capfilt.sampling.num_captions == 0
    assert rows["both"].pretrain.steps == 5

    bad = _write(tmp_path / "pipes" / "bad.yaml", {"base": "base.yaml", "rows": {"k": {"capfilt": {"thresold": 1}}}})
    with pytest.raises(ConfigError, match=r"row 'k'.*\n  rows\.k\.capfilt\.thresold: Extra inputs"):
        load_comparison(bad)
    with pytest.raises(ConfigError, match="base.*Field required"):
        load_comparison(_write(tmp_path / "nobase.yaml", {"rows": {"a": {}}}))
    with pytest.raises(ConfigError, match="missing.yaml: no such file"):
        load_comparison(_write(tmp_path / "missing-base.yaml", {"base": "missing.yaml", "rows": {"a": {}}}))


def test_the_table_reads_each_rows_last_model_and_last_round(tmp_path):
    def metrics(tr1, rounds):
        capfilt = [{"filter": {"roc_auc": 0.8 + r / 100}, "captioner": {"synthetic_caption_accuracy": 0.1 * (r + 1)},
                    "capfilt": {"kept_texts": 100 + r}} for r in range(rounds)]
        out = {"models": {"noisy": {"retrieval": {"i2t_r1": 0.25, "t2i_r1": 0.2}, "captioning": {}}},
               "seconds": {"total": 90.0}}
        if rounds:
            out["models"]["bootstrapped"] = {"retrieval": {"i2t_r1": tr1, "t2i_r1": 0.3},
                                             "captioning": {"bleu4": 0.1, "cider": 0.5, "caption_accuracy": 0.4}}
            out.update(capfilt[0])
        if rounds > 1:
            out["rounds"] = {f"round_{r}": value for r, value in enumerate(capfilt)}
        return out

    for row, (tr1, rounds) in {"noisy": (None, 0), "both": (0.5, 1), "two_rounds": (0.6, 2)}.items():
        (tmp_path / row).mkdir()
        (tmp_path / row / "metrics.json").write_text(json.dumps(metrics(tr1, rounds)))
    table = read_table(str(tmp_path), ["noisy", "both", "two_rounds"])
    assert table["rows"]["noisy"]["model"] == "noisy" and table["rows"]["noisy"]["values"]["TR@1"] == 0.25
    assert table["rows"]["noisy"]["values"]["filter AUC"] is None
    assert table["rows"]["both"]["values"]["TR@1"] == 0.5 and table["rows"]["both"]["values"]["pairs kept"] == 100
    last = table["rows"]["two_rounds"]
    assert last["rounds"] == 2 and last["values"]["synthetic acc"] == pytest.approx(0.2)
    assert last["values"]["filter AUC"] == pytest.approx(0.81) and last["values"]["pairs kept"] == 101
    lines = format_markdown(table).splitlines()
    assert lines[0].startswith("| row | TR@1 | IR@1 | BLEU-4 | CIDEr | caption acc | filter AUC |")
    assert lines[2] == "| noisy | 25.0 | 20.0 | n/a | n/a | n/a | n/a | n/a | n/a | 1.5 |"
    assert lines[4].startswith("| two_rounds | 60.0 | 30.0 | 10.0 | 50.0 | 40.0 | 0.810 | 0.200 | 101 | 1.5 |")


def test_validate_checks_every_row_of_a_comparison(tmp_path):
    from click.testing import CliRunner

    from capfilt.cli import main

    _write(tmp_path / "base.yaml", {"pretrain": {}, "finetune_captioner": {}, "finetune_filter": {}, "capfilt": {},
                                    "evaluate": {}})
    good = _write(tmp_path / "good.yaml", {"base": "base.yaml", "rows": {"noisy": {"capfilt": None}, "both": {}}})
    result = CliRunner().invoke(main, ["validate", good])
    assert result.exit_code == 0, result.output
    assert f"{good}: row 'noisy': valid; stages: tokenizer, pretrain_noisy, evaluate" in result.output
    assert f"{good}: row 'both': valid" in result.output
    # A row that validates key by key but cannot be planned: named, with the reason.
    bad = _write(tmp_path / "bad.yaml", {"base": "base.yaml", "rows": {"ok": {}, "orphan": {"pretrain": None}}})
    result = CliRunner().invoke(main, ["validate", bad])
    assert result.exit_code != 0 and f"{bad}: row 'orphan': finetune_" in result.output
    assert "needs a pretrain section or model.init" in result.output
