"""An OpenAI-compatible chat API over one model: `GET /v1/models`, `POST /v1/chat/completions`.

`create_app` builds the FastAPI app; `python -m mmchat.serve` runs it. Requests are validated
into one-line errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`, 4xx):
no user input gets a 500. Fields the server cannot honour (`n` > 1, `tools`, `logprobs`, a JSON
`response_format`, penalties, unknown fields) are refused with a 400, never ignored. Sampling
fields left out take the model's decoding defaults (`decoding_defaults`; a converted llava-hf
folder's generation config), not OpenAI's temperature 1.

Every request gets a thread that feeds its conversation to the `mmchat.engine.Engine`, which
decodes the answers in progress together (at most `max_batch`: one LLM forward per step for all);
at most `max_queue` more requests wait, more get a 429. A streaming client that disconnects stops
its answer at the next step and frees its place in the batch.
Conversations reuse KV caches across requests through `PrefixPool`; `usage.prompt_tokens_details
.cached_tokens` says how many prompt tokens were not prefilled.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from mmchat.answer import TurnStats
from mmchat.chat import ContextError
from mmchat.engine import Engine
from mmchat.generate import decoding_defaults
from mmchat.model import MultimodalModel
from mmchat.serving.api_requests import (
    ApiError,
    ChatRequest,
    Conversation,
    RemoteImages,
    check_text,
    error_body,
    validation_error,
    conversation,
)
from mmchat.serving.config import DEFAULT_MAX_BATCH
from mmchat.serving.prefix_cache import PrefixPool


RETRY_AFTER_S = 1
"""A 429's `Retry-After`: answers take about a second each to make room on a small machine."""
BODY_TIMEOUT_S = 30
"""A request body must arrive within this many seconds (408 after)."""
DISCONNECT_POLL_S = 0.5
"""How often a non-streamed request looks whether its client is still there while it waits."""


# -- generation: a thread per request, decoding in the shared engine ------------------------
@dataclass
class _Job:
    conversation: Conversation
    gen: object
    stop: tuple[str, ...]
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event


class Worker:
    """Runs each request's answer on a thread of its own (at most the engine's `max_batch` at
    once; `max_queue` more wait, in order); owns the `PrefixPool`."""

    def __init__(self, pool: PrefixPool, engine: Engine, max_queue: int):
        self.pool = pool
        self.engine = engine
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(engine.max_batch, thread_name_prefix="mmchat-request")
        self._pending = 0
        self._guard = threading.Lock()

    def submit(self, job: _Job) -> None:
        with self._guard:
            if self._pending >= self.engine.max_batch + self.max_queue:
                raise ApiError(429, f"the server is busy ({self._pending} requests in progress or waiting); "
                               "retry shortly", None, "server_busy", kind="rate_limit_error",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self._pending += 1
        self._executor.submit(self._run, job)

    def _run(self, job: _Job) -> None:
        def put(kind, value=None):
            job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))

        try:
            if job.cancelled.is_set():
                return
            self._answer(job, put)
        except Exception as e:  # the model failed: the client hears it, the server keeps serving
            put("error", ApiError(503, f"generation failed ({type(e).__name__}: {e})", None, "generation_failed",
                                  kind="server_error"))
        finally:
            with self._guard:
                self._pending -= 1

    def _answer(self, job: _Job, put) -> None:
        c = job.conversation
        sid, session = self.pool.take(c.system, c.keys)
        try:
            deltas = session.answer(c.messages, c.images, job.gen, job.stop, c.system)
        except ContextError as e:
            self.pool.release(sid)
            return put("error", ApiError(400, f"messages: {e}", "messages", "context_length_exceeded"))
        except ValueError as e:
            self.pool.release(sid)
            return put("error", ApiError(400, f"messages: {e}", "messages", "invalid_value"))
        put("start")
        try:
            for delta in deltas:
                if job.cancelled.is_set():
                    break
                put("delta", delta)
        finally:
            deltas.close()
            self.pool.release(sid, c.system, c.keys)
        put("end", session.last_stats)


