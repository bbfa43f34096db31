"""A chat session about images that keeps its KV cache between turns.

Each turn renders the whole conversation with the one renderer, keeps the longest cached
prefix that still matches (token ids, and image identity for image slots), crops the cache
there and prefills only the rest. Answers therefore equal a full re-prefill of the history,
while turn N costs only its own tokens. Undo and regenerate are history edits; the cache
follows by the same prefix rule.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from PIL import Image

from mmchat.answer import Answer, TurnStats
from mmchat.conversation import ASSISTANT, USER, Message, Rendered, render
from mmchat.generate import GenerationConfig, stop_ids
from mmchat.image import load_image
from mmchat.kv_cache import new_cache
from mmchat.model import MultimodalModel
from mmchat.templates import resolve_template


class ContextError(ValueError):
    """The conversation cannot fit the model's context window."""


@dataclass
class _Image:
    uid: int
    """Unique within its session: cache keys name image slots by it."""
    image: Image.Image
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """Its projected features [T, H] per layout (`MultimodalModel.image_layout`), computed once."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Its image slots in a prompt per layout (`MultimodalModel.image_token_counts`), asked once.
    OneVision reads an image as tiles when it is the conversation's only one and as one square once
    a second arrives, so the same image can have both."""
    key: str | None = None
    """The caller's identity for the image's content (`answer`: a hash), so a re-sent image keeps its uid."""


