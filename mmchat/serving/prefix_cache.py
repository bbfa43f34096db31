"""The API's conversations: a few `ChatSession`s whose KV caches serve any request that continues them.

API clients re-send the whole conversation every turn. The pool keeps at most `max_sessions`
sessions (the least recently used is reused first); a request goes to the session whose
conversation — system prompt, then each message's role, text and image content hashes — shares
the most leading messages with the request's, and `ChatSession.answer` then prefills only the
tokens after the longest matching cached prefix. A request that shares no user message with any
session takes a new session while there is room, else the least recently used one.

Only the API's generation thread touches the pool (one request at a time), so it has no locks.
"""
from __future__ import annotations

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

    def __init__(self, model: MultimodalModel, max_sessions: int = 4):
        if max_sessions < 1:
            raise ValueError(f"--max-sessions {max_sessions}: must be at least 1")
        self.model = model
        self.max_sessions = max_sessions
        self._ids = count()
        self._sessions: OrderedDict[int, tuple[ChatSession, str | None, list[MessageKey]]] = OrderedDict()

    def take(self, system: str | None, messages: list[MessageKey]) -> tuple[int, ChatSession]:
        """The session to answer this conversation with (most shared leading messages)."""
        best, best_shared = None, 0
        for sid, (_, their_system, theirs) in reversed(self._sessions.items()):  # most recent first
            shared = shared_messages(theirs, messages) if their_system == system else 0
            if shared > best_shared:
                best, best_shared = sid, shared
        if best is None:
            if len(self._sessions) < self.max_sessions:
                best = next(self._ids)
                self._sessions[best] = (ChatSession(self.model), system, [])
            else:
                best = next(iter(self._sessions))  # least recently used
        self._sessions.move_to_end(best)
        return best, self._sessions[best][0]

    def remember(self, sid: int, system: str | None, messages: list[MessageKey]) -> None:
        """Record what session `sid` now holds: `messages` plus the answer it just gave."""
        session = self._sessions[sid][0]
        held = list(messages)
        if session.messages and session.messages[-1].role == ASSISTANT:
            held.append(MessageKey(ASSISTANT, session.messages[-1].text))
        self._sessions[sid] = (session, system, held)

    def __len__(self) -> int:
        return len(self._sessions)
