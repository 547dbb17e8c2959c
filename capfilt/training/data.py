"""What each Ray Train worker reads: a deterministic stream of decoded, augmented, tokenized pairs,
read from the training sources where they are, a few shards at a time.

The stream (:class:`StreamPlan`) is a function of (seed, position) and of the pairs per unit (an input
shard or a CapFilt pairs file; counted once by :func:`~capfilt.data.pairs.index_pairs`). Each epoch
deals the units, shuffled, to windows of at most ``shuffle_shards`` units (each source's shards spread
over the windows in turn, so every window holds a share of every source); the pairs of a window are
trained in a seeded permutation of all of them, then the next window follows. Epochs follow one
another without a gap, step ``s`` takes global positions ``[s * batch, (s + 1) * batch)`` and rank
``r`` the r-th slice of it. So a run resumed at step ``s`` continues exactly where the killed one
stopped, whatever the number of workers, and finding the pair of a position is arithmetic: nothing
is read or replayed to skip ahead.

Memory is bounded by the window, not the data: a :class:`UnitCache` actor (one per training attempt)
reads each unit of the windows the ranks are in (image bytes fetched from the input shards a row group
or tar at a time), keeps the tables in the object store, which every rank and decoding task shares,
and releases them once every rank has moved on; it reads the next window ahead. The trainer holds one integer per unit.

Each rank streams its own positions through :class:`BatchPrefetcher`: Ray CPU tasks, a few
micro-batches ahead of the trainer, turn positions into tensors (:func:`make_batch`: decode,
``train_transform`` seeded by (seed, position), tokenize), so decoding overlaps training and a task
lost with its node is re-run by Ray. Not Ray Data: its streaming executor runs in the consuming
process, and while the consumer is the slower side (a trainer always is, once the prefetch is full)
it has no task to ``ray.wait`` on and spins, holding the GIL (Ray 2.60, ``process_completed_tasks``):
in the training worker that made the demo's steps 2.5-3x slower.

A pair met in training whose image does not decode, or whose unit can no longer be read, is counted
by reason and replaced by the next good pair of its micro-batch (deterministically), so the batch
keeps its size; the trainer stops when such pairs exceed ``max_bad_fraction`` of the run.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pyarrow as pa


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (independent streams for independent uses)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1


def rank_positions(start_step: int, steps: int, batch_size: int, workers: int, rank: int) -> np.ndarray:
    """The stream positions rank ``rank`` trains on in steps ``[start_step, steps)``, in order."""
    per_rank = batch_size // workers
    step_starts = np.arange(start_step, steps, dtype=np.int64) * batch_size + rank * per_rank
    return (step_starts[:, None] + np.arange(per_rank, dtype=np.int64)[None, :]).reshape(-1)


class StreamPlan:
    """Stream positions -> (window, unit, ordinal of the pair within its unit). See the module docstring.

    ``shuffle_shards`` 0 puts every unit in one window: a global permutation per epoch (every pair's
    image bytes in the object store at once).
    """

    def __init__(self, unit_pairs: Sequence[int], seed: int, shuffle_shards: int,
                 unit_groups: Sequence[int] | None = None):
        self.unit_pairs = np.asarray(unit_pairs, dtype=np.int64)
        self.unit_groups = np.zeros(len(self.unit_pairs), dtype=np.int64) if unit_groups is None else \
            np.asarray(unit_groups, dtype=np.int64)
        self.seed = seed
        self.total = int(self.unit_pairs.sum())
        if self.total <= 0:
            raise ValueError("the training stream has no pairs")
        units = len(self.unit_pairs)
        self.windows_per_epoch = -(-units // shuffle_shards) if 0 < shuffle_shards < units else 1
        self._epochs: OrderedDict[int, tuple[list[np.ndarray], np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The epoch's windows (their units) and the stream offset (within the epoch) where each starts.

        Each group's units (a training source's shards) are shuffled, then dealt to the windows in
        turn, so every window holds a share of every source and windows differ by one unit at most:
        a human set in two shards beside eight web shards puts one human shard in each of two
        windows, never both in one, which would leave the other window's steps without human pairs.
        """
        if epoch not in self._epochs:
            rng = np.random.default_rng(derived_seed("units", self.seed, epoch))
            dealt = np.concatenate([rng.permutation(np.flatnonzero(self.unit_groups == group))
                                    for group in np.unique(self.unit_groups)])
            first = int(rng.integers(self.windows_per_epoch))
            slots = (first + np.arange(len(dealt))) % self.windows_per_epoch
            windows = [dealt[slots == index] for index in range(self.windows_per_epoch)]
            sizes = [int(self.unit_pairs[units].sum()) for units in windows]
            self._epochs[epoch] = (windows, np.concatenate([[0], np.cumsum(sizes)]))
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def window_units(self, window: int) -> np.ndarray:
        """The units of global window ``window`` (epoch * windows_per_epoch + index within the epoch)."""
        epoch, index = divmod(window, self.windows_per_epoch)
        return self._epoch(epoch)[0][index]

    def _window(self, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window's units, where each unit's pairs start among the window's, and its permutation."""
        if window not in self._windows:
            units = self.window_units(window)
            starts = np.concatenate([[0], np.cumsum(self.unit_pairs[units])])
            permutation = np.random.default_rng(derived_seed("pairs", self.seed, window)).permutation(int(starts[-1]))
            self._windows[window] = (units, starts, permutation)
            while len(self._windows) > 3:
                self._windows.popitem(last=False)
        return self._windows[window]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global stream positions -> (global window, unit, ordinal within the unit), each per position."""
        positions = np.asarray(positions, dtype=np.int64)
        windows, units, ordinals = (np.empty(len(positions), dtype=np.int64) for _ in range(3))
        epochs, offsets = np.divmod(positions, self.total)
        for epoch in np.unique(epochs):
            in_epoch = np.flatnonzero(epochs == epoch)
            _, window_starts = self._epoch(int(epoch))
            index = np.searchsorted(window_starts, offsets[in_epoch], side="right") - 1
            for local in np.unique(index):
                chosen = in_epoch[index == local]
                window = int(epoch) * self.windows_per_epoch + int(local)
                window_units, starts, permutation = self._window(window)
                slots = permutation[offsets[chosen] - window_starts[local]]
                which = np.searchsorted(starts, slots, side="right") - 1
                windows[chosen] = window
                units[chosen] = window_units[which]
                ordinals[chosen] = slots - starts[which]
        return windows, units, ordinals


# --------------------------------------------------------------------------------------------------
# Reading units: Ray tasks owned by one actor per training attempt
# --------------------------------------------------------------------------------------------------


def read_unit(source_json: str, path: str, expected_pairs: int) -> dict[str, Any]:
    """One unit's pairs with their image bytes, or the reason it cannot be trained on (run as a Ray task)."""
    from capfilt.config import PairSource
    from capfilt.data.pairs import read_unit_pairs
    from capfilt.data.shards import ShardError

    source = PairSource.model_validate_json(source_json)
    try:
        table = read_unit_pairs(source, path)
    except (ShardError, OSError, ValueError, pa.ArrowException) as error:
        return {"error": "shard_unreadable", "detail": f"{path}: {type(error).__name__}: {error}"[:500]}
    if table.num_rows != expected_pairs:
        return {"error": "shard_changed",
                "detail": f"{path}: {table.num_rows} pairs, {expected_pairs} when the stage indexed it"}
    return {"table": table.select(["image_id", "text", "key", "shard", "row", "image"]),
            "max_pixels": source.max_pixels}


class UnitCache:
    """Reads the units of the windows the ranks are in (and the next one), once for all ranks of the run.

    A Ray actor (threaded: ``max_concurrency`` above the number of ranks). It reads units in a few
    threads of its own and puts each table in the object store, where every rank and decoding task
    shares it; a unit is released once no rank is in, or about to enter, a window that holds it.
    Reading here rather than in Ray tasks matters on a busy node: a task of another kind than the
    decoding ones made Ray start a fresh worker process for it (and tear it down after), and those
    start-ups, a dozen per window, halved the trainer's steps/s for a minute at each window change.
    """

    def __init__(self, sources: list[str], units: list[dict[str, Any]], seed: int, shuffle_shards: int,
                 ranks: int, read_threads: int = 2):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._sources = sources
        self._units = units
        self._plan = StreamPlan([unit["pairs"] for unit in units], seed, shuffle_shards,
                                [unit["source"] for unit in units])
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="capfilt-unit-read")
        self._lock = threading.Lock()
        self._tables: dict[int, Any] = {}  # unit -> Future of the ObjectRef of read_unit's result
        self._rank_window = [0] * ranks

    def _read(self, unit: int):
        import ray

        entry = self._units[unit]
        return ray.put(read_unit(self._sources[entry["source"]], entry["path"], entry["pairs"]))

    def tables(self, rank: int, windows: list[int]) -> dict[int, Any]:
        """Object refs of the units of ``windows`` (the windows one micro-batch of ``rank`` touches)."""
        with self._lock:
            self._rank_window[rank] = max(self._rank_window[rank], min(windows))
            for window in (*windows, max(windows) + 1):  # the next window is read ahead
                for unit in self._plan.window_units(window):
                    if int(unit) not in self._tables:
                        self._tables[int(unit)] = self._pool.submit(self._read, int(unit))
            keep = {int(unit) for window in range(min(self._rank_window), max(*self._rank_window, *windows) + 2)
                    for unit in self._plan.window_units(window)}
            for unit in [unit for unit in self._tables if unit not in keep]:
                del self._tables[unit]
            wanted = {int(unit): self._tables[int(unit)] for window in windows
                      for unit in self._plan.window_units(window)}
        return {unit: future.result() for unit, future in wanted.items()}

    def held(self) -> int:
        """Units whose tables the actor holds now (for tests and benchmarks)."""
        with self._lock:
            return len(self._tables)


