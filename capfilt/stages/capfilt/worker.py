"""Accelerator side: caption, score, decide."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from capfilt.config import CapFiltConfig, CaptionSampling, ModelRef
from capfilt.stages.capfilt.schemas import FILTERED, HUMAN, KEPT, MARKER_ROW, REJECTED, RESULT_SCHEMA, SYNTHETIC, WEB


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
            for member, (captioner_id, processor, captioner) in enumerate(self.captioners):
                captions = captioner.generate(pixel_values(processor), keys, round=config.round,
                                              first_caption=member * config.sampling.num_captions)
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
