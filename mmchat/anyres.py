"""LLaVA-NeXT "AnyRes" and LLaVA-OneVision "anyres_max_N": one image -> tiles -> packed tokens.

An image is cut into a grid of tower-sized tiles chosen from a list of pinpoint resolutions, the
tower runs on every tile plus the whole image squashed to one tile, and the tiles' feature maps
are stitched back into one map, cropped to the image's own aspect ratio, followed by a learned
newline after each row. These functions reproduce transformers 5.24 to the last bit:

- pixels: the torchvision backend (`LlavaNextImageProcessor`, `LlavaOnevisionImageProcessor`),
  which `AutoImageProcessor` loads by default when torchvision is installed (the `*Pil` classes
  differ from it by resampling rounding);
- token counts: `LlavaNextProcessor` / `LlavaOnevisionProcessor._get_number_of_features`;
- packing: `LlavaNextModel.pack_image_features` / `LlavaOnevisionModel.pack_image_features`.

The counting and the packing share one helper for the cropped grid, so the number of `<image>`
slots and the number of packed features cannot drift apart.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from mmchat.config import CLIP_MEAN, CLIP_STD, VisionConfig

Size = tuple[int, int]
"""(height, width), in pixels; transformers' order for `image_sizes` and pinpoints."""

SELECT_STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class AnyresSettings:
    """What fixes the tiling and the token layout of one model family's checkpoint."""

    tile_size: int
    """Side S of the square the vision tower sees (`vision_config.image_size`), also the tile side."""
    patch_size: int
    """The tower's patch side p: a tile gives a g x g feature map, g = S // p. SigLIP-384 has
    p = 14 and g = 27: its patch conv ignores the last 6 pixels, and so does g."""
    pinpoints: tuple[Size, ...]
    """Allowed grid resolutions (height, width) in pixels, multiples of `tile_size`
    (`image_grid_pinpoints`)."""
    max_tiles: int | None = None
    """OneVision's `anyres_max_N`: shrink the cropped feature map bilinearly to about N tiles'
    worth of tokens when it is larger than 1.1² x that. None for LLaVA-NeXT, which never shrinks."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if not 0 < self.patch_size <= self.tile_size:
            raise ValueError(f"patch_size {self.patch_size} must be positive and at most tile_size {self.tile_size}")
        if not self.pinpoints:
            raise ValueError("pinpoints is empty; pass the checkpoint's image_grid_pinpoints")
        for h, w in self.pinpoints:
            if h <= 0 or w <= 0 or h % self.tile_size or w % self.tile_size:
                # transformers would cut ragged edge tiles and fail to stack them.
                raise ValueError(f"pinpoint {(h, w)} is not a positive multiple of tile_size {self.tile_size}")
        if self.max_tiles is not None and self.max_tiles <= 0:
            raise ValueError(f"max_tiles must be positive or None, got {self.max_tiles}")

    @property
    def tiles_only_alone(self) -> bool:
        """OneVision (anyres_max_N) tiles an image only when it is its prompt's only image; with
        several, each is one padded square plus a newline (`square_tokens`), as transformers does
        (its processor's `batch_num_images`). LLaVA-NeXT tiles every image."""
        return self.max_tiles is not None

    @property
    def square_tokens(self) -> int:
        """Features of an image read as one square (OneVision, several images): g² and a newline."""
        return self.grid**2 + 1

    @property
    def grid(self) -> int:
        """Feature map side g of one tile: S // p tokens per row and per column."""
        return self.tile_size // self.patch_size


def settings_from_transformers(config: Any, image_processor: Any) -> AnyresSettings:
    """Settings of a llava-hf `LlavaNextConfig` / `LlavaOnevisionConfig` and its image processor.

    Only the processor set-ups the checkpoints use are accepted: tiles and the base image are
    tower-sized squares, so the processor's second resize and centre crop change nothing.
    """
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    max_tiles = None
    if config.model_type == "llava_onevision":
        # transformers reads N with `.strip("anyres_max_")`; anything else would fail there too.
        match = re.fullmatch(r"anyres_max_(\d+)", config.vision_aspect_ratio)
        if match is None:
            raise ValueError(f"vision_aspect_ratio {config.vision_aspect_ratio!r} is not anyres_max_N")
        max_tiles = int(match.group(1))
    elif config.model_type != "llava_next":
        raise ValueError(f"model_type {config.model_type!r} is neither llava_next nor llava_onevision")
    size, crop = image_processor.size, image_processor.crop_size
    sides = {size.shortest_edge} if size.shortest_edge else {size.height, size.width}
    if image_processor.do_center_crop and crop:
        sides |= {crop.height, crop.width}
    if sides != {tile}:
        raise ValueError(f"image processor size {dict(size)} / crop_size {crop and dict(crop)} does not match "
                         f"the tower's image_size {tile}; set both to {tile} in preprocessor_config.json")
    if not (image_processor.do_resize and image_processor.do_rescale and image_processor.do_normalize
            and math.isclose(image_processor.rescale_factor, 1 / 255)):
        raise ValueError("the image processor must resize, rescale by 1/255 and normalise, as llava-hf's do")
    return AnyresSettings(
        tile_size=tile, patch_size=patch, pinpoints=tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints),
        max_tiles=max_tiles, image_mean=tuple(image_processor.image_mean), image_std=tuple(image_processor.image_std),
    )


