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


def lr_factor(step: int, warmup: int, total: int, decay: str = "cosine", hold: int = 0) -> float:
    """The learning rate's multiplier at 0-based `step` of `total`: a linear warmup over `warmup` steps
    (1/(warmup+1) .. warmup/(warmup+1): no step is wasted at 0), `hold` steps at the peak, then
    `decay` ("cosine", "linear" or "constant") from 1 at step warmup + hold to 0 at `total`.
    The one schedule of the training kit (hold 0) and the demo's pretraining."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step < warmup + hold or decay == "constant":
        return 1.0
    progress = (step - warmup - hold) / max(1, total - warmup - hold)
    if decay == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """`lr_factor` with --lr-scheduler's decay after a warmup over --warmup-ratio of the steps."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    decay = cfg.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, decay))
