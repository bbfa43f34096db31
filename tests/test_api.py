"""The OpenAI-compatible API end to end: `python -m mmchat.serve` in a subprocess, driven by the
official `openai` client (and curl, as the README shows it).

The tiny random model answers gibberish, so the tests check properties: streamed text equals the
whole answer, a follow-up turn reuses the cache and answers as a fresh session does, stop strings
and max_tokens end answers as OpenAI's do, every bad input gets its 4xx in OpenAI's shape and the
server keeps serving, and a client that hangs up mid-stream frees the model at once.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
from matplotlib import cbook
from PIL import Image

from app_server import ROOT, free_port

KEY = "test-key"
LONG_CONTEXT = 16384
"""The test model's context: long enough that a full-length answer takes many seconds on a CPU."""


def readme_curl() -> str:
    """The curl command in the README's API section, as a user copies it."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## OpenAI-compatible API"):].split("```bash\n", 1)[1].split("```", 1)[0]
    return block[block.index("curl "):].strip()


def photo_png() -> bytes:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


class ApiServer:
    def __init__(self, model: Path | None, workdir: Path, *flags: str):
        self.port = free_port()
        self.log = workdir / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
        env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", MMCHAT_CACHE=str(workdir / "cache"),
                   MMCHAT_API_KEY=KEY, NO_PROXY="127.0.0.1,localhost")
        with open(self.log, "w") as log:
            model_flag = [] if model is None else ["--model", str(model)]
            self.process = subprocess.Popen([sys.executable, "-m", "mmchat.serve", *model_flag,
                                             "--port", str(self.port), *flags],
                                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text())
            try:
                request = urllib.request.Request(self.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(request, timeout=5):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(self.log.read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def long_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a 16k context (LLaMA's rotary positions need no new weights)."""
    out = tmp_path_factory.mktemp("api") / "tiny"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "llm" / "config.json").read_text())
    (out / "llm" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG_CONTEXT}))
    return out


