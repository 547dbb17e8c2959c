"""Shared fixtures: small things built in code, never downloaded."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep each test process to one intra-op thread so parallel work (Ray) is not starved.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOY_CORPUS = [
    "a red circle left of a blue square",
    "two green triangles above a yellow star on a striped background",
    "a small purple square below a large orange circle",
    "a picture of a dog running on grass",
    "click to enlarge",
    "img 2041 jpg",
    "three blue stars and a red triangle",
    "a large white circle right of a small black square",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from capfilt.data.text import train_tokenizer

    return train_tokenizer(TOY_CORPUS * 20, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)
