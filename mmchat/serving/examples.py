"""Example images drawn by code: coloured shapes on plain backgrounds, with a question each.

    python -m mmchat.serving.examples            # (re)draws assets/examples/*.png

The app offers these as examples; they are small, ours, and reproducible (a test redraws them
and compares pixels), so no downloaded photo ever enters the repository.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmchat.serving.assets import assets_dir

EXAMPLES_DIR = assets_dir() / "examples"
SIZE = 336  # LLaVA-1.5's input size: the model sees the drawing without resampling
_SUPERSAMPLE = 4  # drawn larger, then downsampled: smooth edges without an antialiasing library

COLOURS = {
    "red": (220, 50, 47),
    "green": (60, 160, 70),
    "blue": (38, 110, 210),
    "yellow": (240, 200, 40),
    "purple": (140, 70, 170),
    "orange": (245, 140, 30),
    "white": (255, 255, 255),
}


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    colour: str
    centre: tuple[float, float]
    """In units of the image side (0..1)."""
    size: float
    """Half-width, in units of the image side."""


@dataclass(frozen=True)
class Example:
    name: str
    question: str
    shapes: tuple[Shape, ...]
    background: str = "white"


EXAMPLES = (
    # Scenes of the demo model's world (finetune/demo/world.py): white background, one shape per
    # cell of a 3×3 grid, so the model that `python app.py` serves offline can answer each question.
    Example("red_circle", "What colour is the circle?", (Shape("circle", "red", (0.5, 0.5), 0.14),)),
    Example("left_right", "Where is the triangle?",
            (Shape("square", "blue", (0.17, 0.5), 0.1), Shape("triangle", "yellow", (0.83, 0.53), 0.12))),
    Example("three_shapes", "Describe the image.",
            (Shape("circle", "green", (0.17, 0.17), 0.1), Shape("square", "orange", (0.83, 0.17), 0.09),
             Shape("triangle", "purple", (0.5, 0.84), 0.13))),
    Example("two_circles", "How many circles are there?",
            (Shape("circle", "blue", (0.17, 0.83), 0.11), Shape("square", "red", (0.5, 0.5), 0.12),
             Shape("circle", "yellow", (0.83, 0.17), 0.09))),
)


def _points(shape: Shape, side: int) -> list[tuple[float, float]]:
    cx, cy, r = shape.centre[0] * side, shape.centre[1] * side, shape.size * side
    if shape.kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape.kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    raise ValueError(f"unknown shape kind {shape.kind!r}; choose circle, square or triangle")


def draw(example: Example, size: int = SIZE) -> Image.Image:
    """The example's picture as an RGB image of `size`×`size` pixels."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[example.background])
    pen = ImageDraw.Draw(image)
    for shape in example.shapes:
        if shape.kind == "circle":
            cx, cy, r = shape.centre[0] * big, shape.centre[1] * big, shape.size * big
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[shape.colour])
        else:
            pen.polygon(_points(shape, big), fill=COLOURS[shape.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def example_path(example: Example, folder: Path = EXAMPLES_DIR) -> Path:
    return Path(folder) / f"{example.name}.png"


def write_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in EXAMPLES:
        path = example_path(example, folder)
        draw(example).save(path, optimize=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmchat.serving.examples", description="Draw the app's example images.")
    p.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="folder for the PNGs (default: %(default)s)")
    args = p.parse_args(argv)
    for path in write_examples(args.out):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
