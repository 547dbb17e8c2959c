"""Training pairs from raw shards and from CapFilt outputs: counts, image resolution, ids."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.config import PairSource, ReaderConfig, WorldConfig
from capfilt.data.pairs import PairCounts, PairReader, caption_corpus, image_id, read_pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from capfilt.data.world import write_world

    config = WorldConfig(seed=5, num_web=10, num_human=4, num_test=0, image_size=32, rows_per_shard=4,
                         captions_per_human_image=3, failed_rows=1, corrupt_rows=1)
    return write_world(config, str(tmp_path_factory.mktemp("world")))


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def messy_shard(tmp_path):
    """One usable row and one row per kind of problem; row groups of two rows."""
    rows = [
        ("a red circle.", _jpeg("red"), "success"),
        (None, _jpeg("blue"), "success"),
        ("!!!", _jpeg("green"), "success"),
        ("a lost image", None, "failed_to_download"),
        ("an error page", b"<html>404</html>", "success"),
    ]
    table = pa.table({
        "key": [f"{i:05d}" for i in range(len(rows))],
        "caption": [caption for caption, _, _ in rows],
        "jpg": pa.array([image for _, image, _ in rows], pa.binary()),
        "status": [status for _, _, status in rows],
        "error_message": [None, None, None, "HTTP Error 404", None],
    })
    path = tmp_path / "00000.parquet"
    pq.write_table(table, path, row_group_size=2)
    return str(path)


def _read(source: PairSource) -> tuple[pa.Table, dict]:
    counts = PairCounts()
    tables = list(read_pairs([source], counts))
    return (pa.concat_tables(tables) if tables else None), counts.as_dict()


def test_raw_shard_rows_become_pairs_or_counted_rejects(messy_shard):
    pairs, counts = _read(PairSource(kind="shards", role="web", reader=ReaderConfig(paths=messy_shard)))

    assert pairs.column("text").to_pylist() == ["a red circle"]  # cleaned by pre_caption
    assert pairs.column("source").to_pylist() == ["web"]
    assert pairs.column("image_id").to_pylist() == [image_id(_jpeg("red"))]
    assert counts["by_source"] == {"web": 1}
    assert counts["rejects"] == {
        "caption_missing": 1,
        "caption_empty": 1,
        "status: failed_to_download": 1,
        "decode_error: not_an_image": 1,
    }


def test_world_shards_account_for_every_row(world):
    web = PairSource(kind="shards", role="web", reader=ReaderConfig(paths=world.web + "/*.parquet"))
    pairs, counts = _read(web)

    assert counts["total"] + sum(counts["rejects"].values()) == 10
    assert counts["rejects"]["status: failed_to_download"] == 1
    assert sum(n for reason, n in counts["rejects"].items() if reason.startswith("decode_error")) == 1
    assert pairs.num_rows == counts["total"] == 8
    assert all(image_id(image) == identity for image, identity in
               zip(pairs.column("image").to_pylist(), pairs.column("image_id").to_pylist()))


def test_all_references_make_one_pair_per_reference_of_the_same_image(world):
    reader = ReaderConfig(paths=world.human + "/*.parquet")
    first, _ = _read(PairSource(kind="shards", role="human", reader=reader))
    every, counts = _read(PairSource(kind="shards", role="human", reader=reader, use_all_references=True))

    assert first.num_rows == 4 and every.num_rows == 12
    assert counts["images"] == 4 and counts["by_source"] == {"human": 12}
    by_image: dict[int, set[str]] = {}
    for identity, text in zip(every.column("image_id").to_pylist(), every.column("text").to_pylist()):
        by_image.setdefault(identity, set()).add(text)
    assert set(by_image) == set(first.column("image_id").to_pylist())
    assert all(len(texts) >= 2 for texts in by_image.values())  # distinct references of one image


def test_use_all_references_needs_the_captions_column(messy_shard):
    source = PairSource(kind="shards", reader=ReaderConfig(paths=messy_shard), use_all_references=True)
    with pytest.raises(ValueError, match="00000.parquet.*'captions'"):
        _read(source)


def _capfilt_output(root, rows: list[dict]) -> str:
    from capfilt.data.output import Commit, CommittedOutput
    from capfilt.stages.capfilt import PAIRS_SCHEMA

    table = pa.Table.from_pylist([{name: row.get(name) for name in PAIRS_SCHEMA.names} for row in rows],
                                 schema=PAIRS_SCHEMA)
    out = CommittedOutput(str(root))
    out.claim({"test": True})
    out.write_table("pairs/part-00000-000.parquet", table)
    out.commit(Commit(0, {row["shard"]: {"rows_in": 1} for row in rows}, ["pairs/part-00000-000.parquet"]))
    out.finish({"totals": {}})
    return str(root)


def test_capfilt_pairs_fetch_images_by_shard_and_row_with_consistent_ids(world, messy_shard, tmp_path):
    web_shard = world.shards["web"][0]
    raw = pq.read_table(web_shard)
    good_rows = [row for row in range(raw.num_rows) if raw.column("gt_image_status")[row].as_py() == "ok"][:2]
    assert len(good_rows) == 2
    rows = []
    for row in good_rows:
        common = {"key": raw.column("key")[row].as_py(), "shard": web_shard, "row": row, "round": 0}
        rows.append({**common, "text": "a web caption", "source": "web"})
        rows.append({**common, "text": "a synthetic caption", "source": "synthetic"})
    # A later row group of another shard, and a human pair whose bytes are embedded.
    rows.append({"key": "00002", "shard": messy_shard, "row": 2, "text": "a green square", "source": "web"})
    rows.append({"key": "h", "shard": "elsewhere.parquet", "row": 0, "text": "embedded", "source": "human",
                 "image": _jpeg("white")})
    output = _capfilt_output(tmp_path / "capfilt", rows)

    pairs, counts = _read(PairSource(kind="capfilt", path=output))
    assert counts["by_source"] == {"human": 1, "synthetic": 2, "web": 3}
    images = pairs.column("image").to_pylist()
    for i, row in enumerate(good_rows):
        assert images[2 * i] == images[2 * i + 1] == raw.column("jpg")[row].as_py()
    assert images[-2] == _jpeg("green") and images[-1] == _jpeg("white")

    # The same image read from the raw web shard gets the same id as its CapFilt pairs.
    from_raw, _ = _read(PairSource(kind="shards", role="web", reader=ReaderConfig(paths=web_shard)))
    raw_ids = dict(zip(from_raw.column("key").to_pylist(), from_raw.column("image_id").to_pylist()))
    capfilt_ids = pairs.column("image_id").to_pylist()
    for i, row in enumerate(good_rows):
        key = raw.column("key")[row].as_py()
        assert capfilt_ids[2 * i] == capfilt_ids[2 * i + 1] == raw_ids[key]

    synthetic_and_human, counts = _read(PairSource(kind="capfilt", path=output, sources=["synthetic", "human"]))
    assert counts["by_source"] == {"human": 1, "synthetic": 2}
    assert set(synthetic_and_human.column("source").to_pylist()) == {"synthetic", "human"}


def test_parquet_fetch_reads_only_the_needed_row_groups(messy_shard):
    reader = PairReader(PairSource(kind="capfilt", path="unused"))
    fetched = reader.fetch_images(messy_shard, [2, 4], referenced_by="test")
    assert fetched == {2: _jpeg("green"), 4: b"<html>404</html>"}
    with pytest.raises(ValueError, match="rows \\[7\\] referenced by test"):
        reader.fetch_images(messy_shard, [7], referenced_by="test")


def test_unfinished_capfilt_output_is_refused(tmp_path):
    (tmp_path / "pairs").mkdir()
    with pytest.raises(ValueError, match="not a finished CapFilt output"):
        _read(PairSource(kind="capfilt", path=str(tmp_path)))


def test_training_reads_units_unchecked_and_the_index_counts_them_once(messy_shard, world, tmp_path):
    import ray

    from capfilt.data.pairs import PAIRS_INDEX, index_pairs, read_unit_pairs

    source = PairSource(kind="shards", reader=ReaderConfig(paths=messy_shard))
    # Training decodes each image once, where it trains on it: the error page is a pair here (met, counted
    # and replaced in training); rows with a bad status or caption are not.
    unit = read_unit_pairs(source, messy_shard)
    assert unit.column("text").to_pylist() == ["a red circle", "an error page"]
    assert unit.column("image").to_pylist() == [_jpeg("red"), b"<html>404</html>"]
    assert read_unit_pairs(source, messy_shard, with_images=False).num_rows == 2

    web = PairSource(kind="shards", reader=ReaderConfig(paths=world.web + "/*.parquet"))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        index = index_pairs([source, web], str(tmp_path), data_cpus=0.5)
    finally:
        if started_here:
            ray.shutdown()
    assert index["units"][0] == {"source": 0, "path": messy_shard, "pairs": 2}
    assert [unit["source"] for unit in index["units"]] == [0, 1, 1, 1]
    assert index["total"] == sum(unit["pairs"] for unit in index["units"]) == 2 + 9  # world: 10 rows, 1 failed
    assert index["rejects"] == {"caption_empty": 1, "caption_missing": 1, "status: failed_to_download": 2}
    assert index["by_source"] == {"web": 11}
    saved = json.loads((tmp_path / PAIRS_INDEX).read_text())
    assert saved == index
    (tmp_path / PAIRS_INDEX).write_text(json.dumps({**index, "marker": 1}))
    assert index_pairs([source], str(tmp_path))["marker"] == 1  # complete: not read again

    # Texts for the tokenizer come without decoding: the error page's caption counts too.
    assert list(caption_corpus([source])) == ["a red circle", "a lost image", "an error page"]


def test_reading_and_counting_shards_needs_no_torch(messy_shard):
    # The Ray tasks that count, read and check shards run this code; torch or transformers would add
    # seconds of imports to each of their worker processes (measured: indexing 1,000 pairs 14 s -> 6 s).
    code = f"""
import sys
from capfilt.config import PairSource, ReaderConfig
from capfilt.data.pairs import PairCounts, PairReader, _index_unit
source = PairSource(reader=ReaderConfig(format="parquet", paths={messy_shard!r}))
assert _index_unit(source.model_dump_json(), {messy_shard!r})["pairs"] == 2  # images unchecked
assert sum(table.num_rows for table in PairReader(source).read_unit({messy_shard!r}, PairCounts())) == 1
import capfilt.stages.capfilt.read
print(",".join(name for name in ("torch", "torchvision", "transformers") if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