# -- the app ---------------------------------------------------------------------------
def create_app(model: MultimodalModel, model_id: str, *, api_key: str | None = None, max_sessions: int = 4,
               max_queue: int = 16, max_images: int = 8, max_body_bytes: int = 20 * 2**20,
               remote: RemoteImages | None = None, engine: Engine | None = None) -> FastAPI:
    """The API app serving `model` as `model_id`; `api_key` (when set) is required as a bearer token.
    `engine` decodes the answers (`python app.py` passes the one its page uses too; None: a new
    one). At least as many conversations as answers decoded at once keep their caches."""
    app = FastAPI(title="mmchat", docs_url=None, redoc_url=None, openapi_url=None)
    engine = engine or Engine(model, DEFAULT_MAX_BATCH)
    worker = Worker(PrefixPool(model, max(max_sessions, engine.max_batch), engine), engine, max_queue)
    remote = remote or RemoteImages()
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None,
                        "not_found" if e.status_code == 404 else None).response()

    if api_key is not None:
        app.add_middleware(_KeyCheck, key=api_key)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "mmchat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, max_body_bytes)
        req = _parse(body)
        if req.model != model_id:
            raise ApiError(404, f"model {req.model!r} is not served here; GET /v1/models lists {model_id!r}",
                           "model", "model_not_found")
        try:
            gen = decoding_defaults(model.config, temperature=req.temperature, top_p=req.top_p,
                                    max_new_tokens=req.max_completion_tokens or req.max_tokens, seed=req.seed)
        except ValueError as e:
            raise ApiError(400, str(e), None, "invalid_value") from None
        conv = await asyncio.to_thread(conversation, req, max_images, remote)
        stop = tuple(check_text(s, f"stop.{i}") for i, s in enumerate((req.stop,) if isinstance(req.stop, str) else req.stop or ()))
        job = _Job(conv, gen, stop, asyncio.Queue(), asyncio.get_running_loop(), threading.Event())
        worker.submit(job)
        try:
            kind, value = await job.events.get()
        except BaseException:
            job.cancelled.set()
            raise
        if kind == "error":
            raise value
        reply = _Reply(model_id, include_usage=bool(req.stream_options and req.stream_options.include_usage))
        if req.stream:
            return StreamingResponse(reply.stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await reply.whole(job, request))

    return app


class _KeyCheck:
    """Requires `Authorization: Bearer KEY`. A plain ASGI middleware: FastAPI's `@app.middleware` wraps the
    request's receive channel, and the handlers would no longer see a client hang up."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refused = ApiError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'", None,
                                   "invalid_api_key")
                return await refused.response()(scope, receive, send)
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"the request body is over {limit / 2**20:g} MB; send fewer or smaller images",
                         None, "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):  # a client trickling its body holds a connection, no more
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S} s; send it at once",
                       None, "body_timeout") from None
    return b"".join(chunks)


def _parse(body: bytes) -> ChatRequest:
    """The body as a request, or a 400 that says what is wrong with it."""
    try:
        return ChatRequest.model_validate(json.loads(body))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON ({e.msg} at character {e.pos})", None, "invalid_json") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text; send JSON encoded as UTF-8", None, "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply; send a chat request", None, "invalid_json") from None
    except ValidationError as e:
        raise validation_error(e) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ApiError(400, f"the body is not usable JSON ({e})", None, "invalid_json") from None


class _Reply:
    """A completion's JSON (whole, or as server-sent event chunks)."""

    def __init__(self, model_id: str, include_usage: bool):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id = model_id
        self.include_usage = include_usage

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    @staticmethod
    def usage(stats: TurnStats) -> dict:
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
                "total_tokens": stats.prompt_tokens + stats.new_tokens,
                "prompt_tokens_details": {"cached_tokens": stats.prompt_tokens - stats.prefill_tokens}}

    async def whole(self, job: _Job, request: Request) -> dict:
        parts, done, looked = [], False, time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    kind = None
                if time.monotonic() - looked >= DISCONNECT_POLL_S:  # has the client hung up? then stop its answer
                    looked = time.monotonic()
                    if await request.is_disconnected():
                        return {}
                if kind is None:
                    continue
                if kind == "delta":
                    parts.append(value)
                elif kind == "error":
                    raise value
                else:
                    done = True
                    break
        finally:
            if not done:
                job.cancelled.set()
        message = {"role": "assistant", "content": "".join(parts)}
        return {**self._head("chat.completion"), "usage": self.usage(value),
                "choices": [{"index": 0, "message": message, "finish_reason": value.finish_reason, "logprobs": None}]}

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        body = {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, job: _Job):
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield self._chunk({"content": value})
                elif kind == "error":
                    yield f"data: {json.dumps({'error': error_body(value)})}\n\n"
                    break
                else:
                    yield self._chunk({}, value.finish_reason)
                    if self.include_usage:
                        yield f"data: {json.dumps({**self._head('chat.completion.chunk'), 'choices': [], 'usage': self.usage(value)})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also on a client's disconnect (the task is cancelled): stop generating
            job.cancelled.set()
