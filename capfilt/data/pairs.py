"""Image-text pairs for training: from raw shards, or from the kept pairs of a CapFilt output.

A pair row (:data:`PAIR_SCHEMA`) holds the image bytes, the cleaned text, an ``image_id``, the
``source`` (``web`` | ``synthetic`` | ``human``) and where it came from (``key``, ``shard``, ``row``).

``image_id`` is the first 63 bits of the SHA-256 of the image bytes, so the same image has the same
id whichever source, shard or stage read it: ITC counts every text of an image as a positive and ITM
never samples one as a negative, even when a web caption, its synthetic captions and a human
caption of that image come from three different tables. (Keys would not do: the generated world's
splits reuse img2dataset keys, and a CapFilt pair and its raw web row carry different keys.)

Nothing is dropped silently: each input row becomes pairs or is counted under a reject reason
(:class:`PairCounts`). Image problems (``status: ...``, ``decode_error: ...``) count rows; caption
problems (``caption_missing``, ``caption_empty``, ...) count texts, since with ``use_all_references``
a row has several. Reading goes one unit at a time (an input shard, or one pairs file of a CapFilt
output), so it streams (:meth:`PairReader.units`, :meth:`PairReader.read_unit`).

Training reads units as :func:`read_unit_pairs` gives them: status- and caption-checked, images not
decoded (training decodes each one where it trains on it, and counts and replaces one that fails).
:func:`index_pairs` counts each unit's pairs once, in Ray tasks, without keeping them: the only table a
training stage keeps is one number per unit (capfilt/training/data.py maps stream positions to pairs
with it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.config import PairSource, ReaderConfig

PAIR_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("image", pa.binary()),
    ]
)
PAIRS_DIR = "pairs"  # a CapFilt output's kept pairs
PAIRS_INDEX = "_pairs_index.json"  # a training stage's pairs per unit (index_pairs)
REFERENCES_COLUMN = "captions"


def image_id(image: bytes) -> int:
    """A non-negative int64 that only the same bytes share (-1 marks empty ITC queue slots)."""
    return int.from_bytes(hashlib.sha256(image).digest()[:8], "big") >> 1


@dataclass
class PairCounts:
    """Pairs made, by source; rejects, by reason; distinct images."""

    pairs: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    image_ids: set[int] = field(default_factory=set)

    def add_pairs(self, table: pa.Table) -> None:
        self.pairs.update(table.column("source").to_pylist())
        self.image_ids.update(table.column("image_id").to_pylist())

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": sum(self.pairs.values()),
            "images": len(self.image_ids),
            "by_source": dict(sorted(self.pairs.items())),
            "rejects": dict(sorted(self.rejects.items())),
        }


class PairReader:
    """One :class:`~capfilt.config.PairSource` → pair tables, one or more per unit."""

    def __init__(self, source: PairSource, check_images: bool = True, fetch_images: bool = True):
        self.source = source
        # Training streams unchecked pairs (a bad image is met, counted and replaced there); an index
        # pass also skips fetching referenced images, which leaves the same rows.
        self.check_images = check_images
        self.fetch = fetch_images
        if source.kind == "shards" and (source.reader is None or source.reader.paths is None):
            raise ValueError("pair source of kind 'shards' needs reader.paths")
        if source.kind == "capfilt" and not source.path:
            raise ValueError("pair source of kind 'capfilt' needs path (a CapFilt output directory)")
        self.wanted = set(source.sources) if source.sources is not None else None

    def units(self) -> list[str]:
        """Input shards (kind shards) or committed pairs files (kind capfilt), in order."""
        from capfilt.data.output import CommittedOutput
        from capfilt.data.shards import expand_paths

        if self.source.kind == "shards":
            return expand_paths(self.source.reader.paths, self.source.reader.storage_options)
        output = CommittedOutput(self.source.path, self.source.storage_options)
        if not output.is_finished():
            raise ValueError(
                f"{self.source.path}: not a finished CapFilt output (no _SUCCESS); run capfilt to completion first"
            )
        return output.data_files(PAIRS_DIR)

    def read(self, counts: PairCounts) -> Iterator[pa.Table]:
        for unit in self.units():
            yield from self.read_unit(unit, counts)

    def read_unit(self, unit: str, counts: PairCounts) -> Iterator[pa.Table]:
        tables = self._from_shard(unit, counts) if self.source.kind == "shards" else self._from_capfilt(unit, counts)
        for table in tables:
            if table.num_rows:
                counts.add_pairs(table)
                yield table

    # -- raw shards --------------------------------------------------------------------------------

    def _from_shard(self, path: str, counts: PairCounts) -> Iterator[pa.Table]:
        from capfilt.data.shards import make_reader, split_by_status

        source = self.source
        if self.wanted is not None and source.role not in self.wanted:
            return
        for batch in make_reader(source.reader).read_shard(path):
            good, rejected = split_by_status(batch)
            counts.rejects.update(rejected.column("reason").to_pylist())
            if source.use_all_references and REFERENCES_COLUMN not in good.column_names:
                raise ValueError(f"{path}: use_all_references needs a {REFERENCES_COLUMN!r} list column")
            texts = good.column(REFERENCES_COLUMN if source.use_all_references else "caption").to_pylist()
            if not source.use_all_references:
                texts = [[text] for text in texts]
            yield self._pairs(
                good.column("image").to_pylist(), texts, [source.role] * good.num_rows,
                good.column("key").to_pylist(), path, good.column("row").to_pylist(), counts,
            )

    # -- CapFilt output ----------------------------------------------------------------------------

    def _from_capfilt(self, pairs_file: str, counts: PairCounts) -> Iterator[pa.Table]:
        fs, fs_path = fsspec.core.url_to_fs(pairs_file, **self.source.storage_options)
        columns = ["key", "text", "source", "shard", "row", "image"]
        with fs.open(fs_path, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        if self.wanted is not None:
            table = table.filter(pc.is_in(table.column("source"), pa.array(sorted(self.wanted))))
        # The pairs of one input shard are contiguous (sorted by shard, row): fetch its images in one read.
        shards = table.column("shard").to_pylist()
        start = 0
        while start < len(shards):
            stop = start
            while stop < len(shards) and shards[stop] == shards[start]:
                stop += 1
            part = table.slice(start, stop - start)
            images = part.column("image").to_pylist()
            rows = part.column("row").to_pylist()
            missing = sorted({row for row, image in zip(rows, images) if image is None})
            if missing and self.fetch:
                fetched = self.fetch_images(shards[start], missing, pairs_file)
                images = [image if image is not None else fetched[row] for row, image in zip(rows, images)]
            yield self._pairs(
                images, [[text] for text in part.column("text").to_pylist()], part.column("source").to_pylist(),
                part.column("key").to_pylist(), shards[start], rows, counts,
            )
            start = stop

    def fetch_images(self, shard: str, rows: Sequence[int], referenced_by: str) -> dict[int, bytes | None]:
        """The image bytes of ``rows`` of one input shard, reading as little of it as the format allows."""
        found = fetch_rows(shard, rows, self._shard_reader_config(shard))
        absent = [row for row in rows if row not in found]
        if absent:
            raise ValueError(f"{shard}: rows {absent[:5]} referenced by {referenced_by} are not in the shard")
        return {row: found[row]["image"] for row in rows}

    def _shard_reader_config(self, shard: str) -> ReaderConfig:
        return self.source.reader if self.source.reader is not None else reader_for(shard, self.source.storage_options)


    # -- both --------------------------------------------------------------------------------------

    def _pairs(
        self,
        images: list[bytes | None],
        texts: list[list[Any]],
        sources: list[str],
        keys: list[str],
        shard: str,
        rows: list[int],
        counts: PairCounts,
    ) -> pa.Table:
        """Decode-check each image once and clean each text; the usable ones become pair rows."""
        from capfilt.data.decode import DecodeError, decode_image
        from capfilt.data.text import CaptionError, clean_caption

        out: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
        verdicts: dict[int, str | None] = {}  # image id -> None (usable) or the decode reject reason
        for image, row_texts, source, key, row in zip(images, texts, sources, keys, rows):
            if image is None and self.check_images:
                counts.rejects["decode_error: missing"] += 1
                continue
            identity = image_id(image) if image is not None else -1
            if self.check_images and identity not in verdicts:
                try:
                    decode_image(image, self.source.max_pixels)
                    verdicts[identity] = None
                except DecodeError as error:
                    verdicts[identity] = error.reason
            if verdicts.get(identity) is not None:
                counts.rejects[verdicts[identity]] += 1
                continue
            for raw in row_texts or [None]:
                try:
                    text = clean_caption(raw, self.source.max_caption_words)
                except CaptionError as error:
                    counts.rejects[error.reason] += 1
                    continue
                for name, value in zip(PAIR_SCHEMA.names, (identity, text, source, key, shard, row, image)):
                    out[name].append(value)
        return pa.Table.from_pydict(out, schema=PAIR_SCHEMA)


def reader_for(shard: str, storage_options: dict[str, Any] | None = None) -> ReaderConfig:
    """The reader of an input shard named in a CapFilt output, by its file name."""
    name = shard.rsplit("/", 1)[-1].lower()
    if name.endswith(".parquet"):
        fmt = "parquet"
    elif ".tar" in name:
        fmt = "webdataset"
    else:
        fmt = "folder"
    return ReaderConfig(format=fmt, storage_options=storage_options or {})


def fetch_rows(shard: str, rows: Sequence[int], reader: ReaderConfig) -> dict[int, dict[str, Any]]:
    """``{row: {"image", "key", "sha256"}}`` for ``rows`` of one input shard, reading as little of it as the
    format allows (Parquet: the row groups holding them, three columns). Rows the shard does not have are
    absent from the answer; storage errors are retried as the readers retry them."""
    from capfilt.data.shards import make_reader

    if reader.format == "parquet":
        return _fetch_parquet_rows(shard, rows, reader)
    wanted = set(rows)
    found = {}
    for batch in make_reader(reader).read_shard(shard):
        columns = zip(batch.column("row").to_pylist(), batch.column("image").to_pylist(),
                      batch.column("key").to_pylist(), batch.column("sha256").to_pylist())
        for row, image, key, sha256 in columns:
            if row in wanted:
                found[row] = {"image": image, "key": key, "sha256": sha256}
    return found


def _fetch_parquet_rows(shard: str, rows: Sequence[int], reader: ReaderConfig) -> dict[int, dict[str, Any]]:
    from capfilt.data.shards import ParquetShardReader, ShardReadError, ShardTransientError, derived_key, retrying

    fs, fs_path = fsspec.core.url_to_fs(shard, **reader.storage_options)

    def fetch(open_file) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        with open_file(fs, fs_path) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            image = ParquetShardReader(reader).image_column(shard, parquet.schema_arrow)
            key = reader.key_column if reader.key_column in names else None
            sha256 = "sha256" if "sha256" in names else None
            columns = [name for name in (image, key, sha256) if name is not None]
            first = 0
            for group in range(parquet.num_row_groups):
                last = first + parquet.metadata.row_group(group).num_rows
                inside = [row for row in rows if first <= row < last]
                if inside:  # only the row groups holding wanted rows, only these columns
                    table = parquet.read_row_group(group, columns=columns)
                    taken = table.take(pa.array([row - first for row in inside])).to_pydict()
                    for index, row in enumerate(inside):
                        found[row] = {
                            "image": taken[image][index],
                            "key": str(taken[key][index]) if key and taken[key][index] is not None
                            else (None if key else derived_key(shard, row)),
                            "sha256": taken[sha256][index] if sha256 else None,
                        }
                first = last
        return found

    try:
        return retrying(fetch, shard, reader)
    except ShardTransientError:
        raise
    except (pa.ArrowException, OSError) as error:
        raise ShardReadError(shard, f"cannot read images ({type(error).__name__}: {error})") from None


def read_pairs(sources: Sequence[PairSource], counts: PairCounts) -> Iterator[pa.Table]:
    """Every source's pair tables in order, counting into ``counts``."""
    for source in sources:
        yield from PairReader(source).read(counts)