@pytest.fixture(scope="module")
def server(long_checkpoint, tmp_path_factory):
    s = ApiServer(long_checkpoint, tmp_path_factory.mktemp("serve"), "--max-sessions", "2", "--max-images", "2",
                  "--max-body-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, **{"temperature": 0, "max_tokens": 24, **kw})


def streamed(client, messages, **kw) -> tuple[str, list]:
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_lists_the_served_id(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("with_image", [False, True])
def test_streamed_answer_equals_the_whole_answer(client, with_image):
    messages = [user("What is in the picture?", *([data_url(photo_png())] if with_image else []))]
    whole = ask(client, messages)
    text, chunks = streamed(client, messages)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert whole.usage.prompt_tokens > (16 if with_image else 0)


def test_second_turn_reuses_the_cache_and_answers_as_a_fresh_session(client, long_checkpoint):
    from mmchat.chat import ChatSession
    from mmchat.conversation import ASSISTANT, USER, Message
    from mmchat.generate import GenerationConfig
    from mmchat.model import LoadOptions, load_model
    from mmchat.serving.api_requests import image_key
    from mmchat.serving.sessions import prepare_image

    first = [user("Describe this photo.", data_url(photo_png()))]
    one = ask(client, first).choices[0].message.content
    second = first + [{"role": "assistant", "content": one}, user("And what colour is her hat?")]
    two = ask(client, second)
    assert 0 < two.usage.prompt_tokens_details.cached_tokens < two.usage.prompt_tokens

    model = load_model(long_checkpoint, LoadOptions("32bit", "cpu"))
    image = prepare_image(photo_png())
    cold = ChatSession(model).answer(
        [Message(USER, "Describe this photo.", 1), Message(ASSISTANT, one), Message(USER, "And what colour is her hat?")],
        [(image_key(image), image)], GenerationConfig(max_new_tokens=24, temperature=0))
    assert "".join(cold) == two.choices[0].message.content


def test_stop_string_and_max_tokens_end_the_answer(client):
    messages = [user("Count to ten.")]
    full = ask(client, messages, max_tokens=40).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = ask(client, messages, max_tokens=40, stop=[stop, "never-said"])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = ask(client, messages, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert streamed(client, messages, max_tokens=40, stop=stop)[0] == cut.choices[0].message.content


def test_a_system_message_replaces_the_templates_system_prompt(client):
    plain = ask(client, [user("Hi")])
    told = ask(client, [{"role": "system", "content": "You answer in one word."}, user("Hi")])
    assert told.usage.prompt_tokens != plain.usage.prompt_tokens


def small_png() -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(photo_png())).resize((48, 48)).save(out, format="PNG")
    return out.getvalue()


def corrupt_png() -> bytes:
    return photo_png()[:400]


BAD = {
    "corrupt image": ({"messages": [user("What?", data_url(corrupt_png()))]}, 400, "invalid_image"),
    "not an image": ({"messages": [user("What?", data_url(b"hello", "text/plain"))]}, 400, "invalid_image_url"),
    "remote URL": ({"messages": [user("What?", "https://example.com/cat.jpg")]}, 400, "remote_images_disabled"),
    "too many images": ({"messages": [user("What?", *[data_url(small_png())] * 3)]}, 400, "too_many_images"),
    "longer than the context": ({"messages": [user("word " * LONG_CONTEXT)]}, 400, "context_length_exceeded"),
    "body too large": ({"messages": [user("x" * 2**20)]}, 413, "request_too_large"),
    "unknown model": ({"model": "gpt-4o"}, 404, "model_not_found"),
    "n=2": ({"n": 2}, 400, "invalid_value"),
    "temperature -1": ({"temperature": -1}, 400, "invalid_value"),
    "no messages": ({"messages": []}, 400, "invalid_value"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
    "logprobs": ({"logprobs": True}, 400, "invalid_value"),
    "json output": ({"response_format": {"type": "json_object"}}, 400, "invalid_value"),
    "ends with the assistant": ({"messages": [user("Hi"), {"role": "assistant", "content": "Hello"}]}, 400, "invalid_value"),
    "starts with the assistant": ({"messages": [{"role": "assistant", "content": "Hello"}, user("Hi")]}, 400, "invalid_value"),
    "empty message": ({"messages": [{"role": "user", "content": " "}]}, 400, "invalid_value"),
    "image from the assistant": ({"messages": [user("Hi"), {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(photo_png())}}]}, user("Hi")]}, 400, "invalid_value"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(client, name):
    fields, status, code = BAD[name]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**{"model": "tiny", "messages": [user("Hi")], "max_tokens": 4, **fields})
    error = caught.value
    assert error.status_code == status, error.body
    assert set(error.body) == {"message", "type", "param", "code"} and error.body["code"] == code
    assert "\n" not in error.body["message"]
    assert ask(client, [user("Still there?")], max_tokens=2).choices[0].message.content is not None


def _raw(fields: str) -> bytes:
    return ('{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]' + fields + "}").encode()


HOSTILE = {  # raw bodies a JSON library would not even produce; each once got a 500 or 503
    "not UTF-8": (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe caf\xe9"}]}', "invalid_json"),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    "a 5000-digit integer": (_raw(', "seed": ' + "9" * 5000), "invalid_json"),
    "seed 2^64": (_raw(f', "seed": {2**64}'), "invalid_value"),
    "a lone surrogate": (b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi \\ud800"}]}', "invalid_value"),
    "a lone surrogate in a part": (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
                                   b'"text": "\\udfff"}]}]}', "invalid_value"),
    "a lone surrogate in stop": (_raw(', "stop": ["\\ud800"]'), "invalid_value"),
    "too many messages": (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"},
                                                                     {"role": "assistant", "content": "Hello"}] * 2049
                                      + [{"role": "user", "content": "Hi"}]}).encode(), "invalid_value"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bodies_get_a_400_and_the_server_keeps_serving(server, client, name):
    body, code = HOSTILE[name]
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert ask(client, [user("Still there?")], max_tokens=2).choices[0].message.content is not None


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1e-300), (2.0, 1.0), (1e-4, 1e-9)])
def test_extreme_but_valid_sampling_values_answer(client, temperature, top_p):
    reply = ask(client, [user("Hi")], max_tokens=4, temperature=temperature, top_p=top_p, seed=2**64 - 1)
    assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")


