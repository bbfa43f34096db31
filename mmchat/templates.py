"""Conversation templates of LLaVA-1.5 (`llava_v1`, `vicuna_v1`, `llama_2`, `plain`).

A template turns messages into segments: prompt text, answer text (trained on, labelled) and
image slots. `mmchat.conversation.render` tokenises them; the segments alone decide the
prompt string, so each template's golden test pins the exact text LLaVA's code produces.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
"""Where an image goes: in LLaVA's data and prompts, and the token llava-hf checkpoints add."""
USER, ASSISTANT = "user", "assistant"

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

PROMPT, ANSWER, IMAGE = "prompt", "answer", "image"


@dataclass(frozen=True)
class Segment:
    kind: str  # PROMPT | ANSWER | IMAGE
    text: str = ""


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    style: str
    """`two` (USER:/ASSISTANT:, answers end in </s>), `llama_2` ([INST] ... [/INST]), `plain`."""
    stop_strings: tuple[str, ...] = ()
    """Text that ends an answer besides the tokenizer's EOS (e.g. "\\n" for `plain`)."""


TEMPLATES = {
    "llava_v1": Template("llava_v1", LLAVA_SYSTEM, "two"),
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, "two"),
    "llama_2": Template("llama_2", LLAMA_2_SYSTEM, "llama_2"),
    "plain": Template("plain", "", "plain", stop_strings=("\n",)),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)} (--template)")
    return TEMPLATES[name]


def _images(count: int, after: str) -> list[Segment]:
    """LLaVA puts a message's images first, each `<image>` followed by `after`."""
    out: list[Segment] = []
    for _ in range(count):
        out += [Segment(IMAGE), Segment(PROMPT, after)]
    return out


def segments(template: Template, messages: list, add_generation_prompt: bool) -> list[Segment]:
    """Messages (alternating user/assistant, user first) -> segments in prompt order."""
    if template.style == "two":
        return _two(template, messages, add_generation_prompt)
    if template.style == "llama_2":
        return _llama_2(template, messages, add_generation_prompt)
    return _plain(messages)


def _two(template: Template, messages: list, add_generation_prompt: bool) -> list[Segment]:
    # LLaVA SeparatorStyle.TWO: "SYS USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:"
    out = [Segment(PROMPT, template.system + " ")]
    for m in messages:
        if m.role == USER:
            out += [Segment(PROMPT, "USER: ")] + _images(m.images, "\n") + [Segment(PROMPT, m.text + " ")]
        else:
            out += [Segment(PROMPT, "ASSISTANT:"), Segment(ANSWER, " " + m.text + "</s>")]
    if add_generation_prompt:
        out.append(Segment(PROMPT, "ASSISTANT:"))
    return out


def _llama_2(template: Template, messages: list, add_generation_prompt: bool) -> list[Segment]:
    # LLaVA SeparatorStyle.LLAMA_2: "[INST] <<SYS>>\nS\n<</SYS>>\n\n<image>\nQ [/INST] A </s><s>[INST] Q2 [/INST]"
    out: list[Segment] = []
    for i, m in enumerate(messages):
        if m.role == USER:
            head = f"[INST] <<SYS>>\n{template.system}\n<</SYS>>\n\n" if i == 0 else "<s>[INST] "
            out += [Segment(PROMPT, head)] + _images(m.images, "\n") + [Segment(PROMPT, m.text + " [/INST]")]
        else:
            out.append(Segment(ANSWER, " " + m.text + " </s>"))
    del add_generation_prompt  # the prompt already ends in "[/INST]"
    return out


def _plain(messages: list) -> list[Segment]:
    # LLaVA's stage-1 `plain` format: the user's text is dropped; "<image>caption\n".
    out: list[Segment] = []
    for m in messages:
        if m.role == USER:
            out += [Segment(IMAGE)] * m.images
        else:
            out.append(Segment(ANSWER, m.text + "\n"))
    return out


def prompt_text(segs: list[Segment]) -> str:
    """The rendered prompt as LLaVA writes it, `<image>` for each slot (for golden tests and logs)."""
    return "".join(IMAGE_TOKEN if s.kind == IMAGE else s.text for s in segs)
