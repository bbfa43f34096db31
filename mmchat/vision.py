"""The vision tower (open_clip, or transformers' own vision model) and LLaVA's feature selection.

open_clip runs CLIP feature-for-feature as transformers does and loads named pretrained weights, so
mmchat trains on it. A converted tower open_clip cannot reproduce exactly stays transformers' vision
model (`VisionConfig.library`): open_clip's SigLIP wraps timm's ViT, whose exact GELU differs from the
tanh GELU llava-hf's SigLIP configs ask for by up to ~5e-4 per activation, compounding over 26 blocks,
and open_clip's own ViT always has a class token, which SigLIP lacks.
"""
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
# transformers' vision models mmchat runs -> how many tokens (CLS) precede the patch grid.
TRANSFORMERS_TOWERS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def load_vision_tower(cfg: VisionConfig, checkpoint: Path | None = None) -> nn.Module:
    """open_clip's `VisionTransformer` (or, with `library: transformers`, transformers' vision model),
    frozen, float32, in eval mode.

    Named pretrained weights (`cfg.pretrained`, e.g. ViT-L-14-336/openai) come through open_clip;
    otherwise the checkpoint's `vision/` folder holds an open_clip model config and the weights, or
    a transformers model folder.
    """
    if cfg.library == "transformers":
        return load_transformers_tower(Path(checkpoint or ".") / VISION_DIR)
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


def load_transformers_tower(folder: Path) -> nn.Module:
    """A `CLIPVisionModel` / `SiglipVisionModel` folder written by `save_pretrained`, no remote code."""
    from transformers import AutoConfig, AutoModel

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vision tower missing: {folder}/config.json; re-convert the checkpoint with `python -m mmchat.convert`")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if config.model_type not in TRANSFORMERS_TOWERS:
        raise ValueError(f"{folder}/config.json: model_type={config.model_type!r}; mmchat runs {sorted(TRANSFORMERS_TOWERS)}")
    tower = AutoModel.from_pretrained(folder, config=config, dtype=torch.float32, trust_remote_code=False)
    return tower.float().eval().requires_grad_(False)


def is_transformers_tower(visual: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(visual, PreTrainedModel)


def save_vision_tower(visual: nn.Module, model_cfg: dict, checkpoint: Path) -> None:
    """Write `vision/open_clip_config.json` and `vision/visual.safetensors` into a checkpoint; a
    transformers tower is written by its `save_pretrained` (its config is `model_cfg`), in float32."""
    folder = Path(checkpoint) / VISION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if is_transformers_tower(visual):
        visual.float().save_pretrained(folder)
        return
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}, indent=2) + "\n")
    state = {k: v.detach().contiguous().float().cpu() for k, v in visual.state_dict().items()}
    save_file(state, str(folder / VISUAL_WEIGHTS))


def num_blocks(visual: nn.Module) -> int:
    if is_transformers_tower(visual):
        return visual.config.num_hidden_layers
    return len(visual.transformer.resblocks)


def feature_block(visual: nn.Module, layer: int) -> int:
    """0-based block whose output is hidden state `layer` (counted as transformers' hidden_states)."""
    n = num_blocks(visual)
    block = n + layer if layer < 0 else layer - 1
    if not 0 <= block < n:
        raise ValueError(f"vision select_layer={layer} is out of range for a {n}-block tower")
    return block


def tower_tokens(visual: nn.Module) -> tuple[int, int]:
    """(tokens before the patches, patches) one image gives: (1, grid) for CLIP, (0, grid) for SigLIP."""
    if is_transformers_tower(visual):
        side = visual.config.image_size // visual.config.patch_size
        return TRANSFORMERS_TOWERS[visual.config.model_type], side * side
    return 1, visual.grid_size[0] * visual.grid_size[1]  # open_clip's ViT always has a class token


def num_image_tokens(visual: nn.Module, cfg: VisionConfig) -> int:
    """How many slots one image fills: every token less the first (`patch`), every token, or 1 for `cls`."""
    prefix, grid = tower_tokens(visual)
    if cfg.select_feature == "cls" and not prefix:
        raise ValueError("vision select_feature='cls': this tower has no class token; use patch or cls_patch")
    return {"patch": prefix + grid - 1, "cls_patch": prefix + grid, "cls": 1}[cfg.select_feature]


def feature_width(visual: nn.Module, cfg: VisionConfig) -> int:
    """The projector's input width: the tower's width once per selected layer."""
    width = visual.config.hidden_size if is_transformers_tower(visual) else visual.conv1.out_channels
    return width * len(cfg.layers)


@torch.no_grad()
def image_features(visual: nn.Module, pixels: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """Normalised pixels [B, 3, S, S] -> features [B, T, D × layers] from the hidden states
    `select_layer` (concatenated along D when several), no final norm."""
    num_image_tokens(visual, cfg)  # refuses `cls` on a tower without a class token
    blocks = [feature_block(visual, layer) for layer in cfg.layers]
    if is_transformers_tower(visual):
        # As llava-hf's `get_image_features`: hidden_states[layer], the first token dropped for `default`.
        hidden = visual(pixel_values=pixels.float(), output_hidden_states=True).hidden_states
        states = [hidden[layer] for layer in cfg.layers]  # [B, prefix + P, D] each
        pick = {"patch": slice(1, None), "cls_patch": slice(None), "cls": slice(0, 1)}[cfg.select_feature]
        return torch.cat([h[:, pick] for h in states], dim=-1)
    taken = sorted(set(blocks))
    out = visual.forward_intermediates(
        pixels.float(),
        indices=taken,
        stop_early=True,  # blocks after the last selected one are never run
        intermediates_only=True,
        output_fmt="NLC",
        output_extra_tokens=True,
    )
    features = []
    for block in blocks:
        i = taken.index(block)
        patches, cls = out["image_intermediates"][i], out["image_intermediates_prefix"][i]  # [B, P, D], [B, 1, D]
        features.append({"patch": patches, "cls": cls, "cls_patch": torch.cat([cls, patches], dim=1)}[cfg.select_feature])
    return torch.cat(features, dim=-1)
