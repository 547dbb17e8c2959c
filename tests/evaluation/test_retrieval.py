"""Ranks and recall on hand-made scores, the two-stage search on oracle and tiny random models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capfilt.config import MedConfig
from capfilt.evaluation.retrieval import (
    FilterRetrieval,
    first_relevant_rank,
    itc_topk,
    recall_at,
    retrieval_metrics,
    shortlist,
)


def test_first_relevant_rank_with_multiple_references_and_ties():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.2],  # relevant item 0 is best: rank 0
        [0.2, 0.2, 0.8, 0.1],  # relevant {0, 1} tie at 0.2; one irrelevant (0.8) above: rank 1
        [0.3, 0.3, 0.3, 0.3],  # everything tied: the relevant item goes below all 3 others
        [0.1, 0.7, 0.6, 0.7],  # relevant {1, 3} at 0.7; irrelevant 0.6 and 0.1 are below: rank 0
    ])
    ranks = first_relevant_rank(scores, [{0}, {0, 1}, {2}, {1, 3}])
    assert ranks.tolist() == [0, 1, 3, 0]
    assert recall_at(ranks, (1, 2, 4)) == {1: 0.5, 2: 0.75, 4: 1.0}


def test_first_relevant_rank_over_shortlists():
    # Query 0 lists items 7 and 3 (relevant 3, scored lower): rank 1. Query 1's relevant item 5 was not
    # shortlisted: it ranks below every candidate, never within K.
    ranks = first_relevant_rank(np.array([[2.0, 1.0], [3.0, 1.0]]), [{3}, {5}], np.array([[7, 3], [0, 1]]))
    assert ranks[0] == 1 and math.isinf(ranks[1])
    assert recall_at(ranks, (1, 2, 10)) == {1: 0.0, 2: 0.5, 10: 0.5}


def test_first_relevant_rank_checks_shapes():
    with pytest.raises(ValueError, match="do not agree"):
        first_relevant_rank(np.zeros((2, 3)), [{0}])


def test_itc_topk_is_exact_inner_product_search():
    generator = np.random.default_rng(0)
    queries = generator.normal(size=(7, 16)).astype(np.float32)
    items = generator.normal(size=(30, 16)).astype(np.float32)
    similarities, indices = itc_topk(queries, items, k=5)
    brute = queries @ items.T
    assert (indices == np.argsort(-brute, axis=1)[:, :5]).all()
    assert np.allclose(similarities, np.take_along_axis(brute, indices, 1), atol=1e-4)
    assert itc_topk(queries, items[:3], k=5)[1].shape == (7, 3)  # k clamps to the items there are


# -------------------------------------------------------------------------------------------------
# An oracle: image i is a constant tensor of value i; text "i ..." describes image i.
# -------------------------------------------------------------------------------------------------

TEXT_OFFSET = 10


class DigitTokenizer:
    """Text ``"<image> ..."`` -> ids ``[1, image + 10, 2, 0, ...]``."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            ids[row, :3] = torch.tensor([1, int(text.split()[0]) + TEXT_OFFSET, 2])
            mask[row, :3] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


class Oracle:
    """ITC points each text at image ``(i + itc_shift) % n``; ITM knows the truth (or not, ``itm_right=False``)."""

    def __init__(self, num_images: int, itc_shift: int = 0, itm_right: bool = True):
        self.num_images, self.itc_shift, self.itm_right = num_images, itc_shift, itm_right
        self.itm_rows = 0

    def image_embeds(self, pixel_values):
        return pixel_values.flatten(1)[:, None, :]  # one "token" per image

    def _image_of(self, image_embeds):
        return image_embeds[:, 0, 0].round().long()

    def image_features(self, image_embeds):
        return F.one_hot(self._image_of(image_embeds), self.num_images).float()

    def text_features(self, input_ids, attention_mask):
        target = (input_ids[:, 1] - TEXT_OFFSET + self.itc_shift) % self.num_images
        return F.one_hot(target, self.num_images).float()

    def itm_logits(self, image_embeds, input_ids, attention_mask):
        self.itm_rows += len(input_ids)
        match = self._image_of(image_embeds) == input_ids[:, 1] - TEXT_OFFSET
        match = match if self.itm_right else ~match
        return torch.stack([torch.zeros(len(match)), match.float() * 10 - 5], dim=1)


