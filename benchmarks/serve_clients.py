"""The users of `benchmarks.serve`: OpenAI-client conversations about a picture, timed per request.

Each user is a thread with its own `openai.OpenAI` client (as separate API users are). A turn sends
the whole conversation again, as API clients do: turn 1 is a picture (a `data:image/png;base64,...`
URL) and a question; each later turn appends the previous answer and a new question. Requests
stream, so time to first token is the arrival of the first content delta; completion tokens come
from the final chunk's `usage` (both servers send it).
"""
from __future__ import annotations

import base64
import importlib.util
import io
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

REQUEST_TIMEOUT_S = 900.0
"""Per request: 16 users queued behind one-at-a-time generation wait minutes on 2 CPU cores."""


@dataclass(frozen=True)
class Conversation:
    picture: str
    """The data URL sent with the first question."""
    questions: tuple[str, ...]


# ------------------------------------------------------------------ pictures and questions


def photos() -> list[Image.Image]:
    """Real photos that ship with installed packages: matplotlib's Grace Hopper and gradio's examples."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        found = [Image.open(f).convert("RGB")]
    spec = importlib.util.find_spec("gradio")  # found, not imported: importing gradio takes seconds
    if spec is not None and spec.submodule_search_locations:
        folder = Path(spec.submodule_search_locations[0]) / "media_assets" / "images"
        found += [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jp*g"))]
    return found  # matplotlib's photo alone still gives six different pictures


def picture_urls(count: int, side: int, offset: int = 0) -> list[str]:
    """`count` different PNG data URLs: a photo, a square crop of it (start, centre or end of its long
    side), maybe mirrored. They are sent at the tower's `side` px, as a client that shrinks pictures
    before upload does: both servers' resize is then the identity, so they see the same pixels (their
    resize kernels differ by up to 0.015 on a full-size photo, which would be a difference in what
    the servers compute rather than in how they serve)."""
    base = photos()
    urls = []
    for i in range(offset, offset + count):
        photo, variant = base[i % len(base)], i // len(base)
        w, h = photo.size
        short, spare = min(w, h), max(w, h) - min(w, h)
        start = (0, spare // 2, spare)[variant % 3]
        box = (start, 0, start + short, short) if w >= h else (0, start, short, start + short)
        image = photo.crop(box).resize((side, side), Image.Resampling.BICUBIC)
        if variant // 3 % 2:
            image = ImageOps.mirror(image)
        out = io.BytesIO()
        image.save(out, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(out.getvalue()).decode())
    return urls


def questions(lexicon: list[str], turns: int, key: str) -> tuple[str, ...]:
    """`turns` questions made of the random tokenizer's own words (English would tokenise into
    characters, some unknown to it). `key` seeds them: each conversation of a run is different, so no
    server can reuse another conversation's cache."""
    rng = random.Random(key)
    return tuple(" ".join(rng.choice(lexicon) for _ in range(rng.randint(6, 10))) + "?" for _ in range(turns))


# ------------------------------------------------------------------ requests


def client(base_url: str):
    import httpx
    import openai

    # trust_env=False: a proxy set for the package registries must not see 127.0.0.1; no retries, so a
    # failed request fails the run instead of being timed twice.
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT_S))


def ask(api, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy completion: its timings, token counts and text."""
    start = time.perf_counter()
    first, parts, usage, finish = None, [], None, None
    stream = api.chat.completions.create(model=model, messages=messages, stream=True, temperature=0.0,
                                         max_tokens=max_tokens, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
            finish = choice.finish_reason or finish
    end = time.perf_counter()
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
    return {"start": start, "ttft_s": (first or end) - start, "total_s": end - start,
            "completion_tokens": usage.completion_tokens if usage else len(parts),
            "prompt_tokens": usage.prompt_tokens if usage else None, "cached_tokens": cached,
            "finish_reason": finish, "answer": "".join(parts)}


def converse(api, model: str, conv: Conversation, max_tokens: int, history: list[str] | None = None) -> list[dict]:
    """The conversation's turns, one request each. The history is each answer as received, or
    `history[i]` when given (another server's answers: every server then sees the same prompts)."""
    messages, records = [], []
    for i, question in enumerate(conv.questions):
        content = [{"type": "image_url", "image_url": {"url": conv.picture}}, {"type": "text", "text": question}] \
            if i == 0 else question
        messages.append({"role": "user", "content": content})
        record = ask(api, model, messages, max_tokens)
        records.append({"turn": i + 1, **record})
        messages.append({"role": "assistant", "content": history[i] if history else record["answer"]})
    return records


def openai_messages(conv: Conversation, answers: list[str], turn: int) -> list[dict]:
    """The messages of turn `turn` (1-based) as `converse` sends them, with `answers` as the history."""
    messages = []
    for i, question in enumerate(conv.questions[:turn]):
        content = [{"type": "image_url", "image_url": {"url": conv.picture}}, {"type": "text", "text": question}] \
            if i == 0 else question
        messages.append({"role": "user", "content": content})
        if i + 1 < turn:
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def concurrent(base_url: str, model: str, convs: list[Conversation], max_tokens: int) -> tuple[list[dict], float]:
    """Every conversation at once, one thread each, all released together; each user asks its next
    question as soon as its answer is complete. Returns the records (with `user`) and the wall time
    from the release to the last answer."""
    barrier = threading.Barrier(len(convs) + 1)
    results: list[list[dict] | BaseException] = [[] for _ in convs]

    apis = [client(base_url) for _ in convs]

    def user(index: int) -> None:
        barrier.wait()
        try:
            results[index] = converse(apis[index], model, convs[index], max_tokens)
        except BaseException as e:  # reported by the caller, after every thread ends
            results[index] = e

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(len(convs))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failed:
        i, error = failed[0]
        raise RuntimeError(f"{len(failed)} of {len(convs)} users failed; user {i}: {type(error).__name__}: {error}")
    records = [{"user": i, **r, "start": r["start"] - start} for i, rs in enumerate(results) for r in rs]
    return records, wall
