"""CapFilt on Ray Data: caption web images, score every text with ITM, keep what matches.

The stream, one way::

    shard list ──► ReadAndDecode (CPU tasks) ──► CapFiltWorker (actor pool, GPU or CPU) ──► driver
                   read a shard, split off bad     K captions per captioner, one vision      groups rows
                   rows, decode + resize to uint8  pass per filter for all texts, keep       by shard, writes
                                                   policy                                    whole shards

Why one fused actor instead of a captioner pool feeding a filter pool: the resized pixels would cross
the object store twice, the two pools would each need their own accelerator share and Ray Data does
not pipeline two GPU stages well; fused, an image is normalised once and both models sit on one
device with predictable memory.

Every input row leaves the worker as exactly one result row (``outcome`` kept / filtered / rejected)
carrying its texts, scores and decisions; the driver explodes results into ``pairs/`` and
``rejects/`` and commits whole input shards (see :mod:`capfilt.data.output`), so counts reconcile
exactly and a resumed run redoes only shards that no commit covers. A shard that cannot be read at
all is recorded in the manifest with its error instead of failing the run.

Synthetic captions depend only on (seed, key, round, caption index) (see
:mod:`capfilt.inference.captioner`), so outputs do not depend on batch size, actor count or restarts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.config import CapFiltConfig, CaptionSampling, ModelRef, ReaderConfig, identity
from capfilt.data.output import Commit, CommittedOutput

WEB, HUMAN, SYNTHETIC = "web", "human", "synthetic"
KEPT, FILTERED, REJECTED = "kept", "filtered", "rejected"
MARKER_ROW = -1  # the end-of-shard record: carries the shard's row count or its read error

# What crosses from the CPU tasks to the actors: one row per input row plus one end marker per shard.
DECODED_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("role", pa.string()),
        ("row", pa.int64()),
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("sha256", pa.string()),
        ("caption", pa.string()),
        ("extra", pa.string()),  # the input's other columns, as JSON
        ("reason", pa.string()),  # a row-level reject (status, decode error) or the marker's shard error
        ("detail", pa.string()),
        ("pixels", pa.binary()),  # uint8 HxWx3, resized to the filter's input size
        ("image", pa.binary()),  # original bytes, only when embed_images
        ("shard_rows", pa.int64()),  # on the marker: rows the shard had
    ]
)

_LIST_STR, _LIST_F64 = pa.list_(pa.string()), pa.list_(pa.float64())
RESULT_SCHEMA = pa.schema(
    [
        *[DECODED_SCHEMA.field(name) for name in ("shard", "role", "row", "key", "source_key", "sha256", "extra")],
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("texts", _LIST_STR),
        ("text_sources", _LIST_STR),
        ("captioner_ids", _LIST_STR),
        ("itm_probs", _LIST_F64),
        ("itc_sims", _LIST_F64),
        ("decisions", _LIST_STR),  # "kept" or the reason the text was dropped
        ("image", pa.binary()),
        ("shard_rows", pa.int64()),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("itm_prob", pa.float64()),
        ("itc_sim", pa.float64()),
        ("captioner_id", pa.string()),
        ("filter_id", pa.string()),
        ("sampling", pa.string()),
        ("round", pa.int64()),
        ("sha256", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("extra", pa.string()),
        ("image", pa.binary()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("score", pa.float64()),
        ("stage", pa.string()),
        ("captioner_id", pa.string()),
        ("round", pa.int64()),
        ("shard", pa.string()),
        ("row", pa.int64()),
    ]
)


@dataclass(frozen=True)
class ShardTask:
    url: str
    role: str  # web | human
    reader: dict[str, Any]  # a ReaderConfig dump, so the task is plain data


# --------------------------------------------------------------------------------------------------
# CPU side: read a shard, split off bad rows, decode and resize
# --------------------------------------------------------------------------------------------------


def resize_uint8(image, image_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """BLIP's test-time resize (bicubic, antialiased, square, no crop) kept in uint8 HxWx3 for transport.

    ``out``: write into this array (e.g. a row of a batch buffer) instead of a new one.
    """
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    pixels = tvF.pil_to_tensor(image)
    pixels = tvF.resize(pixels, [image_size, image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if out is None:
        out = np.empty((image_size, image_size, 3), dtype=np.uint8)
    torch.from_numpy(out).copy_(pixels.permute(1, 2, 0))  # torch transposes uint8 about twice as fast as numpy
    return out


def binary_rows(values: np.ndarray, present: np.ndarray) -> pa.Array:
    """A binary column over ``present`` rows: row i holds the next of ``values`` (stacked, equal-sized) or null.

    Built on ``values``' own memory: no bytes object per image and no copy until Ray stores the block.
    """
    size = values[0].nbytes if len(values) else 0
    if size * len(values) >= 2**31:
        raise ValueError(f"{len(values)} decoded images of {size} bytes exceed Arrow's 2 GiB binary column; "
                         "lower capfilt.decode_batch_size")
    offsets = np.zeros(len(present) + 1, dtype=np.int32)
    np.cumsum(present * size, out=offsets[1:])
    validity = pa.array(present, pa.bool_()).buffers()[1]
    data = pa.py_buffer(np.ascontiguousarray(values))
    return pa.Array.from_buffers(pa.binary(), len(present), [validity, pa.py_buffer(offsets), data],
                                 null_count=int(len(present) - present.sum()))


class ReadAndDecode:
    """Ray Data UDF over shard tasks (batch_size=1): yields decoded row tables, then the end marker."""

    def __init__(self, image_size: int, max_pixels: int, decode_batch_size: int, embed_images: bool):
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.decode_batch_size = decode_batch_size
        self.embed_images = embed_images

    def __call__(self, tasks: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for url, role, reader in zip(tasks["url"], tasks["role"], tasks["reader"]):
            yield from self.read_shard(ShardTask(str(url), str(role), json.loads(reader)))

    def read_shard(self, task: ShardTask) -> Iterator[pa.Table]:
        from capfilt.data.shards import ShardError, make_reader

        rows_seen = 0
        try:
            for rows in make_reader(ReaderConfig(**task.reader)).read_shard(task.url):
                rows_seen += rows.num_rows
                for start in range(0, rows.num_rows, self.decode_batch_size):
                    yield self.decode(rows.slice(start, self.decode_batch_size), task)
        except ShardError as error:
            if rows_seen:
                raise  # rows already went downstream: fail loudly rather than half-count a shard
            yield _marker(task, rows=0, reason="shard_unreadable", detail=str(error))
            return
        yield _marker(task, rows=rows_seen)

    def decode(self, rows: pa.Table, task: ShardTask) -> pa.Table:
        from capfilt.data.images import DecodeError, decode_image

        n = rows.num_rows
        status = rows.column("status").to_pylist()
        error_message = rows.column("error_message").to_pylist()
        images = rows.column("image").to_pylist() if task.role == WEB else [None] * n
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        # Decoded web images are written straight into one buffer, which becomes the pixels column.
        pixels = np.empty((n, self.image_size, self.image_size, 3), dtype=np.uint8)
        decoded = np.zeros(n, dtype=bool)
        filled = 0
        for i in range(n):
            if status[i] != "success":
                # As capfilt.data.shards.split_by_status words it.
                reason[i], detail[i] = f"status: {status[i]}", error_message[i]
            elif task.role == WEB:
                try:
                    image = decode_image(images[i], self.max_pixels)
                except DecodeError as error:
                    reason[i], detail[i] = error.reason, error.detail
                    continue
                resize_uint8(image, self.image_size, out=pixels[filled])
                decoded[i] = True
                filled += 1
        extra_names = [name for name in rows.column_names if name not in NORMALISED_COLUMNS]
        extras = {name: rows.column(name).to_pylist() for name in extra_names}
        columns = {name: rows.column(name) for name in ("row", "key", "source_key", "sha256", "caption")}
        columns.update(
            shard=[task.url] * n,
            role=[task.role] * n,
            extra=[json.dumps({name: extras[name][i] for name in extra_names}, default=str) for i in range(n)],
            reason=reason,
            detail=detail,
            pixels=binary_rows(pixels[:filled], decoded),
            image=rows.column("image") if self.embed_images else pa.nulls(n, pa.binary()),
            shard_rows=pa.nulls(n, pa.int64()),
        )
        return pa.Table.from_pydict({name: columns[name] for name in DECODED_SCHEMA.names}, schema=DECODED_SCHEMA)


NORMALISED_COLUMNS = {"key", "source_key", "shard", "row", "image", "caption", "status", "error_message", "sha256"}


def _marker(task: ShardTask, rows: int, reason: str | None = None, detail: str | None = None) -> pa.Table:
    record = {name: [None] for name in DECODED_SCHEMA.names}
    record.update(shard=[task.url], role=[task.role], row=[MARKER_ROW], shard_rows=[rows], reason=[reason], detail=[detail])
    return pa.Table.from_pydict(record, schema=DECODED_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Accelerator side: caption, score, decide
# --------------------------------------------------------------------------------------------------


def sampling_label(sampling: CaptionSampling) -> str:
    """A compact, complete description of how synthetic captions were drawn, stored on every row."""
    if sampling.method == "beam":
        return (f"beam:beams={sampling.num_beams},len={sampling.min_length}-{sampling.max_length},"
                f"rep={sampling.repetition_penalty}")
    return (
        f"nucleus:top_p={sampling.nucleus_top_p},top_k={sampling.top_k},temperature={sampling.temperature},"
        f"rep={sampling.repetition_penalty},len={sampling.min_length}-{sampling.max_length},"
        f"k={sampling.num_captions},seed={sampling.seed},prompt={sampling.prompt!r}"
    )


def decide(probs: Sequence[float], threshold: float, keep_policy: str, best_n: int) -> list[str]:
    """``kept`` or the drop reason for each scored text of one image."""
    decisions = ["kept" if prob >= threshold else "itm_below_threshold" for prob in probs]
    if keep_policy == "best_n":
        ranked = sorted((i for i, d in enumerate(decisions) if d == "kept"), key=lambda i: (-probs[i], i))
        for i in ranked[best_n:]:
            decisions[i] = "not_in_best_n"
    return decisions


def resolve_device(dtype_name: str) -> tuple[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype_name == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    return device, dtype


# Decoded-row columns a result row carries unchanged.
PASSED_THROUGH = ("shard", "role", "row", "key", "source_key", "sha256", "extra", "image", "shard_rows")


def pixel_array(pixels: pa.ChunkedArray, rows: list[int]) -> np.ndarray:
    """uint8 [len(rows), S, S, 3] from the given rows of a pixels column: one copy in Arrow, no bytes per row."""
    picked = pixels.take(pa.array(rows, pa.int64())).combine_chunks()
    offset_type = np.int64 if pa.types.is_large_binary(picked.type) else np.int32
    offsets = np.frombuffer(picked.buffers()[1], dtype=offset_type)[picked.offset : picked.offset + len(rows) + 1]
    data = np.frombuffer(picked.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    side = math.isqrt(len(data) // max(len(rows), 1) // 3)
    if side * side * 3 * len(rows) != len(data) or len(set(np.diff(offsets).tolist())) > 1:
        raise ValueError(f"decoded pixels of {len(rows)} rows are not equal-sized square RGB images")
    return data.reshape(len(rows), side, side, 3)


class CapFiltWorker:
    """Captioners + filters on one device. Plain Python: Ray runs it as an actor, benchmarks call it."""

    def __init__(self, config: dict[str, Any], captioners: list[dict], filters: list[dict], threads: int | None = None):
        import torch

        from capfilt.inference.captioner import Captioner
        from capfilt.inference.scorer import Scorer
        from capfilt.models.export import load_captioner, load_filter

        if threads:
            torch.set_num_threads(threads)
        self.config = CapFiltConfig(**config)
        self.device, self.dtype = resolve_device(self.config.dtype)
        self.captioners, self.filters = [], []
        for ref in map(ModelRef.model_validate, captioners):
            loaded = load_captioner(ref.path, revision=ref.revision, device=self.device, dtype=self.dtype)
            captioner = Captioner(loaded.model, loaded.tokenizer, self.config.sampling, self.device, self.dtype)
            self.captioners.append((model_id(ref, loaded.provenance), _preprocessing(loaded), captioner))
        for ref in map(ModelRef.model_validate, filters):
            loaded = load_filter(ref.path, revision=ref.revision, device=self.device, dtype=self.dtype)
            scorer = Scorer(loaded.model, loaded.tokenizer, self.config.max_text_length, self.device, self.dtype,
                            itc_similarity=self.config.itc_similarity)
            self.filters.append((model_id(ref, loaded.provenance), _preprocessing(loaded), scorer))

    def device_images(self, pixels: np.ndarray):
        """uint8 [B,H,W,3] on the model device; the array may be read-only Arrow memory (nothing writes to it)."""
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(pixels).to(self.device)

    def pixel_values(self, pixels, processor: dict[str, Any]):
        """uint8 [B,H,W,3] (numpy, or a tensor on the device) -> the model's normalised input, resized if needed."""
        import torch
        import torch.nn.functional as F

        if not isinstance(pixels, torch.Tensor):
            pixels = self.device_images(pixels)
        # Channels first while still uint8 (a quarter of the bytes to move), then normalise in place.
        images = pixels.permute(0, 3, 1, 2).contiguous().float()
        size = processor["image_size"]
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(processor["mean"], device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(processor["std"], device=self.device).view(1, 3, 1, 1) * 255.0
        return images.sub_(mean).div_(std).to(self.dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from capfilt.data.text import CaptionError, clean_caption, pre_caption

        config = self.config
        # Only what the per-row decisions read becomes Python; the other columns pass through as Arrow.
        columns = {name: batch.column(name).to_pylist() for name in ("row", "role", "key", "caption", "reason", "detail")}
        n = batch.num_rows
        texts: list[list[str]] = [[] for _ in range(n)]
        sources: list[list[str]] = [[] for _ in range(n)]
        models: list[list[str | None]] = [[] for _ in range(n)]
        decisions: list[list[str | None]] = [[] for _ in range(n)]
        outcome: list[str | None] = [None] * n
        reason, detail = list(columns["reason"]), list(columns["detail"])

        def add(i: int, text: str | None, source: str, captioner: str | None, decision: str | None) -> None:
            if decision is None and any(t == text and d is None for t, d in zip(texts[i], decisions[i])):
                decision = "duplicate_text"
            texts[i].append(text)
            sources[i].append(source)
            models[i].append(captioner)
            decisions[i].append(decision)

        scored = []  # rows whose image goes through the models
        for i in range(n):
            if columns["row"][i] == MARKER_ROW:
                continue
            if reason[i] is not None:
                outcome[i] = REJECTED
                continue
            source = HUMAN if columns["role"][i] == HUMAN else WEB
            try:
                text = clean_caption(columns["caption"][i], config.max_caption_words)
                decision = None if (source == HUMAN or config.score_web_text) else "web_text_excluded"
                add(i, text, source, None, decision)
            except CaptionError as error:
                if source == HUMAN:
                    outcome[i], reason[i], detail[i] = REJECTED, error.reason, error.detail
                    continue
                add(i, columns["caption"][i], source, None, error.reason)
            if source == HUMAN:
                decisions[i][0] = "kept"
                outcome[i] = KEPT
            else:
                scored.append(i)

        probs: dict[int, list] = {}
        sims: dict[int, list] = {}
        if scored:
            images = self.device_images(pixel_array(batch.column("pixels"), scored))
            normalised: dict[tuple, Any] = {}  # models with the same preprocessing share one input tensor

            def pixel_values(processor: dict[str, Any]):
                key = (processor["image_size"], tuple(processor["mean"]), tuple(processor["std"]))
                if key not in normalised:
                    normalised[key] = self.pixel_values(images, processor)
                return normalised[key]

            keys = [columns["key"][i] for i in scored]
            for captioner_id, processor, captioner in self.captioners:
                captions = captioner.generate(pixel_values(processor), keys, round=config.round)
                for i, image_captions in zip(scored, captions):
                    for caption in image_captions:
                        text = pre_caption(caption, config.max_caption_words)
                        add(i, text, SYNTHETIC, captioner_id, None if text else "caption_empty")
            probs, sims = self._score(scored, pixel_values, texts, decisions)
            for i in scored:
                outcome[i] = KEPT if "kept" in decisions[i] else FILTERED
        results = {}
        for name in PASSED_THROUGH:
            column, field_type = batch.column(name), RESULT_SCHEMA.field(name).type
            results[name] = column if column.type == field_type else column.cast(field_type)
        results.update(
            outcome=outcome,
            reason=reason,
            detail=detail,
            texts=texts,
            text_sources=sources,
            captioner_ids=models,
            decisions=decisions,
            itm_probs=[probs.get(i, [None] * len(texts[i])) for i in range(n)],
            itc_sims=[sims.get(i, [None] * len(texts[i])) for i in range(n)],
        )
        return pa.Table.from_pydict({name: results[name] for name in RESULT_SCHEMA.names}, schema=RESULT_SCHEMA)

    def _score(self, scored: list[int], pixel_values, texts, decisions) -> tuple[dict, dict]:
        """Mean ITM probability and ITC similarity (None when off) over the filters; sets each candidate's decision."""
        config = self.config
        candidates = [[j for j, d in enumerate(decisions[i]) if d is None] for i in scored]
        prob_sum = [np.zeros(len(c)) for c in candidates]
        sim_sum = [np.zeros(len(c)) for c in candidates]
        for _, processor, scorer in self.filters:
            scores = scorer.score(
                pixel_values(processor),
                [[texts[i][j] for j in c] for i, c in zip(scored, candidates)],
            )
            for r, image_scores in enumerate(scores):
                prob_sum[r] += [score.itm_prob for score in image_scores]
                if config.itc_similarity:
                    sim_sum[r] += [score.itc_sim for score in image_scores]
        probs, sims = {}, {}
        for r, (i, c) in enumerate(zip(scored, candidates)):
            mean_probs = (prob_sum[r] / len(self.filters)).tolist()
            mean_sims = (sim_sum[r] / len(self.filters)).tolist() if config.itc_similarity else [None] * len(c)
            probs[i], sims[i] = [None] * len(texts[i]), [None] * len(texts[i])
            for t, (j, decision) in enumerate(zip(c, decide(mean_probs, config.threshold, config.keep_policy, config.best_n))):
                decisions[i][j] = decision
                probs[i][j], sims[i][j] = mean_probs[t], mean_sims[t]
        return probs, sims


def _preprocessing(loaded) -> dict[str, Any]:
    return {"image_size": loaded.image_size, "mean": loaded.image_mean, "std": loaded.image_std}


def model_id(ref: ModelRef, provenance: dict[str, Any]) -> str:
    name = ref.name or ref.path
    revision = ref.revision or provenance.get("revision") or provenance.get("weights_sha256", "")[:12]
    return f"{name}@{revision}" if revision else name


# --------------------------------------------------------------------------------------------------
# Driver side: whole shards in, committed Parquet out
# --------------------------------------------------------------------------------------------------


def explode(results: pa.Table, filter_id: str, sampling: str, round_: int) -> tuple[pa.Table, pa.Table]:
    """Result rows (one per input row) -> pair rows (one per kept text) and reject rows.

    Ordered by (shard, row), then by text within a row; a rejected input row gives one ``read`` reject
    and no texts. Built with Arrow kernels (flatten the list columns, take the row columns by parent
    index), so no Python object per value is made: memory stays a small multiple of the result bytes.
    """
    if results.num_rows == 0:
        return PAIRS_SCHEMA.empty_table(), REJECTS_SCHEMA.empty_table()
    order = pc.sort_indices(results, sort_keys=[("shard", "ascending"), ("row", "ascending")])
    table = results.take(order)
    column = {name: table.column(name).combine_chunks() for name in table.column_names}

    lengths = pc.fill_null(pc.list_value_length(column["texts"]), 0)
    for name in _TEXT_LISTS[1:]:
        if not pc.all(pc.equal(pc.fill_null(pc.list_value_length(column[name]), 0), lengths)).as_py():
            raise ValueError(f"result rows whose {name} and texts differ in length")
    flat = {name: pc.list_flatten(column[name]) for name in _TEXT_LISTS}
    parent = pc.list_parent_indices(column["texts"])  # the (sorted) result row of every text
    rejected_row = pc.fill_null(pc.equal(column["outcome"], REJECTED), False)
    live = pc.invert(pc.take(rejected_row, parent))  # a rejected row's texts, if any, are not exploded
    is_kept = pc.fill_null(pc.equal(flat["decisions"], "kept"), False)
    kept, dropped = pc.and_(live, is_kept), pc.and_(live, pc.invert(is_kept))

    def by_row(names: Sequence[str], rows: pa.Array) -> dict[str, pa.Array]:
        return {name: pc.take(column[name], rows) for name in names}

    def constant(value: Any, type_: pa.DataType, length: int) -> pa.Array:
        return pa.repeat(pa.scalar(value, type_), length)

    rows = pc.filter(parent, kept)
    source = pc.filter(flat["text_sources"], kept)
    m = len(rows)
    pairs = {
        **by_row(("key", "source_key", "sha256", "shard", "row", "extra", "image"), rows),
        "text": pc.filter(flat["texts"], kept),
        "source": source,
        "itm_prob": pc.filter(flat["itm_probs"], kept),
        "itc_sim": pc.filter(flat["itc_sims"], kept),
        "captioner_id": pc.filter(flat["captioner_ids"], kept),
        "filter_id": pc.if_else(pc.fill_null(pc.equal(source, HUMAN), False), pa.scalar(None, pa.string()),
                                pa.scalar(filter_id, pa.string())),
        "sampling": pc.if_else(pc.fill_null(pc.equal(source, SYNTHETIC), False), pa.scalar(sampling, pa.string()),
                               pa.scalar(None, pa.string())),
        "round": constant(round_, pa.int64(), m),
    }

    # Rejects: one per rejected input row (stage "read") and one per dropped text, in (row, text) order.
    read_rows = pc.indices_nonzero(rejected_row)
    r = len(read_rows)
    read_rejects = {
        **by_row(("key", "source_key", "shard", "row", "reason", "detail"), read_rows),
        "text": constant(None, pa.string(), r),
        "source": pc.take(column["role"], read_rows),
        "score": constant(None, pa.float64(), r),
        "stage": constant("read", pa.string(), r),
        "captioner_id": constant(None, pa.string(), r),
        "round": constant(round_, pa.int64(), r),
    }
    text_rows = pc.filter(parent, dropped)
    t = len(text_rows)
    score = pc.filter(flat["itm_probs"], dropped)
    text_rejects = {
        **by_row(("key", "source_key", "shard", "row"), text_rows),
        "text": pc.filter(flat["texts"], dropped),
        "source": pc.filter(flat["text_sources"], dropped),
        "reason": pc.filter(flat["decisions"], dropped),
        "detail": constant(None, pa.string(), t),
        "score": score,
        "stage": pc.if_else(pc.is_null(score), pa.scalar("caption", pa.string()), pa.scalar("filter", pa.string())),
        "captioner_id": pc.filter(flat["captioner_ids"], dropped),
        "round": constant(round_, pa.int64(), t),
    }
    rejects = pa.concat_tables([pa.Table.from_pydict(read_rejects, schema=REJECTS_SCHEMA),
                                pa.Table.from_pydict(text_rejects, schema=REJECTS_SCHEMA)])
    # Sort key: the result row, then the text's place (-1 for a read reject, which has no texts).
    text_place = pc.filter(pa.array(np.arange(len(parent), dtype=np.int64)), dropped)
    place = pa.chunked_array([constant(-1, pa.int64(), r), text_place], pa.int64())
    row_of = pa.chunked_array([read_rows.cast(pa.int64()), text_rows.cast(pa.int64())], pa.int64())
    keyed = pa.table({"row_of": row_of, "place": place})
    rejects = rejects.take(pc.sort_indices(keyed, sort_keys=[("row_of", "ascending"), ("place", "ascending")]))
    return pa.Table.from_pydict(pairs, schema=PAIRS_SCHEMA), rejects.combine_chunks()


_TEXT_LISTS = ("texts", "text_sources", "captioner_ids", "itm_probs", "itc_sims", "decisions")
_COUNTED = ("outcome", "reason", "role", "itm_probs", "decisions")


def shard_counts(results: pa.Table, shard_rows: int, error: str | None) -> dict[str, Any]:
    """Per-shard accounting: rows by outcome, texts by decision; rows_in == kept + filtered + rejected."""
    columns = results.select(list(_COUNTED)).to_pydict()  # only what is counted becomes Python
    counts: dict[str, Any] = {"rows_in": shard_rows, KEPT: 0, FILTERED: 0, REJECTED: 0, "images_decoded": 0,
                              "texts_scored": 0, "texts_kept": 0, "texts_dropped": 0, "reasons": {}}
    if error:
        counts["error"] = error
    for i in range(results.num_rows):
        outcome = columns["outcome"][i]
        counts[outcome] += 1
        if outcome == REJECTED:
            reason = columns["reason"][i]
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
            continue
        if columns["role"][i] == WEB:
            counts["images_decoded"] += 1
        for prob, decision in zip(columns["itm_probs"][i], columns["decisions"][i]):
            counts["texts_scored"] += prob is not None
            if decision == "kept":
                counts["texts_kept"] += 1
            else:
                counts["texts_dropped"] += 1
                counts["reasons"][decision] = counts["reasons"].get(decision, 0) + 1
    return counts


class ShardAssembler:
    """Collects result rows per input shard and commits whole shards once complete.

    A shard is exploded into pair and reject rows (Arrow) as soon as its last row arrives, and its
    results are dropped. Exploded shards wait in ``ready`` until they hold ``rows_per_file`` input rows
    or ``max_buffer_bytes`` of pair and reject rows, whichever comes first, and are then committed
    together. So the driver holds at most about ``max_buffer_bytes`` of finished shards (plus the last
    one: a shard is never split) and the shards still in flight, whatever the input size. Which shards
    share a commit depends on arrival order; each commit's rows are ordered by (shard, row, text).
    """

    def __init__(self, output: CommittedOutput, next_commit_id: int, rows_per_file: int, filter_id: str,
                 sampling: str, round_: int,
                 max_buffer_bytes: int = CapFiltConfig.model_fields["max_buffer_bytes"].default):
        self.output = output
        self.commit_id = next_commit_id
        self.rows_per_file = rows_per_file
        self.max_buffer_bytes = max_buffer_bytes
        self.labels = (filter_id, sampling, round_)
        self.partial: dict[str, list[pa.Table]] = {}
        self.expected: dict[str, tuple[int, str | None]] = {}
        self.seen: dict[str, int] = {}
        self.ready: dict[str, ReadyShard] = {}
        self.ready_rows = 0  # input rows of the ready shards
        self.ready_bytes = 0  # Arrow bytes of their pair and reject rows
        self.committed: set[str] = set()

    def add(self, batch: pa.Table) -> None:
        rows = batch.column("row").to_pylist()
        shards = batch.column("shard").to_pylist()
        markers = [i for i, row in enumerate(rows) if row == MARKER_ROW]
        for i in markers:
            self.expected[shards[i]] = (batch.column("shard_rows")[i].as_py(), batch.column("reason")[i].as_py() and
                                        f"{batch.column('reason')[i].as_py()}: {batch.column('detail')[i].as_py()}")
        data = batch.filter(pa.array([row != MARKER_ROW for row in rows])) if markers else batch
        for shard in set(data.column("shard").to_pylist()):
            part = data.filter(pc.equal(data.column("shard"), shard))
            self.partial.setdefault(shard, []).append(part)
            self.seen[shard] = self.seen.get(shard, 0) + part.num_rows
        for shard in sorted(set(shards)):
            self._maybe_complete(shard)
        if self.ready_rows >= self.rows_per_file or self.ready_bytes >= self.max_buffer_bytes:
            self.flush()

    def _maybe_complete(self, shard: str) -> None:
        if shard not in self.expected or self.seen.get(shard, 0) < self.expected[shard][0]:
            return
        if self.seen.get(shard, 0) > self.expected[shard][0]:
            raise RuntimeError(f"{shard}: {self.seen[shard]} result rows for {self.expected[shard][0]} input rows")
        if shard in self.ready or shard in self.committed:
            return  # complete already (a repeated end marker)
        tables = self.partial.pop(shard, [])
        table = pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()
        pairs, rejects = explode(table, *self.labels)
        self.ready[shard] = ReadyShard(shard, shard_counts(table, *self.expected[shard]), pairs, rejects)
        self.ready_rows += table.num_rows
        self.ready_bytes += pairs.nbytes + rejects.nbytes

    def flush(self) -> None:
        if not self.ready:
            return
        # Shards in name order, each already in (row, text) order: the commit is ordered by (shard, row, text).
        ready = [self.ready[shard] for shard in sorted(self.ready)]
        shards = {done.name: done.counts for done in ready}
        files = []
        for name in ("pairs", "rejects"):
            table = pa.concat_tables([getattr(done, name) for done in ready])  # no copy: one chunk per shard
            for part, start in enumerate(range(0, max(table.num_rows, 1), self.rows_per_file)):
                relative = f"{name}/part-{self.commit_id:05d}-{part:03d}.parquet"
                self.output.write_table(relative, table.slice(start, self.rows_per_file))
                files.append(relative)
        self.output.commit(Commit(self.commit_id, shards, files))
        self.committed.update(shards)
        self.commit_id += 1
        self.ready, self.ready_rows, self.ready_bytes = {}, 0, 0

    def pending(self) -> list[str]:
        return sorted(set(self.partial) | {s for s in self.expected if s not in self.committed and s not in self.ready})


@dataclass(frozen=True)
class ReadyShard:
    """A complete input shard waiting for its commit: its accounting and its exploded rows."""

    name: str
    counts: dict[str, Any]
    pairs: pa.Table
    rejects: pa.Table


def _read_task(tasks: dict[str, np.ndarray], **settings) -> Iterator[pa.Table]:
    # A plain function, so Ray Data runs reads as tasks that give their CPU back between shards.
    yield from ReadAndDecode(**settings)(tasks)


def actor_pool(config: CapFiltConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Actor count and per-actor resources from the cluster, never taking the CPUs reads need."""
    gpus = resources.get("GPU", 0.0)
    if gpus >= config.gpus_per_actor:
        room = int(gpus // config.gpus_per_actor)
        per_actor = {"num_gpus": config.gpus_per_actor, "num_cpus": min(config.cpus_per_actor, 1.0)}
        where = f"{gpus:g} GPUs at {config.gpus_per_actor:g} per actor"
    else:
        spare = resources.get("CPU", 0.0) - config.reserve_cpus_for_reading
        room = int(spare // config.cpus_per_actor) if spare > 0 else 0
        per_actor = {"num_cpus": config.cpus_per_actor}
        where = (f"{resources.get('CPU', 0):g} CPUs, {config.reserve_cpus_for_reading:g} reserved for reading, "
                 f"{config.cpus_per_actor:g} per actor")
    if room < 1:
        raise ValueError(f"capfilt.actors: no room for an actor on this cluster ({where}); "
                         "lower capfilt.cpus_per_actor or capfilt.reserve_cpus_for_reading")
    if config.actors == "auto":
        # An autoscaling pool: it keeps working with fewer actors when a node is lost.
        concurrency: int | tuple[int, int] = (1, room)
    elif config.actors > room:
        raise ValueError(f"capfilt.actors: {config.actors} requested but the cluster fits {room} ({where})")
    else:
        concurrency = config.actors
    threads = max(1, int(per_actor["num_cpus"])) if "num_gpus" not in per_actor else None
    return {"concurrency": concurrency, "threads": threads, **per_actor}


def image_settings(ref: ModelRef) -> dict[str, Any]:
    from capfilt.models.export import read_image_processor

    return read_image_processor(ref.path, revision=ref.revision)


def fingerprint(config: CapFiltConfig, shards: list[ShardTask], provenance: dict[str, Any]) -> dict[str, Any]:
    """What determines the output. Batch sizes, actor counts and file sizes do not, so they may change on resume."""
    settings = identity(config)
    for name in ("web", "human", "output"):  # the inputs are listed per shard below; output is where, not what
        settings.pop(name, None)
    return {"capfilt": settings, "inputs": [[task.role, task.url] for task in shards], "models": provenance}


def plan(config: CapFiltConfig) -> list[ShardTask]:
    from capfilt.data.shards import expand_paths

    tasks = []
    for role, reader in ((WEB, config.web), (HUMAN, config.human)):
        if reader is None:
            continue
        reader_dump = reader.model_dump(mode="json")
        for url in expand_paths(reader.paths, reader.storage_options):
            tasks.append(ShardTask(url, role, reader_dump))
    if not tasks:
        raise ValueError("capfilt.web: no input shards configured")
    return tasks


def run_capfilt(config: CapFiltConfig, output: str, log=print) -> dict[str, Any]:
    """Run (or resume) CapFilt into ``output``; returns the manifest."""
    import ray

    if not config.captioners or not config.filters:
        raise ValueError("capfilt.captioners and capfilt.filters: at least one of each is needed")
    started = time.time()
    tasks = plan(config)
    provenance = {"captioners": [provenance_of(ref, "captioner") for ref in config.captioners],
                  "filters": [provenance_of(ref, "filter") for ref in config.filters]}
    out = CommittedOutput(output, config.output_storage_options)
    out.claim(fingerprint(config, tasks, provenance))
    next_id = out.recover(["pairs", "rejects"])
    done = out.done_shards()
    todo = [task for task in tasks if task.url not in done]
    filter_id = "+".join(p["id"] for p in provenance["filters"])
    label = sampling_label(config.sampling)
    if todo:
        log(f"capfilt: {len(todo)} of {len(tasks)} input shards to process into {output}")
        if not ray.is_initialized():
            ray.init()
        pool = actor_pool(config, ray.cluster_resources())
        image_size = image_settings(config.filters[0])["image_size"]
        worker_config = config.model_dump(mode="json")
        items = [{"url": t.url, "role": t.role, "reader": json.dumps(t.reader)} for t in todo]
        dataset = (
            ray.data.from_items(items, override_num_blocks=len(items))
            # max_retries: a read on a lost node is redone elsewhere. Being a task-only argument, it also
            # keeps Ray Data from fusing reads into the actors, which would serialise decode and model.
            .map_batches(_read_task, batch_size=1, batch_format="numpy", num_cpus=1, max_retries=3,
                         fn_kwargs={"image_size": image_size, "max_pixels": config.max_pixels,
                                    "decode_batch_size": config.decode_batch_size,
                                    "embed_images": config.embed_images})
            .map_batches(CapFiltWorker, batch_size=config.batch_size, batch_format="pyarrow",
                         concurrency=pool["concurrency"], num_cpus=pool["num_cpus"], num_gpus=pool.get("num_gpus", 0),
                         fn_constructor_kwargs={"config": worker_config,
                                                "captioners": [r.model_dump() for r in config.captioners],
                                                "filters": [r.model_dump() for r in config.filters],
                                                "threads": pool["threads"]})
        )
        assembler = ShardAssembler(out, next_id, config.rows_per_file, filter_id, label, config.round,
                                   max_buffer_bytes=config.max_buffer_bytes)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            assembler.add(batch)
        assembler.flush()
        if assembler.pending():
            raise RuntimeError(f"capfilt: shards did not complete: {assembler.pending()[:5]}")
    manifest = build_manifest(out, tasks, provenance, label, started)
    out.finish(manifest)
    return manifest


def provenance_of(ref: ModelRef, role: str) -> dict[str, Any]:
    from capfilt.models.export import model_provenance

    record = model_provenance(ref.path, revision=ref.revision)
    return {"role": role, "id": model_id(ref, record), **record}


def build_manifest(out: CommittedOutput, tasks: list[ShardTask], provenance: dict, sampling: str, started: float) -> dict:
    from capfilt.provenance import library_versions

    shards = {}
    for commit in out.commits():
        shards.update(commit.shards)
    totals: dict[str, Any] = {}
    for counts in shards.values():
        for name, value in counts.items():
            if name == "reasons":
                merged = totals.setdefault("reasons", {})
                for reason, count in value.items():
                    merged[reason] = merged.get(reason, 0) + count
            elif isinstance(value, int):
                totals[name] = totals.get(name, 0) + value
    fingerprint_record = json.loads(out.fs.cat_file(out.path("_capfilt.json")))
    return {
        "shards": shards,
        "totals": totals,
        "unreadable_shards": sorted(s for s, c in shards.items() if c.get("error")),
        "config_hash": fingerprint_record["hash"],
        "models": provenance,
        "sampling": sampling,
        "libraries": library_versions(),
        "finished_at": time.time(),
        "seconds_this_run": time.time() - started,
        "roles": {t.url: t.role for t in tasks},
    }

