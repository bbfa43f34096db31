"""What a chat-completions request may hold, and what it becomes: the schema (pydantic), its
validation into one-line errors in OpenAI's shape, and its messages and images (data URLs; http(s)
only when allowed, with size and time limits) as mmchat messages keyed for the prefix cache."""
from __future__ import annotations

import base64
import binascii
import hashlib
import time
import urllib.request
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmchat.conversation import ASSISTANT, USER, Message
from mmchat.image import ImageError
from mmchat.serving.prefix_cache import MessageKey
from mmchat.serving.sessions import prepare_image


# -- errors ----------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers
        """Extra response headers (a 429's `Retry-After`)."""

    def response(self) -> JSONResponse:
        return JSONResponse({"error": error_body(self)}, status_code=self.status, headers=self.headers)


def validation_error(e: ValidationError) -> ApiError:
    errors = e.errors()
    # A content part of an unknown type fails both of content's shapes (a string, a list of parts):
    # the part's own error says what is wrong, "should be a valid string" would not.
    first = next((err for err in errors if err["type"] == "union_tag_invalid"), errors[0])
    loc = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "list[", "str", "TextPart", "ImagePart"))]
    param = ".".join(loc) or None
    if first["type"] == "union_tag_invalid":
        kind = first["ctx"].get("tag")
        return ApiError(400, f"{param}: content parts of type {kind!r} are not supported (video, audio and files are out "
                        "of scope); send 'text' and 'image_url' parts", param, "unsupported_content")
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"{param}: not supported by this server; leave it out", param, "unsupported_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param, "invalid_value")


# -- the request -----------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_MESSAGES = 4096
"""Messages in one request at most: rendering checks each answer against the turns before it, so a
conversation's cost grows with the square of its length; a context holds far fewer anyway."""
SEEDS = (-(2**63), 2**64 - 1)
"""The seeds torch's generators take."""


class ChatRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted and unused (OpenAI's end-user id)."""
    n: int | None = None
    logprobs: bool | None = None
    response_format: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v):
        if v is not None and not SEEDS[0] <= v <= SEEDS[1]:
            raise ValueError(f"must be a 64-bit integer, from {SEEDS[0]} to {SEEDS[1]}")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError(f"{v} choices asked; this server generates one (n=1)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("log probabilities are not supported; leave logprobs out")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError(f"type {v.get('type')!r} is not supported; only {{'type': 'text'}}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:
            raise ValueError("penalties are not supported; leave them out or set 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return v


@dataclass
class Conversation:
    """A request's conversation as the model takes it."""

    system: str | None
    messages: list[Message]
    images: list[tuple[str, Image.Image]]
    keys: list[MessageKey]


@dataclass
class RemoteImages:
    """Fetching `http(s)` image URLs; off unless `--allow-remote-images`."""

    allowed: bool = False
    max_bytes: int = 10 * 2**20
    timeout: float = 10.0


def image_key(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def _image_bytes(url: str, param: str, remote: RemoteImages) -> bytes:
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        if not sep or not head.startswith("image/") or not head.endswith(";base64"):
            raise ApiError(400, f"{param}: a data URL must be data:image/...;base64,...", param, "invalid_image_url")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param}: the data URL is not valid base64", param, "invalid_image_url") from None
    if not url.startswith(("http://", "https://")):
        raise ApiError(400, f"{param}: use a data:image/...;base64 URL", param, "invalid_image_url")
    if not remote.allowed:
        raise ApiError(400, f"{param}: remote image URLs are off on this server (start it with --allow-remote-images); "
                            "send the image as a data URL", param, "remote_images_disabled")
    too_large = ApiError(413, f"{param}: the image is over {remote.max_bytes / 2**20:g} MB", param, "image_too_large")
    deadline = time.monotonic() + remote.timeout  # for the whole fetch, not per read (a slow drip)
    data = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=remote.timeout) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > remote.max_bytes:
                raise too_large
            while len(data) <= remote.max_bytes:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = response.read1(min(2**16, remote.max_bytes + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
    except ApiError:
        raise
    except Exception as e:  # any fetch failure is the URL's fault as far as the client can tell
        timed_out = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)  # URLError
        why = f"no answer within {remote.timeout:g} s" if timed_out else type(e).__name__
        raise ApiError(400, f"{param}: could not fetch the image ({why})", param, "image_fetch_failed") from None
    if len(data) > remote.max_bytes:
        raise too_large
    return bytes(data)


def check_text(text: str, param: str) -> str:
    """A string a tokenizer can take: JSON can carry lone surrogates (`"\\ud800"`), which are no UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param}: the text holds {text[e.start:e.end]!r}, half of a UTF-16 surrogate pair, "
                            "which is no character; send valid Unicode", param, "invalid_value") from None
    return text


def _text_of(content, param: str, images_allowed: bool) -> tuple[str, list[tuple[str, ImageURL]], list[dict] | None]:
    """(text, image URLs with their params, the content parts in order or None for a string). The text is
    kept as sent (a leading space of an answer included): the chat template renders what the client sent,
    as transformers' processor and vLLM do, so the tokens of an answer the server generated match again."""
    if isinstance(content, str):
        return check_text(content, f"{param}.content"), [], None
    texts = [check_text(p.text, f"{param}.content.{i}.text") for i, p in enumerate(content) if isinstance(p, TextPart)]
    images = [(f"{param}.content.{i}.image_url", p.image_url) for i, p in enumerate(content) if isinstance(p, ImagePart)]
    if images and not images_allowed:
        raise ApiError(400, f"{param}: only user messages can carry images", param, "invalid_value")
    parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in content]
    return "\n".join(texts), images, parts


def conversation(request: ChatRequest, max_images: int, remote: RemoteImages) -> Conversation:
    """Validate the messages' order and decode their images (blocking: run it in a thread)."""
    msgs = list(request.messages)
    system = None
    if msgs[0].role in ("system", "developer"):
        system, _, _ = _text_of(msgs.pop(0).content, "messages.0", images_allowed=False)
    offset = len(request.messages) - len(msgs)
    if not msgs or msgs[-1].role != USER:
        raise ApiError(400, "messages: the conversation must end with a user message", "messages", "invalid_value")
    count = sum(isinstance(p, ImagePart) for m in msgs if not isinstance(m.content, str) for p in m.content)
    if count > max_images:
        raise ApiError(400, f"messages: {count} images; this server takes at most {max_images} per request",
                       "messages", "too_many_images")
    out = Conversation(system, [], [], [])
    for i, m in enumerate(msgs):
        param = f"messages.{i + offset}"
        expected = USER if i % 2 == 0 else ASSISTANT
        if m.role != expected:
            raise ApiError(400, f"{param}: role {m.role!r} here; after an optional first system message, turns must "
                                "alternate user, assistant, ... and end with a user message", param, "invalid_value")
        text, urls, parts = _text_of(m.content, param, images_allowed=m.role == USER)
        if not text.strip() and not urls:
            raise ApiError(400, f"{param}: the message is empty", param, "invalid_value")
        keys = []
        for where, url in urls:
            try:
                image = prepare_image(_image_bytes(url.url, where, remote))
            except ImageError as e:
                raise ApiError(400, f"{where}: {e}", where, "invalid_image") from None
            keys.append(image_key(image))
            out.images.append((keys[-1], image))
        out.messages.append(Message(m.role, text, len(urls), parts))
        out.keys.append(MessageKey(m.role, text, tuple(keys)))
    return out


def error_body(e: ApiError) -> dict:
    return {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}
