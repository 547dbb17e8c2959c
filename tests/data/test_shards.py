"""Readers over real img2dataset layouts (written with img2dataset's own writers), folders, and bad files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.config import ReaderConfig
from capfilt.data.images import decode_batch, eval_transform
from capfilt.data.shards import (
    REJECT_SCHEMA,
    FolderReader,
    ParquetShardReader,
    ShardReadError,
    ShardSchemaError,
    ShardTransientError,
    WebDatasetShardReader,
    expand_braces,
    expand_paths,
    make_reader,
    reject_rows,
    split_by_status,
)

META_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("lang", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


def jpeg(colour=(200, 30, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write_img2dataset_shard(folder, shard_id, samples, output_format="parquet"):
    """``samples``: (image bytes or None, caption, status, error_message); written by img2dataset's writer."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations
    from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

    writer_class = ParquetSampleWriter if output_format == "parquet" else WebDatasetSampleWriter
    writer = writer_class(shard_id, str(folder), True, 5, META_SCHEMA, "jpg")
    for index, (data, caption, status, error) in enumerate(samples):
        key = f"{shard_id:05d}{index:04d}"
        meta = {
            "url": f"http://example.com/{key}.jpg",
            "caption": caption,
            "lang": "en",
            "key": key,
            "status": status,
            "error_message": error,
            "width": 24 if data else None,
            "height": 16 if data else None,
            "original_width": 48 if data else None,
            "original_height": 32 if data else None,
            "exif": None,
            "sha256": hashlib.sha256(data).hexdigest() if data else None,
        }
        writer.write(data, key, caption, meta)
    writer.close()
    suffix = "parquet" if output_format == "parquet" else "tar"
    return str(folder / f"{shard_id:05d}.{suffix}")


SAMPLES = [
    (jpeg(), "A red box.", "success", None),
    (None, "gone", "failed_to_download", "HTTP Error 404: Not Found"),
    (jpeg((30, 200, 30)), "A green box!", "success", None),
    (None, "too small", "failed_to_resize", "image too small"),
    (jpeg((30, 30, 200)), None, "success", None),
]


def read_all(reader, path):
    return pa.concat_tables(list(reader.read_shard(path)))


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def test_brace_expansion():
    assert expand_braces("s3://b/{00000..00002}.parquet") == [
        "s3://b/00000.parquet",
        "s3://b/00001.parquet",
        "s3://b/00002.parquet",
    ]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_braces("x/{literal}.csv") == ["x/{literal}.csv"]


def test_expand_paths_globs_braces_sorted_and_unique(tmp_path):
    for name in ("00002.parquet", "00000.parquet", "00001.parquet", "00001_stats.json"):
        (tmp_path / name).write_bytes(b"x")
    by_glob = expand_paths(str(tmp_path / "*.parquet"))
    assert by_glob == [str(tmp_path / f"{i:05d}.parquet") for i in range(3)]
    by_brace = expand_paths([str(tmp_path / "{00000..00002}.parquet"), str(tmp_path / "0000{1,2}.parquet")])
    assert by_brace == by_glob


