"""Drawing scenes with PIL: a cached background texture, then one polygon or ellipse per object.

Fast by construction: textures are made once per (pattern, tint, variant, size) with numpy and
copied per image; objects are drawn at the output size (no supersampling; JPEG softens the edges).
"""

from __future__ import annotations

import io
import math
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from capfilt.data.world.scene import COLOURS, GRID, SIZE_FRACTION, TINTS, Background, Scene, SceneObject


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [
        ((1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / points - math.pi / 2),
         (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / points - math.pi / 2))
        for k in range(2 * points)
    ]


# Outlines in units of the object's radius, scaled so the shapes look about equally big.
_SHAPES = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.1), (1.05, 0.75), (-1.05, 0.75)],
    "star": [(1.15 * x, 1.15 * y) for x, y in _star()],
    "cross": [(-0.35, -1), (0.35, -1), (0.35, -0.35), (1, -0.35), (1, 0.35), (0.35, 0.35),
              (0.35, 1), (-0.35, 1), (-0.35, 0.35), (-1, 0.35), (-1, -0.35), (-0.35, -0.35)],
}


@lru_cache(maxsize=256)
def _texture(pattern: str, tint: str, variant: int, size: int) -> Image.Image:
    base = np.array(TINTS[tint], dtype=np.int16)
    # The second shade is a grey step (lighter on dark tints, darker on light ones), never an object hue.
    shade = base + (40 if base.mean() < 100 else -35)
    rng = np.random.default_rng(zlib.crc32(f"{pattern}/{tint}/{variant}/{size}".encode()))
    pixels = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 10)
    if pattern == "striped":
        # variants: horizontal, vertical, and the two diagonals
        axis = (yy, xx, xx + yy, xx - yy)[variant % 4]
        pixels[(axis // (period // 2)) % 2 == 0] = shade
    elif pattern == "dotted":
        offset = variant * period // 4
        radius = max(1.0, period / 5)
        mask = ((xx + offset) % period - period / 2) ** 2 + ((yy + offset) % period - period / 2) ** 2 <= radius**2
        pixels[mask] = shade
    elif pattern == "noisy":
        pixels = pixels + rng.normal(0.0, 22.0, size=(size, size, 1)).round().astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def background_image(background: Background, size: int) -> Image.Image:
    return _texture(background.pattern, background.tint, background.variant, size).copy()


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    cx = ((obj.col + 0.5) / GRID + obj.dx) * size
    cy = ((obj.row + 0.5) / GRID + obj.dy) * size
    radius = SIZE_FRACTION[obj.size] * size / 2
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon([(cx + radius * x, cy + radius * y) for x, y in _SHAPES[obj.shape]], fill=fill)


def render(scene: Scene, size: int) -> Image.Image:
    image = background_image(scene.background, size)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, size)
    return image


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
