"""The projector from vision features to the LLM's embedding space (LLaVA's `mm_projector`)."""
from __future__ import annotations

from torch import nn

from mmchat.config import ProjectorConfig


def build_projector(cfg: ProjectorConfig) -> nn.Module:
    """`linear` or `mlp2x_gelu`; parameter names match LLaVA's `mm_projector.*` keys.

    [B, T, in_dim] -> [B, T, out_dim]
    """
    if cfg.type == "linear":
        return nn.Linear(cfg.in_dim, cfg.out_dim, bias=cfg.bias)
    # transformers' own activation module, as llava-hf's projector uses; `gelu` is exact (erf) GELU,
    # as LLaVA's `nn.GELU()`: the tanh approximation would change the logits.
    from transformers.activations import ACT2FN

    return nn.Sequential(nn.Linear(cfg.in_dim, cfg.out_dim, bias=cfg.bias), ACT2FN[cfg.act],
                         nn.Linear(cfg.out_dim, cfg.out_dim, bias=cfg.bias))
