"""Conversations: messages, and the one renderer that yields `input_ids` and `labels` together.

Labels come from the character offsets of the very tokens fed to the model, never from
re-tokenising pieces of the prompt (LLaVA's "tokenization mismatch" bug).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Integral
from typing import Sequence

from mmchat.templates import (  # noqa: F401  (Message and the role names are used from here too)
    ANSWER,
    ASSISTANT,
    CHAT,
    IMAGE,
    IMAGE_TOKEN,
    USER,
    Message,
    Segment,
    Template,
    chat_text,
    segments,
)

IGNORE_INDEX = -100
LLAVA_ROLES = {"human": USER, "gpt": ASSISTANT}
"""LLaVA's data names its roles `human` / `gpt`, in the order turns alternate."""
_ROLES = {**LLAVA_ROLES, USER: USER, ASSISTANT: ASSISTANT}


@dataclass
class Rendered:
    """A tokenised conversation; each image's slot already expanded to that image's token count."""

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


def image_slot_counts(image_tokens: int | Sequence[int], images: int) -> list[int]:
    """Each image's number of slots, in conversation order: `image_tokens` is one count for every
    image (LLaVA-1.5: 576) or one count per image (AnyRes: from each image's size)."""
    if isinstance(image_tokens, Integral):
        counts = [int(image_tokens)] * images
    else:
        counts = [int(c) for c in image_tokens]
        if len(counts) != images:
            raise ValueError(f"the conversation has {images} image(s) but {len(counts)} image token count(s) "
                             f"were given: {counts}")
    if any(c < 1 for c in counts):
        raise ValueError(f"every image needs at least one image token; got counts {counts}")
    return counts


def render(
    messages: list[Message],
    template: Template,
    tokenizer,
    image_tokens: int | Sequence[int],
    add_generation_prompt: bool = False,
    image_token_id: int | None = None,
    escape: bool = True,
) -> Rendered:
    """Messages -> `Rendered` (input_ids, labels, image_mask), exactly as LLaVA tokenises.

    The prompt is split at image slots; each text chunk is tokenised whole without special
    tokens (LLaVA's `tokenizer_image_token`), one BOS goes first, and each slot becomes
    `image_tokens` positions: one count for every image, or a list of each image's count in
    order (see `image_slot_counts`). Labels are the token ids on answer text (answers and their
    closing `</s>`), IGNORE_INDEX elsewhere. The `chat` style is tokenised as transformers
    does (`_render_chat`).
    """
    check_roles(messages, add_generation_prompt)
    counts = image_slot_counts(image_tokens, sum(m.images for m in messages))
    if escape:
        specials = list(tokenizer.all_special_tokens) + list(tokenizer.get_added_vocab())
        messages = [replace(m, text=escape_special_text(m.text, specials), content=None if m.content is None else [
            {**part, "text": escape_special_text(part["text"], specials)} if part.get("type") == "text" else part
            for part in m.content]) for m in messages]
        if template.system:  # a system prompt may be typed too (the API's system message)
            template = replace(template, system=escape_special_text(template.system, specials))
    if template.style == CHAT:
        return _render_chat(messages, template, tokenizer, counts, add_generation_prompt, image_token_id)
    slot_id = image_token_id if image_token_id is not None else _placeholder_id(tokenizer)
    out = Rendered()
    if tokenizer.bos_token_id is not None:
        _append(out, [tokenizer.bos_token_id], labelled=[False])
    chunk: list[Segment] = []
    per_image = iter(counts)
    for seg in segments(template, messages, add_generation_prompt):
        if seg.kind != IMAGE:
            chunk.append(seg)
            continue
        _tokenise_chunk(out, chunk, tokenizer)
        chunk = []
        _append_slots(out, slot_id, next(per_image))
    _tokenise_chunk(out, chunk, tokenizer)
    assert next(per_image, None) is None, "the template wrote fewer image segments than the messages hold"
    return out


def _placeholder_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _append_slots(out: Rendered, slot_id: int, count: int) -> None:
    out.input_ids += [slot_id] * count
    out.labels += [IGNORE_INDEX] * count
    out.image_mask += [True] * count


def _append(out: Rendered, ids: list[int], labelled: list[bool]) -> None:
    out.input_ids += ids
    out.labels += [t if keep else IGNORE_INDEX for t, keep in zip(ids, labelled)]
    out.image_mask += [False] * len(ids)


