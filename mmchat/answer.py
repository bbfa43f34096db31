"""One answer being generated, token by token: the choice of each token, where the answer stops
(stop tokens, stop strings, the token budget), the text shown so far, and the turn's statistics.

The model's forward passes are not here: a chat session feeds an `Answer` the logits of its own
forwards, and `mmchat.engine` feeds many answers the rows of one batched forward, so both paths
stop, stream and count in exactly the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mmchat.generate import GenerationConfig, next_token


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    """Tokens of the rendered conversation fed to the model this turn."""
    prefill_tokens: int = 0
    """Of those, how many were computed now (the rest came from the KV cache)."""
    new_tokens: int = 0
    answer_ids: list[int] = field(default_factory=list)
    """The generated token ids (the stop token excluded), for exact comparisons."""
    dropped_turns: int = 0
    finish_reason: str = ""
    """`stop` (a stop token or stop string ended the answer) or `length` (the token budget did)."""
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    decode_model_seconds: float = 0.0
    """Of decode_seconds, the time inside the LLM's forward; the rest is the session's own work
    per token (choosing, detokenising, stop strings, streaming)."""
    batch_size: int = 1
    """The most answers decoded together with this one (`mmchat.engine`; 1 alone)."""

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds > 0 else 0.0


class Answer:
    """Chooses tokens from logits until the answer ends; `push` returns the text to show now."""

    def __init__(self, tokenizer, gen: GenerationConfig, stop_tokens: frozenset[int], stop_strings: tuple[str, ...],
                 budget: int, stats: TurnStats, context_ids: list[int], device):
        self.tokenizer, self.gen, self.stats = tokenizer, gen, stats
        self.stop_tokens, self.stop_strings, self.budget = stop_tokens, stop_strings, budget
        # The repetition penalty looks at the prompt's text tokens and the answer so far.
        self._context = list(context_ids) if gen.repetition_penalty != 1.0 else None
        self._generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.seed is not None else None
        self.generated: list[int] = []
        self.text, self._shown = "", ""  # the answer so far, and the part of it streamed
        self.done = False
        self.token: int | None = None
        """The token to feed the model next (None once the answer is done)."""
        self._started = time.perf_counter()

    def push(self, logits: torch.Tensor) -> str:
        """Choose the next token from `logits` [V]; returns newly visible text ('' if none)."""
        seen = None
        if self._context is not None:
            seen = torch.tensor(self._context + self.generated, dtype=torch.long, device=logits.device)
        token = next_token(logits, seen, self.gen, self._generator)
        if not self.generated and not self.stats.time_to_first_token:
            self.stats.time_to_first_token = time.perf_counter() - self._started
        self.token = None
        if token in self.stop_tokens:
            return self._stop()
        self.generated.append(token)
        self.stats.new_tokens = len(self.generated)  # live: a stopped ZeroGPU turn reports it
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self._stop()
        self.text = text
        visible = safe_prefix(text, self.stop_strings)
        delta = ""
        if len(visible) > len(self._shown) and visible.startswith(self._shown):
            delta, self._shown = visible[len(self._shown):], visible
        if len(self.generated) >= self.budget:
            self.done = True  # finish_reason stays "length"
        else:
            self.token = token
        return delta

    def _stop(self) -> str:
        self.stats.finish_reason = "stop"
        self.done = True
        return ""

    def close(self) -> str:
        """Finish the statistics; returns the text not shown yet (what stop-string look-ahead held back)."""
        self.stats.new_tokens = len(self.generated)
        self.stats.answer_ids = list(self.generated)
        self.stats.decode_seconds = time.perf_counter() - self._started - self.stats.time_to_first_token
        tail = self.text[len(self._shown):] if self.text.startswith(self._shown) else ""
        self._shown = self.text
        return tail


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Text safe to show now: nothing from the first undecodable byte on (a half-decoded character;
    stray bytes that more tokens may still regroup, so the streamed text always equals the final
    one), no possible start of a stop string."""
    end = text.find("\ufffd")
    end = len(text) if end < 0 else end
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return text[:end]
