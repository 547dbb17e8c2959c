"""Captioning metrics: corpus BLEU-4 and CIDEr-D as pycocoevalcap computes them, and caption accuracy.

Text is tokenised like the COCO toolkit without its Java: lowercase, BLIP's ``pre_caption`` cleaning,
commas and question marks split off, whitespace tokens, tokens made only of punctuation dropped
(PTBTokenizer drops the same punctuation tokens).

- BLEU (Papineni et al.; pycocoevalcap ``bleu_scorer``): n-gram counts clipped by the largest count in
  any one reference, summed over the corpus; brevity penalty from the summed candidate length and the
  summed lengths of the reference closest in length to each candidate (ties: the shorter).
  pycocoevalcap's smoothing constants are kept, so an n-gram order with no match gives ~1e-6, not 0.
- CIDEr-D (Vedantam et al.; pycocoevalcap ``cider_scorer``): tf-idf vectors of 1..4-grams with document
  frequencies over the references of the evaluated images, per-order cosine with the candidate's
  weights clipped at the reference's, a Gaussian length penalty (sigma 6), averaged over orders and
  references and scaled by 10. Papers print the result x100 (BLIP ViT-B on COCO: 133.3 = 1.333 here).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from capfilt.data.text import pre_caption

_SPLIT_OFF = re.compile(r"[,?]")
_PUNCTUATION_ONLY = re.compile(r"^[^\w]+$")
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing


def tokenize(text: str) -> list[str]:
    """Caption -> lowercase word tokens, punctuation removed."""
    text = _SPLIT_OFF.sub(" ", pre_caption(text, max_words=1_000_000))
    return [token for token in text.split() if not _PUNCTUATION_ONLY.match(token)]


def ngrams(tokens: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1 .. BLEU-``max_n`` of one candidate per item against its references."""
    _check(candidates, references)
    guess, correct = [0] * max_n, [0] * max_n
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        tokens = tokenize(candidate)
        ref_tokens = [tokenize(ref) for ref in refs]
        clip: Counter = Counter()
        for ref in ref_tokens:
            clip |= ngrams(ref, max_n)  # | keeps the largest count of each n-gram
        for gram, count in ngrams(tokens, max_n).items():
            correct[len(gram) - 1] += min(count, clip[gram])
        for n in range(1, max_n + 1):
            guess[n - 1] += max(len(tokens) - n + 1, 0)
        candidate_length += len(tokens)
        reference_length += min((abs(len(ref) - len(tokens)), len(ref)) for ref in ref_tokens)[1]

    ratio = (candidate_length + _TINY) / (reference_length + _SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + _TINY) / (guess[n] + _SMALL)
        scores.append(product ** (1 / (n + 1)) * brevity)
    return scores


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D over the corpus (the mean) and per item."""
    _check(candidates, references)
    ref_counts = [[ngrams(tokenize(ref), max_n) for ref in refs] for refs in references]
    document_frequency: Counter = Counter()
    for counts in ref_counts:
        document_frequency.update(set().union(*counts))  # an n-gram counts once per image
    log_images = math.log(len(candidates))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        weights: list[dict] = [{} for _ in range(max_n)]
        for gram, term_frequency in counts.items():
            # An n-gram no reference has gets document frequency 1, as pycocoevalcap does.
            weights[len(gram) - 1][gram] = term_frequency * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        # pycocoevalcap measures length in bigrams (words - 1 for any non-empty caption).
        return weights, norms, sum(c for gram, c in counts.items() if len(gram) == 2)

    scores = []
    for candidate, refs in zip(candidates, ref_counts):
        weights, norms, length = vector(ngrams(tokenize(candidate), max_n))
        total = [0.0] * max_n
        for ref in refs:
            ref_weights, ref_norms, ref_length = vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, ref_weights[n].get(g, 0.0)) * ref_weights[n].get(g, 0.0) for g, w in weights[n].items())
                if norms[n] and ref_norms[n]:
                    dot /= norms[n] * ref_norms[n]
                total[n] += dot * penalty
        scores.append(10.0 * sum(total) / max_n / len(refs))
    return sum(scores) / len(scores), scores


def caption_accuracy(captions: Sequence[str], scenes: Sequence[str | None]) -> float | None:
    """Fraction of captions the generated world's checker finds true of their scene; None without scenes."""
    from capfilt.data.world import check_caption

    judged = [bool(check_caption(caption, scene)) for caption, scene in zip(captions, scenes, strict=True) if scene]
    return sum(judged) / len(judged) if judged else None


def caption_metrics(
    captions: Sequence[str], references: Sequence[Sequence[str]], scenes: Sequence[str | None] | None = None
) -> dict[str, float | None]:
    cider, _ = cider_d(captions, references)
    return {
        "bleu4": bleu(captions, references)[3],
        "cider": cider,
        "caption_accuracy": caption_accuracy(captions, scenes) if scenes is not None else None,
    }
