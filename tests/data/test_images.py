"""BLIP preprocessing against transformers, and batches that decode and transform together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.config import ImageConfig
from capfilt.data.images import BlipRandAugment, decode_batch, eval_transform, image_transform, train_transform
from tests.data.test_decode import encode, header_only_png, noise_jpeg

# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, shape", [(32, (50, 70)), (64, (200, 150)), (48, (13, 97))])
def test_eval_transform_matches_blip_image_processor(size, shape):
    from transformers import BlipImageProcessor

    pixels = np.random.default_rng(size).integers(0, 256, (*shape, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ours = eval_transform(size)(image)
    processor = BlipImageProcessor(size={"height": size, "width": size})
    reference = processor(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == reference.shape == (3, size, size)
    # Same ops in the same order; the measured difference is <= 5e-7 (float32 rounding of the fused
    # (x - 255 mean) / (255 std)).
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_eval_transform_squashes_without_crop():
    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 3, 30))  # a blue strip at the far left survives only without a crop
    out = eval_transform(30)(image)
    assert out.shape == (3, 30, 30)
    assert out[2, 15, 0] > out[0, 15, 0]


def test_train_transform_shape_and_seed():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    transform = train_transform(32, scale=(0.5, 1.0))
    first, again, other = transform(image, seed=7), transform(image, seed=7), transform(image, seed=8)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # A seeded call leaves the caller's random stream where it was, and draws what torch.manual_seed would.
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    transform(image, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        reference = transform(image)
    assert torch.equal(first, reference)
    assert set(BlipRandAugment._AUGMENTATION_SPACE) == {
        "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    }  # fmt: skip


def test_decode_batch_keeps_good_images_and_names_bad_ones():
    good = encode(Image.new("RGB", (30, 20), "green"), "PNG")
    batch = [good, None, b"garbage", noise_jpeg(), header_only_png(3000, 3000)]
    pixels, ok, failures = decode_batch(batch, max_pixels=1_000_000, transform=eval_transform(16))
    assert pixels.shape == (2, 3, 16, 16)
    assert ok == [0, 3]
    assert [(f.index, f.reason) for f in failures] == [
        (1, "decode_error: missing"),
        (2, "decode_error: not_an_image"),
        (4, "decode_error: too_many_pixels"),
    ]
    assert len(ok) + len(failures) == len(batch)


def test_decode_batch_of_only_bad_images_is_empty_not_an_error():
    pixels, ok, failures = decode_batch([b"", None], max_pixels=100, transform=eval_transform(16))
    assert pixels.shape == (0, 3, 16, 16) and ok == [] and len(failures) == 2


def test_transforms_from_config():
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    config = ImageConfig(train_scale=(0.2, 1.0))
    assert torch.equal(image_transform(config, 24, train=False)(image), eval_transform(24)(image))
    train = image_transform(config, 24, train=True)
    assert train(image, seed=1).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="train_scale"):
        ImageConfig(train_scale=(0.9, 0.5))
