"""Untrusted image bytes to an RGB ``PIL.Image``: the one place capfilt decodes images.

:func:`decode_image` turns bytes into an RGB ``PIL.Image`` or raises :class:`DecodeError`, whose
``reason`` is the reject reason recorded for the row (the full table of reasons is in
:mod:`capfilt.data.shards`). It never raises anything else and never drops an image silently:

- the pixel limit is checked against the size in the header, before any pixel is decoded
  (decompression bombs), and Pillow's own ``DecompressionBombError`` maps to the same reason;
- ``img.load()`` forces the full decode, so a truncated file fails here and not inside a model batch;
- EXIF orientation is applied; a broken EXIF block leaves the pixels as stored instead of losing
  the image;
- every mode becomes RGB: alpha (RGBA, LA, PA, La, RGBa, palette or L/RGB with a transparency key) is
  composited on white; 16-bit integer images are scaled to 8 bits (Pillow's ``convert`` clips them);
  animated images give their first frame.

Conversions that need a convention: mode ``I`` is read as 16-bit (what PNG/TIFF decoders give it
for); mode ``F`` as [0, 1] when its values fit there, else [0, 255]; CMYK uses Pillow's conversion,
without ICC profiles.

Only Pillow and numpy: the Ray tasks that read, count and check shards import this module, and
torch/torchvision (seconds per worker process) stay out of them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from capfilt.config import ImageConfig

DEFAULT_MAX_PIXELS = ImageConfig().max_pixels

_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class DecodeError(ValueError):
    """Bytes that do not give a usable image.

    ``reason`` is a stable category (``decode_error: truncated``) so rejects group by it; ``detail`` holds
    the specifics (``30000x30000 > limit 67108864``); ``str(error)`` is ``"reason (detail)"``.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` to an RGB image with EXIF orientation applied; raises :class:`DecodeError`."""
    if data is None:
        raise DecodeError("decode_error: missing", "no image bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("decode_error: not_bytes", type(data).__name__)
    if len(data) == 0:
        raise DecodeError("decode_error: empty", "0 bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecodeError("decode_error: too_many_pixels", str(error)) from None
    except UnidentifiedImageError:
        head = bytes(data[:12])
        if _looks_like_image(head):  # a known signature that Pillow cannot parse: a broken image
            raise DecodeError("decode_error: corrupt", f"unreadable header, first bytes {head!r}") from None
        raise DecodeError("decode_error: not_an_image", f"{len(data)} bytes, first {head!r}") from None
    except Exception as error:  # noqa: BLE001 -- Pillow plugins raise many types on bad headers
        raise _as_decode_error(error) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError("decode_error: too_many_pixels", f"{width}x{height} > limit {max_pixels}")
    if width == 0 or height == 0:
        raise DecodeError("decode_error: corrupt", f"zero-sized image {width}x{height}")
    try:
        image.load()  # the full decode: truncated data fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecodeError("decode_error: too_many_pixels", str(error)) from None
    except Exception as error:  # noqa: BLE001
        raise _as_decode_error(error) from None
    try:
        image = _apply_orientation(image)
        return to_rgb(image)
    except DecodeError:
        raise
    except Exception as error:  # noqa: BLE001
        raise _as_decode_error(error) from None


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(head: bytes) -> bool:
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _as_decode_error(error: Exception) -> DecodeError:
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return DecodeError("decode_error: truncated", message)
    if isinstance(error, MemoryError):
        return DecodeError("decode_error: too_many_pixels", message)
    return DecodeError("decode_error: corrupt", message)


def _apply_orientation(image: Image.Image) -> Image.Image:
    # exif_transpose also returns a single-frame copy, so animated images end up as their first frame.
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 -- a broken EXIF block: keep the pixels as stored, not lose the image
        image.seek(0)
        return image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha over white, 16-bit scaled (not clipped) to 8 bits."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # 16-bit samples to 8 bits by v / 257 (65535 -> 255, 257 -> 1); mode I is read as 16-bit too,
        # which is what PNG and TIFF decoders give it for.
        values = np.asarray(image).astype(np.float64)
        eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if mode == "F":
        # Float images: [0, 1] when they fit there, else taken as [0, 255].
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 and values.min() >= 0.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # CMYK, YCbCr, P, L, 1, RGBX, ...
    except (ValueError, OSError) as error:
        raise DecodeError("decode_error: unsupported_mode", f"{mode}: {error}") from None
