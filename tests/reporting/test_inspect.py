import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from capfilt.cli import main
from capfilt.reporting.inspect import format_inspection, inspect_output
from capfilt.reporting.reader import OutputReader, parse_storage_options
from capfilt.reporting.texts import QUANTILES, THRESHOLDS, TextFilter


def _committed(path, table):
    return pa.concat_tables([pq.read_table(f, columns=[c for c in pq.read_schema(f).names if c != "image"])
                             for f in OutputReader(path).files(table)])


def _scored(path):
    """(source, score) of every scored web/synthetic text, straight from the files."""
    pairs, rejects = _committed(path, "pairs"), _committed(path, "rejects")
    rows = [(r["source"], r["itm_prob"]) for r in pairs.select(["source", "itm_prob"]).to_pylist()]
    rows += [(r["source"], r["score"]) for r in rejects.select(["source", "score"]).to_pylist()]
    return [(s, v) for s, v in rows if v is not None and s in ("web", "synthetic")]


def _cli(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_counts_match_the_manifest(capfilt_output):
    info = inspect_output(capfilt_output.path)
    totals = capfilt_output.manifest["totals"]
    assert info["finished"] and info["problems"] == []
    assert info["pairs"]["rows"] == totals["texts_kept"]
    # Every dropped text and rejected row is one reject row, so the reasons agree exactly.
    assert info["rejects"]["by_reason"] == totals["reasons"]
    assert info["rejects"]["by_reason"]["not_in_best_n"] > 0
    assert info["rejects"]["by_reason"]["status: failed_to_download"] == 2
    pairs = _committed(capfilt_output.path, "pairs")
    assert info["pairs"]["by_source"] == {s: pairs["source"].to_pylist().count(s) for s in set(pairs["source"].to_pylist())}
    # best_n=1: each decoded web image keeps exactly one of its 1 + K texts; human pairs pass through.
    assert info["pairs"]["by_source"].get("web", 0) + info["pairs"]["by_source"].get("synthetic", 0) == totals["images_decoded"]
    assert info["pairs"]["by_source"]["human"] == 8
    # Per-shard accounting is the manifest's, and all of it reconciles.
    shards = {s["shard"]: s for s in info["shards"]["list"]}
    assert set(shards) == set(capfilt_output.manifest["shards"])
    for shard, counts in capfilt_output.manifest["shards"].items():
        assert (shards[shard]["rows_in"], shards[shard]["kept"], shards[shard]["rejected"]) == \
               (counts["rows_in"], counts["kept"], counts["rejected"])
        assert shards[shard]["reconciles"] and shards[shard]["committed"]
    text = format_inspection(info)
    assert "no problems" in text and "not_in_best_n" in text


def test_json_has_the_documented_fields_and_right_statistics(capfilt_output):
    result = _cli("inspect", capfilt_output.path, "--json", "--samples", "3")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {"path", "finished", "config_hash", "threshold", "keep_policy", "models", "selection", "totals", "pairs",
            "rejects", "scores", "kept_fraction", "samples", "shards", "problems"} <= set(info)
    assert info["keep_policy"] == "best_n"
    scored = _scored(capfilt_output.path)
    for source in ("web", "synthetic"):
        values = np.array([v for s, v in scored if s == source])
        summary = info["scores"][source]
        assert summary["count"] == len(values) > 0
        assert list(summary["quantiles"]) == ["p1", "p5", "p25", "p50", "p75", "p95", "p99"]
        assert np.allclose(list(summary["quantiles"].values()), np.quantile(values, QUANTILES))
    everything = np.array([v for _, v in scored])
    assert [row["threshold"] for row in info["kept_fraction"]] == list(THRESHOLDS)
    median = float(np.median(everything))
    assert info["kept_fraction"][0]["all"] == pytest.approx(np.mean(everything >= 0.1))
    # Recomputed at arbitrary thresholds too: kept iff score >= t.
    from capfilt.reporting.texts import kept_fraction
    assert kept_fraction(everything, [median])[0] == pytest.approx(np.mean(everything >= median))
    assert len(info["samples"]["pairs"]) == 3 and len(info["samples"]["rejects"]) == 3
    assert {"key", "text", "source", "itm_prob", "shard", "row"} <= set(info["samples"]["pairs"][0])
    assert {"key", "reason", "detail", "score", "stage"} <= set(info["samples"]["rejects"][0])
    assert ({"shard", "rows_in", "kept", "filtered", "rejected", "reconciles", "committed", "problems"}
            <= set(info["shards"]["list"][0]))


def test_filters_select_what_they_say(capfilt_output, monkeypatch):
    path = capfilt_output.path
    pairs, rejects = _committed(path, "pairs"), _committed(path, "rejects")

    synthetic = inspect_output(path, filters=TextFilter(sources=("synthetic",)), samples=50)
    assert set(synthetic["pairs"]["by_source"]) == {"synthetic"}
    assert synthetic["pairs"]["rows"] == pc.sum(pc.equal(pairs["source"], "synthetic")).as_py()
    assert set(synthetic["scores"]) == {"web", "synthetic"} and synthetic["scores"]["web"]["count"] == 0
    assert all(row["source"] == "synthetic" for row in synthetic["samples"]["pairs"] + synthetic["samples"]["rejects"])

    dropped = inspect_output(path, filters=TextFilter(decisions=("not_in_best_n",)))
    assert dropped["pairs"]["rows"] == 0
    assert dropped["rejects"]["by_reason"] == {"not_in_best_n": pc.sum(pc.equal(rejects["reason"], "not_in_best_n")).as_py()}
    kept_only = inspect_output(path, filters=TextFilter(decisions=("kept",)))
    assert kept_only["rejects"]["rows"] == 0 and kept_only["pairs"]["rows"] == pairs.num_rows

    scores = sorted(v for _, v in _scored(path))
    cut = scores[len(scores) // 2]
    high = inspect_output(path, filters=TextFilter(min_score=cut), samples=100)
    assert sum(s["count"] for s in high["scores"].values()) == sum(v >= cut for v in scores)
    assert all((row.get("itm_prob") or row.get("score")) >= cut for row in high["samples"]["pairs"] + high["samples"]["rejects"])
    low = inspect_output(path, filters=TextFilter(max_score=cut))
    assert sum(s["count"] for s in low["scores"].values()) == sum(v <= cut for v in scores)
    assert low["rejects"]["by_reason"].get("status: failed_to_download") is None  # unscored rows excluded

    # A key lookup reads only the row groups whose key statistics admit it.
    key = pairs["key"][len(pairs) // 2].as_py()
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    one = inspect_output(path, filters=TextFilter(keys=(key,)), samples=0)
    lookup_reads = len(reads)
    reads.clear()
    inspect_output(path, samples=0)
    assert lookup_reads < len(reads)
    assert one["pairs"]["rows"] == pc.sum(pc.equal(pairs["key"], key)).as_py() > 0
    assert one["rejects"]["rows"] == pc.sum(pc.equal(rejects["key"], key)).as_py()

    result = _cli("inspect", path, "--source", "web", "--reason", "kept", "--samples", "2")
    assert result.exit_code == 0 and "selection: source=['web'], reason=['kept']" in result.output


def test_unfinished_and_unreconciled_outputs_are_flagged(output_copy):
    commits = sorted((output_copy / "_commits").iterdir())
    lost = json.loads(commits[-1].read_text())
    os.remove(output_copy / "_SUCCESS")
    os.remove(commits[-1])
    manifest = json.loads((output_copy / "manifest.json").read_text())
    broken = next(iter(json.loads(commits[0].read_text())["shards"]))
    manifest["shards"][broken]["rows_in"] += 1
    (output_copy / "manifest.json").write_text(json.dumps(manifest))

    info = inspect_output(str(output_copy))
    assert not info["finished"]
    assert "not finished: no _SUCCESS" in info["problems"]
    for shard in lost["shards"]:
        assert f"{shard}: not finished: no commit record" in info["problems"]
    assert any(p.startswith(f"{broken}: does not reconcile") for p in info["problems"])
    flagged = {s["shard"] for s in info["shards"]["list"] if s["problems"]}
    assert flagged == set(lost["shards"]) | {broken}
    # Files no commit names are not counted.
    remaining = sum(c["texts_kept"] for s, c in manifest["shards"].items() if s not in lost["shards"])
    assert info["pairs"]["rows"] == remaining

    result = _cli("inspect", str(output_copy))
    assert result.exit_code == 0
    assert "NOT FINISHED" in result.output and "PROBLEMS" in result.output and broken in result.output


def test_bad_paths_and_options_give_clear_errors(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "not a CapFilt output" in result.output and str(tmp_path) in result.output
    result = CliRunner().invoke(main, ["inspect", str(tmp_path), "--storage-option", "novalue"])
    assert result.exit_code == 1 and "key=value" in result.output


def test_storage_options_parse_json_values_over_the_environment():
    environ = {"CAPFILT_STORAGE_OPTIONS": '{"anon": false, "client_kwargs": {"region_name": "x"}}'}
    options = parse_storage_options(["anon=true", "key=abc", "max_concurrency=4"], environ)
    assert options == {"anon": True, "key": "abc", "max_concurrency": 4, "client_kwargs": {"region_name": "x"}}
    with pytest.raises(ValueError, match="CAPFILT_STORAGE_OPTIONS"):
        parse_storage_options([], {"CAPFILT_STORAGE_OPTIONS": "{nope"})


def test_inspect_and_report_read_an_output_on_s3(capfilt_output, tmp_path, s3_server):
    root = capfilt_output.path
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        s3_server.client.upload_file(str(path), s3_server.bucket, f"out/{path.relative_to(root)}")
    client = json.dumps({"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"})
    url = s3_server.url("out")
    result = _cli("inspect", url, "--json", "--samples", "2", "--storage-option", "key=testing",
                  "--storage-option", "secret=testing", "--storage-option", f"client_kwargs={client}")
    assert result.exit_code == 0, result.output
    remote, local = json.loads(result.output), inspect_output(root, samples=2)
    for field in ("finished", "pairs", "rejects", "scores", "kept_fraction", "samples", "shards", "problems"):
        assert remote[field] == local[field], field

    environ = {"CAPFILT_STORAGE_OPTIONS": json.dumps(s3_server.storage_options)}
    html = tmp_path / "s3.html"
    result = CliRunner().invoke(main, ["report", url, "-o", str(html)], env=environ)
    assert result.exit_code == 0, result.output
    assert url in html.read_text() and 'class="thumb" src="data:image/jpeg' in html.read_text()


def test_an_output_killed_before_its_first_commit(capfilt_output, tmp_path):
    from capfilt.reporting.report import build_report

    empty = tmp_path / "out"
    empty.mkdir()
    (empty / "_capfilt.json").write_bytes((Path(capfilt_output.path) / "_capfilt.json").read_bytes())
    info = inspect_output(str(empty))
    assert not info["finished"] and info["pairs"]["rows"] == 0 and info["shards"]["committed"] == 0
    assert info["shards"]["with_problems"] == info["shards"]["count"] == len(capfilt_output.manifest["shards"])
    assert info["scores"]["web"]["quantiles"]["p50"] is None
    summary = build_report(str(empty), str(tmp_path / "empty.html"))
    assert summary["images"] == 0 and "not finished: no commit record" in (tmp_path / "empty.html").read_text()
