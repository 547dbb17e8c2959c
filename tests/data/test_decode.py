"""Decoding real bad inputs built in code: every bad input gets its reason, every mode becomes RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from capfilt.data.decode import DecodeError, decode_image, to_rgb


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` with almost no pixel data: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def assert_close(pixel, expected, tolerance=8):
    assert all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected)), (pixel, expected)


# --------------------------------------------------------------------------------------------------
# Rejects
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "decode_error: missing"),
        (b"", "decode_error: empty"),
        ("not bytes", "decode_error: not_bytes"),
        (b"<html>404 not found</html>", "decode_error: not_an_image"),
        (noise_jpeg()[:600], "decode_error: truncated"),
        (encode(Image.new("RGB", (40, 40), "red"), "PNG")[:-30], "decode_error: truncated"),
    ],
    ids=["none", "zero-bytes", "str", "html", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_give_their_reason(data, reason):
    with pytest.raises(DecodeError) as caught:
        decode_image(data, max_pixels=10**6)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


def test_corrupt_header_is_corrupt():
    data = bytearray(encode(Image.new("RGB", (8, 8), "red"), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: the chunk CRC no longer matches
    with pytest.raises(DecodeError) as caught:
        decode_image(bytes(data), max_pixels=10**6)
    assert caught.value.reason == "decode_error: corrupt"


def test_decompression_bomb_is_rejected_from_the_header():
    bomb = header_only_png(30_000, 30_000)
    assert len(bomb) < 200  # tiny file, 900 M declared pixels
    with pytest.raises(DecodeError) as caught:
        decode_image(bomb)  # default limit
    assert caught.value.reason == "decode_error: too_many_pixels"


def test_pixel_limit_is_checked_before_decoding():
    # 5000 x 5000 is under Pillow's own limit, so only our header check can name these numbers;
    # the file holds no pixel data, so a decode would have failed as truncated instead.
    with pytest.raises(DecodeError) as caught:
        decode_image(header_only_png(5000, 5000), max_pixels=1_000_000)
    assert caught.value.reason == "decode_error: too_many_pixels"
    assert "5000x5000 > limit 1000000" in caught.value.detail


def test_random_corruption_never_raises_another_type():
    original = noise_jpeg(32, 32)
    rng = np.random.default_rng(1)
    outcomes = set()
    for _ in range(40):
        data = bytearray(original)
        for position in rng.integers(0, len(data), 6):
            data[position] = int(rng.integers(0, 256))
        try:
            image = decode_image(bytes(data), max_pixels=10**6)
            assert image.mode == "RGB"
            outcomes.add("ok")
        except DecodeError as error:
            outcomes.add(error.reason)
    assert outcomes  # every outcome was an RGB image or a DecodeError


# --------------------------------------------------------------------------------------------------
# Modes, orientation, frames
# --------------------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    image = decode_image(encode(cyan, "JPEG", quality=95))
    assert image.mode == "RGB"
    assert_close(image.getpixel((8, 8)), (0, 255, 255))


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_image(data)
    assert image.mode == "RGB"
    # Pillow's convert would give [0, 255, 255, 255]
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(image)[0, :, 1].tolist() == [0, 1, 128, 255]


def test_exif_orientation_swaps_size_and_moves_pixels():
    stored = Image.new("RGB", (40, 20), "red")
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert image.size == (20, 40)
    assert_close(image.getpixel((10, 5)), (255, 0, 0), 30)  # the left half is now on top
    assert_close(image.getpixel((10, 35)), (0, 0, 255), 30)


def test_palette_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (20, 10), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.paste(1, (10, 0, 20, 10))
    image = decode_image(encode(palette_image, "PNG", transparency=0))
    assert image.getpixel((2, 2)) == (255, 255, 255)  # transparent red -> white, not red, not black
    assert image.getpixel((15, 2)) == (0, 0, 255)


def test_la_and_rgba_are_composited_on_white():
    la = Image.new("LA", (20, 10), (0, 0))
    la.paste((0, 255), (10, 0, 20, 10))
    image = decode_image(encode(la, "PNG"))
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((15, 2)) == (0, 0, 0)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    pixel = decode_image(encode(rgba, "PNG")).getpixel((1, 1))
    assert pixel[0] == 255 and 125 <= pixel[1] <= 129 and pixel[1] == pixel[2]


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode_image(data)
    assert image.mode == "RGB"
    assert image.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F"), (128, 128, 128)),
        (Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32), mode="F"), (200, 200, 200)),
        (Image.new("I", (4, 4), 65535), (255, 255, 255)),
        (Image.new("YCbCr", (4, 4), (255, 128, 128)), (255, 255, 255)),
    ],
    ids=["1", "L", "F-unit", "F-255", "I", "YCbCr"],
)
def test_other_modes_become_rgb(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert_close(rgb.getpixel((1, 1)), expected, 1)

