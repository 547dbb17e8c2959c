"""CapFilt on faulty input: row-level faults stay row-level, unreadable shards fail the stage by name,
storage errors are retried (through a real S3-protocol server), and every row is accounted exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import ReaderConfig
from capfilt.data.output import CommittedOutput
from capfilt.stages.capfilt import InputReadError, run_capfilt
from tests.stages.test_capfilt import _config


def _reconciles(manifest: dict) -> None:
    for shard, counts in manifest["shards"].items():
        assert counts["rows_in"] == counts["kept"] + counts["filtered"] + counts["rejected"], shard


def test_bad_keys_stay_row_level_and_unreadable_shards_fail_the_stage_by_name(ray_cluster, small_world, tiny_models,
                                                                              tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    source = small_world.shards["web"][0]
    shutil.copy(source, web / "00000.parquet")
    table = pq.read_table(source)
    keys = table["key"].to_pylist()
    keys[-1], keys[1] = keys[0], None  # the last row repeats the first row's key; one key is null
    pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys, pa.string())),
                   web / "00100.parquet")
    (web / "00101.parquet").write_bytes(b"not a parquet file")
    pq.write_table(table.drop_columns(["caption"]), web / "00102.parquet")  # a schema error; the footer reads
    config = _config(small_world, tiny_models, web=ReaderConfig(paths=f"{web}/*.parquet"), human=None)
    out = tmp_path / "out"

    with pytest.raises(InputReadError, match=r"2 of 4 input shards \(50.0%\) could not be read in full, more than "
                                             r"capfilt.max_unreadable_fraction = 0: .*00101.parquet, .*00102.parquet"):
        run_capfilt(config, str(out))
    assert not (out / "_SUCCESS").exists()  # not finished, but what was read is committed and reported
    manifest = json.loads((out / "manifest.json").read_text())
    _reconciles(manifest)
    shards = manifest["shards"]
    n = table.num_rows
    duplicate = shards[str(web / "00100.parquet")]
    assert duplicate["rows_in"] == n and "error" not in duplicate
    assert duplicate["reasons"]["duplicate_key"] == 1 and duplicate["reasons"]["key_missing"] == 1
    schema_error = shards[str(web / "00102.parquet")]
    assert schema_error["rows_in"] == n and schema_error["reasons"] == {"shard_unreadable": n}
    assert "missing caption column 'caption'" in schema_error["error"]
    garbage = shards[str(web / "00101.parquet")]
    assert garbage["rows_in"] == 0 and "not a readable Parquet file" in garbage["error"]
    unread = manifest["could_not_read"]
    assert unread["shards"] == [str(web / "00101.parquet"), str(web / "00102.parquet")] and unread["rows"] == n

    rejects = pq.read_table(out / "rejects").to_pylist()
    duplicate_row = [r for r in rejects if r["reason"] == "duplicate_key"]
    assert [(r["key"], r["source_key"]) for r in duplicate_row] == [(keys[0], f"00100.parquet:{n - 1}")]
    assert "first at row 0" in duplicate_row[0]["detail"]
    unreadable = sorted(r["row"] for r in rejects if r["reason"] == "shard_unreadable")
    assert unreadable == list(range(n))

    # Allowing it finishes the same output without redoing a shard.
    commits = len(CommittedOutput(str(out)).commits())
    manifest = run_capfilt(config.model_copy(update={"max_unreadable_fraction": 0.5}), str(out))
    assert (out / "_SUCCESS").exists() and len(CommittedOutput(str(out)).commits()) == commits
    assert manifest["could_not_read"]["fraction"] == 0.5


def test_storage_errors_are_retried_and_a_shard_that_keeps_failing_is_read_on_the_next_run(
        ray_cluster, small_world, tiny_models, s3_server, faulty_s3):
    shards = small_world.shards["web"][:3]
    for path in shards:
        s3_server.client.upload_file(str(path), s3_server.bucket, f"world/web/{Path(path).name}")
    reader = ReaderConfig(paths=s3_server.url("world/web/*.parquet"), storage_options=faulty_s3.storage_options,
                          read_retries=2, retry_backoff_s=0.05)
    config = _config(small_world, tiny_models, web=reader, human=None, output_storage_options=s3_server.storage_options)
    output = s3_server.url("out")
    names = [Path(path).name for path in shards]
    faulty_s3.fail(names[0], 2)  # a blip: within the retries
    faulty_s3.fail(names[1], 1000)  # an outage: longer than the retries

    with pytest.raises(InputReadError, match=f"1 input shards could not be read after retries.*{names[1]}.*run again"):
        run_capfilt(config, output)
    assert sum(names[0] in path for path in faulty_s3.failed) == 2
    done = CommittedOutput(output, s3_server.storage_options).done_shards()
    assert sorted(Path(shard).name for shard in done) == [names[0], names[2]]  # the failing one is not done

    faulty_s3.fail(names[1], 0)  # storage is back
    manifest = run_capfilt(config, output)
    _reconciles(manifest)
    assert manifest["totals"]["rows_in"] == sum(pq.read_metadata(path).num_rows for path in shards)
    assert manifest["could_not_read"]["shards"] == []
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    pairs = pq.read_table(f"{s3_server.bucket}/out/pairs", filesystem=fs)
    rejects = pq.read_table(f"{s3_server.bucket}/out/rejects", filesystem=fs)
    # Every input row exactly once: as pairs (one per kept text) or as rejects, never twice over.
    texts = list(zip(pairs["shard"].to_pylist(), pairs["row"].to_pylist(), pairs["source"].to_pylist(),
                     pairs["text"].to_pylist()))
    assert len(texts) == len(set(texts))
    rows = {(Path(s).name, r) for s, r in zip(pairs["shard"].to_pylist(), pairs["row"].to_pylist())}
    rows |= {(Path(s).name, r) for s, r in zip(rejects["shard"].to_pylist(), rejects["row"].to_pylist())}
    assert rows == {(name, row) for name, path in zip(names, shards) for row in range(pq.read_metadata(path).num_rows)}


def test_webdataset_failed_rows_do_not_take_the_images_of_kept_pairs(ray_cluster, small_world, tiny_models, tokenizer,
                                                                    tmp_path):
    """img2dataset's WebDataset keeps failed rows only in the sidecar Parquet; their indices there are
    the tar's indices of other samples. Through CapFilt and pretraining each kept pair keeps its image."""
    import tarfile

    from capfilt.config import ImageConfig, MedConfig, PairSource, TrainConfig
    from capfilt.data.pairs import read_unit_pairs
    from capfilt.stages.pretrain import run_pretrain
    from tests.data.test_shards import write_img2dataset_shard

    source = pq.read_table(small_world.shards["web"][0]).to_pylist() + pq.read_table(small_world.shards["web"][1]).to_pylist()
    samples = []
    for index, row in enumerate(source):
        failed = index % 3 == 1 or row["jpg"] is None  # interleaved: sidecar row i is tar sample i's twin
        samples.append((None if failed else row["jpg"], row["caption"], "failed_to_download" if failed else "success",
                        "HTTP Error 404" if failed else None))
    web = tmp_path / "web"
    web.mkdir()
    tar = write_img2dataset_shard(web, 0, samples, output_format="webdataset")
    truth = {}  # key -> image bytes, read with tarfile, not with capfilt
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            if member.name.endswith(".jpg"):
                truth[member.name[: -len(".jpg")]] = archive.extractfile(member).read()
    assert 0 < len(truth) < len(samples)

    config = _config(small_world, tiny_models, web=ReaderConfig(format="webdataset", paths=f"{web}/*.tar"), human=None,
                     threshold=0.0)
    out = tmp_path / "out"
    manifest = run_capfilt(config, str(out))
    _reconciles(manifest)
    assert manifest["totals"]["rows_in"] == len(samples)
    assert manifest["totals"]["reasons"]["status: failed_to_download"] == len(samples) - len(truth)
    rejects = pq.read_table(out / "rejects").to_pylist()
    failed = [(r["row"], r["source_key"]) for r in rejects if r["reason"] == "status: failed_to_download"]
    assert all(row >= len(truth) and key.startswith("00000.parquet:") for row, key in failed)

    pairs_source = PairSource(kind="capfilt", path=str(out))
    units = [str(path) for path in sorted((out / "pairs").glob("*.parquet"))]
    pairs = pa.concat_tables([read_unit_pairs(pairs_source, unit) for unit in units])
    assert pairs.num_rows == manifest["totals"]["texts_kept"] > 0
    for key, image in zip(pairs["key"].to_pylist(), pairs["image"].to_pylist()):
        assert image == truth[key], key  # as training reads it: its own image, fetched from the tar

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    model = MedConfig(preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2,
                                             "mlp_dim": 128},
                      text={"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, embed_dim=32, queue_size=64)
    train = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=3, log_every=1,
                        image=ImageConfig(hflip_p=0.0))
    result = run_pretrain(train, model, str(tokenizer_dir), [pairs_source], str(tmp_path / "pretrain"), log=lambda _: None)
    assert result["pairs"]["total"] == pairs.num_rows
    assert result["bad_pairs"]["pairs"] == 0, result["bad_pairs"]  # no kept pair met a missing image
