"""The API's conversations: a few `ChatSession`s whose KV caches serve any request that continues them.

API clients re-send the whole conversation every turn. The pool keeps at most `max_sessions`
sessions (the least recently used is reused first); a request goes to the session whose
conversation — system prompt, then each message's role, text and image content hashes — shares
the most leading messages with the request's, and `ChatSession.answer` then prefills only the
tokens after the longest matching cached prefix. A request that shares no user message with any
session takes a new session while there is room, else the least recently used one.

Requests run at once (their answers decode together in `mmchat.engine`), so a session answering
one request is busy: `take` never hands it to another until `release`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

from mmchat.chat import ChatSession
from mmchat.conversation import ASSISTANT
from mmchat.model import MultimodalModel


@dataclass(frozen=True)
class MessageKey:
    role: str
    text: str
    images: tuple[str, ...] = ()
    """sha256 of each image's pixels, in order."""


def shared_messages(a: list[MessageKey], b: list[MessageKey]) -> int:
    """How many leading messages two conversations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixPool:
    """`max_sessions` chat sessions, each remembered with the conversation its cache holds."""

    def __init__(self, model: MultimodalModel, max_sessions: int = 4, engine=None):
        if max_sessions < 1:
            raise ValueError(f"--max-sessions {max_sessions}: must be at least 1")
        self.model = model
        self.max_sessions = max_sessions
        self.engine = engine
        """The `mmchat.engine.Engine` the sessions decode in (None: each answers on its own)."""
        self._ids = count()
        self._sessions: OrderedDict[int, tuple[ChatSession, str | None, list[MessageKey]]] = OrderedDict()
        self._busy: set[int] = set()
        self._guard = threading.Lock()

    def take(self, system: str | None, messages: list[MessageKey]) -> tuple[int, ChatSession]:
        """A session that is not busy to answer this conversation with (most shared leading
        messages); busy until `release`. Beyond `max_sessions` when all are busy (never the case
        while requests in progress are at most `max_sessions`)."""
        with self._guard:
            best, best_shared = None, 0
            for sid, (_, their_system, theirs) in reversed(self._sessions.items()):  # most recent first
                if sid in self._busy:
                    continue
                shared = shared_messages(theirs, messages) if their_system == system else 0
                if shared > best_shared:
                    best, best_shared = sid, shared
            if best is None:
                idle = [sid for sid in self._sessions if sid not in self._busy]  # least recently used first
                if len(self._sessions) < self.max_sessions or not idle:
                    best = next(self._ids)
                    self._sessions[best] = (ChatSession(self.model, engine=self.engine, strip_answers=False), system, [])
                else:
                    best = idle[0]
            self._sessions.move_to_end(best)
            self._busy.add(best)
            return best, self._sessions[best][0]

    def release(self, sid: int, system: str | None = None, messages: list[MessageKey] | None = None) -> None:
        """Session `sid` is free again; with `messages`, it now holds them plus the answer it just
        gave (None: the request changed nothing, e.g. it was refused)."""
        with self._guard:
            session = self._sessions[sid][0]
            if messages is not None:
                held = list(messages)
                if session.messages and session.messages[-1].role == ASSISTANT:
                    held.append(MessageKey(ASSISTANT, session.messages[-1].text))
                self._sessions[sid] = (session, system, held)
            self._busy.discard(sid)
            while len(self._sessions) > self.max_sessions:  # grown past the bound while all were busy
                oldest = next((k for k in self._sessions if k not in self._busy), None)
                if oldest is None:
                    break
                del self._sessions[oldest]

    def __len__(self) -> int:
        return len(self._sessions)
