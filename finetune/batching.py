"""Batches: dynamic padding, and a length-grouped, resumable, rank-sharded batch order.

The order of an epoch depends only on (seed, epoch): every rank computes the same list of
global batches and takes its share, and a resumed run starts at a global batch position.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from mmchat.conversation import IGNORE_INDEX

MEGA_BATCH = 50
"""Global batches per length-sorted group: the order stays random across groups (HF's choice)."""


def collate(examples: list[dict], pad_id: int) -> dict:
    """Examples -> a right-padded batch.

    input_ids, labels (IGNORE_INDEX on padding), attention_mask, image_mask: [B, L] with L the
    longest example; pixel_values: [N, 3, S, S], the batch's images in order (None when N is 0).
    AnyRes examples' tiles are concatenated, [sum tiles_i, 3, S, S], with image_sizes [N, 2] and
    image_tiles [N] to tell the images apart (both None for other models).
    """
    errors = [e["error"] for e in examples if "error" in e]
    if errors:
        return {"error": errors[0]}
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        "image_mask": torch.zeros((len(examples), length), dtype=torch.bool),
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = e["input_ids"]
        batch["labels"][row, :n] = e["labels"]
        batch["attention_mask"][row, :n] = 1
        batch["image_mask"][row, :n] = e["image_mask"]
    images = [e["pixel_values"] for e in examples if e["pixel_values"] is not None]
    batch["pixel_values"] = torch.cat(images) if images else None
    sizes = [e["image_size"] for e in examples if e.get("image_size") is not None]
    batch["image_sizes"] = torch.stack(sizes) if sizes else None  # [N, 2]
    batch["image_tiles"] = torch.tensor([len(p) for p in images]) if sizes else None  # [N]
    return batch


def global_batches(lengths: np.ndarray, batch_size: int, world_size: int, seed: int, epoch: int,
                   group_by_length: bool) -> list[np.ndarray]:
    """One epoch's global batches (`batch_size * world_size` record indices each).

    With `group_by_length`, a random permutation is cut into groups of MEGA_BATCH global
    batches, each sorted by length; batches are then shuffled, the one holding the longest
    record first (an out-of-memory error shows at step 1, not hours in). For several ranks the
    order is padded by wrapping around to a multiple of `world_size`, so every rank gets a share
    of every batch.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if len(order) % world_size:
        order = np.concatenate([order, order[: world_size - len(order) % world_size]])
    size = batch_size * world_size
    if group_by_length:
        groups = [order[i:i + size * MEGA_BATCH] for i in range(0, len(order), size * MEGA_BATCH)]
        order = np.concatenate([g[np.argsort(-lengths[g], kind="stable")] for g in groups])
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda i: lengths[batches[i]].max())
        batches.insert(0, batches.pop(longest))
    return batches


def padding_fraction(batches: list[np.ndarray], lengths: np.ndarray, world_size: int = 1) -> float:
    """Share of padded positions when each rank pads its part of each batch to its longest record."""
    padded = total = 0
    for batch in batches:
        for rank in range(world_size):
            part = lengths[batch[rank::world_size]]
            padded += int(part.max()) * len(part)
            total += int(part.sum())
    return 1.0 - total / padded if padded else 0.0


class RankBatchSampler(Sampler[list[int]]):
    """This rank's share (`batch[rank::world_size]`) of each global batch, from a start position."""

    def __init__(self, lengths: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.start = 0, 0
        self._batches = self._compute()

    def _compute(self) -> list[np.ndarray]:
        return global_batches(self.lengths, self.batch_size, self.world_size, self.seed, self.epoch,
                              self.group_by_length)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate `epoch`'s batches from global batch `start` (a resumed run's data position)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches = self._compute()
        self.start = start

    @property
    def batches(self) -> list[np.ndarray]:
        """All global batches of the current epoch."""
        return self._batches

    def __len__(self) -> int:
        return len(self._batches) - self.start

    def __iter__(self):
        for batch in self._batches[self.start:]:
            yield batch[self.rank::self.world_size].tolist()
