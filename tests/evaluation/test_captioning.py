"""BLEU and CIDEr-D against hand-computed values, tokenisation, and caption accuracy with the checker."""

from __future__ import annotations

import math
import random

import pytest

from capfilt.evaluation.captioning import bleu, caption_accuracy, caption_metrics, cider_d, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red, circle. Left-of the STAR?!") == ["a", "red", "circle", "left-of", "the", "star"]
    assert tokenize("  - ... ") == []


def test_bleu_hand_computed():
    # Unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3; equal lengths, no brevity penalty.
    scores = bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert scores[0] == pytest.approx(5 / 6)
    assert scores[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert scores[2] == pytest.approx(0.5)  # (5/6 * 3/5 * 1/4) ** (1/3)
    assert scores[3] == pytest.approx(0.0, abs=1e-3)


def test_bleu_identical_candidate_scores_one():
    refs = [["a red circle left of a blue square"] * 3, ["two green triangles above a star"]]
    assert bleu([refs[0][0], refs[1][0]], refs)[3] == pytest.approx(1.0)


def test_bleu_brevity_penalty_and_closest_reference_length():
    # Precisions are 1; candidate 2 words, reference 6: BP = exp(1 - 6/2).
    assert bleu(["the cat"], [["the cat sat on the mat"]], max_n=2)[1] == pytest.approx(math.exp(-2))
    # 4 words between references of 3 and 5: the closest-length tie goes to the shorter one, so no penalty.
    assert bleu(["a b c d"], [["a b c", "a b c d e"]], max_n=1)[0] == pytest.approx(1.0)
    # References of 2 and 5 words: the 5-word one is closer to 4, so a penalty exp(1 - 5/4).
    assert bleu(["a b c d"], [["a b", "a b c d e"]], max_n=1)[0] == pytest.approx(math.exp(1 - 5 / 4))


def test_bleu_clips_by_the_largest_count_in_one_reference():
    # "the" four times; at most twice in any one reference: 2/4. Closest reference length 3 < 4: no penalty.
    assert bleu(["the the the the"], [["the cat", "the the dog"]], max_n=1)[0] == pytest.approx(0.5)


def test_bleu_is_a_corpus_statistic():
    # Counts are summed before dividing: 2 of 6 unigrams match overall, not the mean of 1 and 0.
    assert bleu(["a b", "c d e f"], [["a b"], ["w x y z"]], max_n=1)[0] == pytest.approx(1 / 3)


def test_bleu_checks_its_input():
    with pytest.raises(ValueError, match="2 candidates for 1"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        bleu(["a"], ["a"])


def test_cider_d_hand_computed():
    # Two images; idf = log 2 for every n-gram here (each in one image's references, or in none).
    # Image A: identical to its reference -> unigram and bigram cosines 1, no 3/4-grams: 10 * 2/4 = 5.
    # Image B: "c x" vs "c d" -> unigram cosine 1/2, bigram 0: 10 * 0.5/4 = 1.25.
    mean, per_item = cider_d(["a b", "c x"], [["a b"], ["c d"]])
    assert per_item == pytest.approx([5.0, 1.25])
    assert mean == pytest.approx(3.125)


def test_cider_d_clipping_and_length_penalty():
    # "a b a" vs "a b": unigram weights (2l, l) vs (l, l), clipped dot 2l^2 -> 2/sqrt(10); bigrams
    # {ab, ba} vs {ab} -> 1/sqrt(2); length (in bigrams) 2 vs 1 -> penalty exp(-1/72).
    _, per_item = cider_d(["a b a", "c d"], [["a b"], ["c d"]])
    expected = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per_item[0] == pytest.approx(expected)


def test_cider_d_identical_captions_and_references_averaging():
    refs = [["one two three four five"], ["six seven eight nine ten"], ["red green blue yellow pink"]]
    mean, _ = cider_d([r[0] for r in refs], refs)
    assert mean == pytest.approx(10.0)  # every order's cosine is 1
    # Three-word captions have no 4-grams: (1 + 1 + 1 + 0) / 4 * 10.
    assert cider_d(["a b c", "d e f"], [["a b c"], ["d e f"]])[0] == pytest.approx(7.5)
    # Scores average over references: matching one of two (and sharing nothing with the other) halves it.
    _, per_item = cider_d(["a b c", "d e f"], [["a b c", "x y z"], ["d e f"]])
    assert per_item[0] == pytest.approx(3.75)


def test_cider_d_gives_nothing_for_ngrams_every_image_has():
    # Document frequency = number of images: idf 0, so shared words carry no weight.
    assert cider_d(["a b", "a b"], [["a b"], ["a b"]])[0] == pytest.approx(0.0)


def test_caption_accuracy_uses_the_world_checker():
    from capfilt.data.world import human_captions, sample_scene

    rng = random.Random(0)
    scenes = [sample_scene(rng, 1, 2, 0.0).to_json() for _ in range(2)]
    from capfilt.data.world import Scene

    true_caption = human_captions(Scene.from_json(scenes[0]), rng, 1)[0]
    assert caption_accuracy([true_caption, "click to enlarge"], scenes) == 0.5
    assert caption_accuracy([true_caption], [None]) is None  # real data: no ground truth


def test_caption_metrics_keys():
    metrics = caption_metrics(["a b c d", "e f g h"], [["a b c d"], ["e f g x"]])
    assert set(metrics) == {"bleu4", "cider", "caption_accuracy"}
    assert metrics["caption_accuracy"] is None and 0 < metrics["bleu4"] < 1
