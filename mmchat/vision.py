"""The vision tower (open_clip, or transformers' own vision model) and LLaVA's feature selection.

open_clip runs CLIP feature-for-feature as transformers does and loads named pretrained weights, so
mmchat trains on it. Any open_clip tower with patch tokens serves: open_clip's own `VisionTransformer`
(OpenAI CLIP, DFN, MetaCLIP: a class token, then the patches) and `TimmModel` towers around a timm ViT
trunk (SigLIP, SigLIP2: patches only; EVA: a class token first); a ResNet or ConvNeXt tower has none.

A converted tower open_clip cannot reproduce exactly stays transformers' vision
model (`VisionConfig.library`): open_clip's SigLIP wraps timm's ViT, whose exact GELU differs from the
tanh GELU llava-hf's SigLIP configs ask for by up to ~5e-4 per activation, compounding over 26 blocks,
and open_clip's own ViT always has a class token, which SigLIP lacks.
"""
from __future__ import annotations

import inspect
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
SERVING_TOWERS = "open_clip ViTs (OpenAI CLIP, DFN, MetaCLIP) and timm ViT trunks (SigLIP, SigLIP2, EVA)"
# open_clip's preprocess `resize_mode` -> VisionConfig: squash (SigLIP) is a plain resize to the square, no pad;
# shortest (CLIP) LLaVA's pad to square, short side, centre crop; longest fits the image inside the square.
RESIZE_FROM_OPEN_CLIP = {"squash": ("exact", False), "shortest": ("shortest_edge", True), "longest": ("exact", True)}


