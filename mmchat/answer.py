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

from mmchat.generate import GenerationConfig, choose_tokens


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
        self.gen, self.stats = gen, stats
        self.stop_tokens, self.stop_strings, self.budget = stop_tokens, stop_strings, budget
        # The repetition penalty looks at the prompt's text tokens and the answer so far (a [V] mask
        # made at the first choice, when the logits tell V).
        self._context = list(context_ids) if gen.repetition_penalty != 1.0 else None
        self._seen: torch.Tensor | None = None
        self._generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.seed is not None else None
        self._text = IncrementalText(tokenizer)
        self.generated = self._text.ids
        self._cut: str | None = None  # the text up to a stop string, once one appeared
        self._shown = 0  # how much of the text was streamed
        self._stop_len = max((len(s) for s in stop_strings), default=0)
        self.done = False
        self.token: int | None = None
        """The token to feed the model next (None once the answer is done)."""
        self.chosen: int | None = None
        """This step's token when `choose` picked it with the batch's other rows; `push` then uses it."""
        self._started = time.perf_counter()

    @property
    def text(self) -> str:
        """The answer so far: the decoded tokens, cut at the first stop string."""
        return self._cut if self._cut is not None else self._text.text

    def seen(self, vocab: int, device) -> torch.Tensor | None:
        """[V] bool: the tokens the repetition penalty discourages (None without one)."""
        if self._context is None:
            return None
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._seen[torch.tensor(self._context + self.generated, dtype=torch.long, device=device)] = True
        return self._seen

    def push(self, logits: torch.Tensor) -> str:
        """Take the next token (`chosen`, else chosen from `logits` [V]); returns newly visible text ('' if none)."""
        token, self.chosen = self.chosen, None
        if token is None:
            token = choose([self], logits.unsqueeze(0))[0]
        if not self.generated and not self.stats.time_to_first_token:
            self.stats.time_to_first_token = time.perf_counter() - self._started
        self.token = None
        if token in self.stop_tokens:
            return self._stop()
        stable = len(self._text.stable)  # text before this is final, and held no stop string
        self._text.add(token)
        self.stats.new_tokens = len(self.generated)  # live: a stopped ZeroGPU turn reports it
        if self._seen is not None:
            self._seen[token] = True
        if self.stop_strings:
            tail_start = max(0, stable - self._stop_len + 1)
            tail = self._text.stable[tail_start:] + self._text.pending
            cut = min((tail.find(s) for s in self.stop_strings if s in tail), default=-1)
            if cut >= 0:
                self._cut = self._text.text[:tail_start + cut]
                return self._stop()
        # Only final text is shown, less a possible start of a stop string.
        visible = len(self._text.stable) - _stop_start(self._text.stable, self.stop_strings)
        delta = ""
        if visible > self._shown:
            delta, self._shown = self._text.stable[self._shown:visible], visible
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
        text = self.text
        tail, self._shown = text[self._shown:], len(text)
        return tail


def choose(answers: list[Answer], logits: torch.Tensor) -> list[int]:
    """Each answer's next token from its row of `logits` [B, V], the batch's rows sampled together."""
    return choose_tokens(logits, [a.gen for a in answers], [a._generator for a in answers],
                         [a.seen(logits.shape[-1], logits.device) for a in answers])


def _stop_start(text: str, stops: tuple[str, ...]) -> int:
    """How many of `text`'s last characters may start a stop string (held back from the stream)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _is_byte_piece(piece: str | None) -> bool:
    """`<0xE6>`: a sentencepiece byte-fallback token."""
    return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


class IncrementalText:
    """The text of a growing list of token ids, decoded with constant work per token.

    vLLM's and TGI's incremental detokenizer: a token's text is what decoding a few tokens before it
    (`ids[prefix:read]`, the last piece of final text) with it adds to decoding them alone, so each
    token decodes a short window, and a tokenizer's leading-space rule (sentencepiece's dummy prefix,
    a word-level tokenizer's separators) applies in the window as in the whole. Text ending in U+FFFD
    (a character whose bytes are not all there yet) stays `pending` until more tokens complete it, and so
    does a run of sentencepiece's byte tokens (`<0xE6>`: LLaMA's byte fallback decodes a run at once,
    every byte of it U+FFFD if the run is not UTF-8, so a later byte can change the text of earlier ones;
    a special token, skipped, does not end a run).
    Invariant: `stable + pending == tokenizer.decode(ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.stable = ""
        """Text that no later token changes."""
        self.pending = ""
        """The text of the tokens after `stable`'s, as decoded now (a half character, say)."""
        self._prefix = self._read = 0
        # Skipped when decoding, so a run of byte tokens on both sides of one is a single run.
        self._specials = frozenset(tokenizer.all_special_ids)
        self._prefix_text = ""
        # transformers' clean-up of spaces before punctuation spans tokens: such a tokenizer decodes it all
        # every token (as any does once a token changes text before it).
        self._whole = bool(tokenizer.clean_up_tokenization_spaces)

    @property
    def text(self) -> str:
        return self.stable + self.pending

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self._whole:
            return self._settle(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not window.startswith(self._prefix_text):  # the new token changed earlier text: decode it all
            self._whole = True
            return self._settle(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        new = window[len(self._prefix_text):]
        if not new or window.endswith("\ufffd") or token in self._specials or \
                _is_byte_piece(self.tokenizer.convert_ids_to_tokens(token)):
            self.pending = new
            return
        self.stable += new
        self.pending = ""
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)

    def _settle(self, text: str) -> None:
        """Take the whole text decoded at once: final up to its first U+FFFD (if it keeps what was final)."""
        end = text.find("\ufffd")
        end = len(text) if end < 0 else end
        if text.startswith(self.stable) and end >= len(self.stable):
            self.stable = text[:end]
        self.pending = text[len(self.stable):]
