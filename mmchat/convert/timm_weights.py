"""timm ViT trunks (open_clip's `TimmModel`: SigLIP, SigLIP2) -> transformers' `SiglipVisionModel`, for `--to llava-hf`.

Only trunks `SiglipVisionModel` computes exactly are mapped: timm's plain `VisionTransformer` with no class
or register tokens, a learned position embedding, pre-norm `Block`s of fused-qkv `Attention` and a two-layer
`Mlp`. Key correspondence (transformers ↔ timm trunk), verified feature-for-feature by
`tests/test_export_towers.py`:

    embeddings.patch_embedding               patch_embed.proj
    embeddings.position_embedding.weight     pos_embed[0]
    encoder.layers.i.layer_norm{1,2}         blocks.i.norm{1,2}
    encoder.layers.i.self_attn.{q,k,v}_proj  blocks.i.attn.qkv (q, k, v stacked)
    encoder.layers.i.self_attn.out_proj      blocks.i.attn.proj
    encoder.layers.i.mlp.fc{1,2}             blocks.i.mlp.fc{1,2}
    post_layernorm                           norm

A bias timm leaves out (`qkv_bias=False`) becomes zeros, a norm without affine weights ones and zeros: the
same numbers. The pooling head (SigLIP's `map` attention pool) and open_clip's projection are dropped:
LLaVA reads hidden states (`vision_use_head=False`).
"""
from __future__ import annotations

import torch
from timm.layers import GELU, GELUTanh, Mlp, PatchEmbed
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from mmchat.convert.clip_weights import UnsupportedTower


def hf_act(act: nn.Module) -> str | None:
    """transformers' `hidden_act` computing exactly what a timm MLP activation does; None if none does."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    return {GELU: "gelu", GELUTanh: "gelu_pytorch_tanh"}.get(type(act))


def block_problems(block: nn.Module) -> list[str]:
    if type(block) is not Block:
        return [f"{type(block).__name__} blocks"]
    attn, problems = block.attn, []
    if type(attn) is not Attention:
        return [f"{type(attn).__name__} attention"]
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        problems.append("qk-norm")
    if not isinstance(attn.norm, nn.Identity):
        problems.append("an attention scale norm")
    if getattr(attn, "gate", None) is not None:  # timm releases before gated attention have no `gate`
        problems.append("gated attention")
    if attn.attn_dim != attn.qkv.in_features:
        problems.append("an attention width unlike the model width")
    if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
        problems.append("layer scale")
    if type(block.mlp) is not Mlp or not isinstance(block.mlp.fc1, nn.Linear):
        problems.append(f"a {type(block.mlp).__name__} MLP")  # SwiGLU (EVA), GluMlp, conv MLPs
    elif not isinstance(block.mlp.norm, nn.Identity):
        problems.append("an MLP scale norm")
    elif hf_act(block.mlp.act) is None:
        problems.append(f"activation {block.mlp.act}")
    if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
        problems.append(f"{type(block.norm1).__name__} norms")
    return problems


def check_siglip_trunk(trunk: nn.Module) -> None:
    """Refuse, in one line, a timm trunk `SiglipVisionModel` would compute differently."""
    if type(trunk) is not VisionTransformer:
        raise UnsupportedTower(f"its timm trunk is a {type(trunk).__name__}, not timm's VisionTransformer")
    problems = []
    if trunk.cls_token is not None:
        problems.append("a class token")
    if trunk.reg_token is not None:
        problems.append(f"{trunk.num_reg_tokens} register tokens")
    if trunk.pos_embed is None:
        problems.append("no learned position embedding")
    embed = trunk.patch_embed
    if type(embed) is not PatchEmbed:
        problems.append(f"a {type(embed).__name__} patch embedding")
    elif not isinstance(embed.norm, nn.Identity):
        problems.append("a patch-embedding norm")
    if embed.patch_size[0] != embed.patch_size[1] or embed.img_size[0] != embed.img_size[1]:
        problems.append("a non-square image or patch size")
    if not isinstance(trunk.norm_pre, nn.Identity):
        problems.append("a pre-norm")
    if not isinstance(trunk.norm, nn.LayerNorm):
        problems.append("no final LayerNorm")
    for block in trunk.blocks:
        problems += block_problems(block)
    if not problems and len(set(norm_eps(trunk))) > 1:
        problems.append(f"layer-norm eps {sorted(set(norm_eps(trunk)))}")
    if problems:
        raise UnsupportedTower(f"its timm trunk has {', '.join(dict.fromkeys(problems))}; "
                               "transformers' SiglipVisionModel cannot express it")


def norm_eps(trunk: VisionTransformer) -> list[float]:
    return [trunk.norm.eps] + [n.eps for b in trunk.blocks for n in (b.norm1, b.norm2)]


def siglip_config_from_timm(trunk: VisionTransformer):
    """A checked timm trunk -> transformers `SiglipVisionConfig`, read off the modules themselves."""
    from transformers import SiglipVisionConfig

    check_siglip_trunk(trunk)
    block = trunk.blocks[0]
    return SiglipVisionConfig(
        hidden_size=trunk.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(trunk.blocks),
        num_attention_heads=block.attn.num_heads,
        num_channels=trunk.patch_embed.proj.in_channels,
        image_size=trunk.patch_embed.img_size[0],
        patch_size=trunk.patch_embed.patch_size[0],
        hidden_act=hf_act(block.mlp.act),  # timm's ViT default is exact GELU; SigLIP's llava-hf configs say tanh
        layer_norm_eps=trunk.norm.eps,
        vision_use_head=False,
    )


def _params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a Linear, Conv2d or LayerNorm; an absent one as the identity's (ones, zeros)."""
    weight = module.weight if module.weight is not None else torch.ones(module.normalized_shape)  # a norm without affine
    bias = module.bias if module.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return weight, bias


def timm_to_siglip(trunk: VisionTransformer) -> dict[str, torch.Tensor]:
    """A checked timm trunk -> `SiglipVisionModel.state_dict()` (no head)."""
    modules = {"embeddings.patch_embedding": trunk.patch_embed.proj, "post_layernorm": trunk.norm}
    out = {"embeddings.position_embedding.weight": trunk.pos_embed[0]}
    for i, block in enumerate(trunk.blocks):
        hf = f"encoder.layers.{i}"
        modules |= {f"{hf}.layer_norm1": block.norm1, f"{hf}.layer_norm2": block.norm2,
                    f"{hf}.self_attn.out_proj": block.attn.proj, f"{hf}.mlp.fc1": block.mlp.fc1, f"{hf}.mlp.fc2": block.mlp.fc2}
        weight, bias = _params(block.attn.qkv)  # [3W, W], [3W]: q, k, v stacked
        for x, w, b in zip("qkv", weight.chunk(3), bias.chunk(3)):
            out |= {f"{hf}.self_attn.{x}_proj.weight": w, f"{hf}.self_attn.{x}_proj.bias": b}
    for name, module in modules.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = _params(module)
    return {k: v.detach().contiguous() for k, v in out.items()}


def siglip_from_timm(visual: nn.Module, dtype: torch.dtype = torch.float32):
    """An open_clip `TimmModel` around a mappable timm ViT -> transformers `SiglipVisionModel` (no head)."""
    from transformers import SiglipVisionModel

    config = siglip_config_from_timm(visual.trunk)
    tower = SiglipVisionModel(config)
    tower.load_state_dict(timm_to_siglip(visual.trunk))  # strict: every transformers weight comes from timm
    return tower.to(dtype).eval()