def load_vision_tower(cfg: VisionConfig, checkpoint: Path | None = None) -> nn.Module:
    """An open_clip tower with patch tokens (or, with `library: transformers`, transformers' vision
    model), frozen, float32, in eval mode; other open_clip towers are refused (`check_tower`).

    Named pretrained weights (`cfg.pretrained`, e.g. ViT-L-14-336/openai) come through open_clip;
    otherwise the checkpoint's `vision/` folder holds an open_clip model config and the weights, or
    a transformers model folder.
    """
    if cfg.library == "transformers":
        return load_transformers_tower(Path(checkpoint or ".") / VISION_DIR)
    if cfg.pretrained:
        if open_clip.get_model_config(cfg.open_clip_model) is None:
            raise ValueError(f"vision tower {cfg.open_clip_model!r} is not an open_clip model name "
                             "(open_clip.list_models() names them; --vision)")
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
        visual = visual_from_config(json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model_cfg"])
        visual.load_state_dict(load_file(weights))
    check_tower(visual, cfg.open_clip_model)
    return visual.float().eval().requires_grad_(False)


def visual_from_config(model_cfg: dict) -> nn.Module:
    """The visual tower of an open_clip model config, random weights (the folder holds them).

    Built as `CLIP` and `CustomTextCLIP` (SigLIP's class) both build `.visual`, without their text
    tower: SigLIP-SO400M's has ~450M parameters, and an `hf_model_name` one would download a model.
    """
    vision_cfg = dict(model_cfg["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # timm would download its own weights
    return open_clip.model._build_vision_tower(model_cfg["embed_dim"], vision_cfg, model_cfg.get("quick_gelu", False))


def preprocess_settings(visual: nn.Module) -> dict:
    """VisionConfig fields for an open_clip tower's own preprocessing (`visual.preprocess_cfg`, which
    `create_model` fills from the pretrained tag: SigLIP's mean/std 0.5 and plain resize, CLIP's crop)."""
    pp = visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    if not isinstance(pp["size"], int) and pp["size"][0] != pp["size"][1]:
        raise ValueError(f"open_clip preprocessing size {tuple(pp['size'])} is not square; mmchat's towers see a square")
    if pp["resize_mode"] not in RESIZE_FROM_OPEN_CLIP:
        raise ValueError(f"open_clip resize_mode {pp['resize_mode']!r}; mmchat maps {sorted(RESIZE_FROM_OPEN_CLIP)}")
    resize, pad = RESIZE_FROM_OPEN_CLIP[pp["resize_mode"]]
    resample = {"bilinear": 2, "nearest": 0}.get(pp["interpolation"], 3)  # bicubic (and `random`, a training-time choice)
    return {"image_size": size, "mean": tuple(pp["mean"]), "std": tuple(pp["std"]), "resize": resize,
            "pad_to_square": pad, "resample": resample}


def _trunk(visual: nn.Module) -> nn.Module | None:
    """The timm trunk of an open_clip `TimmModel` (SigLIP, EVA, ...); None for other towers."""
    return visual.trunk if isinstance(visual, open_clip.timm_model.TimmModel) else None


def check_tower(visual: nn.Module, name: str) -> None:
    """Refuse, in one line naming the tower, an open_clip tower that gives no patch tokens."""
    if is_transformers_tower(visual) or isinstance(visual, open_clip.transformer.VisionTransformer):
        return
    trunk = _trunk(visual)
    if trunk is None:
        raise ValueError(f"vision tower {name}: open_clip's {type(visual).__name__} gives no patch tokens; mmchat "
                         f"takes {SERVING_TOWERS}")
    takes_tokens = callable(getattr(trunk, "forward_intermediates", None)) and \
        "return_prefix_tokens" in inspect.signature(trunk.forward_intermediates).parameters
    if not (takes_tokens and all(hasattr(trunk, a) for a in ("patch_embed", "blocks", "num_prefix_tokens"))):
        raise ValueError(f"vision tower {name}: its timm trunk {type(trunk).__name__} gives no patch tokens "
                         f"(no ViT forward_intermediates); mmchat takes {SERVING_TOWERS}")


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
    trunk = _trunk(visual)
    return len(trunk.blocks) if trunk is not None else len(visual.transformer.resblocks)


def feature_block(visual: nn.Module, layer: int) -> int:
    """0-based block whose output is hidden state `layer` (counted as transformers' hidden_states)."""
    n = num_blocks(visual)
    block = n + layer if layer < 0 else layer - 1
    if not 0 <= block < n:
        raise ValueError(f"vision select_layer={layer} is out of range for a {n}-block tower")
    return block


def tower_tokens(visual: nn.Module) -> tuple[int, int]:
    """(tokens before the patches, patches) one image gives: (1, grid) for CLIP, (0, grid) for SigLIP
    (timm trunks: their class and register tokens)."""
    if is_transformers_tower(visual):
        side = visual.config.image_size // visual.config.patch_size
        return TRANSFORMERS_TOWERS[visual.config.model_type], side * side
    trunk = _trunk(visual)
    if trunk is not None:
        grid = trunk.patch_embed.grid_size
        return trunk.num_prefix_tokens, grid[0] * grid[1]
    return 1, visual.grid_size[0] * visual.grid_size[1]  # open_clip's ViT always has a class token


def patch_size(visual: nn.Module) -> int:
    """The side of the tower's square patches (AnyRes tiles give image_size // patch_size tokens a side)."""
    if is_transformers_tower(visual):
        return visual.config.patch_size
    trunk = _trunk(visual)
    sides = tuple(trunk.patch_embed.patch_size) if trunk is not None else tuple(visual.patch_size)
    if sides[0] != sides[1]:
        raise ValueError(f"vision tower patches of {sides[0]}x{sides[1]} px; mmchat's towers have square patches")
    return int(sides[0])


def _has_class_token(visual: nn.Module) -> bool:
    trunk = _trunk(visual)
    return trunk is None or getattr(trunk, "cls_token", None) is not None  # open_clip's ViT always has one


def num_image_tokens(visual: nn.Module, cfg: VisionConfig) -> int:
    """How many slots one image fills. open_clip towers: the patches (`patch`), the class token then the
    patches (`cls_patch`), or the class token (`cls`). transformers towers, as llava-hf: every token
    less the first (`patch`, even on SigLIP), every token (`cls_patch`), or the first (`cls`)."""
    prefix, grid = tower_tokens(visual)
    if is_transformers_tower(visual):
        if cfg.select_feature == "cls" and not prefix:
            raise ValueError("vision select_feature='cls': this tower has no class token; use patch or cls_patch")
        return {"patch": prefix + grid - 1, "cls_patch": prefix + grid, "cls": 1}[cfg.select_feature]
    if cfg.select_feature != "patch" and not _has_class_token(visual):
        raise ValueError(f"vision select_feature={cfg.select_feature!r}: tower {cfg.open_clip_model} has no class "
                         "token; use patch (all its patch tokens)")
    return {"patch": grid, "cls_patch": 1 + grid, "cls": 1}[cfg.select_feature]


def feature_width(visual: nn.Module, cfg: VisionConfig) -> int:
    """The projector's input width: the tower's width once per selected layer."""
    if is_transformers_tower(visual):
        width = visual.config.hidden_size
    else:
        trunk = _trunk(visual)
        width = trunk.embed_dim if trunk is not None else visual.conv1.out_channels
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
        output_extra_tokens=True,  # the prefix tokens apart; absent on a tower without any (SigLIP)
    )
    features = []
    for block in blocks:
        i = taken.index(block)
        patches = out["image_intermediates"][i]  # [B, P, D]
        if cfg.select_feature == "patch":
            features.append(patches)
            continue
        cls = out["image_intermediates_prefix"][i][:, :1]  # [B, 1, D]: the class token leads (then any registers)
        features.append(cls if cfg.select_feature == "cls" else torch.cat([cls, patches], dim=1))
    return torch.cat(features, dim=-1)
