"""Scenes: what is in a generated image, sampled from a seed and serialised to JSON.

A scene is 1-4 objects on a 3x3 grid of cells over a textured background. Objects sit in distinct
cells, so every relation between two objects is decided by their cells (different column: one is
left of the other; different row: one is above the other) and never depends on a pixel or two of
jitter. The centre offsets inside a cell are kept in the scene only so the JSON reproduces the image.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Saturated hues that stay apart after JPEG's chroma subsampling and against every background tint.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (140, 60, 190),
    "pink": (245, 120, 190),
}
SIZES = ("small", "large")
# Fraction of the image side an object spans; a 3x3 cell is 1/3.
SIZE_FRACTION = {"small": 0.17, "large": 0.27}
# The widest outline (the star) reaches this many radii from the centre.
OUTLINE_EXTENT = 1.15
PATTERNS = ("plain", "striped", "dotted", "noisy")
# Background tints use words no object colour uses, so "white" always talks about the background.
TINTS = {"white": (236, 236, 236), "grey": (128, 128, 128), "black": (28, 28, 28)}
TEXTURE_VARIANTS = 4
RELATIONS = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
GRID = 3


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    # Centre offset from the cell centre, in fractions of the image side.
    dx: float = 0.0
    dy: float = 0.0


@dataclass(frozen=True)
class Background:
    pattern: str
    tint: str
    variant: int = 0


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background

    def to_json(self) -> str:
        # vars(), not dataclasses.asdict: asdict deep-copies and was a fifth of the generation time.
        data = {"objects": [vars(obj) for obj in self.objects], "background": vars(self.background)}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        try:
            data = json.loads(text)
            objects = tuple(SceneObject(**obj) for obj in data["objects"])
            background = Background(**data["background"])
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"not a scene JSON ({error}): {text[:120]!r}") from None
        scene = cls(objects, background)
        scene.validate()
        return scene

    def validate(self) -> None:
        cells = set()
        for obj in self.objects:
            if obj.shape not in SHAPES or obj.colour not in COLOURS or obj.size not in SIZES:
                raise ValueError(f"unknown attribute in scene object {obj}")
            if not (0 <= obj.row < GRID and 0 <= obj.col < GRID) or (obj.row, obj.col) in cells:
                raise ValueError(f"scene object {obj} is off the grid or shares a cell")
            cells.add((obj.row, obj.col))
        if self.background.pattern not in PATTERNS or self.background.tint not in TINTS:
            raise ValueError(f"unknown background {self.background}")


def holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` of ``b`` (``holds("left", a, b)``: a is left of b)."""
    if relation == "left":
        return a.col < b.col
    if relation == "right":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}")


def sample_scene(
    rng: random.Random,
    min_objects: int = 1,
    max_objects: int = 3,
    duplicate_probability: float = 0.25,
) -> Scene:
    """Objects in distinct cells; a new object repeats an earlier one's colour and shape with
    ``duplicate_probability`` so captions need counts ("two green triangles")."""
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(GRID * GRID), count)
    objects: list[SceneObject] = []
    for cell in cells:
        if objects and rng.random() < duplicate_probability:
            twin = rng.choice(objects)
            shape, colour = twin.shape, twin.colour
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        size = rng.choice(SIZES)
        # Jitter inside the cell, leaving a margin so neighbours never overlap.
        slack = max(0.0, (1.0 / GRID - OUTLINE_EXTENT * SIZE_FRACTION[size]) / 2 - 0.005)
        dx, dy = (round(rng.uniform(-slack, slack), 3) for _ in range(2))
        objects.append(SceneObject(shape, colour, size, cell // GRID, cell % GRID, dx, dy))
    background = Background(rng.choice(PATTERNS), rng.choice(tuple(TINTS)), rng.randrange(TEXTURE_VARIANTS))
    return Scene(tuple(objects), background)
