"""The synthetic world of the demo model: 1-3 solid shapes on white, one per cell of a 3×3 grid.

A `Scene` is the ground truth (kind, colour, cell, centre, size of each shape); `draw` renders
it at any size. Scenes come from `random.Random(f"{seed}:{index}")`, so scene `index` of a seed
is the same whatever else is generated, and a new seed gives a held-out world.

Colours are the app's example palette (`mmchat.serving.examples.COLOURS`), so the example images are
drawn in exactly the colours the demo model learned:

    red (220, 50, 47)     green (60, 160, 70)    blue (38, 110, 210)
    yellow (240, 200, 40) purple (140, 70, 170)  orange (245, 140, 30)

Sizes are the shape's full width (circle diameter, square side, triangle's circumscribed
diameter) as a fraction of the image side. A shape lies inside its cell (one wider than a cell,
over 33%, is centred on it), so it never straddles two cells; shapes never overlap and never
leave the image.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image

from mmchat.serving.examples import COLOURS as PALETTE
from mmchat.serving.examples import Example
from mmchat.serving.examples import Shape as DrawnShape
from mmchat.serving.examples import draw as draw_example

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
KINDS = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
RGB = {name: PALETTE[name] for name in COLOURS}
MARGIN = 0.01
"""Least gap between two shapes' boxes, and between a shape and the image border (image sides)."""


@dataclass(frozen=True)
class WorldConfig:
    """Which part of the world scenes are drawn from (the quick build uses a simpler slice)."""

    min_shapes: int = 1
    max_shapes: int = 3
    min_size: float = 0.15
    max_size: float = 0.35
    colours: tuple[str, ...] = COLOURS
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        if not 1 <= self.min_shapes <= self.max_shapes <= 9:
            raise ValueError(f"shapes per scene must satisfy 1 <= min ({self.min_shapes}) <= max ({self.max_shapes}) <= 9")
        if not 0 < self.min_size <= self.max_size <= 0.45:
            raise ValueError(f"shape sizes must satisfy 0 < min ({self.min_size}) <= max ({self.max_size}) <= 0.45")
        unknown = sorted(set(self.colours) - set(COLOURS)) + sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.colours or not self.kinds:
            raise ValueError(f"unknown or empty colours/kinds {unknown}; choose from {COLOURS} and {KINDS}")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int
    """0 top, 1 middle, 2 bottom."""
    column: int
    """0 left, 1 center, 2 right."""
    centre: tuple[float, float]
    """(x, y) in image sides, y down."""
    size: float
    """Full width in image sides."""

    @property
    def position(self) -> str:
        return position_name(self.row, self.column)

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in image sides; a triangle's apex is up, its base lower."""
        x, y, r = self.centre[0], self.centre[1], self.size / 2
        if self.kind == "triangle":  # vertices at -90°, 30°, 150° on the circumscribed circle
            half = r * math.cos(math.pi / 6)
            return x - half, y - r, x + half, y + r / 2
        return x - r, y - r, x + r, y + r


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    """In reading order: by row, then column."""


def position_name(row: int, column: int) -> str:
    """"top left" ... "bottom right"; the middle cell is "center"."""
    if (row, column) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLUMNS[column]}"


POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))


def scene_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def sample_scene(rng: random.Random, world: WorldConfig = WorldConfig()) -> Scene:
    """A scene: distinct cells, each shape's kind, colour and size uniform, centre jittered in its cell."""
    count = rng.randint(world.min_shapes, world.max_shapes)
    cells = rng.sample(range(9), count)
    while True:  # rare: two large neighbours touching; draw their sizes and places again
        shapes = [_place(rng, world, cell) for cell in cells]
        if not any(_touch(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1:]):
            return Scene(tuple(sorted(shapes, key=lambda s: (s.row, s.column))))


def twin(scene: Scene, rng: random.Random, world: WorldConfig = WorldConfig()) -> Scene:
    """The scene with one thing changed: a shape's kind, colour or cell, or a shape added or removed.

    Contrastive pretraining pairs scenes with their twins in a batch, so telling a circle from a
    square (and every other attribute) is needed to match captions, not only the easy cues.
    """
    shapes = list(scene.shapes)
    changes = ["kind", "kind", "kind", "colour", "move"]  # kinds are the hardest to tell apart: most twins differ there
    if len(shapes) > world.min_shapes:
        changes.append("remove")
    if len(shapes) < world.max_shapes:
        changes.append("add")
    while True:
        change, i = rng.choice(changes), rng.randrange(len(shapes))
        new = list(shapes)
        if change == "kind" and len(world.kinds) > 1:
            new[i] = replace(shapes[i], kind=rng.choice([k for k in world.kinds if k != shapes[i].kind]))
        elif change == "colour" and len(world.colours) > 1:
            new[i] = replace(shapes[i], colour=rng.choice([c for c in world.colours if c != shapes[i].colour]))
        elif change in ("move", "add"):
            free = sorted(set(range(9)) - {s.row * 3 + s.column for s in shapes})
            moved = _place(rng, world, rng.choice(free))
            if change == "move":
                new[i] = replace(moved, kind=shapes[i].kind, colour=shapes[i].colour)
            else:
                new.append(moved)
        elif change == "remove":
            del new[i]
        else:
            continue
        clash = any(_touch(a, b) for j, a in enumerate(new) for b in new[j + 1:]) or not _inside(new[i % len(new)])
        if not clash:
            return Scene(tuple(sorted(new, key=lambda s: (s.row, s.column))))


def _inside(shape: Shape) -> bool:
    left, top, right, bottom = shape.box()
    return MARGIN <= left and right <= 1 - MARGIN and MARGIN <= top and bottom <= 1 - MARGIN


def _place(rng: random.Random, world: WorldConfig, cell: int) -> Shape:
    """A shape of `cell`: its box inside the cell when it fits, else centred on the cell; always
    inside the image. A shape never straddles two cells, so "where" has one answer."""
    row, column = divmod(cell, 3)
    size = rng.uniform(world.min_size, world.max_size)
    kind = rng.choice(world.kinds)
    left, top, right, bottom = Shape(kind, "", row, column, (0.0, 0.0), size).box()  # extents around the centre
    x = _offset(rng, column / 3, (column + 1) / 3, -left, right)
    y = _offset(rng, row / 3, (row + 1) / 3, -top, bottom)
    return Shape(kind, rng.choice(world.colours), row, column, (x, y), size)


def _offset(rng: random.Random, start: float, end: float, before: float, after: float) -> float:
    """A centre coordinate in [start, end] whose extent (`before`, `after`) stays inside it and the image."""
    lo, hi = start + MARGIN + before, end - MARGIN - after
    centre = rng.uniform(lo, hi) if lo < hi else (start + end) / 2
    return min(max(centre, MARGIN + before), 1 - MARGIN - after)


def _touch(a: Shape, b: Shape) -> bool:
    al, at, ar, ab = a.box()
    bl, bt, br, bb = b.box()
    return al < br + MARGIN and bl < ar + MARGIN and at < bb + MARGIN and bt < ab + MARGIN


def draw(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of `size`×`size` pixels (antialiased, as the app's examples)."""
    shapes = tuple(DrawnShape(s.kind, s.colour, s.centre, s.size / 2) for s in scene.shapes)
    return draw_example(Example("synthetic", "", shapes), size)
