"""The image-token strategies the benchmarks compare (`--image-tokens`), and random checkpoints that use them.

- `mlp`: LLaVA-1.5's `mlp2x_gelu`, one token per patch (576 on a 336-px tower with 14-px patches);
- `resampler`: mmchat's `resampler` projector, `--queries` learned queries = that many tokens;
- `anyres`: LLaVA-NeXT's AnyRes with llava-v1.6's pinpoints, the picture `--grid` tiles large: the whole
  picture squashed to one tile plus the grid's tiles, each through the tower, stitched, a newline per row.

Counts come from mmchat's own code (`MultimodalModel.image_tokens`, `mmchat.anyres.num_image_tokens`).
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

STRATEGIES = ("mlp", "resampler", "anyres")
LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
"""llava-v1.6's `image_grid_pinpoints` (height, width) for its 336-px tower."""
GRIDS = tuple((h // 336, w // 336) for h, w in LLAVA_V16_PINPOINTS)
"""(rows, cols) those pinpoints allow."""


@dataclass(frozen=True)
class ImageTokens:
    strategy: str = "mlp"
    """mlp (one token per patch), resampler (`queries` tokens) or anyres (base tile + `grid`)."""
    queries: int = 64
    """resampler: learned queries, so tokens per image."""
    grid: tuple[int, int] = (2, 2)
    """anyres: (rows, cols) of tiles; the picture is drawn that many tiles large, so AnyRes picks this grid."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--image-tokens {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.queries < 1:
            raise ValueError(f"--queries {self.queries}: use at least 1")
        if tuple(self.grid) not in GRIDS:
            raise ValueError(f"--grid {format_grid(self.grid)}: llava-v1.6's pinpoints allow "
                             f"{', '.join(map(format_grid, GRIDS))}")

    @property
    def tiles(self) -> int:
        """Squares the tower runs on per image."""
        return 1 + self.grid[0] * self.grid[1] if self.strategy == "anyres" else 1

    @property
    def label(self) -> str:
        return {"mlp": "mlp2x_gelu", "resampler": f"resampler, {self.queries} queries",
                "anyres": f"AnyRes {self.grid[0]}×{self.grid[1]}"}[self.strategy]

    def pinpoints(self, tile: int) -> list[list[int]]:
        """llava-v1.6's pinpoints for a `tile`-px tower (scaled from 336 px, as smaller test towers need)."""
        return [[h * tile // 336, w * tile // 336] for h, w in LLAVA_V16_PINPOINTS]

    def picture_size(self, tile: int) -> tuple[int, int]:
        """(height, width) of the picture the benchmarks draw: the grid's size for anyres, one tile otherwise."""
        return (self.grid[0] * tile, self.grid[1] * tile) if self.strategy == "anyres" else (tile, tile)

    def count(self, tile: int, patch: int) -> int:
        """Image tokens of the benchmarks' picture on a tower of `tile` px and `patch`-px patches."""
        from mmchat.anyres import AnyresSettings, num_image_tokens

        if self.strategy == "resampler":
            return self.queries
        if self.strategy == "anyres":
            settings = AnyresSettings(tile, patch, tuple(map(tuple, self.pinpoints(tile))))
            return num_image_tokens(self.picture_size(tile), settings)
        return (tile // patch) ** 2

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "label": self.label, "queries": self.queries, "grid": list(self.grid),
                "tiles": self.tiles}


def format_grid(grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def add_flags(p: argparse.ArgumentParser) -> None:
    """`--image-tokens`, `--queries`, `--grid`, as every benchmark that takes a strategy declares them."""
    p.add_argument("--image-tokens", choices=STRATEGIES, default="mlp",
                   help="how an image becomes tokens: mlp (576 on a 336-px tower), resampler (--queries), "
                        "anyres (llava-v1.6 tiling, --grid) (default: %(default)s)")
    p.add_argument("--queries", type=int, help="with --image-tokens resampler: learned queries (default: 64)")
    p.add_argument("--grid", help=f"with --image-tokens anyres: tiles, one of {' '.join(map(format_grid, GRIDS))} "
                                  "(default: 2x2)")


def from_flags(a: argparse.Namespace) -> ImageTokens:
    """The strategy `add_flags`' flags ask for; a flag that does not belong to it is refused by name."""
    if a.queries is not None and a.image_tokens != "resampler":
        raise ValueError(f"Can't use --queries with --image-tokens {a.image_tokens}: queries are the resampler's "
                         "(--image-tokens resampler)")
    if a.grid is not None and a.image_tokens != "anyres":
        raise ValueError(f"Can't use --grid with --image-tokens {a.image_tokens}: the grid is AnyRes's "
                         "(--image-tokens anyres)")
    return ImageTokens(a.image_tokens, 64 if a.queries is None else a.queries, parse_grid(a.grid or "2x2"))


def parse_grid(text: str) -> tuple[int, int]:
    """`--grid` ROWSxCOLS -> (rows, cols)."""
    try:
        grid = tuple(int(n) for n in text.lower().replace("×", "x").split("x"))
    except ValueError:
        grid = ()
    if len(grid) != 2:
        raise ValueError(f"--grid {text!r}: write ROWSxCOLS, e.g. 2x2")
    return grid


def draw_picture(path: Path, size: tuple[int, int]) -> None:
    """Two shapes on white, (height, width) `size`: the benchmarks' picture."""
    from PIL import Image, ImageDraw

    h, w = size
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 12, h // 6, w * 5 // 12, h * 11 // 18), fill=(220, 30, 30))
    draw.rectangle((w * 13 // 24, h // 3, w * 7 // 8, h * 7 // 9), fill=(30, 60, 220))
    image.save(path)


# ------------------------------------------------------------------ random checkpoints


def derive_checkpoint(mlp: Path, out: Path, strategy: ImageTokens, seed: int = 0) -> Path:
    """A copy of the random mmchat checkpoint `mlp` (an mlp2x_gelu projector) that reads images the
    strategy's way: the same tower and LLM; a new random resampler, or llava-v1.6's pinpoints and a
    random `image_newline` beside the same projector."""
    import torch

    from mmchat.checkpoint import PROJECTOR_FILE, read_config, read_projector_state, save_projector, write_config
    from mmchat.config import AnyresConfig, ProjectorConfig
    from mmchat.model import add_image_newline
    from mmchat.projector import build_projector

    shutil.copytree(mlp, out)
    if strategy.strategy == "mlp":
        return out
    config = read_config(out)
    torch.manual_seed(seed)
    if strategy.strategy == "resampler":
        config.projector = ProjectorConfig("resampler", config.projector.in_dim, config.projector.out_dim,
                                           queries=strategy.queries)
        projector = build_projector(config.projector)
    else:
        config.vision.anyres = AnyresConfig(pinpoints=strategy.pinpoints(config.vision.image_size))
        projector = build_projector(config.projector)
        projector.load_state_dict(read_projector_state(out))
        add_image_newline(projector, config.projector.out_dim, torch.randn(config.projector.out_dim) * 0.02)
    save_projector(projector, out / PROJECTOR_FILE)
    write_config(config, out)
    return out


def build_llava_next_hf(out: Path, shape, seed: int = 0) -> list[str]:
    """`benchmarks.random_llava.build_llava_hf`'s random LLaVA saved as a `LlavaNextForConditionalGeneration`
    (the same weights, llava-v1.6's pinpoints, a random `image_newline`) with its image processor; returns
    the word list."""
    import torch
    from transformers import (LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor)

    from benchmarks.random_llava import build_llava_hf

    lexicon = build_llava_hf(out, shape, seed)
    llava = LlavaForConditionalGeneration.from_pretrained(out)
    pins = ImageTokens("anyres").pinpoints(shape.image_size)
    config = LlavaNextConfig(vision_config=llava.config.vision_config, text_config=llava.config.text_config,
                             image_grid_pinpoints=pins, image_token_index=llava.config.image_token_index,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
    assert list(missing) == ["model.image_newline"] and not unexpected, (missing, unexpected)
    model.save_pretrained(out)
    side = shape.image_size
    LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                            image_grid_pinpoints=pins).save_pretrained(out)
    return lexicon
