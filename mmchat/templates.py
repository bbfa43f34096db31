"""Conversation templates of LLaVA-1.5 (`llava_v1`, `vicuna_v1`, `llama_2`, `plain`) and `chat`.

A fixed template turns messages into segments: prompt text, answer text (trained on, labelled)
and image slots. `mmchat.conversation.render` tokenises them; the segments alone decide the
prompt string, so each template's golden test pins the exact text LLaVA's code produces.

`chat` renders with the tokenizer's own Jinja chat template, as transformers' `apply_chat_template`
does (`chat_text`): the whole string plus the character spans of the answers, which `render`
turns into labels through token offsets like any other answer text.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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


@dataclass
class Message:
    role: str  # USER | ASSISTANT
    text: str
    images: int = 0
    """Images attached to this message; LLaVA places them before the text."""
    content: list[dict] | None = None
    """The content parts as an API client sent them, in order (`{"type": "text", "text": ...}`,
    `{"type": "image"}`): a `chat` template renders them as transformers' processor and vLLM do. None:
    `images` image parts, then `text`. `text` is the text parts joined by newlines (fixed templates)."""


@dataclass(frozen=True)
class Segment:
    kind: str  # PROMPT | ANSWER | IMAGE
    text: str = ""


@dataclass(frozen=True)
class Template:
    name: str
    system: str | None
    """The system prompt. `chat`: None (the Jinja template's own default, if any) or a system message
    put first, `{"role": "system", "content": ...}`, as transformers takes it."""
    style: str
    """`two` (USER:/ASSISTANT:, answers end in </s>), `llama_2` ([INST] ... [/INST]), `plain`, or
    `chat` (the tokenizer's Jinja template)."""
    stop_strings: tuple[str, ...] = ()
    """Text that ends an answer besides the tokenizer's EOS (e.g. "\\n" for `plain`)."""
    chat_template: str | None = None
    """`chat` only: the Jinja source, `tokenizer.chat_template`."""
    assistant_parts: bool = False
    """`chat` only: the Jinja template reads an answer as a list of parts (llava-hf's templates do),
    not as a string; `resolve_template` finds out which by rendering a probe."""
    user_text: bool = False
    """`chat` only: a user message goes in as one string, `<image>\n` per image before the text
    (LLaVA-OneVision's data format), for templates written for text-only LLMs (Qwen2-Instruct,
    Llama-3-Instruct), which take no content parts; used only when parts do not render."""
    end_of_turn: str | None = None
    """`chat` only: the token that closes an answer (`<|im_end|>`, `<|eot_id|>`, ...), found on the
    probe; generation should stop there, as it may differ from the tokenizer's EOS. None when the
    template closes answers with no token (it marks them with `{% generation %}`, or writes text)."""
    system_as: str | None = None
    """`chat` only: how the template takes a system message, found on the probe: `parts` (one text
    part, tried first when user messages go in as parts), `text` (a string), or None (it refuses
    or drops one, as Gemma's does)."""


TEMPLATES = {
    "llava_v1": Template("llava_v1", LLAVA_SYSTEM, "two"),
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, "two"),
    "llama_2": Template("llama_2", LLAMA_2_SYSTEM, "llama_2"),
    "plain": Template("plain", "", "plain", stop_strings=("\n",)),
}


CHAT = "chat"
TEMPLATE_NAMES = (*sorted(TEMPLATES), CHAT)
"""Every name a config or --template may give: the fixed templates and `chat`."""


def check_template_name(name: str) -> None:
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; choose one of {list(TEMPLATE_NAMES)} (--template)")


def get_template(name: str) -> Template:
    """A fixed template; `chat` needs the tokenizer, so it comes from `resolve_template`."""
    check_template_name(name)
    if name == CHAT:
        raise ValueError("template 'chat' renders with the tokenizer's chat template; "
                         "get it with resolve_template('chat', tokenizer)")
    return TEMPLATES[name]


def resolve_template(name: str, tokenizer) -> Template:
    """The template `name` for this tokenizer: a fixed one, or `chat` carrying its Jinja source.

    `chat` is checked once here on a probe conversation (one image, one answer), so a template
    that cannot take images or answers fails when the session or training run starts.
    """
    if name != CHAT:
        return get_template(name)
    source = tokenizer.chat_template
    if isinstance(source, dict):  # several named templates: the default one is for chat
        source = source.get("default")
    if not source:
        raise ValueError(f"template 'chat' needs a chat template, but tokenizer {_tokenizer_name(tokenizer)} has "
                         "none; add one (chat_template in tokenizer_config.json or chat_template.jinja) or choose "
                         f"another --template ({', '.join(sorted(TEMPLATES))})")
    probe = [Message(USER, "Which colour is it?", 1), Message(ASSISTANT, "It is red.")]
    first_error = None
    # Content parts first (what llava-hf's templates take; an answer as a string first, as
    # transformers' text templates take it), then plain strings, only for a template that fails on
    # parts altogether (written for a text-only LLM): one that takes parts but writes no <image>
    # for an image part cannot show images, and is refused.
    for user_text, parts in ((False, False), (False, True), (True, False)):
        if user_text and not isinstance(first_error, _RenderFailed):
            break
        template = Template(CHAT, None, CHAT, chat_template=source, assistant_parts=parts, user_text=user_text)
        try:
            text, [(_, end)] = chat_text(template, probe, tokenizer, add_generation_prompt=False)
        except (_NoAnswer, _RenderFailed) as e:
            first_error = first_error or e
            continue
        end_of_turn = next((c for c in _control_tokens(tokenizer) if text[:end].endswith(c)), None)
        return replace(template, end_of_turn=end_of_turn, system_as=_system_form(template, probe, tokenizer))
    raise ValueError(str(first_error))


def _system_form(template: Template, probe: list, tokenizer) -> str | None:
    """`parts` or `text`: the first form of system message the template writes; None if neither."""
    for form in ("text",) if template.user_text else ("parts", "text"):
        try:
            text = _apply(replace(template, system="Be brief.", system_as=form), probe, tokenizer, False)
        except _RenderFailed:
            continue
        if "Be brief." in text:
            return form
    return None


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


# -- `chat`: the tokenizer's Jinja template -------------------------------------------------

class _NoAnswer(ValueError):
    """The chat template did not write an answer's text."""


class _RenderFailed(ValueError):
    """The chat template raised while rendering (e.g. a text-only template given content parts)."""


def chat_text(template: Template, messages: list, tokenizer,
              add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """`chat` style: (the prompt string, the character spans of the answers in it).

    The string is what `tokenizer.apply_chat_template(..., tokenize=False)` renders for messages
    in transformers' multimodal format: a user message is `[{"type": "image"}, ..., {"type":
    "text", "text": ...}]` (images first, as LLaVA does), and the template must write `<image>`
    for each image part, as llava-hf's templates do. An answer's span runs from the end of the
    generation prompt (the conversation before it, rendered with `add_generation_prompt=True`)
    through the first control token after the answer's text: its end-of-turn token
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`). What the template writes
    after that token (a newline, Phi-3's closing EOS) is not labelled: generation stops at the
    end-of-turn token, so the model never produces it; the template writes it when the next turn
    is rendered. A template that closes answers with no token (llava-hf/llava-1.5's `ASSISTANT:
    answer USER: ...`, marked with `{% generation %}`; llava-v1.6-mistral's `[/INST] answer<\\s> `)
    gets the answer's text alone: the model ends it with EOS, which the template never writes.

    A system prompt (`template.system`, not None) goes first as `{"role": "system", "content": ...}`:
    one text part or a string, as the probe found the template reads it (`system_as`); it is never
    labelled. A template that refuses system messages (Gemma's) is refused here in one line.
    """
    text = _apply(template, messages, tokenizer, add_generation_prompt)
    if template.system and template.system.strip() not in text:
        raise ValueError(f"{_who(tokenizer)} does not write the system message; leave it out")
    images = sum(m.images for m in messages)
    if text.count(IMAGE_TOKEN) != images:
        raise ValueError(f"{_who(tokenizer)} wrote {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholder(s) for "
                         f"{images} image(s); it must write {IMAGE_TOKEN} for each {{'type': 'image'}} content part, "
                         "as llava-hf's chat templates do")
    controls = [t for t in _control_tokens(tokenizer) if t != IMAGE_TOKEN]
    spans = []
    for i, m in enumerate(messages):
        if m.role != ASSISTANT:
            continue
        prompt = _apply(template, messages[:i], tokenizer, add_generation_prompt=True)
        turn = _apply(template, messages[: i + 1], tokenizer, add_generation_prompt=False)
        answer = m.text.strip()
        start = turn.find(answer, len(prompt)) if turn.startswith(prompt) else turn.find(answer)
        if start < 0:
            raise _NoAnswer(f"{_who(tokenizer)} cannot render an assistant turn: the answer's text is missing from "
                            "its output")
        if not turn.startswith(prompt):
            raise ValueError(f"{_who(tokenizer)}: the conversation with answer {i // 2 + 1} does not start with the "
                             "generation prompt rendered before it; mmchat cannot tell which text is the answer")
        found = [(k, -len(c)) for c in controls if (k := turn.find(c, start + len(answer))) >= 0]
        if found:
            k, minus_length = min(found)  # the first control token after the answer (the longest, on a tie)
            end = k - minus_length
        else:
            # No token closes the answer: the template marks it ({% generation %}, llava-1.5's) or writes
            # plain text after it (llava-v1.6-mistral's literal "<\s> "); the model ends it with EOS.
            # Training from such a template is refused where it starts (finetune.build): no stop to learn.
            end = start + len(answer)
        if text[:end] != turn[:end]:
            raise ValueError(f"{_who(tokenizer)} renders answer {i // 2 + 1} differently once later turns follow; "
                             "mmchat needs each turn rendered the same way in the whole conversation")
        spans.append((len(prompt), end))
    return text, spans


def _apply(template: Template, messages: list, tokenizer, add_generation_prompt: bool) -> str:
    import jinja2

    chat = []
    if template.system is not None:
        if template.system_as is None:
            raise ValueError(f"{_who(tokenizer)} takes no system message; leave it out")
        parts = template.system_as == "parts"
        chat.append({"role": "system", "content": [{"type": "text", "text": template.system}] if parts else template.system})
    for m in messages:
        if m.role == USER and template.user_text:
            content = f"{IMAGE_TOKEN}\n" * m.images + m.text
        elif m.content is not None and (m.role == USER or template.assistant_parts):
            content = m.content
        elif m.role == USER:
            content = [{"type": "image"} for _ in range(m.images)] + [{"type": "text", "text": m.text}]
        else:
            content = [{"type": "text", "text": m.text}] if template.assistant_parts else m.text
        chat.append({"role": m.role, "content": content})
    try:
        return tokenizer.apply_chat_template(chat, chat_template=template.chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, TypeError) as e:  # TypeError: a text-only template adding str + parts
        raise _RenderFailed(f"{_who(tokenizer)} failed: {' '.join(str(e).split())}") from None


def _control_tokens(tokenizer) -> list[str]:
    # The tokens a template closes a turn with: special and added tokens, except whitespace ones
    # (Gemma's "\n" runs), as transformers' own control-token list has them.
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted((t for t in tokens if t and not t.isspace()), key=len, reverse=True)


def _who(tokenizer) -> str:
    return f"template 'chat' (the chat template of tokenizer {_tokenizer_name(tokenizer)})"


def _tokenizer_name(tokenizer) -> str:
    return repr(tokenizer.name_or_path or type(tokenizer).__name__)
