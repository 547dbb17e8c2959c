"""Tiny MEDs and batches for the model tests (32 px images, the `tiny` preset otherwise)."""

from __future__ import annotations

import pytest
import torch

from capfilt.config import MedConfig
from capfilt.models.med import MED

IMAGE_SIZE = 32
# Rows 0 and 2 show the same image with the same caption; rows 3 and 4 share a caption only.
TEXTS = [
    "a red circle",
    "a blue square left of a star",
    "a red circle",
    "two green triangles",
    "two green triangles",
    "a small purple square",
]
IMAGE_IDS = [0, 1, 0, 2, 3, 4]


def tiny_config(**overrides) -> MedConfig:
    # Queue of 960 = 160 batches of len(TEXTS); no dropout so repeated forwards agree.
    fields = {"preset": "tiny", "vision": {"image_size": IMAGE_SIZE}, "text": {"dropout": 0.0}, "queue_size": 960}
    fields.update(overrides)
    return MedConfig(**fields)


@pytest.fixture
def make_med(tokenizer):
    def make(seed: int = 0, **overrides) -> MED:
        torch.manual_seed(seed)
        return MED.from_config(tiny_config(**overrides), tokenizer)

    return make


@pytest.fixture
def batch(tokenizer):
    """(pixel_values, input_ids, attention_mask, image_ids) for TEXTS, with pixels fixed per image id."""
    text = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(max(IMAGE_IDS) + 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    image_ids = torch.tensor(IMAGE_IDS)
    return images[image_ids], text.input_ids, text.attention_mask, image_ids
