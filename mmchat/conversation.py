"""Conversations: messages, and the one renderer that yields `input_ids` and `labels` together.

Labels come from the character offsets of the very tokens fed to the model, never from
re-tokenising pieces of the prompt (LLaVA's "tokenization mismatch" bug).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmchat.templates import ANSWER, ASSISTANT, IMAGE, IMAGE_TOKEN, USER, Segment, Template, segments

IGNORE_INDEX = -100
LLAVA_ROLES = {"human": USER, "gpt": ASSISTANT}
"""LLaVA's data names its roles `human` / `gpt`, in the order turns alternate."""
_ROLES = {**LLAVA_ROLES, USER: USER, ASSISTANT: ASSISTANT}


@dataclass
class Message:
    role: str  # USER | ASSISTANT
    text: str
    images: int = 0
    """Images attached to this message; LLaVA places them before the text."""


@dataclass
class Rendered:
    """A tokenised conversation; image slots already expanded to `image_tokens` each."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_images(self) -> int:
        starts = [i for i, m in enumerate(self.image_mask) if m and (i == 0 or not self.image_mask[i - 1])]
        return len(starts)


def messages_from_llava(conversations: list[dict]) -> list[Message]:
    """LLaVA-format turns (`{"from": "human"|"gpt", "value"}`) -> messages.

    `<image>` markers in a human turn become that message's images (moved to the front, as
    LLaVA's `preprocess_multimodal` does); in training data they are trusted markers.
    """
    out = []
    for i, turn in enumerate(conversations):
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"turn {i}: unknown role {turn.get('from')!r}; expected 'human' or 'gpt'")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {i}: 'value' must be a string")
        images = value.count(IMAGE_TOKEN) if role == USER else 0
        text = value.replace(IMAGE_TOKEN, "").strip() if images else value
        out.append(Message(role, text, images))
    return out


def escape_special_text(text: str, specials: list[str]) -> str:
    """Stop typed text from becoming special tokens (`</s>`, `<image>`, ...).

    A zero-width space after the first character keeps the text visible to the model while the
    tokenizer no longer matches the special token.
    """
    for special in sorted(set(specials) | {IMAGE_TOKEN}, key=len, reverse=True):
        if len(special) > 1 and special in text:
            text = text.replace(special, special[0] + "\u200b" + special[1:])
    return text


def check_roles(messages: list[Message], add_generation_prompt: bool) -> None:
    for i, m in enumerate(messages):
        expected = USER if i % 2 == 0 else ASSISTANT
        if m.role != expected:
            raise ValueError(f"message {i} has role {m.role!r}; turns must alternate user, assistant, user, ...")
    if add_generation_prompt and (not messages or messages[-1].role != USER):
        raise ValueError("a generation prompt needs the conversation to end with a user message")


def render(
    messages: list[Message],
    template: Template,
    tokenizer,
    image_tokens: int,
    add_generation_prompt: bool = False,
    image_token_id: int | None = None,
    escape: bool = True,
) -> Rendered:
    """Messages -> `Rendered` (input_ids, labels, image_mask), exactly as LLaVA tokenises.

    The prompt is split at image slots; each text chunk is tokenised whole without special
    tokens (LLaVA's `tokenizer_image_token`), one BOS goes first, and each slot becomes
    `image_tokens` positions. Labels are the token ids on answer text (answers and their
    closing `</s>`), IGNORE_INDEX elsewhere.
    """
    check_roles(messages, add_generation_prompt)
    if escape:
        specials = list(tokenizer.all_special_tokens) + list(tokenizer.get_added_vocab())
        messages = [Message(m.role, escape_special_text(m.text, specials), m.images) for m in messages]
    slot_id = image_token_id if image_token_id is not None else _placeholder_id(tokenizer)
    out = Rendered()
    if tokenizer.bos_token_id is not None:
        _append(out, [tokenizer.bos_token_id], labelled=[False])
    chunk: list[Segment] = []
    for seg in segments(template, messages, add_generation_prompt):
        if seg.kind != IMAGE:
            chunk.append(seg)
            continue
        _tokenise_chunk(out, chunk, tokenizer)
        chunk = []
        out.input_ids += [slot_id] * image_tokens
        out.labels += [IGNORE_INDEX] * image_tokens
        out.image_mask += [True] * image_tokens
    _tokenise_chunk(out, chunk, tokenizer)
    return out


def _placeholder_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _append(out: Rendered, ids: list[int], labelled: list[bool]) -> None:
    out.input_ids += ids
    out.labels += [t if keep else IGNORE_INDEX for t, keep in zip(ids, labelled)]
    out.image_mask += [False] * len(ids)


def _tokenise_chunk(out: Rendered, chunk: list[Segment], tokenizer) -> None:
    text = "".join(s.text for s in chunk)
    if not text:
        return
    spans, pos = [], 0
    for s in chunk:
        if s.kind == ANSWER:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labelled = [_in_answer(start, end, spans) for start, end in enc["offset_mapping"]]
    _append(out, list(enc["input_ids"]), labelled)


def _in_answer(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # A token belongs to an answer when its characters overlap one; a zero-width token
    # (sentencepiece's dummy prefix) when it sits inside one.
    for a, b in spans:
        if (end > a and start < b) or (start == end and a <= start < b):
            return True
    return False

