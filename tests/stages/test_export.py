"""`capfilt export`: the consumers' own libraries (webdataset, Hugging Face datasets) read what it writes,
as the same (image bytes, text) pairs as the CapFilt output; it resumes after a kill and names what it
could not resolve."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import ExportConfig, PairSource, ReaderConfig
from capfilt.data.pairs import read_unit_pairs
from capfilt.stages.capfilt import run_capfilt
from capfilt.stages.export import run_export
from tests.stages.test_capfilt import _config


def _digest(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


@pytest.fixture(scope="module")
def capfilt_output(ray_cluster, small_world, tiny_models, tmp_path_factory):
    """A CapFilt output over copies of two web shards and the human shards (copies: a test rewrites them)."""
    root = tmp_path_factory.mktemp("export-input")
    for split, paths in (("web", small_world.shards["web"][:2]), ("human", small_world.shards["human"])):
        (root / split).mkdir()
        for path in paths:
            shutil.copy(path, root / split)
    config = _config(small_world, tiny_models, web=ReaderConfig(paths=f"{root}/web/*.parquet"),
                     human=ReaderConfig(paths=f"{root}/human/*.parquet"), threshold=0.3)
    output = str(root / "capfilt")
    manifest = run_capfilt(config, output)
    # What CapFilt kept, resolved by capfilt's own training reader: (image digest, text, source) per pair.
    source = PairSource(kind="capfilt", path=output)
    pairs = pa.concat_tables([read_unit_pairs(source, unit) for unit in sorted(glob.glob(f"{output}/pairs/*.parquet"))])
    expected = sorted(zip(map(_digest, pairs["image"].to_pylist()), pairs["text"].to_pylist(),
                          pairs["source"].to_pylist()))
    assert len({source for _, _, source in expected}) == 3  # web, synthetic and human texts to export
    return {"root": root, "output": output, "manifest": manifest, "expected": expected}


def test_webdataset_export_reads_as_the_same_pairs_with_webdataset_and_datasets(capfilt_output, tmp_path):
    import datasets
    import webdataset as wds

    dest = tmp_path / "wds"
    manifest = run_export(capfilt_output["output"], str(dest), ExportConfig(samples_per_shard=7), log=lambda _: None)
    tars = sorted(glob.glob(f"{dest}/*.tar"))
    assert len(tars) == manifest["planned_shards"] > 1
    assert all(os.path.exists(tar[: -len(".tar")] + ".parquet") for tar in tars)  # img2dataset's index beside each
    assert manifest["totals"]["texts"] == manifest["capfilt_texts_kept"] == capfilt_output["manifest"]["totals"]["texts_kept"]

    # open_clip's loader: webdataset's own reader, samples grouped by key, raw bytes.
    seen, keys = [], set()
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        seen.append((_digest(sample["jpg"]), sample["txt"].decode(), meta["sources"][0]))
        keys.add(sample["__key__"])
        score = meta["itm_probs"][0]
        assert (math.isnan(score) and meta["sources"][0] == "human") or score >= 0.0  # a human text has no score
        assert meta["input_shard"].endswith(".parquet") and "url" in meta  # provenance and the input's columns
    assert sorted(seen) == capfilt_output["expected"] and len(keys) == len(seen)

    # Hugging Face datasets, as its users load WebDataset.
    loaded = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    loaded = loaded.cast_column("jpg", datasets.Image(decode=False))
    from_hf = sorted((_digest(row["jpg"]["bytes"]), row["txt"], row["json"]["sources"][0]) for row in loaded)
    assert from_hf == capfilt_output["expected"]

    # capfilt's own training reader takes the tars as any img2dataset WebDataset input.
    source = PairSource(kind="shards", role="web", reader=ReaderConfig(format="webdataset", paths=f"{dest}/*.tar"))
    trained = pa.concat_tables([read_unit_pairs(source, tar) for tar in tars])
    assert sorted(zip(map(_digest, trained["image"].to_pylist()), trained["text"].to_pylist())) == sorted(
        (digest, text) for digest, text, _ in capfilt_output["expected"])

    # The index beside each tar lists its samples, as img2dataset's does.
    index = pq.read_table(tars[0][: -len(".tar")] + ".parquet")
    assert {"key", "caption", "status", "sha256", "itm_probs", "url"} <= set(index.column_names)
    assert "jpg" not in index.column_names


def test_parquet_export_reads_with_datasets_and_as_an_img2dataset_input(capfilt_output, tmp_path):
    import datasets

    from capfilt.data.shards import ParquetShardReader

    dest = tmp_path / "parquet"
    run_export(capfilt_output["output"], str(dest), ExportConfig(format="parquet", samples_per_shard=1000),
               log=lambda _: None)
    files = sorted(glob.glob(f"{dest}/*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    from_hf = sorted((_digest(row["jpg"]), row["caption"], row["sources"][0]) for row in loaded)
    assert from_hf == capfilt_output["expected"]

    # capfilt's own reader takes it as any img2dataset Parquet input, and so does training.
    rows = pa.concat_tables([batch for path in files for batch in ParquetShardReader().read_shard(path)])
    assert sorted(zip(map(_digest, rows["image"].to_pylist()), rows["caption"].to_pylist())) == sorted(
        (digest, text) for digest, text, _ in capfilt_output["expected"])
    source = PairSource(kind="shards", role="web", reader=ReaderConfig(paths=f"{dest}/*.parquet"))
    trained = pa.concat_tables([read_unit_pairs(source, path) for path in files])
    assert sorted(zip(map(_digest, trained["image"].to_pylist()), trained["text"].to_pylist())) == sorted(
        zip(map(_digest, rows["image"].to_pylist()), rows["caption"].to_pylist()))


def test_options_select_sources_scores_and_group_texts_by_image(capfilt_output, tmp_path):
    import webdataset as wds

    def read(dest):
        return [(_digest(s["jpg"]), s["txt"].decode(), json.loads(s["json"]))
                for s in wds.WebDataset(sorted(glob.glob(f"{dest}/*.tar")), shardshuffle=False)]

    chosen = {"sources": ["synthetic", "human"], "min_score": 0.5}
    by_text = run_export(capfilt_output["output"], str(tmp_path / "texts"), ExportConfig(**chosen), log=lambda _: None)
    pairs = pq.read_table(f"{capfilt_output['output']}/pairs", columns=["source", "itm_prob"]).to_pylist()
    low = sum(1 for p in pairs if p["source"] == "synthetic" and p["itm_prob"] < 0.5)
    web = sum(p["source"] == "web" for p in pairs)
    assert by_text["totals"]["excluded"] == {"source_not_exported": web, "below_min_score": low}
    assert by_text["totals"]["texts"] == len(pairs) - web - low > 0
    texts = read(tmp_path / "texts")
    assert all(meta["sources"][0] != "web" and (math.isnan(meta["itm_probs"][0]) or meta["itm_probs"][0] >= 0.5)
               for _, _, meta in texts)

    by_image = run_export(capfilt_output["output"], str(tmp_path / "images"), ExportConfig(**chosen, group_by="image"),
                          log=lambda _: None)
    images = read(tmp_path / "images")
    assert len({digest for digest, _, _ in images}) == len(images) == by_image["totals"]["samples"]  # one per image
    # The same texts, now gathered per image, each image's best-scoring one (human first) as its caption.
    assert sorted((digest, text) for digest, _, meta in images for text in meta["texts"]) == sorted(
        (digest, text) for digest, text, _ in texts)
    for _, caption, meta in images:
        assert caption == meta["texts"][0]
        scores = [score for score in meta["itm_probs"] if not math.isnan(score)]
        assert scores == sorted(scores, reverse=True)


def test_unresolvable_references_are_named_errors_and_the_counts_still_reconcile(capfilt_output, tmp_path):
    root = tmp_path / "inputs"
    shutil.copytree(capfilt_output["root"], root)
    output = root / "capfilt"
    # The CapFilt output names its inputs by path: point a copy of it at the copied inputs.
    pairs_files = sorted((output / "pairs").glob("*.parquet"))
    for path in pairs_files:
        table = pq.read_table(path)
        shards = [s.replace(str(capfilt_output["root"]), str(root)) for s in table["shard"].to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(shards)), path)
    web = sorted((root / "web").glob("*.parquet"))
    os.remove(web[0])  # an input shard gone
    changed = pq.read_table(web[1])  # an input shard rewritten: other keys at the same rows
    keys = [f"x{key}" for key in changed["key"].to_pylist()]
    pq.write_table(changed.set_column(changed.schema.get_field_index("key"), "key", pa.array(keys)), web[1])

    manifest = run_export(str(output), str(tmp_path / "out"), ExportConfig(), log=lambda _: None)
    totals = manifest["totals"]
    referencing = pq.read_table(output / "pairs", columns=["shard", "source"]).to_pylist()
    gone = sum(1 for p in referencing if p["shard"] == str(web[0]))
    moved = sum(1 for p in referencing if p["shard"] == str(web[1]))
    assert totals["errors_by_reason"] == {"input_unreadable": gone, "key_mismatch": moved}
    assert totals["texts"] + totals["errors"] == totals["pairs"]  # nothing silently dropped
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert len(errors) == gone + moved
    assert any("FileNotFoundError" in e["detail"] and str(web[0]) in e["detail"] for e in errors)
    assert any(e["reason"] == "key_mismatch" and "'x" in e["detail"] for e in errors)

    result = subprocess.run([sys.executable, "-m", "capfilt.cli", "export", str(output), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"{gone + moved} pairs could not be resolved" in result.stderr


def test_a_killed_export_resumes_without_a_sample_twice_or_missing(capfilt_output, ray_cluster, tmp_path):
    dest = tmp_path / "killed"
    command = [sys.executable, "-m", "capfilt.cli", "export", capfilt_output["output"], str(dest),
               "--samples-per-shard", "2", "--address", ray_cluster.get_runtime_context().gcs_address]
    log = open(tmp_path / "export.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and len(list((dest / "_commits").glob("*.json")) if (
            dest / "_commits").exists() else []) < 2:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (dest / "_SUCCESS").exists(), (tmp_path / "export.log").read_text()[-2000:]
    (dest / "99999.tar").write_bytes(b"a file a killed run left behind")

    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert not (dest / "99999.tar").exists()
    import webdataset as wds

    seen = [(_digest(s["jpg"]), s["txt"].decode(), json.loads(s["json"])["sources"][0])
            for s in wds.WebDataset(sorted(glob.glob(f"{dest}/*.tar")), shardshuffle=False)]
    assert sorted(seen) == capfilt_output["expected"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == len(seen) and len(manifest["shards"]) == manifest["planned_shards"]
    assert Path(dest / "_capfilt.json").exists()


def test_export_to_a_real_s3_protocol_server(capfilt_output, s3_server):
    import s3fs
    import webdataset as wds

    settings = ExportConfig(samples_per_shard=1000, output_storage_options=s3_server.storage_options)
    manifest = run_export(capfilt_output["output"], s3_server.url("wds"), settings, log=lambda _: None)
    names = {item["Key"] for item in s3_server.client.list_objects_v2(Bucket=s3_server.bucket, Prefix="wds/")["Contents"]}
    assert {"wds/00000.tar", "wds/00000.parquet", "wds/manifest.json", "wds/_SUCCESS"} <= names
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    local = Path(capfilt_output["root"]) / "from-s3"
    fs.get(f"{s3_server.bucket}/wds/", str(local), recursive=True)
    tars = sorted(str(path) for path in local.glob("*.tar"))
    assert len(tars) == manifest["planned_shards"]
    seen = sorted((_digest(s["jpg"]), s["txt"].decode(), json.loads(s["json"])["sources"][0])
                  for s in wds.WebDataset(tars, shardshuffle=False))
    assert seen == capfilt_output["expected"]
