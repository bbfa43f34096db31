"""The web app's conversations: one `ChatSession` per browser session, in bounded memory.

At most `max_cached` conversations keep a KV cache (and image features); when another needs
one, the least recently used drops its cache and is re-prefilled transparently when its user
comes back. At most `max_conversations` are remembered at all, each with its text and its
images downscaled to twice the model's input size. A lock per conversation lets one request
at a time change it; a streaming answer holds the lock until it ends or is stopped.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from mmchat.chat import ChatSession
from mmchat.conversation import USER
from mmchat.generate import GenerationConfig
from mmchat.image import ImageError, load_image
from mmchat.model import MultimodalModel

MIN_PIXELS = 64
"""Smaller images (a 1×1 pixel, say) carry nothing to look at; refused with a message."""


class Busy(RuntimeError):
    """The conversation is still busy with an earlier request."""


def prepare_image(source, image_size: int) -> Image.Image:
    """A user's image as RGB, longest side at most 2×`image_size`; `ImageError` if unusable.

    The model sees `image_size` pixels after padding to a square, so twice that keeps what it
    sees while a 12-megapixel photo costs ~1 MB of memory instead of ~36 MB.
    """
    try:
        image = load_image(source)
    except ImageError as e:  # name the file as the user knows it, not by its upload path
        name = Path(source).name if isinstance(source, (str, Path)) else None
        raise ImageError(str(e).replace(str(source), name) if name else str(e)) from None
    width, height = image.size
    if width * height < MIN_PIXELS:
        raise ImageError(f"the image is only {width}×{height} pixels, too small to show anything; "
                         "upload one of at least 8×8 pixels")
    limit = 2 * image_size
    if max(width, height) > limit:
        scale = limit / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
    return image


@dataclass
class Turn:
    """One message as the page shows it."""

    role: str
    text: str
    image_files: list[str] = field(default_factory=list)


@dataclass
class Conversation:
    session: ChatSession
    image_files: list[str] = field(default_factory=list)
    """The file shown for each image in `session.images`, in the same order."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ask(self, text: str, image_file: str | None, gen: GenerationConfig) -> Iterator[str]:
        """Add a question (with an optional image file) and stream the answer's text deltas.

        Raises `ImageError`, `ValueError` or `ContextError` before anything changes.
        """
        if self.session.messages and self.session.messages[-1].role == USER:
            raise ValueError("the last question has no answer yet (it was interrupted): "
                             "press Regenerate to answer it, or Undo to remove it")
        image = None if image_file is None else prepare_image(image_file, self.session.model.config.vision.image_size)
        deltas = self.session.ask(text, image, gen)
        if image_file is not None:
            self.image_files.append(image_file)
        return deltas

    def regenerate(self, gen: GenerationConfig) -> Iterator[str]:
        if not self.session.messages:
            raise ValueError("there is nothing to regenerate; ask a question first")
        return self.session.regenerate(gen)

    def undo(self) -> None:
        self.session.undo()
        del self.image_files[len(self.session.images):]

    def clear(self) -> None:
        self.session.clear()
        self.image_files.clear()

    def restart(self, template: str | None) -> None:
        """A new, empty conversation rendered with `template` (None: the checkpoint's)."""
        self.session = ChatSession(self.session.model, template=template)
        self.image_files.clear()

    def thread(self) -> list[Turn]:
        files = iter(self.image_files)
        return [Turn(m.role, m.text, [next(files) for _ in range(m.images)]) for m in self.session.messages]

    def take_notices(self) -> list[str]:
        notices, self.session.notices[:] = list(self.session.notices), []
        return notices


class SessionPool:
    """Conversations by session key (Gradio's session hash), least recently used evicted."""

    def __init__(self, model: MultimodalModel, max_cached: int = 4, max_conversations: int = 256,
                 wait_seconds: float = 30.0):
        if not 1 <= max_cached <= max_conversations:
            raise ValueError(f"need 1 <= max_cached ({max_cached}) <= max_conversations ({max_conversations})")
        self.model = model
        self.max_cached = max_cached
        self.max_conversations = max_conversations
        self.wait_seconds = wait_seconds
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._cached: OrderedDict[str, None] = OrderedDict()  # keys whose session may hold a KV cache
        self._guard = threading.Lock()

    @contextmanager
    def use(self, key: str, generate: bool = False) -> Iterator[Conversation]:
        """The conversation for `key` (created on first use), locked while the block runs.

        `generate` says the block runs the model: the conversation then takes a cache slot,
        evicting the least recently used cache beyond `max_cached`.
        """
        with self._guard:
            conversation = self._conversations.get(key)
            if conversation is None:
                conversation = self._conversations[key] = Conversation(ChatSession(self.model))
                self._forget_oldest()
            self._conversations.move_to_end(key)
        if not conversation.lock.acquire(timeout=self.wait_seconds):
            raise Busy("this conversation is still answering; press Stop or wait for the answer")
        try:
            if generate:
                with self._guard:
                    self._cached[key] = None
                    self._cached.move_to_end(key)
                    self._evict_caches()
            yield conversation
        finally:
            conversation.lock.release()

    def forget(self, key: str) -> None:
        """Drop a conversation (its user closed the page)."""
        with self._guard:
            self._conversations.pop(key, None)
            self._cached.pop(key, None)

    def __len__(self) -> int:
        return len(self._conversations)

    @property
    def cached_keys(self) -> list[str]:
        with self._guard:
            return list(self._cached)

    def _evict_caches(self) -> None:
        for key in list(self._cached)[:-1]:  # oldest first, never the one being entered
            if len(self._cached) <= self.max_cached:
                return
            conversation = self._conversations.get(key)
            if conversation is None:
                del self._cached[key]
            elif conversation.lock.acquire(blocking=False):  # a busy one is generating: skip it
                try:
                    conversation.session.drop_cache()
                    del self._cached[key]
                finally:
                    conversation.lock.release()

    def _forget_oldest(self) -> None:
        for key in list(self._conversations):
            if len(self._conversations) <= self.max_conversations:
                return
            if not self._conversations[key].lock.locked():
                del self._conversations[key]
                self._cached.pop(key, None)