def test_expand_paths_names_the_pattern_that_matches_nothing(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
        expand_paths(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="00001.parquet"):
        expand_paths(str(tmp_path / "{00000..00001}.parquet"))


def test_expand_paths_and_read_through_fsspec_memory(tmp_path):
    import fsspec

    local = write_img2dataset_shard(tmp_path, 0, SAMPLES)
    memory = fsspec.filesystem("memory")
    memory.pipe("/capfilt-shards/00000.parquet", open(local, "rb").read())
    paths = expand_paths("memory://capfilt-shards/{00000..00000}.parquet")
    assert paths == ["memory:///capfilt-shards/00000.parquet"]
    table = read_all(ParquetShardReader(), paths[0])
    assert table.num_rows == len(SAMPLES)


def test_s3_with_storage_options(tmp_path, s3_server):
    local = write_img2dataset_shard(tmp_path, 0, SAMPLES)
    s3_server.client.upload_file(local, s3_server.bucket, "run/00000.parquet")
    # endpoint_url at the top level, as users write it for s3fs, rather than under client_kwargs.
    config = ReaderConfig(
        paths=s3_server.url("run/*.parquet"),
        storage_options={"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"},
    )
    reader = make_reader(config)
    assert reader.paths() == [s3_server.url("run/00000.parquet")]
    table = pa.concat_tables(list(reader.read()))
    assert table["key"].to_pylist() == [f"00000000{i}" for i in range(5)]


# --------------------------------------------------------------------------------------------------
# img2dataset Parquet
# --------------------------------------------------------------------------------------------------


def test_img2dataset_parquet_is_normalised(tmp_path):
    path = write_img2dataset_shard(tmp_path, 3, SAMPLES)
    batches = list(ParquetShardReader(batch_size=2).read_shard(path))
    assert [batch.num_rows for batch in batches] == [2, 2, 1]
    table = pa.concat_tables(batches)
    assert table.column_names[:9] == [
        "key", "source_key", "shard", "row", "image", "caption", "status", "error_message", "sha256"
    ]  # fmt: skip
    # every other input column carried through unchanged
    carried = {"url", "lang", "width", "height", "original_width", "original_height", "exif"}
    assert set(table.column_names[9:]) == carried
    assert table["key"].to_pylist() == [f"00003000{i}" for i in range(5)]
    assert table["source_key"].to_pylist() == [f"00003.parquet:{i}" for i in range(5)]
    assert table["row"].to_pylist() == list(range(5))
    assert table["shard"].to_pylist() == [path] * 5
    assert table["caption"].to_pylist() == [caption for _, caption, _, _ in SAMPLES]
    assert table["image"].to_pylist()[0] == SAMPLES[0][0]
    assert table["sha256"][0].as_py() == hashlib.sha256(SAMPLES[0][0]).hexdigest()
    assert table["lang"].to_pylist() == ["en"] * 5
    assert table.schema.field("width").type == pa.int32()


def test_failed_rows_become_status_rejects_and_counts_reconcile(tmp_path):
    path = write_img2dataset_shard(tmp_path, 0, SAMPLES)
    table = read_all(ParquetShardReader(), path)
    good, rejects = split_by_status(table, stage="read")
    assert good.num_rows + rejects.num_rows == table.num_rows == len(SAMPLES)
    assert good["key"].to_pylist() == ["000000000", "000000002", "000000004"]
    assert rejects.schema == REJECT_SCHEMA
    assert rejects.to_pylist() == [
        {"key": "000000001", "source_key": "00000.parquet:1", "text": "gone", "reason": "status: failed_to_download",
         "detail": "HTTP Error 404: Not Found", "score": None, "stage": "read"},
        {"key": "000000003", "source_key": "00000.parquet:3", "text": "too small", "reason": "status: failed_to_resize",
         "detail": "image too small", "score": None, "stage": "read"},
    ]  # fmt: skip


def test_pipeline_counts_reconcile_through_decoding(tmp_path):
    # Rows claiming success can still hold bad bytes: decoding rejects them with a reason.
    samples = SAMPLES + [(jpeg()[:300], "truncated", "success", None), (b"<html>", "not an image", "success", None)]
    path = write_img2dataset_shard(tmp_path, 0, samples)
    rows_in = passed = rejected = 0
    reasons = []
    for batch in ParquetShardReader(batch_size=3).read_shard(path):
        rows_in += batch.num_rows
        good, status_rejects = split_by_status(batch)
        pixels, ok, failures = decode_batch(good["image"].to_pylist(), 10**6, eval_transform(16))
        decode_rejects = reject_rows(good, failures, stage="decode")
        assert pixels.shape[0] == len(ok)
        passed += len(ok)
        rejected += status_rejects.num_rows + decode_rejects.num_rows
        reasons += status_rejects["reason"].to_pylist() + decode_rejects["reason"].to_pylist()
    assert rows_in == len(samples) == passed + rejected
    assert passed == 3
    assert sorted(reasons) == [
        "decode_error: not_an_image",
        "decode_error: truncated",
        "status: failed_to_download",
        "status: failed_to_resize",
    ]


def test_derived_keys_are_stable_and_extra_columns_keep_their_names(tmp_path):
    path = tmp_path / "part-7.parquet"
    # no key column; input columns named like normalised ones are namespaced, not overwritten
    columns = {"jpg": [jpeg(), jpeg()], "caption": ["a", "b"], "shard": ["s1", "s2"], "row": [10, 20]}
    pq.write_table(pa.table({**columns, "score": [0.1, 0.2]}), path)
    first = read_all(ParquetShardReader(), str(path))
    second = read_all(ParquetShardReader(batch_size=1), str(path))
    assert first["key"].to_pylist() == ["part-7_000000", "part-7_000001"] == second["key"].to_pylist()
    assert first["input_shard"].to_pylist() == ["s1", "s2"]
    assert first["input_row"].to_pylist() == [10, 20]
    assert first["row"].to_pylist() == [0, 1]
    assert first["score"].to_pylist() == [0.1, 0.2]
    assert first["status"].to_pylist() == ["success", "success"]


def test_columns_projection_reads_only_what_is_asked(tmp_path):
    path = write_img2dataset_shard(tmp_path, 0, SAMPLES)
    table = read_all(ParquetShardReader(columns=["url"]), path)
    assert table.column_names[9:] == ["url"]
    with pytest.raises(ShardSchemaError, match="'nope'"):
        read_all(ParquetShardReader(columns=["nope"]), path)


def test_duplicate_and_missing_keys_are_row_level_rejects(tmp_path):
    path = tmp_path / "dup.parquet"
    keys = ["a", "b", "a", None, "", "c"]
    pq.write_table(pa.table({"key": keys, "jpg": [jpeg()] * 6, "caption": ["x"] * 6}), path)
    table = read_all(ParquetShardReader(batch_size=2), str(path))
    assert table.num_rows == 6  # every row of the shard, in order
    assert table["status"].to_pylist() == ["success", "success", "duplicate_key", "key_missing", "key_missing",
                                           "success"]
    good, rejects = split_by_status(table)
    assert good["key"].to_pylist() == ["a", "b", "c"]  # the first row with a key keeps it
    assert rejects["reason"].to_pylist() == ["duplicate_key", "key_missing", "key_missing"]
    assert rejects["detail"][0].as_py() == "key 'a' first at row 0, which keeps it"
    assert rejects["source_key"].to_pylist() == ["dup.parquet:2", "dup.parquet:3", "dup.parquet:4"]
    # with derived keys every row keeps its own
    assert read_all(ParquetShardReader(key_column=None), str(path))["status"].to_pylist() == ["success"] * 6


def test_a_failed_row_keeps_its_own_reason_when_its_key_repeats(tmp_path):
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"key": ["a", "a"], "jpg": [None, jpeg()], "caption": ["x", "y"],
                             "status": ["failed_to_download", "success"], "error_message": ["404", None]}), path)
    _, rejects = split_by_status(read_all(ParquetShardReader(), str(path)))
    assert rejects["reason"].to_pylist() == ["status: failed_to_download", "duplicate_key"]


