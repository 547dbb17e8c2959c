"""What each Ray Train worker reads: a deterministic stream of decoded, augmented, tokenized pairs.

The order of training samples is a function of (seed, step) alone: the pairs are read in a fresh
permutation per epoch (seeded by (seed, epoch)), epochs follow one another without a gap, and step
``s`` takes global positions ``[s * batch, (s + 1) * batch)`` of that stream, rank ``r`` the r-th
slice of it. So a run resumed at step ``s`` continues exactly where the killed one stopped, whatever
the number of workers, and nothing is decoded twice to skip ahead.

Each rank streams its own positions through :class:`BatchPrefetcher`: Ray CPU tasks, a few
micro-batches ahead of the trainer, turn positions into tensors (:func:`make_batch`: look the pair
up, decode, ``train_transform`` seeded by (seed, position), tokenize), so decoding overlaps training
and a task lost with its node is re-run by Ray. Not Ray Data: its streaming executor runs in the
consuming process, and while the consumer is the slower side (a trainer always is, once the
prefetch is full) it has no task to ``ray.wait`` on and spins, holding the GIL (Ray 2.60,
``process_completed_tasks``): in the training worker that made the demo's steps 2.5-3x slower.
The pairs table is loaded once per Ray worker process: at the demo's scale (thousands of small
JPEGs) it is a few MB; at web scale it would be the place to switch to shard-local shuffling.
"""

from __future__ import annotations

import hashlib
from collections import deque
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (independent streams for independent uses)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_pairs: int) -> np.ndarray:
    """The pair indices of one epoch, in training order."""
    return np.random.default_rng(derived_seed("order", seed, epoch)).permutation(num_pairs)


def pair_index(positions: np.ndarray, seed: int, num_pairs: int) -> np.ndarray:
    """Global stream positions → indices into the pairs table."""
    epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), num_pairs)
    out = np.empty(len(offsets), dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = epoch_order(seed, int(epoch), num_pairs)[offsets[chosen]]
    return out


def rank_positions(start_step: int, steps: int, batch_size: int, workers: int, rank: int) -> np.ndarray:
    """The stream positions rank ``rank`` trains on in steps ``[start_step, steps)``, in order."""
    per_rank = batch_size // workers
    step_starts = np.arange(start_step, steps, dtype=np.int64) * batch_size + rank * per_rank
    return (step_starts[:, None] + np.arange(per_rank, dtype=np.int64)[None, :]).reshape(-1)


@lru_cache(maxsize=2)
def load_pair_table(files: tuple[str, ...]) -> pa.Table:
    return pa.concat_tables([pq.read_table(path, columns=["image_id", "text", "image"]) for path in files])


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_dir: str):
    from capfilt.data.text import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@lru_cache(maxsize=4)
def _transform(image_size: int, image_config_json: str):
    from capfilt.config import ImageConfig
    from capfilt.data.images import image_transform

    return image_transform(ImageConfig.model_validate_json(image_config_json), image_size, train=True)


def make_batch(
    batch: dict[str, np.ndarray],
    *,
    pair_files: Sequence[str],
    tokenizer_dir: str,
    image_size: int,
    image_config_json: str,
    max_text_length: int,
    prompt: str,
    seed: int,
) -> dict[str, np.ndarray]:
    """One micro-batch (run as a Ray task): ``{"position"}`` → pixels, token ids and mask, image ids, position."""
    import torch

    from capfilt.data.images import decode_image

    table = load_pair_table(tuple(pair_files))
    positions = np.asarray(batch["position"], dtype=np.int64)
    rows = table.take(pa.array(pair_index(positions, seed, table.num_rows)))
    transform = _transform(image_size, image_config_json)
    with torch.inference_mode():
        pixels = torch.stack(
            [
                transform(decode_image(image), seed=derived_seed("augment", seed, int(position)))
                for image, position in zip(rows.column("image").to_pylist(), positions)
            ]
        )
    texts = [prompt + text for text in rows.column("text").to_pylist()]
    tokens = _tokenizer(tokenizer_dir)(
        texts, padding="max_length", truncation=True, max_length=max_text_length, return_tensors="np"
    )
    return {
        "pixel_values": pixels.numpy(),
        "input_ids": tokens["input_ids"].astype(np.int64),
        "attention_mask": tokens["attention_mask"].astype(np.int64),
        "image_ids": rows.column("image_id").to_numpy().astype(np.int64),
        "position": positions,
    }


class BatchPrefetcher:
    """One rank's micro-batches in order, ``make_batch`` running as Ray tasks ``ahead`` batches early."""

    def __init__(self, positions: np.ndarray, micro_batch: int, udf_kwargs: dict[str, Any], data_cpus: float,
                 ahead: int = 4):
        import ray

        self._decode = ray.remote(num_cpus=data_cpus)(make_batch)
        self._chunks = [positions[i : i + micro_batch] for i in range(0, len(positions), micro_batch)]
        self._udf_kwargs = udf_kwargs
        self._ahead = ahead
        self._submitted = 0
        self._pending: deque = deque()

    def __iter__(self) -> "BatchPrefetcher":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        import ray

        while len(self._pending) < self._ahead and self._submitted < len(self._chunks):
            positions = self._chunks[self._submitted]
            self._pending.append(self._decode.remote({"position": positions}, **self._udf_kwargs))
            self._submitted += 1
        if not self._pending:
            raise StopIteration
        return ray.get(self._pending.popleft())
