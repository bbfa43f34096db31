"""The web app's conversations: one `ChatSession` per browser session, in bounded memory.

At most `max_cached` conversations keep a KV cache (and image features); when another needs
one, the least recently used drops its cache and is re-prefilled transparently when its user
comes back. At most `max_conversations` are remembered at all, each with its text and its
images at full size (at most `MAX_SERVED_PIXELS` each). A lock per conversation lets one request
at a time change it; a streaming answer holds the lock until it ends or is stopped.

A turn has two sides, so that the model may run in another process (ZeroGPU runs each call of
the `spaces.GPU` function in a forked worker whose changes to memory are lost): the process that
keeps the conversations checks the `Question` and hands the worker a picklable `History`; the
worker (`SessionPool.conversation_for`, `Conversation.generate`) yields `Update`s; and
`Conversation.follow` relays their text and records the turn, unless the worker ran in this very
process and its session already did.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from PIL import Image

from mmchat.answer import TurnStats
from mmchat.chat import ChatSession
from mmchat.conversation import ASSISTANT, USER, Message
from mmchat.generate import GenerationConfig
from mmchat.image import ImageError, load_image
from mmchat.model import MultimodalModel

MIN_PIXELS = 64
"""Smaller images (a 1×1 pixel, say) carry nothing to look at; refused with a message."""


class Busy(RuntimeError):
    """The conversation is still busy with an earlier request."""


MAX_SERVED_PIXELS = 16_000_000
"""The page and the API keep each image at full size (as transformers reads it; any downscale would change
the pixels the model sees), so a larger one is refused with a message: a 12-megapixel phone photo and a
4K frame fit, and a conversation's images stay bounded (16 MP is 48 MB as RGB)."""


def prepare_image(source, max_pixels: int = MAX_SERVED_PIXELS) -> Image.Image:
    """A user's image as RGB at full size; `ImageError` if unusable or over `max_pixels`."""
    try:
        image = load_image(source, max_pixels)
    except ImageError as e:  # name the file as the user knows it, not by its upload path
        name = Path(source).name if isinstance(source, (str, Path)) else None
        raise ImageError(str(e).replace(str(source), name) if name else str(e)) from None
    width, height = image.size
    if width * height < MIN_PIXELS:
        raise ImageError(f"the image is only {width}×{height} pixels, too small to show anything; "
                         "upload one of at least 8×8 pixels")
    return image


@dataclass
class Turn:
    """One message as the page shows it."""

    role: str
    text: str
    image_files: list[str] = field(default_factory=list)


@dataclass
class Question:
    """A checked question, its image read (`prepare_image`); picklable."""

    text: str
    image_file: str | None = None
    """The file shown in the page for the image."""
    image: Image.Image | None = None


@dataclass
class History:
    """What a worker needs to rebuild a conversation: picklable, so it can cross to a ZeroGPU worker."""

    template: str | None
    messages: list[Message]
    images: list[Image.Image]

    def held_by(self, session: ChatSession) -> bool:
        """`session` holds exactly this history, with the very same image objects: in the same process."""
        return (session.template == self.template and session.messages == self.messages
                and len(session.images) == len(self.images)
                and all(a is b for a, b in zip(session.images, self.images)))

    def conversation(self, model: MultimodalModel) -> "Conversation":
        session = ChatSession(model, template=self.template)
        images = iter(self.images)
        for message in self.messages:
            session.add(message, [next(images) for _ in range(message.images)])
        return Conversation(session)


@dataclass
class Update:
    """What `Conversation.generate` yields; picklable, as on ZeroGPU it comes from another process."""

    delta: str = ""
    """The answer's next piece of text."""
    stats: TurnStats | None = None
    """The turn's stats so far (the last update's are final); None before generation starts."""
    notices: list[str] = field(default_factory=list)
    pid: int = 0
    """The first update only (the question was accepted): the process that generates."""


