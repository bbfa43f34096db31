"""Which library runs a converted vision tower, and the tuned tower weights a LLaVA checkpoint carries.

A llava-hf CLIP tower open_clip can express (QuickGELU or exact GELU, layer-norm eps 1e-5) becomes
open_clip's ViT: feature-for-feature equal, and the tower mmchat trains with. Any other tower (SigLIP:
tanh GELU, eps 1e-6, no class token) stays transformers' own vision model, saved with
`save_pretrained` and run as llava-hf runs it (`mmchat.vision`, `VisionConfig.library`).
"""
from __future__ import annotations

import open_clip
import torch
from torch import nn

from mmchat.convert.clip_weights import PLACEHOLDER_TEXT_CFG, UnsupportedTower, hf_to_open_clip, open_clip_from_hf
from mmchat.convert.common import ConvertError, log
from mmchat.vision import TRANSFORMERS_TOWERS

# Where original LLaVA checkpoints that tuned their tower (xtuner's, LLaVA's `unfreeze_mm_vision_tower`)
# keep it: LLaVA's `CLIPVisionTower.vision_tower` is a transformers `CLIPVisionModel`.
TUNED_TOWER_PREFIX = "model.vision_tower.vision_tower."


def tower_from_hf(tower: nn.Module) -> tuple[str, nn.Module, dict]:
    """A llava-hf `vision_tower` -> (`VisionConfig.library`, the float32 module mmchat runs, its
    config as the checkpoint's `vision/` folder records it)."""
    model_type = tower.config.model_type
    if model_type not in TRANSFORMERS_TOWERS:
        raise ConvertError(f"vision tower {model_type!r}: mmchat runs {', '.join(sorted(TRANSFORMERS_TOWERS))}")
    if model_type == "clip_vision_model":
        try:
            visual, clip_cfg = open_clip_from_hf(tower)
            return "open_clip", visual, clip_cfg
        except UnsupportedTower as e:
            log(f"note: {e}; the tower stays transformers' CLIPVisionModel")
    else:
        log(f"vision tower {model_type}: kept as transformers' own model (open_clip cannot run it exactly)")
    tower = tower.float().eval()
    return "transformers", tower, tower.config.to_dict()


def with_tuned_tower(settings: dict, visual: nn.Module | None, clip_cfg: dict | None, tuned: dict[str, torch.Tensor],
                     tower_name: str) -> tuple[dict, nn.Module, dict]:
    """The checkpoint's own CLIP weights (`CLIPVisionModel` keys, `vision_model.*`) on the named
    tower's architecture: (VisionConfig fields, open_clip visual, its config) with the weights in `vision/`.

    `visual` is the local folder's tower, or None for a named open_clip tower (`settings` name it).
    """
    if visual is None:
        model, tag = settings["open_clip_model"], settings["pretrained"]
        named = open_clip.get_model_config(model)
        quick_gelu = bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", named.get("quick_gelu", False)))
        clip_cfg = {"embed_dim": named["embed_dim"], "quick_gelu": quick_gelu, "vision_cfg": named["vision_cfg"],
                    "text_cfg": PLACEHOLDER_TEXT_CFG}
        visual = open_clip.CLIP(**clip_cfg).visual
    layers = len(visual.transformer.resblocks)
    try:
        state = hf_to_open_clip(tuned, layers, None, clip_cfg["embed_dim"])
    except KeyError as e:
        raise ConvertError(f"the checkpoint's vision tower weights ({TUNED_TOWER_PREFIX}*) lack {e.args[0]}; "
                           f"they do not fit {tower_name}") from None
    state["proj"] = visual.state_dict()["proj"]  # LLaVA reads hidden states; the projection is never used
    try:
        visual.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]  # one line: load_state_dict lists every mismatch on its own line
        raise ConvertError(f"the checkpoint's vision tower weights ({TUNED_TOWER_PREFIX}*) do not fit {tower_name}: {why}") from None
    log(f"vision tower: the checkpoint's own weights ({len(tuned)} tensors) on {tower_name}'s architecture")
    return {**settings, "pretrained": None}, visual.eval(), clip_cfg
