"""Caption cleaning (capfilt/data/text.py) on the captions web data really has."""

from __future__ import annotations

import pytest

from capfilt.data.text import CaptionError, clean_caption, pre_caption


def test_pre_caption_is_blips_cleaning():
    raw = '  A Dog!!  jumps (over) the "fence"; #2 :~*.  \n'
    assert pre_caption(raw) == "a dog jumps over the fence 2"


def test_pre_caption_keeps_other_punctuation():
    assert pre_caption("Kid's toy, 3-wheeled?") == "kid's toy, 3-wheeled?"


@pytest.mark.parametrize(
    "value, reason",
    [
        (None, "caption_missing"),
        (float("nan"), "caption_missing"),
        (42, "caption_not_text"),
        (["a", "list"], "caption_not_text"),
        (b"\xff\xfe not utf-8", "caption_not_text"),
        ("", "caption_empty"),
        ("  .!!  ~~ ", "caption_empty"),
    ],
    ids=["none", "nan", "int", "list", "bad-bytes", "empty", "only-punctuation"],
)
def test_bad_captions_are_rejected_with_a_reason(value, reason):
    with pytest.raises(CaptionError) as caught:
        clean_caption(value)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


def test_utf8_bytes_are_decoded():
    assert clean_caption("Café au lait.".encode("utf-8")) == "café au lait"


def test_ten_thousand_words_are_truncated_not_rejected():
    caption = " ".join(f"word{i}" for i in range(10_000))
    cleaned = clean_caption(caption, max_words=30)
    assert cleaned.split(" ") == [f"word{i}" for i in range(30)]


def test_word_limit_is_configurable():
    assert clean_caption("one two three four", max_words=2) == "one two"


def test_trained_tokenizer_is_a_function_of_the_corpus(tmp_path):
    from capfilt.data.text import load_tokenizer, train_tokenizer
    from capfilt.models.tokens import special_ids

    corpus = ["a red circle left of a blue square", "two green stars above a red circle", "click to enlarge"] * 5
    first = train_tokenizer(corpus, tmp_path / "a", vocab_size=60)
    second = train_tokenizer(list(reversed(corpus)), tmp_path / "b", vocab_size=60)
    assert first.get_vocab() == second.get_vocab()
    loaded = load_tokenizer(tmp_path / "a")
    ids = special_ids(loaded)
    assert ids["pad"] == 0 and loaded.bos_token == "[DEC]" and ids["enc"] == ids["dec"] + 1 == len(loaded) - 1
    # Frequent words are whole tokens; unseen words still tokenize from characters.
    assert loaded.tokenize("red circle") == ["red", "circle"]
    assert "[UNK]" not in loaded.tokenize("cobalt")