@dataclass(frozen=True)
class PairUnit:
    """One unit of training data: an input shard or a CapFilt pairs file, of the ``source``-th source."""

    source: int
    path: str


def training_units(sources: Sequence[PairSource]) -> list[PairUnit]:
    return [PairUnit(index, unit) for index, source in enumerate(sources) for unit in PairReader(source).units()]


def read_unit_pairs(source: PairSource, unit: str, counts: PairCounts | None = None, *,
                    with_images: bool = True) -> pa.Table:
    """The pairs of one unit, in order, as training reads them: status- and caption-checked, images not
    decoded (training meets, counts and replaces a bad image). ``with_images=False`` leaves referenced
    images unfetched: the same rows, for counting."""
    counts = counts if counts is not None else PairCounts()
    reader = PairReader(source, check_images=False, fetch_images=with_images)
    tables = list(reader.read_unit(unit, counts))
    return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()


def _index_unit(source_json: str, path: str) -> dict[str, Any]:
    from capfilt.data.shards import ShardError

    counts = PairCounts()
    try:
        table = read_unit_pairs(PairSource.model_validate_json(source_json), path, counts, with_images=False)
    except (ShardError, OSError, pa.ArrowException) as error:  # a unit gone is counted, as training counts it
        return {"pairs": 0, "by_source": {}, "rejects": {"shard_unreadable": 1},
                "error": f"{path}: {type(error).__name__}: {error}"[:500]}
    return {"pairs": table.num_rows, "by_source": dict(counts.pairs), "rejects": dict(counts.rejects)}