def test_duplicate_keys_across_shards(tmp_path):
    write_img2dataset_shard(tmp_path, 0, SAMPLES)
    (tmp_path / "copy").mkdir()
    write_img2dataset_shard(tmp_path / "copy", 0, SAMPLES)
    batches = list(ParquetShardReader().read(str(tmp_path / "**/*.parquet")))
    second = pa.concat_tables(batches[len(batches) // 2:])
    _, rejects = split_by_status(second)
    duplicates = [row["detail"] for row in rejects.to_pylist() if row["reason"] == "duplicate_key"]
    assert len(duplicates) == 3 and "'000000000' first at" in duplicates[0]


def test_a_corrupt_row_group_costs_its_own_rows_only(tmp_path):
    path = tmp_path / "groups.parquet"
    table = pa.table({"key": [f"k{i}" for i in range(9)], "jpg": [jpeg()] * 9, "caption": [f"c{i}" for i in range(9)],
                      "url": [f"u{i}" for i in range(9)]})
    pq.write_table(table, path, row_group_size=3, compression="snappy")
    metadata = pq.ParquetFile(path).metadata
    middle = metadata.row_group(1).column(1)  # the jpg column chunk of the middle row group
    data = bytearray(path.read_bytes())
    start = middle.dictionary_page_offset or middle.data_page_offset  # the chunk begins at its dictionary
    data[start + 20 : start + middle.total_compressed_size - 4] = b"\xff" * (middle.total_compressed_size - 24)
    path.write_bytes(bytes(data))
    out = read_all(ParquetShardReader(batch_size=2), str(path))
    assert out["row"].to_pylist() == list(range(9))
    assert out["status"].to_pylist() == ["success"] * 3 + ["rows_unreadable"] * 3 + ["success"] * 3
    assert out["key"].to_pylist()[6:] == ["k6", "k7", "k8"]
    assert out["key"].to_pylist()[3:6] == [None] * 3
    assert "row group 1" in out["error_message"][3].as_py()
    _, rejects = split_by_status(out)
    assert rejects["reason"].to_pylist() == ["rows_unreadable"] * 3


def test_a_schema_error_carries_the_rows_the_footer_counts(tmp_path):
    path = tmp_path / "no-caption.parquet"
    pq.write_table(pa.table({"jpg": [jpeg()] * 4}), path)
    with pytest.raises(ShardSchemaError) as caught:
        read_all(ParquetShardReader(), str(path))
    assert caught.value.rows == 4
    assert pickle.loads(pickle.dumps(caught.value)).rows == 4


class FlakyFileSystem:
    """A local fsspec filesystem whose opens or reads fail with ``error``, ``failures`` times, after ``after``
    good reads (as a network store does in the middle of a transfer)."""

    def __init__(self, failures: int, error=TimeoutError, on="read", after=0):
        from fsspec.implementations.local import LocalFileSystem

        self.failures, self.error, self.on, self.after = failures, error, on, after
        flaky = self

        class Handle(io.FileIO):
            def read(self, *args):
                if flaky.on == "read" and flaky.failures > 0:
                    if flaky.after > 0:
                        flaky.after -= 1
                    else:
                        flaky.failures -= 1
                        raise flaky.error("connection reset by peer")
                return super().read(*args)

        class FS(LocalFileSystem):
            def _open(self, path, mode="rb", **kwargs):
                if flaky.on == "open" and flaky.failures > 0:
                    flaky.failures -= 1
                    raise flaky.error("503 Slow Down")
                return Handle(path, "rb")

        self.fs = FS()


@pytest.mark.parametrize("on, after", [("open", 0), ("read", 0), ("read", 6)], ids=["open", "read", "mid-file"])
def test_storage_errors_are_retried_without_repeating_or_losing_a_row(tmp_path, monkeypatch, on, after):
    import fsspec.core

    path = str(tmp_path / "groups.parquet")
    rows = 40
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(rows)], "jpg": [jpeg()] * rows,
                             "caption": [f"c{i}" for i in range(rows)]}), path, row_group_size=4)
    expected = read_all(ParquetShardReader(batch_size=3), path)
    flaky = FlakyFileSystem(failures=2, on=on, after=after)
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **options: (flaky.fs, url))
    waits = []
    reader = ParquetShardReader(batch_size=3, read_retries=2, retry_backoff_s=0.5)
    batches = list(reader.read_shard(path, sleep=waits.append))
    got = pa.concat_tables(batches)
    assert got.equals(expected)  # every row once, in order
    assert waits == [0.5, 1.0] and flaky.failures == 0
    if after:
        assert len(batches) > 1 and batches[0].num_rows == 3  # rows went out before the failure

    flaky.failures, flaky.after = 3, 0  # one more than the retries
    with pytest.raises(ShardTransientError, match="groups.parquet.*3 attempts"):
        list(reader.read_shard(path, sleep=waits.append))


