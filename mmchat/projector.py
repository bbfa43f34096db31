"""The projector from vision features to the LLM's embedding space (LLaVA's `mm_projector`)."""
from __future__ import annotations

import math

import torch
from torch import nn

from mmchat.config import ProjectorConfig


def build_projector(cfg: ProjectorConfig) -> nn.Module:
    """`linear` or `mlp2x_gelu`, parameter names as LLaVA's `mm_projector.*` keys: [B, T, in_dim] -> [B, T, out_dim].
    `resampler`: [B, T, in_dim] -> [B, queries, out_dim] (`Resampler`)."""
    if cfg.type == "resampler":
        return Resampler(cfg)
    if cfg.type == "linear":
        return nn.Linear(cfg.in_dim, cfg.out_dim, bias=cfg.bias)
    # transformers' own activation module, as llava-hf's projector uses; `gelu` is exact (erf) GELU,
    # as LLaVA's `nn.GELU()`: the tanh approximation would change the logits.
    from transformers.activations import ACT2FN

    return nn.Sequential(nn.Linear(cfg.in_dim, cfg.out_dim, bias=cfg.bias), ACT2FN[cfg.act],
                         nn.Linear(cfg.out_dim, cfg.out_dim, bias=cfg.bias))


class Resampler(nn.Module):
    """Qwen-VL's one cross-attention layer: `queries` learned vectors attend to the patch features and
    come out at the LLM's width, so an image costs `queries` tokens whatever the tower's grid. The keys
    carry a fixed 2-D sin-cos position of their patch: without it attention would be blind to where a
    patch is (any shuffle of the patches gives the same output).

    [B, T, in_dim] (T patches on a square grid, in reading order) -> [B, queries, out_dim]
    """

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(cfg.queries, cfg.out_dim), std=0.02))
        self.kv_proj = nn.Linear(cfg.in_dim, cfg.out_dim, bias=False)  # ln_kv's bias follows
        self.ln_q = nn.LayerNorm(cfg.out_dim)
        self.ln_kv = nn.LayerNorm(cfg.out_dim)
        self.attn = nn.MultiheadAttention(cfg.out_dim, cfg.heads, batch_first=True)
        self.ln_post = nn.LayerNorm(cfg.out_dim)
        self.proj = nn.Linear(cfg.out_dim, cfg.out_dim, bias=cfg.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(features))  # [B, T, D]
        pos = sincos_2d(patch_grid(features.shape[1]), kv.shape[-1]).to(kv)  # [T, D]
        queries = self.ln_q(self.query).expand(len(features), -1, -1)  # [B, Q, D]
        out, _ = self.attn(queries, kv + pos, kv, need_weights=False)  # positions on the keys only
        return self.proj(self.ln_post(out))  # [B, Q, D]


def patch_grid(tokens: int) -> int:
    """The side of the square patch grid `tokens` vision features form."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"the resampler places the {tokens} vision features on a square grid of patches, and {tokens} "
                         "is not a square; use vision select_feature 'patch' (the patches without a class token)")
    return side


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding (Qwen-VL's resampler) of a grid × grid patch map in
    reading order: [grid², dim], the row's sines and cosines in the first half, the column's in the second."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    halves = []
    for axis in (rows, cols):
        angles = axis.reshape(-1, 1) * freqs  # [grid², dim/4]
        halves += [angles.sin(), angles.cos()]
    return torch.cat(halves, dim=1).float()