def index_pairs(sources: Sequence[PairSource], out_dir: str, data_cpus: float = 1.0) -> dict[str, Any]:
    """Count the pairs of every unit of ``sources`` (Ray tasks, one per unit) without keeping any, and
    record them in ``out_dir/_pairs_index.json``: the only table training keeps is one number per unit.

    A complete index is reused as is: the caller binds ``out_dir`` to the source configuration.
    """
    import ray

    path = os.path.join(out_dir, PAIRS_INDEX)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    units = training_units(sources)
    task = ray.remote(num_cpus=data_cpus)(_index_unit)
    dumps = [source.model_dump_json() for source in sources]
    found = ray.get([task.remote(dumps[unit.source], unit.path) for unit in units])
    totals, by_source, rejects = 0, Counter(), Counter()
    for entry in found:
        totals += entry["pairs"]
        by_source.update(entry["by_source"])
        rejects.update(entry["rejects"])
    if totals == 0:
        raise ValueError(f"no usable pairs in the training sources (rejects: {dict(sorted(rejects.items()))})")
    index = {
        "total": totals,
        "by_source": dict(sorted(by_source.items())),
        "rejects": dict(sorted(rejects.items())),
        "units": [{"source": unit.source, "path": unit.path, "pairs": entry["pairs"],
                   **({"error": entry["error"]} if "error" in entry else {})} for unit, entry in zip(units, found)],
    }
    os.makedirs(out_dir, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)
    return index


def caption_corpus(sources: Sequence[PairSource]) -> Iterator[str]:
    """The cleaned texts of ``sources`` without touching images (a tokenizer's training corpus)."""
    from capfilt.data.shards import make_reader
    from capfilt.data.text import CaptionError, clean_caption

    for source in sources:
        reader = PairReader(source)
        if source.kind == "shards" and reader.wanted is not None and source.role not in reader.wanted:
            continue
        for unit in reader.units():
            if source.kind == "shards":
                column = REFERENCES_COLUMN if source.use_all_references else "caption"
                texts = (text for batch in make_reader(source.reader).read_shard(unit)
                         for value in batch.column(column).to_pylist()
                         for text in (value if source.use_all_references else [value]) or [])
            else:
                fs, fs_path = fsspec.core.url_to_fs(unit, **source.storage_options)
                with fs.open(fs_path, "rb") as handle:
                    table = pq.read_table(handle, columns=["text", "source"])
                if reader.wanted is not None:
                    table = table.filter(pc.is_in(table.column("source"), pa.array(sorted(reader.wanted))))
                texts = iter(table.column("text").to_pylist())
            for text in texts:
                try:
                    yield clean_caption(text, source.max_caption_words)
                except CaptionError:
                    continue
