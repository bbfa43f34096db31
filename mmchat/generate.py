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


def next_token(
    logits: torch.Tensor, context_ids: torch.Tensor | None, cfg: GenerationConfig, generator: torch.Generator | None
) -> int:
    """logits [V] of the last position -> the chosen token id; `context_ids` [N] are penalised."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and context_ids is not None and context_ids.numel():
        seen = logits[context_ids]
        # Out of place: the logits come from inference mode and cannot be written to.
        logits = logits.scatter(0, context_ids, torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty))
    if cfg.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p. The first token always stays: a top_p
        # below float32's smallest number (1e-300) is 0 here, and would otherwise drop every token.
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= cfg.top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:  # logits that overflowed: the most likely token is the only sane pick
        return int(torch.argmax(torch.nan_to_num(logits, nan=-float("inf"))))
    return int(torch.multinomial(probs / total, 1, generator=generator))
