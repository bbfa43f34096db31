"""Continuous batching: the answers of many conversations decoded together, one LLM forward per step.

Every chat session of a server (the API's and the app page's) hands its answers to one `Engine`.
Its thread owns the model. Each round it

1. admits waiting answers while fewer than `max_batch` are in progress;
2. prefills one chunk (`prefill_chunk` positions) of the oldest newcomer with the newcomer's own
   KV cache — the session's cached prefix, so only the conversation's new tokens run — and, once
   the prefill is done, chooses its first token and moves the newcomer into the batch (only when
   nobody is decoding does it prefill chunk after chunk: a long prompt then stalls no one);
3. runs one decode step for the whole batch: one forward over one new token per conversation,
   each attending to its own cached positions (`mmchat.kv_cache.BatchCache`: a row per
   conversation, its padding masked, its own position ids). Finished answers leave between steps
   and take their row back as their session's cache, so the next turn prefills only what is new.

Greedy answers equal each conversation's solo answer up to float rounding (a batched matmul sums
in another order): in float32 only a near-tie of the two best logits can flip a token. A model
whose cache is not plain full attention (sliding windows) decodes one answer at a time here.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mmchat.answer import Answer, choose
from mmchat.kv_cache import BatchCache, new_cache

DEFAULT_PREFILL_CHUNK = 512
"""Positions per prefill forward while others decode: LLaVA-1.5's 576 image tokens take two."""


@dataclass
class _Request:
    session: object  # a ChatSession
    view: object
    answer: Answer
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    prefill: Iterator | None = None
    fed: list[int] = field(default_factory=list)
    """Answer tokens fed to the batch (the session's cache keys grow by them when it leaves)."""


@dataclass
class EngineStats:
    steps: int = 0
    """Batched decode forwards run."""
    tokens: int = 0
    """Tokens fed by those forwards."""
    largest_batch: int = 0


