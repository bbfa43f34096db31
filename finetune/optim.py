"""Optimizer (parameter groups with the projector's own learning rate) and learning-rate schedule."""
from __future__ import annotations

import math

import torch

from finetune.train_config import ConfigError, TrainConfig
from mmchat.model import MultimodalModel


def param_groups(model: MultimodalModel, cfg: TrainConfig) -> list[dict]:
    """`llm` (LoRA or all LLM weights, at --lr) and `projector` (at --projector-lr, else --lr)."""
    groups = []
    llm = [p for p in model.llm.parameters() if p.requires_grad]
    if llm:
        groups.append({"name": "llm", "params": llm, "lr": cfg.lr})
    groups.append({"name": "projector", "params": list(model.projector.parameters()), "lr": cfg.projector_lr or cfg.lr})
    return groups


def optimizer_name(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.optimizer == "auto":
        return "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if cfg.optimizer != "adamw" and device.type != "cuda":
        raise ConfigError(f"--optimizer {cfg.optimizer} needs a CUDA GPU; use --optimizer adamw on the CPU")
    return cfg.optimizer


def make_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: torch's on CPU; bitsandbytes' 8-bit (paged: spills to CPU memory under pressure) on GPU."""
    name = optimizer_name(cfg, device)
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999)}
    if name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    optimizer = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return optimizer(groups, **kwargs)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor of the demo's pretraining loops: linear warmup over `warmup` steps, cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup over --warmup-ratio of the steps, then cosine / linear decay to 0, or constant."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
