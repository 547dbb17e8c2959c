"""Batched inference with plain transformers BLIP models: the captioner and the filter's scorer."""

from capfilt.inference.captioner import Captioner
from capfilt.inference.scorer import Scorer, TextScore

__all__ = ["Captioner", "Scorer", "TextScore"]
