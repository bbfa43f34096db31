"""The CLIP vision tower (open_clip) and LLaVA's feature selection."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmchat.config import VisionConfig

VISION_DIR = "vision"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's own `local-dir:` layout
VISUAL_WEIGHTS = "visual.safetensors"


def load_vision_tower(cfg: VisionConfig, checkpoint: Path | None = None) -> nn.Module:
    """open_clip's `VisionTransformer`, frozen, float32, in eval mode.

    Named pretrained weights (`cfg.pretrained`, e.g. ViT-L-14-336/openai) come through open_clip;
    otherwise the checkpoint's `vision/` folder holds an open_clip model config and the weights.
    """
    if cfg.pretrained:
        try:
            model = open_clip.create_model(cfg.open_clip_model, pretrained=cfg.pretrained)
        except Exception as e:  # open_clip raises several types for missing files / network errors
            raise RuntimeError(
                f"could not load the vision tower open_clip {cfg.open_clip_model}/{cfg.pretrained} ({e}); "
                "it downloads on first use, so connect once or use a checkpoint whose vision/ folder holds the weights"
            ) from e
        visual = model.visual
    else:
        folder = Path(checkpoint or ".") / VISION_DIR
        weights = folder / VISUAL_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"vision weights missing: {weights}; re-convert the checkpoint with `python -m mmchat.convert`")
        model_cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        # The folder holds only the visual tower's weights, so build CLIP from its config and keep `.visual`.
        visual = open_clip.CLIP(**model_cfg).visual
        visual.load_state_dict(load_file(weights))
    return visual.float().eval().requires_grad_(False)


def save_vision_tower(visual: nn.Module, model_cfg: dict, checkpoint: Path) -> None:
    """Write `vision/open_clip_config.json` and `vision/visual.safetensors` into a checkpoint."""
    folder = Path(checkpoint) / VISION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}, indent=2) + "\n")
    state = {k: v.detach().contiguous().float().cpu() for k, v in visual.state_dict().items()}
    save_file(state, str(folder / VISUAL_WEIGHTS))


def num_blocks(visual: nn.Module) -> int:
    return len(visual.transformer.resblocks)


def feature_block(visual: nn.Module, cfg: VisionConfig) -> int:
    """0-based block whose output is taken; `select_layer` counts like transformers' hidden_states."""
    n = num_blocks(visual)
    block = n + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer - 1
    if not 0 <= block < n:
        raise ValueError(f"vision select_layer={cfg.select_layer} is out of range for a {n}-block tower")
    return block


def num_image_tokens(visual: nn.Module, cfg: VisionConfig) -> int:
    """How many slots one image fills: the patch grid (+1 with CLS), or 1 for `cls`."""
    grid = visual.grid_size[0] * visual.grid_size[1]
    return {"patch": grid, "cls_patch": grid + 1, "cls": 1}[cfg.select_feature]


def feature_width(visual: nn.Module) -> int:
    return visual.conv1.out_channels


@torch.no_grad()
def image_features(visual: nn.Module, pixels: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """Normalised pixels [B, 3, S, S] -> features [B, T, D] from block `select_layer`, no final norm."""
    out = visual.forward_intermediates(
        pixels.float(),
        indices=[feature_block(visual, cfg)],
        stop_early=True,  # blocks after the selected one are never run
        intermediates_only=True,
        output_fmt="NLC",
        output_extra_tokens=True,
    )
    patches = out["image_intermediates"][0]  # [B, P, D]
    cls = out["image_intermediates_prefix"][0]  # [B, 1, D]
    if cfg.select_feature == "patch":
        return patches
    if cfg.select_feature == "cls":
        return cls
    return torch.cat([cls, patches], dim=1)