def settings_from_config(vision: VisionConfig, patch_size: int) -> AnyresSettings:
    """Settings of an mmchat checkpoint's `vision` config (with `anyres`) on a tower of `patch_size`."""
    if vision.anyres is None:
        raise ValueError("this vision config has no anyres settings: its images are one square each")
    return AnyresSettings(tile_size=vision.image_size, patch_size=patch_size,
                          pinpoints=tuple((h, w) for h, w in vision.anyres.pinpoints),
                          max_tiles=vision.anyres.max_tiles, image_mean=vision.mean, image_std=vision.std)


# ---- the grid ---------------------------------------------------------------------------------

def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint that keeps the most of the image's pixels, then wastes the least canvas
    (`transformers.image_processing_utils.select_best_resolution`; first one wins ties)."""
    height, width = image_size
    best, most_kept, least_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)  # int() truncates, as there
        wasted = pin_w * pin_h - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (pin_h, pin_w), kept, wasted
    return best


def grid_shape(image_size: Size, settings: AnyresSettings) -> Size:
    """(rows, cols) of tiles the image is cut into (`get_anyres_image_grid_shape`)."""
    best_h, best_w = select_best_resolution(image_size, settings.pinpoints)
    return best_h // settings.tile_size, best_w // settings.tile_size


def fit_size(image_size: Size, target: Size) -> Size:
    """Size of the image scaled to fit `target`, aspect kept (`get_patch_output_size`): the side
    with the smaller scale fills the target; the other is rounded up (ceil), capped at the target."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


# ---- pixels -----------------------------------------------------------------------------------

