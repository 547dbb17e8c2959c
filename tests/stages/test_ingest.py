"""Ingest end to end: real photos served over local HTTP, img2dataset, then our reader."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from capfilt.config import IngestConfig
from capfilt.data.images import decode_batch, eval_transform
from capfilt.data.shards import ParquetShardReader, split_by_status
from capfilt.stages.ingest import SUCCESS_MARKER, IngestError, ingest, read_marker, shard_summary

FLICKR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k-1k"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def photo_server():
    if not (FLICKR / "images").is_dir():
        pytest.skip(f"the Flickr8k sample is not at {FLICKR} (expected <repo>/../shared/data/flickr8k-1k)")
    handler = functools.partial(_QuietHandler, directory=str(FLICKR / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def first_captions(count: int) -> list[tuple[str, str]]:
    pairs, seen = [], set()
    with open(FLICKR / "captions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["image"] not in seen:
                seen.add(row["image"])
                pairs.append((row["image"], row["caption"]))
            if len(pairs) == count:
                break
    return pairs


@pytest.mark.timeout(180)
def test_ingest_downloads_and_the_reader_reconciles(photo_server, tmp_path):
    pairs = first_captions(12)
    url_list = tmp_path / "urls.csv"
    with open(url_list, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "photo_id"])
        for name, caption in pairs:
            writer.writerow([f"{photo_server}/{name}", caption, name.split(".")[0]])
        writer.writerow([f"{photo_server}/no-such-photo.jpg", "a photo that is gone", "gone"])
    config = IngestConfig(
        url_list=str(url_list),
        save_additional_columns=["photo_id"],
        image_size=64,
        number_sample_per_shard=8,
        thread_count=4,
        timeout_s=5,
    )
    out = tmp_path / "shards"
    assert ingest(config, str(out)) == str(out)

    marker = read_marker(str(out))
    assert marker["count"] == 13 and marker["successes"] == 12 and marker["failed_to_download"] == 1
    assert marker["shards"] == 2
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]

    reader = ParquetShardReader(batch_size=5)
    table = pa.concat_tables(list(reader.read(str(out / "*.parquet"))))
    assert table.num_rows == 13
    good, rejects = split_by_status(table, stage="ingest")
    assert good.num_rows == 12 and rejects.num_rows == 1
    assert rejects["reason"].to_pylist() == ["status: failed_to_download"]
    assert "404" in rejects["detail"][0].as_py()
    assert rejects["text"].to_pylist() == ["a photo that is gone"]
    # the caller's columns came through, captions untouched
    by_id = dict(zip(good["photo_id"].to_pylist(), good["caption"].to_pylist()))
    assert by_id == {name.split(".")[0]: caption for name, caption in pairs}
    pixels, ok, failures = decode_batch(good["image"].to_pylist(), 10**7, eval_transform(32))
    assert pixels.shape == (12, 3, 32, 32) and not failures
    assert min(good["width"].to_pylist() + good["height"].to_pylist()) == 64  # keep_ratio: shorter side

    # complete: a second call returns at once without touching the shards
    before = (out / "00000.parquet").stat().st_mtime_ns
    assert ingest(config, str(out)) == str(out)
    assert (out / "00000.parquet").stat().st_mtime_ns == before


def test_a_stats_file_without_its_shard_is_an_error(tmp_path):
    (tmp_path / "00000_stats.json").write_text(
        json.dumps({"count": 3, "successes": 3, "failed_to_download": 0, "failed_to_resize": 0})
    )
    config = IngestConfig(url_list="unused.csv")
    with pytest.raises(IngestError, match="00000_stats.json exists but 00000.parquet does not"):
        shard_summary(str(tmp_path), config)
    (tmp_path / "00000.parquet").write_bytes(b"")
    assert shard_summary(str(tmp_path), config)["count"] == 3
    assert not (tmp_path / SUCCESS_MARKER).exists()


def test_missing_shards_fail_the_ingest_and_leave_no_marker(tmp_path, monkeypatch):
    import img2dataset

    # img2dataset gives up on a failing shard without raising; simulate a run that wrote nothing.
    monkeypatch.setattr(img2dataset, "download", lambda **kwargs: None)
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\nhttp://127.0.0.1:9/b.jpg,b\n")
    out = tmp_path / "shards"
    out.mkdir()
    with pytest.raises(IngestError, match="0 shards with 0 rows, expected 1 shards with 2 rows"):
        ingest(IngestConfig(url_list=str(url_list)), str(out))
    assert read_marker(str(out)) is None