def test_invalid_json_and_unknown_routes_get_openai_errors(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server.url + "/v1/nothing", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("key", [None, "wrong"])
def test_wrong_or_missing_api_key_gets_401(server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(server.url + "/v1/models", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0).models.list()


def test_the_readme_curl_command_works(server, tmp_path):
    assert shutil.which("curl"), "curl is not installed"
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        (tmp_path / "cat.jpg").write_bytes(f.read())
    command = readme_curl().replace("8000", str(server.port)).replace("llava-1.5-7b-hf", "tiny")
    out = subprocess.run(["bash", "-c", command], cwd=tmp_path, env={**os.environ, "MMCHAT_API_KEY": KEY},
                         capture_output=True, text=True, timeout=60, check=True)
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["prompt_tokens"] > 16


# -- a `chat` template model, remote images and a full queue ----------------------------------

@pytest.fixture(scope="module")
def chat_checkpoint(long_checkpoint, tiny_tokenizer_dir, tmp_path_factory):
    """A tiny checkpoint with a ChatML chat template (template `chat`) and the 16k context."""
    from test_chat_templates import CHATML
    from tiny_models import build_checkpoint
    from transformers import AutoTokenizer

    from mmchat.checkpoint import read_config, write_config

    root = tmp_path_factory.mktemp("api-chatml")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(root / "tokenizer")
    ckpt = build_checkpoint(root / "tiny", root / "tokenizer")
    config = read_config(ckpt)
    config.template = "chat"
    write_config(config, ckpt)
    llm = json.loads((ckpt / "llm" / "config.json").read_text())
    (ckpt / "llm" / "config.json").write_text(json.dumps({**llm, "max_position_embeddings": LONG_CONTEXT}))
    return ckpt


REMOTE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def chat_server(chat_checkpoint, tmp_path_factory):
    s = ApiServer(chat_checkpoint, tmp_path_factory.mktemp("serve-chat"), "--allow-remote-images",
                  "--remote-image-mb", "0.5", "--remote-timeout", str(REMOTE_TIMEOUT), "--max-batch", "1",
                  "--max-queue", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat_client(chat_server):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_a_system_message_goes_to_a_chat_template(chat_client, chat_checkpoint):
    from mmchat.model import LoadOptions, load_model
    from mmchat.templates import resolve_template

    tokenizer = load_model(chat_checkpoint, LoadOptions("32bit", "cpu")).tokenizer
    assert resolve_template("chat", tokenizer).system_as is not None
    system = "You answer in one word."
    plain = ask(chat_client, [user("Hi")], max_tokens=2)
    told = ask(chat_client, [{"role": "system", "content": system}, user("Hi")], max_tokens=2)
    # The prompts are the ChatML template's, with its default system prompt and with the one given.
    expected = {s: tokenizer(tokenizer.apply_chat_template(([{"role": "system", "content": s}] if s else [])
                                                           + [{"role": "user", "content": "Hi"}],
                                                           tokenize=False, add_generation_prompt=True))["input_ids"]
                for s in (None, system)}
    assert plain.usage.prompt_tokens == len(expected[None])
    assert told.usage.prompt_tokens == len(expected[system]) != plain.usage.prompt_tokens


@pytest.fixture(scope="module")
def image_host():
    """A local http.server: /good.png (a small PNG), /big.png (over 0.5 MB); and `hang`, a port
    that takes connections and never answers."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = {"/good.png": small_png(), "/big.png": b"\x89PNG" + os.urandom(2**20)}
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    yield f"http://127.0.0.1:{httpd.server_port}", f"http://127.0.0.1:{hang.getsockname()[1]}/slow.png", hits
    httpd.shutdown()
    httpd.server_close()
    hang.close()


def test_remote_images_are_fetched_within_limits(chat_client, client, image_host):
    base, hanging, hits = image_host
    good = ask(chat_client, [user("What is it?", base + "/good.png")], max_tokens=2)
    fetched = ask(chat_client, [user("What is it?", data_url(small_png()))], max_tokens=2)
    assert good.usage.prompt_tokens == fetched.usage.prompt_tokens > 16 and hits == ["/good.png"]

    def refused(c, url):
        with pytest.raises(openai.APIStatusError) as caught:
            ask(c, [user("What is it?", url)], max_tokens=2)
        assert "\n" not in caught.value.body["message"]
        return caught.value.status_code, caught.value.body["code"], caught.value.body["message"]

    assert refused(chat_client, base + "/big.png")[:2] == (413, "image_too_large")
    assert refused(chat_client, base + "/missing.png")[:2] == (400, "image_fetch_failed")
    started = time.monotonic()
    status, code, message = refused(chat_client, hanging)
    assert (status, code) == (400, "image_fetch_failed") and f"within {REMOTE_TIMEOUT:g} s" in message
    assert REMOTE_TIMEOUT - 0.5 < time.monotonic() - started < REMOTE_TIMEOUT + 5
    # Without --allow-remote-images the URL is refused and never fetched.
    del hits[:]
    assert refused(client, base + "/good.png")[:2] == (400, "remote_images_disabled") and hits == []


def test_a_full_queue_gets_429_and_the_server_recovers(chat_client):
    """--max-batch 1 --max-queue 0: while one long answer is generated, other requests are refused at once."""
    stream = ask(chat_client, [user("Tell me everything.")], stream=True, max_tokens=LONG_CONTEXT - 200)
    next(iter(stream))
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError) as caught:
                ask(chat_client, [user("Me too.")], max_tokens=2)
            assert time.monotonic() - started < 5
            body = caught.value.body
            assert body["code"] == "server_busy" and body["type"] == "rate_limit_error" and "\n" not in body["message"]
            assert caught.value.response.headers["retry-after"] == "1"
    finally:
        stream.close()
    deadline = time.monotonic() + 20  # the abandoned answer stops at its next token
    while True:
        try:
            assert ask(chat_client, [user("Me now.")], max_tokens=2).usage.completion_tokens >= 1
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_client_that_hangs_up_mid_stream_frees_its_place_in_the_batch(chat_client):
    """--max-batch 1 --max-queue 0: the one place is taken until the abandoned answer (~16k tokens,
    many seconds) leaves the batch, which it does at its next step once the client hangs up."""
    stream = ask(chat_client, [user("Tell me everything.")], stream=True, max_tokens=LONG_CONTEXT - 200)
    for _, _ in zip(range(5), stream):
        pass
    with pytest.raises(openai.RateLimitError):
        ask(chat_client, [user("Me too.")], max_tokens=2)
    stream.close()
    assert quick_answer_once_freed(chat_client).usage.completion_tokens == 4


def quick_answer_once_freed(chat_client, within: float = 5.0):
    """A short answer as soon as the one place in the batch is free again (429 until then)."""
    hung_up = time.monotonic()
    while True:
        try:
            return ask(chat_client, [user("Quick one.")], max_tokens=4)
        except openai.RateLimitError:
            assert time.monotonic() - hung_up < within, "the abandoned answer still holds its place in the batch"
            time.sleep(0.05)


def test_a_client_that_hangs_up_before_a_whole_answer_frees_its_place_in_the_batch(chat_client):
    """The same for a non-streamed request: its client gives up (a time-out) while the long answer is made;
    the server notices within a second and stops computing it, instead of finishing ~16k tokens."""
    impatient = chat_client.with_options(timeout=2.0)
    with pytest.raises(openai.APITimeoutError):
        ask(impatient, [user("Tell me everything, at once.")], max_tokens=LONG_CONTEXT - 200)
    assert quick_answer_once_freed(chat_client).usage.completion_tokens == 4


# -- many clients at once: the demo model, decoded in one batch -------------------------------

@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`python -m mmchat.serve` with no --model: the demo model the project ships (trained, so its
    greedy choices are decisive: answers must match exactly, no near-ties to allow for)."""
    s = ApiServer(None, tmp_path_factory.mktemp("serve-demo"), "--max-batch", "8")
    yield s
    s.stop()


def test_eight_concurrent_clients_each_get_their_solo_answer(demo_server):
    from mmchat.serving.examples import EXAMPLES, draw

    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    pictures = []
    for example in EXAMPLES:
        out = io.BytesIO()
        draw(example).save(out, format="PNG")
        pictures.append((example.question, data_url(out.getvalue())))
    scripts = [(question if i < 4 else "How many shapes are there?", url, "What colour is the square?")
               for i, (question, url) in enumerate(pictures * 2)]

    def converse(script) -> list[tuple[str, int]]:
        first, url, second = script
        messages, said = [user(first, url)], []
        for follow_up in (second, None):
            reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
            said.append((reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens))
            if follow_up:
                messages += [{"role": "assistant", "content": said[-1][0]}, user(follow_up)]
        return said

    alone = [converse(script) for script in scripts]
    start = threading.Barrier(8)

    def at_once(script):
        start.wait()
        return converse(script)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(at_once, scripts))
    for i, (a, b) in enumerate(zip(alone, together)):
        assert [text for text, _ in a] == [text for text, _ in b], f"client {i}: alone {a} vs together {b}"
        assert a[0][0].strip(), f"client {i} got an empty answer"
        assert b[1][1] > 0, f"client {i}: the second turn reused no cached prefix"