# --------------------------------------------------------------------------------------------------
# Decoding one micro-batch
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_dir: str, storage_options_json: str = "{}"):
    """The tokenizer at a path, or at a URL (fetched once per process onto this node)."""
    import json

    from capfilt.data.text import load_tokenizer
    from capfilt.training.store import fetch

    return load_tokenizer(fetch(tokenizer_dir, json.loads(storage_options_json)))


@lru_cache(maxsize=4)
def _transform(image_size: int, image_config_json: str):
    from capfilt.config import ImageConfig
    from capfilt.data.images import image_transform

    return image_transform(ImageConfig.model_validate_json(image_config_json), image_size, train=True)


def make_batch(
    positions: np.ndarray,
    units: np.ndarray,
    ordinals: np.ndarray,
    unit_ids: Sequence[int],
    *tables: dict[str, Any],
    tokenizer_dir: str,
    image_size: int,
    image_config_json: str,
    max_text_length: int,
    prompt: str,
    seed: int,
    storage_options_json: str = "{}",
) -> dict[str, Any]:
    """One micro-batch (run as a Ray task): pixels, token ids and mask, image ids, positions, and the bad pairs.

    ``tables[i]`` is :func:`read_unit`'s result for unit ``unit_ids[i]``. A pair whose unit could not be
    read or whose image does not decode is listed in ``bad`` and replaced by the next good pair of the
    micro-batch (cyclically), which it then holds twice; augmentation stays seeded by its own position.
    """
    import torch

    from capfilt.data.decode import DecodeError, decode_image

    by_unit = dict(zip(unit_ids, tables))
    positions = np.asarray(positions, dtype=np.int64)
    decoded: list[Any] = []
    texts: list[str] = []
    ids: list[int] = []
    bad: list[dict[str, Any]] = []
    for position, unit, ordinal in zip(positions, units, ordinals):
        entry = by_unit[int(unit)]
        if "error" in entry:
            bad.append({"position": int(position), "unit": int(unit), "ordinal": int(ordinal),
                        "reason": entry["error"], "detail": entry["detail"]})
            decoded.append(None)
            texts.append("")
            ids.append(-1)
            continue
        table = entry["table"]
        image = table.column("image")[int(ordinal)].as_py()
        try:
            decoded.append(decode_image(image, entry["max_pixels"]))
        except DecodeError as error:
            bad.append({"position": int(position), "unit": int(unit), "ordinal": int(ordinal),
                        "reason": error.reason, "key": table.column("key")[int(ordinal)].as_py(),
                        "shard": table.column("shard")[int(ordinal)].as_py(),
                        "row": table.column("row")[int(ordinal)].as_py()})
            decoded.append(None)
        texts.append(table.column("text")[int(ordinal)].as_py())
        ids.append(table.column("image_id")[int(ordinal)].as_py())
    good = [index for index, image in enumerate(decoded) if image is not None]
    if not good:
        reasons = sorted({entry["reason"] for entry in bad})
        raise RuntimeError(f"no pair of the micro-batch at positions {positions[0]}..{positions[-1]} can be "
                           f"trained on ({', '.join(reasons)}): {bad[0].get('detail', bad[0])}")
    source = [index if decoded[index] is not None else next(
        (good_index for good_index in good if good_index > index), good[0]) for index in range(len(decoded))]
    transform = _transform(image_size, image_config_json)
    with torch.inference_mode():
        pixels = torch.stack([transform(decoded[source[index]], seed=derived_seed("augment", seed, int(position)))
                              for index, position in enumerate(positions)])
    tokens = _tokenizer(tokenizer_dir, storage_options_json)([prompt + texts[index] for index in source], padding="max_length",
                                       truncation=True, max_length=max_text_length, return_tensors="np")
    return {
        "pixel_values": pixels.numpy(),
        "input_ids": tokens["input_ids"].astype(np.int64),
        "attention_mask": tokens["attention_mask"].astype(np.int64),
        "image_ids": np.asarray([ids[index] for index in source], dtype=np.int64),
        "position": positions,
        "bad": bad,
    }