def _to_rgb_uint8(image: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8, converted as transformers does: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def _resize(pixels: torch.Tensor, size: Size) -> torch.Tensor:
    """torchvision's resize, exactly as the processors call it: on uint8, bicubic, antialiased.
    Its uint8 bicubic result depends on where it runs (native AVX kernel on CPU, float then
    rounded on GPU or without AVX); this runs on the CPU, as the processors do by default."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(pixels, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def _normalise(stack: torch.Tensor, settings: AnyresSettings) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float32. The processors fold the 1/255 rescale into float32 mean and
    std (both x 255) rather than dividing the pixels first; the other order differs in the last bits."""
    mean = torch.tensor(settings.image_mean) * 255.0
    std = torch.tensor(settings.image_std) * 255.0
    return (stack.float() - mean[:, None, None]) / std[:, None, None]


def preprocess_anyres(image: Image.Image, settings: AnyresSettings) -> tuple[torch.Tensor, Size]:
    """One image -> (pixels [1 + rows*cols, 3, S, S], image_size (height, width)).

    Tile 0 is the whole image squashed to S x S (the "base"); then the tiles of the image scaled
    to fit the best pinpoint and centred on a black canvas of that size, row by row. Equals the
    processor's `pixel_values[0]` and `image_sizes[0]` for a single image.
    """
    pixels = _to_rgb_uint8(image)  # [3, H, W]
    image_size = (pixels.shape[1], pixels.shape[2])
    best_h, best_w = select_best_resolution(image_size, settings.pinpoints)
    new_h, new_w = fit_size(image_size, (best_h, best_w))
    left, top = (best_w - new_w) // 2, (best_h - new_h) // 2  # the odd pixel goes right / bottom
    canvas = torch.nn.functional.pad(_resize(pixels, (new_h, new_w)),
                                     (left, best_w - new_w - left, top, best_h - new_h - top))  # [3, best_h, best_w]
    s = settings.tile_size
    tiles = canvas.view(3, best_h // s, s, best_w // s, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
    stack = torch.cat([_resize(pixels, (s, s))[None], tiles])  # [1 + n, 3, S, S] uint8
    return _normalise(stack, settings), image_size


def preprocess_square(image: Image.Image, settings: AnyresSettings) -> torch.Tensor:
    """One image of a OneVision prompt holding several -> pixels [1, 3, S, S]: centred on a square
    of its longer side filled with the mean colour, then resized to S x S; no tiles
    (`LlavaOnevisionImageProcessor` when `batch_num_images` is not 1)."""
    pixels = _to_rgb_uint8(image)
    height, width = pixels.shape[1:]
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    fill = [int(m * 255) for m in settings.image_mean]  # truncated, as the processor does
    square = torch.empty(3, side, side, dtype=torch.uint8)
    square[:] = torch.tensor(fill, dtype=torch.uint8)[:, None, None]
    square[:, top:top + height, left:left + width] = pixels
    return _normalise(_resize(square, (settings.tile_size, settings.tile_size))[None], settings)


# ---- tokens -----------------------------------------------------------------------------------

def _unpadded_shape(image_size: Size, map_h: int, map_w: int) -> tuple[int, int, int, int]:
    """(top, rows, left, cols) of the stitched [map_h, map_w] feature map that shows the image and
    not the canvas's padding (`unpad_image`, and `_get_unpadded_features` in the processors).

    The same padding is cut from both ends, so when the padding is odd one padded row (or column)
    stays in. `round(..., 7)` absorbs float error before truncating.
    """
    height, width = image_size
    if width / height > map_w / map_h:
        padding = (map_h - int(round(height * (map_w / width), 7))) // 2
        return padding, map_h - 2 * padding, 0, map_w
    padding = (map_w - int(round(width * (map_h / height), 7))) // 2
    return 0, map_h, padding, map_w - 2 * padding


def _shrunk_shape(rows: int, cols: int, settings: AnyresSettings) -> Size | None:
    """OneVision's anyres_max_N target (rows, cols) for a cropped map, or None to keep it."""
    if settings.max_tiles is None:
        return None
    ratio = math.sqrt(rows * cols / (settings.max_tiles * settings.grid**2))
    if ratio <= 1.1:
        return None
    return int(rows // ratio), int(cols // ratio)


def num_image_tokens(image_size: Size, settings: AnyresSettings) -> int:
    """Features one image becomes, i.e. `<image>` slots the prompt needs: the base tile's g²
    plus, for the cropped (and for OneVision maybe shrunk) map, rows x cols and one newline per row.

    Matches the processors with their llava-hf settings (NeXT: `num_additional_image_tokens` 1 and
    strategy `default`; OneVision: `num_image_tokens` g² and strategy `full`).
    """
    rows, cols = grid_shape(image_size, settings)
    _, map_rows, _, map_cols = _unpadded_shape(image_size, rows * settings.grid, cols * settings.grid)
    map_rows, map_cols = _shrunk_shape(map_rows, map_cols, settings) or (map_rows, map_cols)
    return settings.grid**2 + map_rows * (map_cols + 1)


def select_tile_features(hidden_states: torch.Tensor, strategy: str) -> torch.Tensor:
    """The tower's tokens that become image features: [tiles, L, D] -> [tiles, T, D].

    `default` drops token 0 (CLIP's CLS; it drops it even from towers without one), `full` keeps
    all (SigLIP). Packing needs T == g²: the other combinations break the grid.
    """
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not one of {SELECT_STRATEGIES}")
    return hidden_states[:, 1:] if strategy == "default" else hidden_states


def pack_image_features(features: torch.Tensor, image_newline: torch.Tensor, image_size: Size,
                        settings: AnyresSettings) -> torch.Tensor:
    """Per-tile features [1 + rows*cols, T, H] (projected; tile 0 the base) -> the image's packed
    sequence [num_image_tokens(image_size), H]: the base's T tokens, then the stitched map, cropped
    to the image and (anyres_max_N) maybe shrunk, row by row with `image_newline` [H] after each row.

    A lone base tile (OneVision's multi-image case) packs as its tokens then one newline.
    """
    tiles, tokens, hidden = features.shape
    base = features[0]  # [T, H]
    if tiles == 1:
        return torch.cat((base, image_newline[None].to(base)), dim=0)
    g = settings.grid
    rows, cols = grid_shape(image_size, settings)
    if tiles != 1 + rows * cols or tokens != g * g:
        # transformers would fail at a view (or only warn, then mix tokens of different tiles).
        raise ValueError(f"features of shape {tuple(features.shape)}, but an image of size {tuple(image_size)} "
                         f"needs {1 + rows * cols} tiles of {g}x{g}={g * g} tokens; check "
                         f"vision_feature_select_strategy and the tower's image_size/patch_size")
    grid = features[1:].reshape(rows, cols, g, g, hidden)  # [rows, cols, g, g, H]
    fmap = grid.permute(4, 0, 2, 1, 3).reshape(hidden, rows * g, cols * g)  # [H, rows*g, cols*g]
    top, map_rows, left, map_cols = _unpadded_shape(image_size, rows * g, cols * g)
    fmap = fmap[:, top:top + map_rows, left:left + map_cols]
    shrunk = _shrunk_shape(map_rows, map_cols, settings)
    if shrunk is not None:
        fmap = torch.nn.functional.interpolate(fmap[None], list(shrunk), mode="bilinear")[0]
    newlines = image_newline[:, None, None].expand(hidden, fmap.shape[1], 1).to(fmap)
    fmap = torch.cat((fmap, newlines), dim=-1)  # [H, rows', cols' + 1]
    return torch.cat((base, fmap.flatten(1, 2).transpose(0, 1)), dim=0)