def test_corrupt_files_are_not_retried(tmp_path):
    bad = tmp_path / "00000.parquet"
    bad.write_bytes(b"not parquet at all, not even close")
    waits = []
    with pytest.raises(ShardReadError):
        list(ParquetShardReader(read_retries=3).read_shard(str(bad), sleep=waits.append))
    assert waits == []
    with pytest.raises(FileNotFoundError):
        list(ParquetShardReader(read_retries=3).read_shard(str(tmp_path / "gone.parquet"), sleep=waits.append))
    assert waits == []


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"jpg": [b"x"]}), "missing caption column 'caption'"),
        (pa.table({"caption": ["x"]}), "no image column"),
        (pa.table({"jpg": [b"x"], "png": [b"x"], "caption": ["x"]}), "ambiguous image columns ['jpg', 'png']"),
        (pa.table({"jpg": [b"x"], "caption": [7]}), "column 'caption' has type int64, expected string"),
        (pa.table({"jpg": ["not bytes"], "caption": ["x"]}), "column 'jpg' has type string, expected binary"),
        (
            pa.table({"jpg": [b"x"], "caption": ["x"], "key": [1.5]}),
            "column 'key' has type double, expected string or integer",
        ),
    ],
    ids=["no-caption", "no-image", "two-images", "int-caption", "string-image", "float-key"],
)
def test_schema_errors_name_file_column_and_types(tmp_path, table, message):
    path = tmp_path / "bad-schema.parquet"
    pq.write_table(table, path)
    with pytest.raises(ShardSchemaError) as caught:
        read_all(ParquetShardReader(), str(path))
    assert str(path) in str(caught.value)
    assert message in str(caught.value)
    assert caught.value.path == str(path)


