"""Sampling settings, next-token choice (temperature, top-p, repetition penalty) and stop ids."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.2
    """0 (or below 1e-5) decodes greedily. 0.2 / top-p 0.7 are LLaVA's web-demo defaults."""
    top_p: float = 0.7
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the context (CTRL-style, as transformers applies it)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1 (--max-new-tokens)")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also NaN
            raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0 (--temperature; 0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (--top-p)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def decoding_defaults(config, **overrides) -> GenerationConfig:
    """A model's decoding defaults (`ModelConfig.temperature/top_p/max_new_tokens`, set from a
    converted folder's generation config), else LLaVA's; `overrides` that are not None win."""
    own = {"temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens}
    chosen = {k: v for k, v in own.items() if v is not None} | {k: v for k, v in overrides.items() if v is not None}
    return replace(GenerationConfig(), **chosen)


def stop_ids(stop_token_ids: list[int] | None, eos_token_id: int | None,
             end_of_turn_id: int | None = None) -> frozenset[int]:
    """The ids that end an answer: a checkpoint's `stop_token_ids` (ModelConfig; a converted folder's
    generation config, kept exactly so answers end where transformers' do), else the tokenizer's
    EOS and the chat template's end-of-turn token (`<|im_end|>` when EOS is `<|endoftext|>`)."""
    if stop_token_ids is not None:
        return frozenset(stop_token_ids)
    return frozenset(t for t in (eos_token_id, end_of_turn_id) if t is not None)


TOP_P_CANDIDATES = 64
"""Top-p first looks among a row's 64 likeliest tokens (a partial sort); only a row whose nucleus is
wider sorts its whole vocabulary. Either way it keeps the tokens a full sort keeps."""


def choose_tokens(logits: torch.Tensor, gens: list[GenerationConfig], generators: list[torch.Generator | None],
                  seen: list[torch.Tensor | None]) -> list[int]:
    """logits [B, V] of each row's last position -> each row's token, with one host sync for the batch.

    Row i follows `gens[i]`: greedy rows take the argmax; the others sample at their temperature from
    their top-p nucleus, drawing from `generators[i]` (a seeded request draws the same tokens alone and in
    any batch) or, if None, from torch's default generator. `seen[i]` [V] bool marks the tokens the
    repetition penalty discourages (None: no penalty). A row whose probabilities overflow (non-finite
    logits) takes its argmax, NaNs ignored.
    """
    logits = logits.float()
    if any(s is not None for s in seen):
        no_penalty = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        mask = torch.stack([no_penalty if s is None else s for s in seen])  # [B, V]
        penalty = _to_device([g.repetition_penalty for g in gens], logits).unsqueeze(1)  # [B, 1]
        # Out of place: the logits come from inference mode and cannot be written to.
        logits = torch.where(mask, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    rows = [i for i, g in enumerate(gens) if not g.greedy]
    if not rows:
        return torch.argmax(logits, dim=-1).tolist()
    if len(rows) == len(gens):
        return _sample(logits, gens, generators).tolist()
    chosen = torch.argmax(logits, dim=-1)  # [B]
    index = _to_device(rows, chosen)
    chosen[index] = _sample(logits[index], [gens[i] for i in rows], [generators[i] for i in rows])
    return chosen.tolist()


def _sample(logits: torch.Tensor, gens: list[GenerationConfig], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [R, V] -> [R] tokens drawn from each row's top-p nucleus at its temperature."""
    temperature = _to_device([g.temperature for g in gens], logits).unsqueeze(1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [R, V]
    u = _uniforms(generators, logits.device)
    tokens, total = torch.empty(len(gens), dtype=torch.long, device=logits.device), torch.empty_like(u)
    whole = [i for i, g in enumerate(gens) if g.top_p >= 1.0]
    if whole:
        whole = _to_device(whole, tokens)
        tokens[whole], total[whole] = _draw(probs[whole], u[whole])
    cut = [i for i, g in enumerate(gens) if g.top_p < 1.0]
    if cut:
        top_p = _to_device([g.top_p for g in gens], logits).unsqueeze(1)
        for rows, sorted_probs, order in _nuclei(probs, top_p, _to_device(cut, tokens)):
            rank, total[rows] = _draw(sorted_probs, u[rows])
            tokens[rows] = order.gather(1, rank.unsqueeze(1)).squeeze(1)
    # Logits that overflowed: the most likely token is the only sane pick. (Only a GPU pays for a check.)
    unusable = ~torch.isfinite(total) | (total <= 0)
    if logits.device.type == "cpu" and not bool(unusable.any()):
        return tokens
    return torch.where(unusable, torch.argmax(torch.nan_to_num(logits, nan=-float("inf")), dim=-1), tokens)


def _to_device(values: list, like: torch.Tensor) -> torch.Tensor:
    """A small list as a tensor of `like`'s dtype and device, copied from pinned memory without waiting on
    a GPU: the batch's one host sync stays the tokens' read."""
    host = torch.tensor(values, dtype=like.dtype)
    return host if like.device.type == "cpu" else host.pin_memory().to(like.device, non_blocking=True)


def _uniforms(generators: list[torch.Generator | None], device) -> torch.Tensor:
    """[R] uniform numbers in [0, 1), one per row, which `_draw` turns into its token: a seeded row's from
    its own generator (the same tokens alone and in any batch), the others' from torch's default one."""
    if all(g is None for g in generators):
        return torch.rand(len(generators), device=device)
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


def _draw(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [R, K] (unnormalised, zeros never drawn), u [R] uniform in [0, 1) -> ([R] index, [R] total mass)."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    index = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
    # u * total may round up to the total: take the token where the mass reaches it then (NaNs: any
    # index, the caller takes the argmax).
    index = torch.minimum(index, torch.searchsorted(cdf, total.contiguous())).clamp_(max=probs.shape[-1] - 1)
    return index.squeeze(1), total.squeeze(1)


def _nuclei(probs: torch.Tensor, top_p: torch.Tensor, rows: torch.Tensor):
    """For `rows` [r] of probs [R, V]: yields (rows, their probabilities sorted [r, K] and zero outside their
    top-p [R, 1] nucleus, the token ids [r, K]). The nucleus is the smallest prefix of the sorted
    probabilities whose mass reaches top_p. A row whose nucleus fits in its `TOP_P_CANDIDATES` likeliest
    tokens takes them (K = 64, a partial sort); a wider one sorts all V: each row's own values decide."""
    vocab = probs.shape[-1]
    # A GPU sorts the whole vocabulary quickly, and checking which rows a partial sort settles would cost it
    # a sync (a CPU none).
    if probs.device.type == "cpu" and vocab > TOP_P_CANDIDATES:
        values, order = torch.topk(probs[rows], TOP_P_CANDIDATES, dim=-1)
        drop = _beyond_nucleus(values, top_p[rows])
        # cumsum - p grows along a sorted row, so a row that drops its k-th token drops every later one.
        narrow = drop[:, -1]
        if bool(narrow.any()):
            yield rows[narrow], values[narrow].masked_fill(drop[narrow], 0.0), order[narrow]
        rows = rows[~narrow]
        if not len(rows):
            return
    values, order = torch.sort(probs[rows], dim=-1, descending=True)
    yield rows, values.masked_fill(_beyond_nucleus(values, top_p[rows]), 0.0), order


def _beyond_nucleus(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, K] True where a sorted row's mass before the token already reaches top_p. The first token
    always stays: a top_p below float32's smallest number (1e-300) is 0 here, and would drop every token."""
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    drop[:, 0] = False
    return drop
