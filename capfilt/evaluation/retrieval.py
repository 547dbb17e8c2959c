"""Image-text retrieval as BLIP evaluates it: ITC shortlists, ITM re-ranks.

For every image (text) the ``k_test`` texts (images) with the highest ITC similarity are found with a
faiss inner-product index over the L2-normalised projections; each candidate is then scored
``ITM logit of the match class + ITC similarity`` (salesforce/BLIP ``train_retrieval.evaluation``),
and anything outside the shortlist ranks below every candidate. An image-to-text query is answered
correctly at K when any of the image's reference texts ranks within the first K.

Ties are counted against the model: a relevant item ranks below every irrelevant item with an equal
score, so a model that scores everything alike gets recall 0, not 1 (the reference's ``argsort``
leaves tie order to the sort).

Each (image, text) pair goes through the ITM encoder once, even when it is a candidate in both
directions. Any model with MED's four retrieval methods works: a :class:`~capfilt.models.med.MED`
directly, or an exported or published ``BlipForImageTextRetrieval`` through :class:`FilterRetrieval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capfilt.models.med import trim_padding
from capfilt.models.tokens import itc_ids, itm_ids

RECALL_AT = (1, 5, 10)


class RetrievalModel(Protocol):
    """What retrieval needs; :class:`~capfilt.models.med.MED` has these methods as they are."""

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor: ...  # all ViT tokens, [CLS] first

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor: ...  # projected, L2-normalised

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...  # [B, 2], class 1 = match


class FilterRetrieval:
    """A ``BlipForImageTextRetrieval`` seen through MED's retrieval methods, with capfilt's token
    conventions ([CLS] first for ITC, [ENC] first for ITM), as :class:`capfilt.inference.Scorer` uses it."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # last_hidden_state, not pooler_output: transformers LayerNorms the pooled token twice.
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = itc_ids(input_ids, self.tokenizer)
        hidden = self.model.text_encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.model.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.text_encoder(
            input_ids=itm_ids(input_ids, self.tokenizer),
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        ).last_hidden_state
        return self.model.itm_head(hidden[:, 0])


# -------------------------------------------------------------------------------------------------
# Ranks and recall
# -------------------------------------------------------------------------------------------------


def first_relevant_rank(
    scores: np.ndarray, relevant: Sequence[Iterable[int]], candidates: np.ndarray | None = None
) -> np.ndarray:
    """0-based rank of each query's best relevant item; ``inf`` when none is among its candidates.

    ``scores[q, j]`` scores item ``candidates[q, j]`` (default: item ``j``) for query ``q``; items not
    listed rank below all listed ones. Ties count against the query: the rank is the number of
    irrelevant candidates scoring at least as high as the best relevant one.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if candidates is None:
        candidates = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    if scores.shape != candidates.shape or len(relevant) != scores.shape[0]:
        raise ValueError(
            f"scores {scores.shape}, candidates {candidates.shape} and {len(relevant)} relevance sets do not agree"
        )
    ranks = np.full(scores.shape[0], np.inf)
    for query, (row, items, wanted) in enumerate(zip(scores, candidates, relevant)):
        hit = np.isin(items, np.fromiter(wanted, dtype=np.int64))
        if hit.any():
            ranks[query] = np.count_nonzero(row[~hit] >= row[hit].max())
    return ranks


def recall_at(ranks: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """Fraction of queries answered within the first K, for each K."""
    if len(ranks) == 0:
        raise ValueError("recall of no queries")
    return {k: float(np.mean(ranks < k)) for k in ks}


# -------------------------------------------------------------------------------------------------
# The two-stage search
# -------------------------------------------------------------------------------------------------


@dataclass
class Shortlists:
    """For each query, its ``k`` candidates and their re-ranked scores (ITM match logit + ITC)."""

    i2t_candidates: np.ndarray  # [images, k] text indices
    i2t_scores: np.ndarray
    t2i_candidates: np.ndarray  # [texts, k] image indices
    t2i_scores: np.ndarray
    itm_pairs: int  # distinct (image, text) pairs the ITM encoder scored


def itc_topk(queries: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products (cosine, the features being normalised): ``(similarities, indices)``."""
    import faiss

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    similarities, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, items.shape[0]))
    return similarities, indices