@dataclass
class Conversation:
    session: ChatSession
    image_files: list[str] = field(default_factory=list)
    """The file shown for each image in `session.images`, in the same order."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ask(self, text: str, image_file: str | None, gen: GenerationConfig,
            image: Image.Image | None = None) -> Iterator[str]:
        """Add a question (with an optional image file) and stream the answer's text deltas.

        `image`: `image_file` already prepared (`question`), so it is not read again.
        Raises `ImageError`, `ValueError` or `ContextError` before anything changes.
        """
        if image is None:
            question = self.question(text, image_file)
            image = question.image
        deltas = self.session.ask(text, image, gen)
        if image_file is not None:
            self.image_files.append(image_file)
        return deltas

    def question(self, text: str, image_file: str | None) -> Question:
        """The question checked and its image prepared, before any model runs; raises `ImageError` or `ValueError`."""
        if self.session.messages and self.session.messages[-1].role == USER:
            raise ValueError("the last question has no answer yet (it was interrupted): "
                             "press Regenerate to answer it, or Undo to remove it")
        if not text or not text.strip():
            raise ValueError("the message is empty; type a question")
        image = None if image_file is None else prepare_image(image_file)
        return Question(text.strip(), image_file, image)

    def check_regenerate(self) -> None:
        if not self.session.messages:
            raise ValueError("there is nothing to regenerate; ask a question first")

    def regenerate(self, gen: GenerationConfig) -> Iterator[str]:
        self.check_regenerate()
        return self.session.regenerate(gen)

    def history(self) -> History:
        return History(self.session.template, list(self.session.messages), self.session.images)

    def generate(self, question: Question | None, gen: GenerationConfig) -> Iterator[Update]:
        """The worker's side of a turn: answer `question` (None: the last question again).

        The first update (`pid` set) says the question was accepted (errors before it are the
        input's, nothing changed); then one per piece of text, with the stats so far; then the
        final stats. Closing it early (Stop) keeps the partial answer, as `ChatSession.ask` does.
        """
        known = len(self.session.notices)
        if question is None:
            deltas = self.regenerate(gen)
        else:
            deltas = self.ask(question.text, question.image_file, gen, question.image)
        try:
            yield Update(notices=self.session.notices[known:], pid=os.getpid())
            for delta in deltas:
                yield Update(delta, replace(self.session.last_stats))
        finally:
            deltas.close()
        yield Update(stats=self.session.last_stats)

    def follow(self, question: Question | None, updates: Iterator[Update]) -> Iterator[str]:
        """The keeping process's side of a turn: relays the answer's text from `updates` (maybe
        generated in another process) and records the turn here unless `generate` ran in this
        process (then its session already holds the turn, and its KV cache).

        Raises before anything changes when the question is refused (`ContextError`): the worker's
        first update is awaited here. Closing the deltas early (Stop) keeps the partial answer.
        """
        accepted = next(updates)
        if accepted.pid == os.getpid():
            return self._relay(updates, record=False)
        if question is None:  # regenerate: the last answer goes, as `ChatSession.regenerate` drops it
            if self.session.messages[-1].role == ASSISTANT:
                self.session.messages.pop()
        else:
            images = [] if question.image is None else [question.image]
            self.session.add(Message(USER, question.text, len(images)), images)
            if question.image_file is not None:
                self.image_files.append(question.image_file)
        self.session.notices += accepted.notices
        return self._relay(updates, record=True)

    def _relay(self, updates: Iterator[Update], record: bool) -> Iterator[str]:
        answer, stats, failed = "", None, False
        try:
            for update in updates:
                answer, stats = answer + update.delta, update.stats or stats
                if update.delta:
                    yield update.delta
        except Exception:  # the question stays unanswered, as in `ChatSession`
            failed = True
            raise
        finally:
            updates.close()
            if record and not failed and stats is not None:  # stats: generation began
                self.session.last_stats = stats
                self.session.add(Message(ASSISTANT, answer.strip()))

    def undo(self) -> None:
        self.session.undo()
        del self.image_files[len(self.session.images):]

    def clear(self) -> None:
        self.session.clear()
        self.image_files.clear()

    def restart(self, template: str | None) -> None:
        """A new, empty conversation rendered with `template` (None: the checkpoint's)."""
        self.session = ChatSession(self.session.model, template=template, engine=self.session.engine)
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
                 wait_seconds: float = 30.0, engine=None):
        if not 1 <= max_cached <= max_conversations:
            raise ValueError(f"need 1 <= max_cached ({max_cached}) <= max_conversations ({max_conversations})")
        self.model = model
        self.max_cached = max_cached
        self.max_conversations = max_conversations
        self.wait_seconds = wait_seconds
        self.engine = engine
        """The `mmchat.engine.Engine` the conversations decode in (None: each answers on its own)."""
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
                conversation = self._conversations[key] = Conversation(ChatSession(self.model, engine=self.engine))
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
            if generate:  # answers that ran together may have left more caches than allowed
                with self._guard:
                    self._evict_caches()

    def conversation_for(self, key: str, history: History) -> Conversation:
        """The conversation a worker generates with: `key`'s own where it holds exactly `history`
        (in the keeping process, whose caller holds its lock: the KV cache is reused), else one
        rebuilt from `history` (a ZeroGPU worker, which got a pickled copy: it re-prefills).

        Takes no lock: a forked worker may inherit `_guard` held by another thread, forever.
        """
        conversation = self._conversations.get(key)
        if conversation is not None and history.held_by(conversation.session):
            return conversation
        return history.conversation(self.model)

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
