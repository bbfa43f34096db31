"""CLIP vision towers between transformers (`CLIPVisionModel`) and open_clip (`VisionTransformer`).

Only the image encoder is mapped; LLaVA never uses the text tower. Key correspondence
(transformers ↔ open_clip), verified feature-for-feature by `tests/test_convert.py`:

    embeddings.class_embedding               class_embedding
    embeddings.patch_embedding.weight        conv1.weight
    embeddings.position_embedding.weight     positional_embedding
    pre_layrnorm / post_layernorm            ln_pre / ln_post
    encoder.layers.i.self_attn.{q,k,v}_proj  transformer.resblocks.i.attn.in_proj_{weight,bias} (q, k, v stacked)
    encoder.layers.i.self_attn.out_proj      transformer.resblocks.i.attn.out_proj
    encoder.layers.i.layer_norm{1,2}         transformer.resblocks.i.ln_{1,2}
    encoder.layers.i.mlp.fc{1,2}             transformer.resblocks.i.mlp.c_{fc,proj}
    visual_projection.weight (CLIPModel)     proj, transposed
"""
from __future__ import annotations

import open_clip
import torch
from torch import nn

HF_ACTS = {"quick_gelu": True, "gelu": False}  # transformers hidden_act -> open_clip quick_gelu
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm always uses torch's default

# open_clip builds the whole CLIP from a config; the checkpoint holds only `visual`, so the
# text tower is a throwaway placeholder kept as small as open_clip allows.
PLACEHOLDER_TEXT_CFG = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


class UnsupportedTower(ValueError):
    """A vision tower that cannot be expressed on the other side without changing its outputs."""


def open_clip_cfg_from_hf(config) -> dict:
    """transformers `CLIPVisionConfig` -> open_clip CLIP model config (`vision_cfg` + placeholder text)."""
    if config.hidden_act not in HF_ACTS:
        raise UnsupportedTower(f"vision hidden_act={config.hidden_act!r}; open_clip supports {sorted(HF_ACTS)}")
    if abs(config.layer_norm_eps - LAYER_NORM_EPS) > 1e-12:
        raise UnsupportedTower(f"vision layer_norm_eps={config.layer_norm_eps}; open_clip's CLIP uses {LAYER_NORM_EPS}")
    if config.num_channels != 3:
        raise UnsupportedTower(f"vision num_channels={config.num_channels}; CLIP takes RGB (3)")
    width, heads = config.hidden_size, config.num_attention_heads
    mlp_ratio = config.intermediate_size / width
    if width % heads or int(width * mlp_ratio) != config.intermediate_size:
        raise UnsupportedTower(f"vision hidden_size={width}, heads={heads}, intermediate_size={config.intermediate_size} do not fit open_clip")
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": HF_ACTS[config.hidden_act],
        "vision_cfg": {
            "image_size": config.image_size,
            "layers": config.num_hidden_layers,
            "width": width,
            "head_width": width // heads,
            "mlp_ratio": mlp_ratio,
            "patch_size": config.patch_size,
        },
        "text_cfg": PLACEHOLDER_TEXT_CFG,
    }


def hf_config_from_open_clip(visual: nn.Module):
    """open_clip `VisionTransformer` -> transformers `CLIPVisionConfig`, read off the modules themselves
    (a named open_clip config does not say QuickGELU; the pretrained tag does)."""
    from transformers import CLIPVisionConfig

    check_plain_vit(visual)
    block = visual.transformer.resblocks[0]
    act = "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    if act == "gelu" and not (isinstance(block.mlp.gelu, nn.GELU) and block.mlp.gelu.approximate == "none"):
        raise UnsupportedTower(f"vision activation {block.mlp.gelu}; transformers' CLIP supports QuickGELU or exact GELU")
    return CLIPVisionConfig(
        hidden_size=visual.conv1.out_channels,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        projection_dim=visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels,
        hidden_act=act,
        layer_norm_eps=LAYER_NORM_EPS,
    )


