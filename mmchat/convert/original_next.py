"""Original-format LLaVA-NeXT (LLaVA's own repo: `image_aspect_ratio: anyres`, `mm_patch_merge_type:
spatial_unpad`, `image_grid_pinpoints`, a learned `model.image_newline`) read as transformers' LlavaNext
runs the same weights (`convert_llava_next_weights_to_hf.py`): the tower's processor at its own size,
the config's pinpoints, base tile plus grid tiles, unpadded, a newline after each row (`mmchat.anyres`).
"""
from __future__ import annotations

import ast
from pathlib import Path

from mmchat.config import AnyresConfig
from mmchat.convert.common import ConvertError, log

SQUARE_ASPECTS = (None, "pad", "square")
"""`image_aspect_ratio`s of LLaVA-1.5-style checkpoints: one square per image, merged `flat`."""
NEWLINE_KEY = "model.image_newline"


def is_next(config: dict) -> bool:
    return config.get("image_aspect_ratio") == "anyres"


def tiling_problems(config: dict) -> list[str]:
    """What in an original config.json mmchat cannot tile as LlavaNext does, one phrase each."""
    aspect, merge = config.get("image_aspect_ratio"), config.get("mm_patch_merge_type", "flat")
    if aspect in SQUARE_ASPECTS:
        return [] if merge == "flat" else [f"mm_patch_merge_type={merge!r} without image_aspect_ratio 'anyres'"]
    if not isinstance(aspect, str) or not aspect.startswith("anyres"):
        return [f"image_aspect_ratio={aspect!r} (mmchat reads pad, square and LLaVA-NeXT's anyres)"]
    if aspect != "anyres":
        return [f"image_aspect_ratio={aspect!r} (LLaVA-OneVision's tiling; convert its llava-hf "
                "LlavaOnevisionForConditionalGeneration folder instead)"]
    problems = []
    if merge != "spatial_unpad":
        problems.append(f"mm_patch_merge_type={merge!r} with anyres (mmchat reads LLaVA-NeXT's 'spatial_unpad': tiles "
                        "stitched, cropped to the image, a newline per row)")
    if config.get("mm_vision_select_feature", "patch") != "patch":
        problems.append(f"mm_vision_select_feature={config['mm_vision_select_feature']!r} with anyres (tiles are stitched "
                        "from their patch grids: 'patch')")
    try:
        pinpoints(config)
    except ValueError as e:
        problems.append(str(e))
    return problems


def pinpoints(config: dict) -> list[list[int]]:
    """`image_grid_pinpoints` as [[height, width], ...]: a list, or the string of one (LLaVA parses it so)."""
    raw = config.get("image_grid_pinpoints")
    value = raw
    if isinstance(raw, str):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in value):
        raise ValueError(f"image_grid_pinpoints={raw!r} (mmchat reads a list of [height, width] in pixels)")
    return [[int(h), int(w)] for h, w in value]


def next_tiling(folder: Path, config: dict) -> AnyresConfig:
    """The folder's AnyRes tiling: LlavaNext's, never shrunk (`max_tiles` None)."""
    pins = pinpoints(config)
    log(f"image_aspect_ratio='anyres', mm_patch_merge_type='spatial_unpad': LLaVA-NeXT tiling on grids {pins}, "
        f"learned image_newline from {NEWLINE_KEY}")
    try:
        return AnyresConfig(pinpoints=pins)
    except ValueError as e:
        raise ConvertError(f"{folder}/config.json: {e}") from None