def test_configured_image_column_and_integer_keys(tmp_path):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"id": [5, 6], "pixels": [jpeg(), None], "text": ["a", "b"]}), path)
    table = read_all(ParquetShardReader(image_column="pixels", caption_column="text", key_column="id"), str(path))
    assert table["key"].to_pylist() == ["5", "6"]
    assert table["caption"].to_pylist() == ["a", "b"]


def test_corrupt_parquet_files_raise_read_errors(tmp_path):
    not_parquet = tmp_path / "00000.parquet"
    not_parquet.write_bytes(b"this is not a parquet file at all")
    with pytest.raises(ShardReadError, match="00000.parquet.*not a readable Parquet file"):
        read_all(ParquetShardReader(), str(not_parquet))
    good = open(write_img2dataset_shard(tmp_path / ".." / tmp_path.name, 1, SAMPLES), "rb").read()
    truncated = tmp_path / "00002.parquet"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ShardReadError, match="00002.parquet"):
        read_all(ParquetShardReader(), str(truncated))


def test_reader_pickles_for_ray_tasks(tmp_path):
    path = write_img2dataset_shard(tmp_path, 0, SAMPLES)
    reader = pickle.loads(pickle.dumps(ParquetShardReader(batch_size=2)))
    assert read_all(reader, path).num_rows == len(SAMPLES)


# --------------------------------------------------------------------------------------------------
# WebDataset
# --------------------------------------------------------------------------------------------------


def test_img2dataset_webdataset_with_sidecar_failures(tmp_path):
    path = write_img2dataset_shard(tmp_path, 0, SAMPLES, output_format="webdataset")
    table = read_all(WebDatasetShardReader(batch_size=2), path)
    assert table.num_rows == len(SAMPLES)  # three samples in the tar + two failures from 00000.parquet
    assert table["key"].to_pylist() == ["000000000", "000000002", "000000004", "000000001", "000000003"]
    assert table["source_key"].to_pylist()[:3] == ["00000.tar:0", "00000.tar:1", "00000.tar:2"]
    assert table["source_key"].to_pylist()[3:] == ["00000.parquet:1", "00000.parquet:3"]
    # (shard, row) names one row of the shard: the sidecar's rows follow the tar's, never reuse its indices
    assert table["row"].to_pylist() == [0, 1, 2, 3, 4] and set(table["shard"].to_pylist()) == {path}
    assert table["caption"].to_pylist()[:2] == ["A red box.", "A green box!"]
    assert table["image"].to_pylist()[1] == SAMPLES[2][0]
    assert table["url"].to_pylist()[0] == "http://example.com/000000000.jpg"
    good, rejects = split_by_status(table)
    assert good.num_rows == 3
    assert rejects["reason"].to_pylist() == ["status: failed_to_download", "status: failed_to_resize"]
    assert rejects["detail"].to_pylist() == ["HTTP Error 404: Not Found", "image too small"]

    tar_only = read_all(WebDatasetShardReader(webdataset_sidecar=False), path)
    assert tar_only["key"].to_pylist() == ["000000000", "000000002", "000000004"]


def test_corrupt_tar_raises_a_read_error(tmp_path):
    path = write_img2dataset_shard(tmp_path, 0, SAMPLES, output_format="webdataset")
    data = open(path, "rb").read()
    broken = tmp_path / "00009.tar"
    broken.write_bytes(data[:700])  # inside the first member's data
    with pytest.raises(ShardReadError, match="00009.tar"):
        read_all(WebDatasetShardReader(), str(broken))


# --------------------------------------------------------------------------------------------------
# Folder + captions file
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name, colour in (("a.jpg", (255, 0, 0)), ("b.png", (0, 255, 0))):
        Image.new("RGB", (12, 12), colour).save(tmp_path / "imgs" / name)
    return tmp_path


