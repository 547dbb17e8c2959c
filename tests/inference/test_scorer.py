from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from capfilt.inference.scorer import Scorer, TextScore
from capfilt.models.tokens import itm_ids

TEXTS = [
    ["a red circle left of a blue square", "a picture of a dog", "img 2041 jpg"],
    ["two green triangles above a yellow star"],
    ["click to enlarge", "a small purple square below a large orange circle"],
]


@contextlib.contextmanager
def vision_calls(model):
    """Yields the list of batch sizes the vision model is called with inside the block."""
    calls = []
    hook = model.vision_model.embeddings.register_forward_hook(lambda module, args, output: calls.append(len(output)))
    try:
        yield calls
    finally:
        hook.remove()


def test_one_vision_pass_for_all_texts(retrieval_model, tokenizer, images):
    scorer = Scorer(retrieval_model, tokenizer)
    with vision_calls(retrieval_model) as calls:
        scores = scorer.score(images[:3], TEXTS)
    assert calls == [3]  # one call, three images, six texts
    assert [len(s) for s in scores] == [3, 1, 2]
    for per_image in scores:
        for score in per_image:
            assert isinstance(score, TextScore)
            assert 0.0 <= score.itm_prob <= 1.0
            assert -1.0 <= score.itc_sim <= 1.0


def test_without_itc_similarity_match_probabilities_are_unchanged_and_the_text_pass_is_skipped(
    retrieval_model, tokenizer, images
):
    def text_passes(itc_similarity: bool):
        """The scores, and (text-encoder passes, passes that cross-attend to the image)."""
        counts = {"text": 0, "cross": 0}
        encoder = retrieval_model.text_encoder
        hooks = [module.register_forward_hook(lambda *_, name=name: counts.update({name: counts[name] + 1}))
                 for name, module in (("text", encoder.embeddings.word_embeddings),
                                      ("cross", encoder.encoder.layer[0].crossattention.self.query))]
        try:
            scores = Scorer(retrieval_model, tokenizer, itc_similarity=itc_similarity).score(images[:3], TEXTS)
        finally:
            for hook in hooks:
                hook.remove()
        return scores, (counts["text"], counts["cross"])

    with_itc, (text, cross) = text_passes(True)
    assert text > cross > 0  # ITM passes cross-attend, ITC passes read the text alone
    itm_only, (text, cross) = text_passes(False)
    assert text == cross > 0  # every text-encoder pass cross-attends: ITM only
    assert [[s.itm_prob for s in row] for row in itm_only] == [[s.itm_prob for s in row] for row in with_itc]
    assert all(s.itc_sim is None for row in itm_only for s in row)
    assert all(s.itc_sim is not None for row in with_itc for s in row)


def test_matches_transformers_forward_for_single_pairs(retrieval_model, tokenizer, images):
    scores = Scorer(retrieval_model, tokenizer).score(images[:3], TEXTS)
    for i, per_image in enumerate(TEXTS):
        for j, text in enumerate(per_image):
            tokens = tokenizer([text], truncation=True, max_length=35, return_tensors="pt")
            pixel_values = images[i : i + 1]
            with torch.no_grad():
                itm_logits = retrieval_model(
                    input_ids=itm_ids(tokens.input_ids, tokenizer),
                    attention_mask=tokens.attention_mask,
                    pixel_values=pixel_values,
                    use_itm_head=True,
                ).itm_score
                itc_sim = retrieval_model(
                    input_ids=tokens.input_ids,
                    attention_mask=tokens.attention_mask,
                    pixel_values=pixel_values,
                    use_itm_head=False,
                ).itm_score
            assert scores[i][j].itm_prob == pytest.approx(itm_logits.softmax(-1)[0, 1].item(), abs=1e-5)
            assert scores[i][j].itc_sim == pytest.approx(itc_sim[0, 0].item(), abs=1e-5)


def test_scores_depend_on_the_pairing(retrieval_model, tokenizer, images):
    # The same text scores differently against different images: the gather by index is not a no-op.
    text = "a red circle left of a blue square"
    scores = Scorer(retrieval_model, tokenizer).score(images[:3], [[text]] * 3)
    assert len({s[0].itm_prob for s in scores}) == 3
    assert len({s[0].itc_sim for s in scores}) == 3


def test_ragged_and_empty_text_lists(retrieval_model, tokenizer, images):
    scorer = Scorer(retrieval_model, tokenizer)
    full = scorer.score(images[:3], TEXTS)
    # Images 0 and 2 again, now in rows 1 and 3 between images without texts.
    pixel_values = images[[3, 0, 4, 2, 5]]
    ragged = scorer.score(pixel_values, [[], TEXTS[0], [], TEXTS[2], []])
    assert [len(s) for s in ragged] == [0, 3, 0, 2, 0]
    for got, expected in ((ragged[1], full[0]), (ragged[3], full[2])):
        for a, b in zip(got, expected):
            assert a.itm_prob == pytest.approx(b.itm_prob, abs=1e-6)
            assert a.itc_sim == pytest.approx(b.itc_sim, abs=1e-6)

    with vision_calls(retrieval_model) as calls:
        assert scorer.score(images[:2], [[], []]) == [[], []]
    assert calls == []  # nothing to score, no vision pass


def test_chunking_gives_the_same_scores(retrieval_model, tokenizer, images):
    whole = Scorer(retrieval_model, tokenizer).score(images[:3], TEXTS)
    for chunk in (1, 2, 4):
        with vision_calls(retrieval_model) as calls:
            chunked = Scorer(retrieval_model, tokenizer, max_texts_per_forward=chunk).score(images[:3], TEXTS)
        assert calls == [3]
        for got, expected in zip(chunked, whole):
            assert [s.itm_prob for s in got] == pytest.approx([s.itm_prob for s in expected], abs=1e-6)
            assert [s.itc_sim for s in got] == pytest.approx([s.itc_sim for s in expected], abs=1e-6)


def test_long_texts_are_truncated(retrieval_model, tokenizer, images):
    text = " ".join(TEXTS[0])
    short = Scorer(retrieval_model, tokenizer, max_text_length=6)
    # Beyond the first 6 tokens nothing counts.
    assert short.score(images[:1], [[text]]) == short.score(images[:1], [[text + " and a dog running on grass"]])
    full = Scorer(retrieval_model, tokenizer, max_text_length=35)
    assert full.score(images[:1], [[text]]) != short.score(images[:1], [[text]])


def test_bfloat16(retrieval_model, tokenizer, images):
    reference = Scorer(retrieval_model, tokenizer).score(images[:3], TEXTS)
    scores = Scorer(copy.deepcopy(retrieval_model), tokenizer, dtype=torch.bfloat16).score(images[:3], TEXTS)
    for got, expected in zip(scores, reference):
        assert [s.itm_prob for s in got] == pytest.approx([s.itm_prob for s in expected], abs=0.01)
        assert [s.itc_sim for s in got] == pytest.approx([s.itc_sim for s in expected], abs=0.01)


def test_bad_input_is_named(retrieval_model, tokenizer, images):
    scorer = Scorer(retrieval_model, tokenizer)
    with pytest.raises(ValueError, match="2 text lists for 3 images"):
        scorer.score(images[:3], TEXTS[:2])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a list of strings, got str"):
        scorer.score(images[:2], [["ok"], "not a list"])
    with pytest.raises(TypeError, match=r"texts\[0\]\[1\] must be a string"):
        scorer.score(images[:1], [["ok", None]])