class Engine:
    """Decodes the answers of many `ChatSession`s (those created with `engine=`) in one batch."""

    def __init__(self, model, max_batch: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if max_batch < 1:
            raise ValueError(f"--max-batch {max_batch}: must be at least 1 (1 decodes one answer at a time)")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        # Rows of different lengths share one append-in-place cache; other caches cannot be stacked.
        self.batchable = new_cache(model.llm.config) is not None
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Owned by the engine's thread:
        self._prefilling: deque[_Request] = deque()
        self._running: list[_Request] = []
        """In the batch's row order."""
        self._cache = None

    # -- the caller's side -----------------------------------------------------------------
    def run(self, session, view, answer: Answer) -> Iterator[str]:
        """Generate `answer` for `session` in the batch; yields text deltas as `ChatSession.ask` does.
        Closing the iterator stops the answer at the next step and keeps what was said."""
        request = _Request(session, view, answer)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine was closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mmchat-engine", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
            elif self._pid != os.getpid():  # a forked copy: the engine's thread stayed in the parent
                raise RuntimeError("this engine runs in another process; a forked worker (ZeroGPU) must "
                                   "answer with sessions that have no engine")
            self._waiting.append(request)
            self._cv.notify()
        try:
            while True:
                kind, value = request.events.get()
                if kind == "delta":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            # Stopped early (or done): the engine lets go of the session before the caller goes on.
            request.cancelled.set()
            with self._cv:
                self._cv.notify()
            request.finished.wait()

    def close(self) -> None:
        """Stop the engine's thread once the answers in progress are done (waiting ones fail)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def busy(self) -> int:
        """Answers waiting or in progress."""
        return len(self._waiting) + len(self._prefilling) + len(self._running)

    # -- the engine's thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._prefilling or self._running or self._closed):
                    self._cv.wait()
                if self._closed and not (self._prefilling or self._running):
                    for request in self._waiting:
                        self._fail(request, RuntimeError("the engine was closed"))
                    return
                while self._waiting and len(self._prefilling) + len(self._running) < self._room():
                    self._prefilling.append(self._waiting.popleft())
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._prefill()
                    if self._running:
                        self._decode_step()
            except Exception as e:  # a bug here must not leave every caller waiting forever
                for request in [*self._prefilling, *self._running]:
                    self._fail(request, e)
                self._prefilling.clear()
                self._running, self._cache = [], None

    def _emit(self, request: _Request, kind: str, value=None) -> None:
        request.events.put((kind, value))

    def _fail(self, request: _Request, error: Exception) -> None:
        request.session.end_answer(request.answer, failed=True)
        self._emit(request, "error", error)
        request.finished.set()

    def _end(self, request: _Request) -> None:
        tail = request.session.end_answer(request.answer, failed=False)
        if tail:
            self._emit(request, "delta", tail)
        self._emit(request, "end")
        request.finished.set()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._prefilling if r.cancelled.is_set()]:
            self._prefilling.remove(request)
            if request.prefill is None:  # never started: the question stays unanswered
                request.session.end_answer(request.answer, failed=True)
                request.finished.set()
            else:  # part of the prompt is in the session's cache, consistently: keep it
                self._end(request)
        gone = [i for i, r in enumerate(self._running) if r.cancelled.is_set()]
        if gone:
            self._leave(gone)

    def _prefill(self) -> None:
        """One chunk of the oldest newcomer's prefill; chunk after chunk while nobody decodes."""
        while self._prefilling:
            request = self._prefilling[0]
            try:
                if request.prefill is None:
                    request.prefill = request.session.prefill_steps(request.view, self.prefill_chunk)
                next(request.prefill)
            except StopIteration as done:
                self._prefilling.popleft()
                try:
                    self._first_token(request, done.value)
                except Exception as e:  # its first token failed (sampling, say): it alone fails
                    self._fail(request, e)
            except Exception as e:  # this conversation's input failed (an image, say); the others go on
                self._prefilling.popleft()
                self._fail(request, e)
            if self._running:
                return

    def _room(self) -> int:
        """Answers in progress at most (admitted ones are never turned away from the batch)."""
        return self.max_batch if self.batchable else 1

    def _first_token(self, request: _Request, logits: torch.Tensor) -> None:
        delta = request.answer.push(logits)
        if delta:
            self._emit(request, "delta", delta)
        if request.answer.done:
            return self._end(request)
        self._join(request)

    def _join(self, request: _Request) -> None:
        cache = request.session.lend_cache()
        if not self.batchable:  # alone by construction (`_room`): the session's own cache runs the steps
            self._cache = cache
        elif self._cache is None:
            self._cache = BatchCache(cache, self.max_batch)
        else:
            self._cache.add(cache)
        self._running.append(request)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._running))
        for r in self._running:
            r.answer.stats.batch_size = max(r.answer.stats.batch_size, len(self._running))

    def _decode_step(self) -> None:
        running, device = self._running, self.model.device
        ids = torch.tensor([[r.answer.token] for r in running], device=device)
        tick = time.perf_counter()
        try:
            mask, positions = self._cache.step_inputs(device) if self.batchable else (None, None)
            out = self.model.llm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache,
                                 use_cache=True)
            logits = out.logits[:, -1]
            if logits.device.type == "cuda":  # kernels run asynchronously: wait, or the forward looks free
                torch.cuda.synchronize(logits.device)
        except Exception as e:  # the batch's cache is lost: every answer in it fails, the engine goes on
            for request in running:
                self._fail(request, e)
            self._running, self._cache = [], None
            return
        seconds = time.perf_counter() - tick
        if self.batchable:
            self._cache.advance()
        else:
            self._cache = out.cache
        self.stats.steps += 1
        self.stats.tokens += len(running)
        try:  # the whole batch's tokens at once (one host sync); if that fails, each row chooses alone
            for request, token in zip(running, choose([r.answer for r in running], logits)):
                request.answer.chosen = token
        except Exception:
            for request in running:
                request.answer.chosen = None
        done, failed = [], {}
        for i, request in enumerate(running):
            request.fed.append(request.answer.token)
            request.answer.stats.decode_model_seconds += seconds
            try:
                delta = request.answer.push(logits[i])
            except Exception as e:  # this answer's choice failed (sampling, detokenising): it alone fails
                failed[i] = e
                continue
            if delta:
                self._emit(request, "delta", delta)
            if request.answer.done:
                done.append(i)
        if done or failed:
            self._leave(done + list(failed), failed)

    def _leave(self, rows: list[int], failed: dict[int, Exception] | None = None) -> None:
        """Answers `rows` end: each takes its row back as its session's cache; those in `failed` fail
        with their error instead (their row is dropped: the session re-prefills next turn)."""
        failed = failed or {}
        for i in sorted(rows, reverse=True):  # from the end: the last row moves into each gap
            request = self._running[i]
            if self.batchable:
                cache = self._cache.remove(i)
                self._running[i] = self._running[-1]
                self._running.pop()
            else:
                cache, self._cache = self._cache, None
                self._running.pop(i)
            if i in failed:
                self._fail(request, failed[i])
            else:
                request.session.return_cache(cache, request.fed)
                self._end(request)
        if not self._running:
            self._cache = None