def test_folder_with_csv(image_folder):
    captions = image_folder / "captions.csv"
    captions.write_text(
        "image,caption,split\nimgs/a.jpg,A red square.,train\nimgs/b.png,1234,val\nimgs/gone.jpg,lost,train\n"
    )
    table = read_all(FolderReader(), str(captions))
    assert table["key"].to_pylist() == ["captions_000000", "captions_000001", "captions_000002"]
    assert table["caption"].to_pylist() == ["A red square.", "1234", "lost"]  # CSV text stays text
    assert table["image_path"].to_pylist() == ["imgs/a.jpg", "imgs/b.png", "imgs/gone.jpg"]
    assert table["split"].to_pylist() == ["train", "val", "train"]
    a_bytes = (image_folder / "imgs" / "a.jpg").read_bytes()
    assert table["image"][0].as_py() == a_bytes
    assert table["sha256"][0].as_py() == hashlib.sha256(a_bytes).hexdigest()
    good, rejects = split_by_status(table)
    assert good.num_rows == 2
    assert rejects["reason"].to_pylist() == ["status: failed_to_read"]
    assert "gone.jpg" in rejects["detail"][0].as_py()
    pixels, ok, failures = decode_batch(good["image"].to_pylist(), 10**6, eval_transform(8))
    assert ok == [0, 1] and not failures


def test_folder_with_jsonl_and_images_root(image_folder, tmp_path):
    captions = tmp_path / "meta" / "pairs.jsonl"
    captions.parent.mkdir()
    lines = [{"image": "a.jpg", "caption": "red", "key": "k1"}, {"image": "b.png", "caption": "green", "key": "k2"}]
    captions.write_text("\n".join(json.dumps(line) for line in lines))
    reader = FolderReader(images_root=str(image_folder / "imgs"))
    table = read_all(reader, str(captions))
    assert table["key"].to_pylist() == ["k1", "k2"]
    assert table["status"].to_pylist() == ["success", "success"]
    assert table["source_key"].to_pylist() == ["pairs.jsonl:0", "pairs.jsonl:1"]


def test_folder_jsonl_with_non_text_captions(tmp_path):
    captions = tmp_path / "pairs.jsonl"
    captions.write_text('{"image": "a.jpg", "caption": 5}\n{"image": "b.jpg", "caption": 6}\n')
    with pytest.raises(ShardSchemaError, match="pairs.jsonl.*'caption' has type int64"):
        read_all(FolderReader(), str(captions))
    captions.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": 6}\n')
    with pytest.raises(ShardSchemaError, match="pairs.jsonl.*caption"):
        read_all(FolderReader(), str(captions))


def test_folder_missing_column(tmp_path):
    captions = tmp_path / "c.csv"
    captions.write_text("file,caption\nx.jpg,hello\n")
    with pytest.raises(ShardSchemaError, match="c.csv.*missing column 'image'"):
        read_all(FolderReader(), str(captions))


def test_hand_made_webdataset_without_sidecar(tmp_path):
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    path = tmp_path / "shard-a.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "part/x1.jpg", jpeg())
        add(tar, "part/x1.txt", "Caf\xe9".encode("latin-1"))  # not UTF-8: replaced, not fatal
        add(tar, "part/x1.cls", b"3")
        add(tar, "part/x2.png", jpeg())
        add(tar, "part/x2.json", json.dumps({"caption": "from json", "source": "web"}).encode())
    table = read_all(WebDatasetShardReader(), str(path))
    assert table["key"].to_pylist() == ["part/x1", "part/x2"]
    assert table["caption"].to_pylist() == ["Caf\ufffd", "from json"]
    assert table["cls"].to_pylist() == [b"3", None]
    assert table["source"].to_pylist() == [None, "web"]
    assert table["status"].to_pylist() == ["success", "success"]

    with tarfile.open(path, "w") as tar:
        add(tar, "x1.jpg", jpeg())
        add(tar, "x2.jpg", jpeg())
        add(tar, "x1.txt", b"the same key again, not contiguous")
        add(tar, "x3.jpg", jpeg())
        add(tar, "x3.json", b"{not json")
        add(tar, "x4.jpg", jpeg())
    table = read_all(WebDatasetShardReader(), str(path))
    assert table["key"].to_pylist() == ["x1", "x2", "x1", "x3", "x4"]
    assert table["status"].to_pylist() == ["success", "success", "duplicate_key", "rows_unreadable", "success"]
    assert table["error_message"][3].as_py().startswith("x3.json is not JSON")
