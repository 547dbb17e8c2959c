"""Caption cleaning and the tokenizer.

``pre_caption`` is BLIP's cleaning (data/utils.py), applied to web, synthetic and human captions
alike. The tokenizer is BERT-uncased WordPiece plus ``[DEC]`` (bos) and ``[ENC]``; offline it is
trained on a caption corpus with the ``tokenizers`` library and saved as a transformers tokenizer, so
our exports load it the same way as ``bert-base-uncased`` or a published BLIP checkpoint's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

from capfilt.models.tokens import CLS_TOKEN, DEC_TOKEN, ENC_TOKEN, PAD_TOKEN, SEP_TOKEN

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


class CaptionError(ValueError):
    """A caption that cannot be used; ``reason`` is the reject reason recorded for the row."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lowercase, replace ``.!"()*#:;~`` by spaces, collapse whitespace, strip, keep ``max_words`` words."""
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def clean_caption(value: object, max_words: int = 30) -> str:
    """``pre_caption`` for untrusted input: raises :class:`CaptionError` for unusable values."""
    if value is None:
        raise CaptionError("caption_missing")
    if isinstance(value, float) and math.isnan(value):
        raise CaptionError("caption_missing", "NaN")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CaptionError("caption_not_text", f"bytes that are not UTF-8 ({error.reason})") from None
    if not isinstance(value, str):
        raise CaptionError("caption_not_text", type(value).__name__)
    cleaned = pre_caption(value, max_words)
    if not cleaned:
        raise CaptionError("caption_empty", repr(value[:80]))
    return cleaned


def train_tokenizer(corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 4000, model_max_length: int = 512):
    """Build an uncased WordPiece tokenizer from ``corpus`` and save it as a transformers tokenizer.

    The vocabulary is every character seen (alone and as a ``##`` continuation), then whole words by
    frequency (ties broken alphabetically) up to ``vocab_size``, so any word still tokenizes. Unlike the
    ``tokenizers`` WordPiece trainer, whose merge ties fall in hash order, the result is a function of
    the corpus alone, which the same-seed-same-run promise needs.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in corpus:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    specials = [PAD_TOKEN, "[UNK]", CLS_TOKEN, SEP_TOKEN, "[MASK]"]
    characters = sorted({character for word in words for character in word})
    vocab_list = specials + characters + [f"##{character}" for character in characters]
    for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab_list) >= vocab_size:
            break
        if len(word) > 1:
            vocab_list.append(word)
    vocab = {token: index for index, token in enumerate(vocab_list)}

    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0",
        pair=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0 $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, vocab[CLS_TOKEN]), (SEP_TOKEN, vocab[SEP_TOKEN])],
    )
    tokenizer = BertTokenizerFast(tokenizer_object=backend, do_lower_case=True, model_max_length=model_max_length)
    tokenizer = _add_mode_tokens(tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _add_mode_tokens(tokenizer):
    # As BLIP's init_tokenizer: [DEC] becomes bos (id = len(vocab)), [ENC] the next id.
    if tokenizer.convert_tokens_to_ids(DEC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    elif tokenizer.bos_token != DEC_TOKEN:
        tokenizer.bos_token = DEC_TOKEN
    if tokenizer.convert_tokens_to_ids(ENC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def load_tokenizer(name_or_path: str | Path, revision: str | None = None):
    """A hub id (``bert-base-uncased``, ``Salesforce/blip-itm-base-coco``) or a local directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
    return _add_mode_tokens(tokenizer)