def _oracle_data(num_images=6, captions_per_image=2):
    pixels = torch.arange(num_images, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 2, 2)
    texts = [f"{image} caption {j}" for image in range(num_images) for j in range(captions_per_image)]
    text_image = [image for image in range(num_images) for _ in range(captions_per_image)]
    return [pixels[:4], pixels[4:]], texts, text_image


def test_a_perfect_model_has_recall_one_both_ways():
    batches, texts, text_image = _oracle_data()
    lists = shortlist(Oracle(6), DigitTokenizer(), batches, texts, k_test=3, batch_size=5)
    metrics = retrieval_metrics(lists, text_image)
    assert all(metrics[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_itm_reranks_a_wrong_itc_shortlist():
    batches, texts, text_image = _oracle_data()
    # ITC prefers the wrong image everywhere; with every item shortlisted, ITM puts the right one first.
    model = Oracle(6, itc_shift=1)
    lists = shortlist(model, DigitTokenizer(), batches, texts, k_test=100, batch_size=7)
    assert retrieval_metrics(lists, text_image)["i2t_r1"] == 1.0
    assert retrieval_metrics(lists, text_image)["t2i_r1"] == 1.0
    # Each (image, text) pair went through ITM once although both directions proposed it.
    assert lists.itm_pairs == 6 * 12 and model.itm_rows == 6 * 12
    # A shortlist of one holds only the wrong candidate: nothing to re-rank into first place.
    lists = shortlist(Oracle(6, itc_shift=1), DigitTokenizer(), batches, texts, k_test=1, batch_size=7)
    metrics = retrieval_metrics(lists, text_image)
    assert metrics["i2t_r1"] == 0.0 and metrics["t2i_r10"] == 0.0


def test_score_is_itm_logit_plus_itc_similarity():
    batches, texts, text_image = _oracle_data()
    # ITM says "no" to the truth: the wrong candidates win even though ITC is right.
    lists = shortlist(Oracle(6, itm_right=False), DigitTokenizer(), batches, texts, k_test=2, batch_size=5)
    assert retrieval_metrics(lists, text_image)["t2i_r1"] == 0.0
    # Right text of image 0: logit -5 + similarity 1.
    row = list(lists.i2t_candidates[0]).index(0)
    assert lists.i2t_scores[0, row] == pytest.approx(-4.0)


# -------------------------------------------------------------------------------------------------
# Tiny random MED, and the same weights as an exported filter
# -------------------------------------------------------------------------------------------------

TINY = MedConfig(
    preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2, "mlp_dim": 128},
    text={"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, embed_dim=32, queue_size=64,
)
TEXTS = ["a red circle", "a red circle left of a blue square", "two green triangles", "a small purple square",
         "three blue stars", "a large white circle", "a yellow star above a red triangle", "click to enlarge"]


@pytest.fixture(scope="module")
def tiny_med(tokenizer):
    from capfilt.models.med import MED

    torch.manual_seed(0)
    return MED.from_config(TINY, tokenizer).eval()


def test_random_med_gives_well_formed_recall(tiny_med, tokenizer):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lists = shortlist(tiny_med, tokenizer, [images[:3], images[3:]], TEXTS, k_test=3, batch_size=4)
    assert lists.i2t_candidates.shape == (4, 3) and lists.t2i_candidates.shape == (8, 3)
    metrics = retrieval_metrics(lists, [0, 0, 1, 1, 2, 2, 3, 3])
    assert set(metrics) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
    # 3 of 4 images shortlisted per text: with 4 images every text is found within 4 unless not shortlisted.
    assert metrics["t2i_r5"] == pytest.approx(np.mean([
        image in lists.t2i_candidates[t] for t, image in enumerate([0, 0, 1, 1, 2, 2, 3, 3])]))


def test_exported_filter_ranks_like_its_med(tiny_med, tokenizer, tmp_path):
    from capfilt.models.export import export_filter, load_filter

    loaded = load_filter(export_filter(tiny_med, tokenizer, tmp_path / "filter"))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = shortlist(tiny_med, tokenizer, [images], TEXTS, k_test=4, batch_size=16)
    exported = shortlist(FilterRetrieval(loaded.model, loaded.tokenizer), loaded.tokenizer, [images], TEXTS,
                         k_test=4, batch_size=16)
    assert (ours.i2t_candidates == exported.i2t_candidates).all()
    assert np.allclose(ours.i2t_scores, exported.i2t_scores, atol=1e-4)
    assert np.allclose(ours.t2i_scores, exported.t2i_scores, atol=1e-4)