@dataclass
class ChatSession:
    """One conversation with a `MultimodalModel`; `ask` streams the answer as text deltas."""

    model: MultimodalModel
    template: str | None = None
    """Template name; None uses the checkpoint's."""
    messages: list[Message] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    """Things the user should be told (e.g. old turns dropped to fit the context)."""
    last_stats: TurnStats = field(default_factory=TurnStats)
    engine: object | None = None
    """A `mmchat.engine.Engine` that decodes this conversation's answers in a batch with others
    (the server's and the app's sessions); None runs the model here, one answer at a time."""
    strip_answers: bool = True
    """Keep answers without their leading and trailing spaces (a page shows them so). The API's
    sessions keep an answer exactly as its client received it, leading space included, so the
    client's copy, sent back next turn, is the same message (`mmchat.serving.prefix_cache`)."""

    def __post_init__(self) -> None:
        self._template = resolve_template(self.template or self.model.config.template, self.model.tokenizer)
        self._base_template = self._template  # `answer` may swap in another system prompt
        self._images: list[_Image] = []  # in conversation order
        self._cache = None
        self._cached_keys: list = []  # token id per cached position, ("img", uid, layout) for image slots
        # Never reset (not even by clear): a new image must not take the uid of one still in the cache keys.
        self._uids = itertools.count()

    # -- conversation edits -------------------------------------------------------------
    def ask(self, text: str, image=None, gen: GenerationConfig | None = None) -> Iterator[str]:
        """Add a user turn (optionally with an image: path, bytes or PIL) and stream the answer.

        Raises `ImageError`/`ValueError`/`ContextError` before anything changes when the input
        cannot be used. Closing the iterator early (Stop) keeps the partial answer.
        """
        if not text or not text.strip():
            raise ValueError("the message is empty; type a question")
        if self.messages and self.messages[-1].role == USER:
            raise ValueError("the last question has no answer yet; call respond() or regenerate()")
        new_images = [] if image is None else [_Image(next(self._uids), load_image(image))]
        self.messages.append(Message(USER, text.strip(), len(new_images)))
        self._images += new_images
        try:
            rendered = self._render_for_generation(gen or GenerationConfig())
        except ContextError:
            self.messages.pop()
            del self._images[len(self._images) - len(new_images):]
            raise
        return self._generate(rendered, gen or GenerationConfig())

    def respond(self, gen: GenerationConfig | None = None) -> Iterator[str]:
        """Answer the pending last user message (e.g. after an interrupted turn)."""
        if not self.messages or self.messages[-1].role != USER:
            raise ValueError("there is no question to answer; ask one first")
        gen = gen or GenerationConfig()
        return self._generate(self._render_for_generation(gen), gen)

    def regenerate(self, gen: GenerationConfig | None = None) -> Iterator[str]:
        """Drop the last answer and answer the last question again."""
        if self.messages and self.messages[-1].role == ASSISTANT:
            self.messages.pop()
        return self.respond(gen)

    def answer(self, messages: list[Message], images: list[tuple[str, Image.Image]],
               gen: GenerationConfig | None = None, stop: tuple[str, ...] = (),
               system: str | None = None) -> Iterator[str]:
        """Replace the conversation with `messages` (ending with a user message) and stream the answer.

        For clients that send the whole conversation each time (an HTTP API). `images` are
        (content key, image) in conversation order; an image whose key the session already holds
        keeps its features and cache slots, so only what changed since the cached prefix is
        prefilled. `stop` adds stop strings (cut from the answer); `system` replaces a fixed
        template's system prompt, or goes to a `chat` template as a first system message. Nothing is dropped to fit: raises `ContextError` if the
        conversation does not fit, `ValueError` for a malformed one, before anything changes.
        """
        template = self._template_with_system(system)
        known = {im.key: im for im in self._images if im.key is not None}
        new_images = [known.get(key) or _Image(next(self._uids), image, key=key) for key, image in images]
        gen = gen or GenerationConfig()
        saved = self._template
        self._template = template
        try:
            rendered = self._render(messages, images=new_images)
        except ValueError:
            self._template = saved
            raise
        if len(rendered) >= self.model.max_context:
            self._template = saved
            raise ContextError(f"the conversation needs {len(rendered)} tokens but the model's context holds "
                               f"{self.model.max_context}; shorten it")
        self.messages = list(messages)
        self._images = new_images
        return self._generate(_View(rendered, new_images, 0, self._layout(new_images)), gen, stop)

    def _template_with_system(self, system: str | None):
        base = self._base_template
        if system is None:
            return base
        if base.style == "plain":
            raise ValueError("the model's template 'plain' (image captions) takes no system message; leave it out")
        return replace(base, system=system)

    def undo(self) -> None:
        """Remove the last question and its answer (and the image that came with it)."""
        if self.messages and self.messages[-1].role == ASSISTANT:
            self.messages.pop()
        if self.messages:
            removed = self.messages.pop()
            if removed.images:
                del self._images[-removed.images:]

    def add(self, message: Message, images: list = ()) -> None:
        """Add a message and its images (path, bytes or PIL) without generating: a turn answered
        elsewhere, e.g. by a ZeroGPU worker, whose own session does not outlive its call."""
        if message.images != len(images):
            raise ValueError(f"the message has {message.images} image(s) but {len(images)} were given")
        self._images += [_Image(next(self._uids), load_image(image)) for image in images]
        self.messages.append(message)

    def clear(self) -> None:
        self.messages.clear()
        self._images.clear()
        self.notices.clear()
        self.drop_cache()

    def drop_cache(self) -> None:
        """Free the KV cache and image features; the next turn re-prefills transparently."""
        self._cache = None
        self._cached_keys = []
        for im in self._images:
            im.features.clear()

    def lend_cache(self):
        """Hand the KV cache over to a batch (`mmchat.engine`) while an answer decodes there."""
        cache, self._cache = self._cache, None
        return cache

    def return_cache(self, cache, fed: list[int]) -> None:
        """Take the KV cache back from a batch, now also holding the answer's tokens `fed` to it."""
        self._cache = cache
        self._cached_keys += fed

    @property
    def cached_tokens(self) -> int:
        return len(self._cached_keys)

    @property
    def images(self) -> list[Image.Image]:
        return [im.image for im in self._images]

    # -- rendering ---------------------------------------------------------------------
    def _render(self, messages: list[Message], generation_prompt: bool = True,
                images: list[_Image] | None = None) -> Rendered:
        """`images`: those of `messages` in order; None: the session's first ones (a prefix of the history)."""
        if images is None:
            images = self._images[:sum(m.images for m in messages)]
        return render(messages, self._template, self.model.tokenizer, self._image_tokens(images),
                      add_generation_prompt=generation_prompt, image_token_id=self.model.config.image_token_id)

    def _layout(self, images: list[_Image]) -> str:
        """How the images of a prompt holding exactly `images` are read (`MultimodalModel.image_layout`)."""
        return self.model.image_layout(len(images))

    def _image_tokens(self, images: list[_Image]) -> list[int]:
        """Each image's own slot count in a prompt of these images, asked of the model once per image and layout."""
        layout = self._layout(images)
        todo = [im for im in images if layout not in im.tokens]
        if todo:
            for im, count in zip(todo, self.model.image_token_counts([im.image for im in todo], layout), strict=True):
                im.tokens[layout] = count
        return [im.tokens[layout] for im in images]

    def _render_for_generation(self, gen: GenerationConfig) -> "_View":
        """Render the history, dropping the oldest turns (never the system prompt) to fit."""
        limit = self.model.max_context
        first, images_before = 0, 0
        while True:
            view = self.messages[first:]
            rendered = self._render(view, images=self._images[images_before:])
            if len(rendered) + min(gen.max_new_tokens, 16) <= limit or len(view) == 1:
                break
            images_before += view[0].images + view[1].images
            first += 2
        if len(rendered) >= limit:
            raise ContextError(
                f"the message needs {len(rendered)} tokens but the model's context holds {limit}; "
                "shorten the message"
            )
        dropped = first // 2
        if dropped:
            self.notices.append(f"Dropped the {dropped} oldest turn(s) to fit the {limit}-token context.")
        shown = self._images[images_before:]
        return _View(rendered, shown, dropped, self._layout(shown))

    # -- the model ---------------------------------------------------------------------
    def _keys(self, view: "_View") -> list:
        """A cache key per position: the token id, or ("img", uid, layout) on each of that image's own slots."""
        slots = [("img", im.uid, view.layout) for im in view.images for _ in range(im.tokens[view.layout])]
        assert len(slots) == sum(view.rendered.image_mask), "the view was rendered with its images' counts"
        keys, slot = [], 0
        for tok, is_image in zip(view.rendered.input_ids, view.rendered.image_mask):
            keys.append(slots[slot] if is_image else tok)
            slot += is_image
        return keys

    def _features(self, images: list[_Image], layout: str) -> torch.Tensor | None:
        """Projected features [sum of the images' counts, H] in order, encoding only images not seen before."""
        todo = [im for im in images if layout not in im.features]
        for im, feats in zip(todo, self.model.encode_each([im.image for im in todo], layout) if todo else [], strict=True):
            if feats.shape[0] != im.tokens[layout]:
                raise ValueError(f"the model encoded an image into {feats.shape[0]} features but counts "
                                 f"{im.tokens[layout]} slots for it (image_token_counts); they must agree")
            im.features[layout] = feats
        for im in images:  # a layout the conversation has left (OneVision's tiles once a 2nd image came)
            for other in [k for k in im.features if k != layout]:
                del im.features[other]
        return torch.cat([im.features[layout] for im in images]) if images else None

    @torch.inference_mode()
    def prefill_steps(self, view: "_View", chunk: int | None = None) -> Iterator[None]:
        """Feed the part of the rendered view not in the cache, `chunk` positions per forward
        (None: all at once); yields between chunks and returns the logits [V] of the last position."""
        keys = self._keys(view)
        keep = sum(1 for _ in itertools.takewhile(lambda kk: kk[0] == kk[1], zip(keys, self._cached_keys)))
        keep = min(keep, len(keys) - 1)  # the last position must run to give logits
        if keep == 0:
            self._cache = new_cache(self.model.llm.config)
        elif keep < len(self._cached_keys):
            self._cache.crop(keep - len(self._cached_keys))  # negative: how many positions to remove
        self._cached_keys = keys[:keep]
        mask, ids = view.rendered.image_mask, view.rendered.input_ids
        rows = self._features(view.images, view.layout)
        row = sum(mask[:keep])
        self.last_stats.prefill_tokens = len(keys) - keep
        start = keep
        while True:
            end = len(keys) if chunk is None else min(len(keys), start + chunk)
            slots = sum(mask[start:end])
            feats = rows[row:row + slots] if slots else None  # [slots, H]: may start or end inside an image
            embeds = self.model.embed(torch.tensor([ids[start:end]], device=self.model.device),
                                      torch.tensor([mask[start:end]], device=self.model.device), feats)
            # Only the last position's logits are needed: skips a [L, vocab] projection (as `generate` does).
            out = self.model.llm(inputs_embeds=embeds, cache=self._cache, use_cache=True, logits_to_keep=1)
            self._cache = out.cache
            self._cached_keys = keys[:end]
            start, row = end, row + slots
            if start == len(keys):
                return out.logits[0, -1]
            yield

    @torch.inference_mode()
    def _step(self, token: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.model.device)
        tick = time.perf_counter()
        out = self.model.llm(input_ids=ids, cache=self._cache, use_cache=True)
        logits = out.logits[0, -1]
        if logits.device.type == "cuda":  # kernels run asynchronously: wait, or the forward looks free
            torch.cuda.synchronize(logits.device)
        self.last_stats.decode_model_seconds += time.perf_counter() - tick
        self._cache = out.cache
        self._cached_keys.append(token)
        return logits

    def _start(self, view: "_View", gen: GenerationConfig, extra_stops: tuple[str, ...]) -> Answer:
        tokenizer = self.model.tokenizer
        end_of_turn = self._template.end_of_turn
        stop_tokens = stop_ids(self.model.config.stop_token_ids, tokenizer.eos_token_id,
                               tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None)
        self.last_stats = TurnStats(prompt_tokens=len(view.rendered), dropped_turns=view.dropped, finish_reason="length")
        context = [t for t, im in zip(view.rendered.input_ids, view.rendered.image_mask) if not im]
        return Answer(tokenizer, gen, stop_tokens, self._template.stop_strings + tuple(s for s in extra_stops if s),
                      min(gen.max_new_tokens, self.model.max_context - len(view.rendered)), self.last_stats,
                      context, self.model.device)

    def end_answer(self, answer: Answer, failed: bool) -> str:
        """Record the answer (unless generation failed: the question stays for a retry, and the
        cache, maybe half-written, is dropped); returns the text not shown yet."""
        if failed:
            self.drop_cache()
            return ""
        tail = answer.close()
        self.messages.append(Message(ASSISTANT, answer.text.strip() if self.strip_answers else answer.text))
        return tail

    def _generate(self, view: "_View", gen: GenerationConfig, extra_stops: tuple[str, ...] = ()) -> Iterator[str]:
        answer = self._start(view, gen, extra_stops)
        if self.engine is not None:  # decoded in a batch with other conversations
            yield from self.engine.run(self, view, answer)
            return
        failed = False
        try:
            steps = self.prefill_steps(view)
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    logits = done.value
                    break
            while True:
                delta = answer.push(logits)
                if delta:
                    yield delta
                if answer.done:
                    break
                logits = self._step(answer.token)
        except Exception:
            failed = True
            raise
        finally:
            # Also runs when the consumer stops early (Stop): keep what was said so far.
            tail = self.end_answer(answer, failed)
        if tail:
            yield tail


@dataclass
class _View:
    rendered: Rendered
    images: list[_Image]
    dropped: int
    layout: str
    """How its images are read (`MultimodalModel.image_layout` of their number)."""