@torch.inference_mode()
def shortlist(
    model: RetrievalModel,
    tokenizer,
    pixel_batches: Iterable[torch.Tensor],
    texts: Sequence[str],
    k_test: int,
    batch_size: int = 64,
    max_text_length: int = 35,
    device: str | torch.device = "cpu",
) -> Shortlists:
    """ITC candidates both ways, re-ranked by ITM; ``pixel_batches`` yields the images in order."""
    device = torch.device(device)
    image_embeds, image_feats = [], []
    for pixel_values in pixel_batches:
        embeds = model.image_embeds(pixel_values.to(device))
        image_feats.append(model.image_features(embeds).float().cpu())
        # Kept on the host: at reference scale (5k images, 577 tokens, ViT-B) they are ~9 GB.
        image_embeds.append(embeds.cpu())
    if not image_embeds or not texts:
        raise ValueError("retrieval needs at least one image and one text")
    image_embeds, image_feats = torch.cat(image_embeds), torch.cat(image_feats)

    tokens = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_text_length, return_tensors="pt"
    )
    text_feats = torch.cat([
        model.text_features(tokens.input_ids[s : s + batch_size].to(device),
                            tokens.attention_mask[s : s + batch_size].to(device)).float().cpu()
        for s in range(0, len(texts), batch_size)
    ])

    i2t_sims, i2t_candidates = itc_topk(image_feats.numpy(), text_feats.numpy(), k_test)
    t2i_sims, t2i_candidates = itc_topk(text_feats.numpy(), image_feats.numpy(), k_test)

    # Every pair either direction proposes, scored once; codes sort image-major.
    num_texts = len(texts)
    i2t_codes = np.arange(len(image_feats))[:, None] * num_texts + i2t_candidates
    t2i_codes = t2i_candidates * num_texts + np.arange(num_texts)[:, None]
    pairs, inverse = np.unique(np.concatenate([i2t_codes.ravel(), t2i_codes.ravel()]), return_inverse=True)
    match_logits = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        image_rows, text_rows = torch.from_numpy(chunk // num_texts), torch.from_numpy(chunk % num_texts)
        input_ids, mask = trim_padding(tokens.input_ids[text_rows], tokens.attention_mask[text_rows])
        logits = model.itm_logits(image_embeds[image_rows].to(device), input_ids.to(device), mask.to(device))
        match_logits[start : start + len(chunk)] = logits[:, 1].float().cpu().numpy()
    i2t_logits = match_logits[inverse[: i2t_codes.size]].reshape(i2t_codes.shape)
    t2i_logits = match_logits[inverse[i2t_codes.size :]].reshape(t2i_codes.shape)
    return Shortlists(
        i2t_candidates=i2t_candidates,
        i2t_scores=i2t_logits + i2t_sims,
        t2i_candidates=t2i_candidates,
        t2i_scores=t2i_logits + t2i_sims,
        itm_pairs=len(pairs),
    )


def retrieval_metrics(lists: Shortlists, text_image: Sequence[int]) -> dict[str, float]:
    """R@1/5/10 both ways; ``text_image[t]`` is the image text ``t`` describes."""
    image_texts: list[list[int]] = [[] for _ in range(lists.i2t_candidates.shape[0])]
    for text, image in enumerate(text_image):
        image_texts[image].append(text)
    i2t = recall_at(first_relevant_rank(lists.i2t_scores, image_texts, lists.i2t_candidates))
    t2i = recall_at(first_relevant_rank(lists.t2i_scores, [[image] for image in text_image], lists.t2i_candidates))
    metrics = {f"i2t_r{k}": value for k, value in i2t.items()}
    metrics.update({f"t2i_r{k}": value for k, value in t2i.items()})
    metrics["r_mean"] = float(np.mean(list(metrics.values())))
    return metrics