def _tokenise_chunk(out: Rendered, chunk: list[Segment], tokenizer) -> None:
    spans, pos = [], 0
    for s in chunk:
        if s.kind == ANSWER:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    _tokenise_text(out, "".join(s.text for s in chunk), spans, tokenizer)


def _tokenise_text(out: Rendered, text: str, spans: list[tuple[int, int]], tokenizer, offset: int = 0) -> None:
    """Append `text` tokenised whole, without special tokens; labelled where a token overlaps
    an answer span (spans count characters from `offset` before the text)."""
    if not text:
        return
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labelled = [_in_answer(offset + start, offset + end, spans) for start, end in enc["offset_mapping"]]
    _append(out, list(enc["input_ids"]), labelled)


def _in_answer(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # A token belongs to an answer when its characters overlap one; a zero-width token
    # (sentencepiece's dummy prefix) when it sits inside one.
    for a, b in spans:
        if (end > a and start < b) or (start == end and a <= start < b):
            return True
    return False



def _render_chat(messages: list[Message], template: Template, tokenizer, counts: list[int],
                 add_generation_prompt: bool, image_token_id: int | None) -> Rendered:
    """`chat` style: the Jinja-rendered string tokenised as transformers tokenises it.

    Special tokens follow `processor.apply_chat_template(..., tokenize=True)`: the tokenizer's own
    (`add_special_tokens=True`: LLaMA's BOS, none for Qwen), except no second BOS when the
    template writes one itself (Llama-3, Gemma). When the tokenizer has `<image>` as a token
    (llava-hf's do), placeholder k becomes `counts[k]` copies of it and the whole string is
    tokenised in one call, as llava-hf processors do: the ids equal
    `tokenizer(expanded_prompt)`. Otherwise the string is split at the placeholders and each
    piece tokenised alone (LLaVA's `tokenizer_image_token`); then a sentencepiece tokenizer puts
    its prefix space at the start of each piece, which one call would not do after an image.
    """
    text, spans = chat_text(template, messages, tokenizer, add_generation_prompt)
    special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    if IMAGE_TOKEN in tokenizer.get_added_vocab():
        return _chat_one_call(text, spans, tokenizer, counts, special, image_token_id)
    out = Rendered()
    prefix, suffix = _special_affixes(tokenizer) if special else ([], [])
    _append(out, prefix, [False] * len(prefix))
    slot_id = image_token_id if image_token_id is not None else _placeholder_id(tokenizer)
    pos = 0
    pieces = text.split(IMAGE_TOKEN)
    assert len(pieces) == len(counts) + 1, "chat_text checks one placeholder per image"
    for k, piece in enumerate(pieces):
        if k:
            _append_slots(out, slot_id, counts[k - 1])
            pos += len(IMAGE_TOKEN)
        _tokenise_text(out, piece, spans, tokenizer, offset=pos)
        pos += len(piece)
    _append(out, suffix, [False] * len(suffix))
    return out


def _chat_one_call(text: str, spans: list[tuple[int, int]], tokenizer, counts: list[int], special: bool,
                   image_token_id: int | None) -> Rendered:
    pieces = text.split(IMAGE_TOKEN)
    assert len(pieces) == len(counts) + 1, "chat_text checks one placeholder per image"
    expanded = pieces[0] + "".join(IMAGE_TOKEN * n + piece for n, piece in zip(counts, pieces[1:]))

    def grown(a: int) -> int:  # characters the placeholders before position `a` gain by expanding
        return sum((n - 1) * len(IMAGE_TOKEN) for n in counts[:text.count(IMAGE_TOKEN, 0, a)])

    spans = [(a + grown(a), b + grown(a)) for a, b in spans]
    enc = tokenizer(expanded, add_special_tokens=special, return_offsets_mapping=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out = Rendered()
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        is_image = tok == image_id
        out.input_ids.append(image_token_id if is_image and image_token_id is not None else tok)
        out.labels.append(tok if not is_image and _in_answer(start, end, spans) else IGNORE_INDEX)
        out.image_mask.append(is_image)
    if sum(out.image_mask) != sum(counts):
        raise ValueError(f"{len(counts)} image(s) need {sum(counts)} {IMAGE_TOKEN} tokens ({counts}) "
                         f"but tokenizer {tokenizer.name_or_path!r} made {sum(out.image_mask)}")
    return out


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. LLaMA's BOS, nothing for Qwen)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: cannot tell which special tokens it adds to a text")
