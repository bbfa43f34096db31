"""The training objective: summed cross-entropy over answer tokens only.

It is an `nn.Module` so that DistributedDataParallel wraps the whole forward pass. Logits are
computed only where the next token is an answer token (transformers' boolean `logits_to_keep`),
which for LLaVA data (576 image slots per example) saves most of the [B, L, vocab] logits.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from mmchat.conversation import IGNORE_INDEX
from mmchat.model import MultimodalModel


class AnswerLoss(nn.Module):
    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.model = model
        base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    def forward(self, input_ids, image_mask, attention_mask, labels, pixel_values=None, image_sizes=None,
                image_tiles=None) -> torch.Tensor:
        """[B, L] ids, masks and labels; pixel_values [N, 3, S, S] or None (an AnyRes model's tiles with
        image_sizes and image_tiles, see `MultimodalModel.forward`) -> the summed answer loss.

        Position t predicts labels[t + 1]; dividing by the answer-token count of the whole
        optimizer step (all micro-batches, all ranks) is left to the caller.
        """
        keep = torch.zeros_like(image_mask)  # [B, L] bool
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][keep[:, :-1]]  # [N]
        extra = {"logits_to_keep": keep} if self.keeps_logits else {}
        out = self.model(input_ids, image_mask, attention_mask, pixel_values, image_sizes=image_sizes,
                         image_tiles=image_tiles, use_cache=False, **extra)
        logits = out.logits if out.logits.dim() == 2 else out.logits[keep]  # [N, V]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if pixel_values is None or not len(pixel_values):
            # No image in this batch: keep the projector in the graph (gradient zero), so every DDP
            # rank reduces the same parameters and backward works when only the projector trains.
            loss = loss + 0.0 * sum(p.sum() for p in self.model.projector.parameters())
        return loss