class BatchPrefetcher:
    """One rank's micro-batches in order, ``make_batch`` running as Ray tasks ``ahead`` batches early."""

    def __init__(self, positions: np.ndarray, micro_batch: int, plan: StreamPlan, cache, rank: int,
                 udf_kwargs: dict[str, Any], data_cpus: float, ahead: int = 4):
        import ray

        self._decode = ray.remote(num_cpus=data_cpus)(make_batch)
        self._chunks = [positions[i : i + micro_batch] for i in range(0, len(positions), micro_batch)]
        self._plan = plan
        self._cache = cache
        self._rank = rank
        self._udf_kwargs = udf_kwargs
        self._ahead = ahead
        self._submitted = 0
        self._pending: deque = deque()

    def __iter__(self) -> "BatchPrefetcher":
        return self

    def _submit(self, positions: np.ndarray):
        import ray

        windows, units, ordinals = self._plan.locate(positions)
        refs = ray.get(self._cache.tables.remote(self._rank, sorted({int(window) for window in windows})))
        unit_ids = sorted({int(unit) for unit in units})
        return self._decode.remote(positions, units, ordinals, unit_ids, *[refs[unit] for unit in unit_ids],
                                   **self._udf_kwargs)

    def submit_ahead(self) -> None:
        """Submit the first ``ahead`` micro-batches now rather than at the first ``next``."""
        while len(self._pending) < self._ahead and self._submitted < len(self._chunks):
            self._pending.append(self._submit(self._chunks[self._submitted]))
            self._submitted += 1

    def __next__(self) -> dict[str, Any]:
        import ray

        self.submit_ahead()
        if not self._pending:
            raise StopIteration
        return ray.get(self._pending.popleft())
