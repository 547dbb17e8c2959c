"""Tiny random BLIP models for the inference tests, built in code around the session tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipTextConfig,
    BlipVisionConfig,
)

from capfilt.models.tokens import special_ids

IMAGE_SIZE = 32


def tiny_blip_config(tokenizer) -> BlipConfig:
    ids = special_ids(tokenizer)
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        encoder_hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=ids["dec"],
        pad_token_id=ids["pad"],
        sep_token_id=ids["sep"],
        eos_token_id=ids["sep"],
    )
    vision = BlipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        # A wide init so that different images give visibly different text distributions.
        initializer_range=0.2,
    )
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)


@pytest.fixture(scope="module")
def caption_model(tokenizer) -> BlipForConditionalGeneration:
    torch.manual_seed(0)
    return BlipForConditionalGeneration(tiny_blip_config(tokenizer)).eval()


@pytest.fixture(scope="module")
def retrieval_model(tokenizer) -> BlipForImageTextRetrieval:
    torch.manual_seed(1)
    return BlipForImageTextRetrieval(tiny_blip_config(tokenizer)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Six distinct images."""
    generator = torch.Generator().manual_seed(123)
    return torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