def check_plain_vit(visual: nn.Module) -> None:
    """Refuse open_clip options transformers' CLIP has no equivalent for (layer scale, attention pooling, ...)."""
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise UnsupportedTower(f"{type(visual).__name__} is not open_clip's VisionTransformer")
    block = visual.transformer.resblocks[0]
    problems = []
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        problems.append("no ln_pre")
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attentional pooling")
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        problems.append("layer scale")
    if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
        problems.append("attention layer norm")
    if not isinstance(block.attn, nn.MultiheadAttention):
        problems.append(f"{type(block.attn).__name__} attention")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        problems.append("non-square image or patch size")
    if problems:
        raise UnsupportedTower(f"this open_clip vision tower has {', '.join(problems)}; transformers' CLIPVisionModel cannot express it")


BLOCK_NAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def renames(layers: int) -> list[tuple[str, str]]:
    """(transformers key, open_clip key) for every tensor that maps one to one (all but q/k/v and proj)."""
    pairs = [
        ("embeddings.class_embedding", "class_embedding"),
        ("embeddings.patch_embedding.weight", "conv1.weight"),
        ("embeddings.position_embedding.weight", "positional_embedding"),
    ]
    modules = [("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")]
    for i in range(layers):
        modules += [(f"encoder.layers.{i}.{hf}", f"transformer.resblocks.{i}.{oc}") for hf, oc in BLOCK_NAMES]
    return pairs + [(f"{hf}.{p}", f"{oc}.{p}") for hf, oc in modules for p in ("weight", "bias")]


def hf_to_open_clip(hf_state: dict[str, torch.Tensor], layers: int, projection: torch.Tensor | None, embed_dim: int) -> dict[str, torch.Tensor]:
    """`CLIPVisionModel.state_dict()` (+ `visual_projection.weight` [E, W] or None) -> open_clip `visual` state.

    Without a projection `proj` is zeros [W, E]: LLaVA reads hidden states, never the pooled embedding.
    """
    hf = {k.removeprefix("vision_model."): v for k, v in hf_state.items()}
    out = {oc: hf[name] for name, oc in renames(layers)}
    for i in range(layers):
        for p in ("weight", "bias"):  # open_clip's MultiheadAttention stacks q, k, v: [3W, W] and [3W]
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat([hf[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"])
    width = out["class_embedding"].shape[0]
    out["proj"] = projection.T if projection is not None else torch.zeros(width, embed_dim)
    return {k: v.contiguous() for k, v in out.items()}


def open_clip_to_hf(visual_state: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """open_clip `visual` state -> (`CLIPVisionModel.state_dict()`, `visual_projection.weight` [E, W] or None)."""
    out = {name: visual_state[oc] for name, oc in renames(layers)}
    for i in range(layers):
        for p in ("weight", "bias"):
            for x, part in zip("qkv", visual_state[f"transformer.resblocks.{i}.attn.in_proj_{p}"].chunk(3)):
                out[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] = part
    proj = visual_state.get("proj")
    return {k: v.contiguous() for k, v in out.items()}, (proj.T.contiguous() if proj is not None else None)


def open_clip_from_hf(tower: nn.Module, projection: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """A transformers `CLIPVisionModel` -> (open_clip `VisionTransformer` float32, its CLIP model config)."""
    model_cfg = open_clip_cfg_from_hf(tower.config)
    visual = open_clip.CLIP(**model_cfg).visual
    state = hf_to_open_clip(tower.state_dict(), tower.config.num_hidden_layers, projection, model_cfg["embed_dim"])
    visual.load_state_dict({k: v.float() for k, v in state.items()})
    return visual.eval(), model_cfg


def hf_from_open_clip(visual: nn.Module, dtype: torch.dtype = torch.float32):
    """An open_clip `VisionTransformer` -> transformers `CLIPVisionModel` (its `visual_projection` is dropped:
    llava-hf's tower has none)."""
    from transformers import CLIPVisionModel

    config = hf_config_from_open_clip(visual)
    state, _ = open_clip_to_hf(visual.state_dict(), config.num_hidden_layers)
    tower = CLIPVisionModel(config)
    tower.load_state_dict(state)  # strict: every transformers weight must come from open_clip
    return tower.to(dtype).eval()
