"""The web app end to end: `python app.py` in a subprocess, driven through `gradio_client`.

Random tiny models answer gibberish, so the tests check behaviour: answers stream, the follow-up
turn is prompted with the history (and reuses the cache), greedy regeneration repeats itself,
Stop keeps a partial answer, each bad input gets its own message and the app keeps serving.
"""
from __future__ import annotations

import html
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
from PIL import Image

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from mmchat.serving.examples import EXAMPLES, draw, example_path

RED_CIRCLE = str(example_path(EXAMPLES[0]))
TWO_CIRCLES = str(example_path(EXAMPLES[3]))
MEMORY_BOUND = 2 * 2**30
"""Server RSS (torch, Gradio, tiny model, 8 conversations) must stay below this (measured: ~1.25 GiB)."""
MEMORY_GROWTH_BOUND = 256 * 2**20
"""…and grow by less than this while 8 clients hold two-turn conversations at once."""


def connect(server) -> Client:
    return Client(server.url, verbose=False, download_files=False, analytics_enabled=False)


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part.get("type") == "text")


def files_of(message: dict) -> list[str]:
    return [part["file"] for part in message["content"] if part.get("type") == "file"]


def send(client: Client, text: str, image: str | None = None, temperature: float = 0.0, max_new_tokens: int = 24):
    """Every streamed update of the chatbot for one question."""
    message = {"text": text, "files": [handle_file(image)] if image else []}
    job = client.submit(message, temperature, 0.7, max_new_tokens, api_name="/send")
    updates = [out[0] for out in job]
    result = job.result()
    return updates + [result[0]] if not updates or updates[-1] != result[0] else updates


def transcript(client: Client) -> dict:
    return client.predict(api_name="/transcript")


@pytest.fixture(scope="module")
def shared_client(app_server):
    c = connect(app_server)
    yield c
    c.close()


@pytest.fixture()
def client(shared_client):
    """A fresh browser session (new session hash) for each test."""
    shared_client.reset_session()
    return shared_client


# -- behaviour through the API -----------------------------------------------------------
def test_image_question_streams_an_answer(client):
    updates = send(client, "What colour is the circle?", RED_CIRCLE, max_new_tokens=64)
    answers = [text_of(chat[-1]) for chat in updates if chat and chat[-1]["role"] == "assistant"]
    assert len(set(answers)) >= 3, f"the answer should arrive in several growing updates, got {answers}"
    assert all(b.startswith(a) for a, b in zip(answers, answers[1:])), "each update extends the previous one"
    final = updates[-1]
    assert [m["role"] for m in final] == ["user", "assistant"]
    assert len(files_of(final[0])) == 1 and text_of(final[0]) == "What colour is the circle?"
    assert len(text_of(final[1])) >= 10
    t = transcript(client)
    assert [(m["role"], m["images"]) for m in t["messages"]] == [("user", 1), ("assistant", 0)]
    assert t["messages"][1]["text"] == text_of(final[1]).strip()


def test_follow_up_turn_sees_the_history_and_reuses_the_cache(client):
    send(client, "What colour is the circle?", RED_CIRCLE)
    first = transcript(client)
    send(client, "And what shape is it?")
    second = transcript(client)
    assert [m["text"] for m in second["messages"][:2]] == [m["text"] for m in first["messages"]]
    # Turn 2's prompt holds turn 1 (question, image, answer) and only the new part is computed.
    assert second["prompt_tokens"] > first["prompt_tokens"] + 5
    assert second["prefill_tokens"] < second["prompt_tokens"] - first["prompt_tokens"] + 10


def test_new_image_mid_conversation_adds_a_slot(client):
    send(client, "What colour is the circle?", RED_CIRCLE)
    final = send(client, "Describe this picture.", TWO_CIRCLES)[-1]
    assert [len(files_of(m)) for m in final] == [1, 0, 1, 0], "each image shows where it entered"
    assert [m["images"] for m in transcript(client)["messages"]] == [1, 0, 1, 0]


def test_greedy_regenerate_repeats_the_answer(client):
    answer = text_of(send(client, "What shape is it?", RED_CIRCLE)[-1][-1])
    job = client.submit(0.0, 0.7, 24, api_name="/regenerate")
    updates = [out[0] for out in job] or [job.result()[0]]
    assert text_of(updates[-1][-1]) == answer
    assert len(transcript(client)["messages"]) == 2, "regenerate replaces the answer"


def test_undo_and_clear(client):
    send(client, "What colour is the circle?", RED_CIRCLE)
    send(client, "What shape is it?")
    chat, _ = client.predict(api_name="/undo")
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert len(transcript(client)["messages"]) == 2
    chat, _ = client.predict(api_name="/clear")
    assert chat == [] and transcript(client)["messages"] == []
    send(client, "Is there a circle?")  # a cleared conversation starts again without an image
    assert [m["images"] for m in transcript(client)["messages"]] == [0, 0]


def test_stop_keeps_the_partial_answer(client):
    job = client.submit({"text": "Describe this picture.", "files": [handle_file(TWO_CIRCLES)]}, 0.0, 0.7, 500,
                        api_name="/send")
    seen = 0
    for _ in job:
        seen += 1
        if seen == 3:
            job.cancel()
            break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server closes the generator after the current token
        t = transcript(client)
        if t["messages"] and t["messages"][-1]["role"] == "assistant":
            break
        time.sleep(0.2)
    assert t["messages"][-1]["role"] == "assistant" and t["messages"][-1]["text"], t
    print(f"stopped after {t['new_tokens']} of at most 500 tokens: {t['messages'][-1]['text']!r}")
    assert t["new_tokens"] < 400, "Stop ended the generation early"
    send(client, "What colour is the roof?")  # the conversation goes on
    assert len(transcript(client)["messages"]) == 4


# -- bad input ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Files users upload: broken ones and valid but unusual ones."""
    d = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(d / "whole.png")
    (d / "truncated.png").write_bytes((d / "whole.png").read_bytes()[:2000])
    (d / "notes.png").write_text("these are my notes, not a picture\n")
    Image.new("RGB", (1, 1), "red").save(d / "pixel.png")
    Image.new("L", (8000, 7000), 128).save(d / "huge.png")  # 56 MP, a few kB
    Image.new("L", (15000, 13000), 128).save(d / "bomb.png")  # 195 MP: Pillow's own bomb guard
    Image.new("CMYK", (48, 40), (0, 200, 200, 0)).save(d / "cmyk.jpg")
    Image.new("RGBA", (40, 48), (255, 0, 0, 128)).save(d / "rgba.png")
    noise.convert("P").save(d / "palette.gif")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(d / "deep.png")  # mode I;16
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return d


BAD = [
    ("truncated.png", "What is this?", "truncated or corrupt"),
    ("notes.png", "What is this?", "notes.png is not a readable image"),
    ("pixel.png", "What is this?", "too small"),
    ("huge.png", "What is this?", "megapixels"),
    ("bomb.png", "What is this?", "megapixels"),
    (None, "", "the message is empty"),
    (None, "   ", "the message is empty"),
    (None, "red " * 1000, "context holds 512"),
]


@pytest.mark.parametrize("upload, text, message", BAD, ids=[b[2] if b[0] is None else b[0] for b in BAD])
def test_bad_input_gets_its_message_and_the_app_keeps_serving(client, images, upload, text, message):
    send(client, "What colour is the circle?", RED_CIRCLE)
    before = transcript(client)["messages"]
    with pytest.raises(AppError) as error:
        send(client, text, str(images / upload) if upload else None)
    assert message in str(error.value)
    assert transcript(client)["messages"] == before, "a refused message changes nothing"
    assert text_of(send(client, "And now?")[-1][-1]), "the next good request is answered"


def test_api_clients_get_error_text_unescaped(client):
    send(client, "What colour is the circle?", RED_CIRCLE)
    with pytest.raises(AppError) as error:
        send(client, "red " * 1000)
    assert re.fullmatch(r"the message needs \d+ tokens but the model's context holds 512; shorten the message",
                        error.value.message), error.value.message
    assert error.value.title == "Can't do that"


def test_only_the_browser_modal_gets_html_escaped_errors(monkeypatch):
    """The modal renders a message as HTML; API clients (gradio_client sends x-gradio-user: api) want text."""
    import gradio as gr

    import app
    from mmchat.serving.loaded_model import ServedModel
    from mmchat.serving.sessions import Conversation, SessionPool

    summary = "No model loaded: <model>'s folder is empty"
    browser = SimpleNamespace(headers={"x-gradio-user": "app"}, session_hash="tab")
    api = SimpleNamespace(headers={"x-gradio-user": "api"}, session_hash="api")
    curl = SimpleNamespace(headers={}, session_hash="curl")
    for request, expected in [(browser, html.escape(summary)), (api, summary), (curl, summary)]:
        with pytest.raises(gr.Error) as error:
            app.Handlers(ServedModel(None, summary), None, lambda fn: fn).undo(request)
        assert (error.value.message, error.value.title) == (expected, "No model")

    def failing(*args):
        yield "Half an"
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(Conversation, "ask", failing)
    model = SimpleNamespace(config=SimpleNamespace(template="llava_v1"), tokenizer=None)
    h = app.Handlers(ServedModel(model, "tiny"), SessionPool(model), lambda fn: fn)
    with pytest.raises(gr.Error) as error:
        list(h.send({"text": "Why?", "files": []}, 0.0, 0.7, 8, browser))
    assert error.value.title == "Generation failed"  # not re-worded as a refused request
    assert error.value.message == ("generation failed (RuntimeError: CUDA out of memory); press Regenerate to try again "
                                   "or Undo to remove the question")


@pytest.mark.parametrize("upload", ["cmyk.jpg", "rgba.png", "palette.gif", "deep.png", "animated.gif"])
def test_unusual_images_are_answered(client, images, upload):
    final = send(client, "What colour is it?", str(images / upload))[-1]
    assert text_of(final[-1]) and [m["images"] for m in transcript(client)["messages"]] == [1, 0]


def test_text_only_and_image_marker_text(client):
    assert text_of(send(client, "Tell me about circles.")[-1][-1])
    send(client, "What does <image> mean here?")
    t = transcript(client)
    assert t["messages"][2]["text"] == "What does <image> mean here?"
    assert [m["images"] for m in t["messages"]] == [0, 0, 0, 0], "typed <image> opens no image slot"


# -- load --------------------------------------------------------------------------------
def test_eight_clients_at_once_with_bounded_memory(app_server):
    server = psutil.Process(app_server.process.pid)
    baseline, peak, done = server.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.1)

    clients = [connect(app_server) for _ in range(8)]

    def conversation(i: int):
        c = clients[i]
        first = send(c, f"Client {i}: what colour is it?", TWO_CIRCLES if i % 2 else RED_CIRCLE, max_new_tokens=24)
        second = send(c, f"Client {i}: and the shape?", max_new_tokens=24)
        return first[-1], second[-1]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(conversation, range(8)))
        transcripts = [transcript(c) for c in clients]
    finally:
        done.set()
        sampler.join()
        for c in clients:
            c.close()
    cached = sum(t["cached_tokens"] > 0 for t in transcripts)
    assert cached <= 3, f"--max-sessions 3, but {cached} conversations hold a KV cache"
    for i, ((first, second), t) in enumerate(zip(answers, transcripts)):
        assert [m["text"] for m in t["messages"] if m["role"] == "user"] == [
            f"Client {i}: what colour is it?", f"Client {i}: and the shape?"], "each client has its own session"
        assert text_of(second[-1]) and text_of(second[-1]).strip() == t["messages"][3]["text"], "complete answers"
        assert text_of(first[-1]).strip() == t["messages"][1]["text"]
    print(f"server RSS: {baseline / 2**20:.0f} MiB before, {peak[0] / 2**20:.0f} MiB peak; {cached} of 8 caches kept "
          f"(bound {MEMORY_BOUND / 2**20:.0f} MiB, growth bound {MEMORY_GROWTH_BOUND / 2**20:.0f} MiB)")
    assert peak[0] < MEMORY_BOUND
    assert peak[0] - baseline < MEMORY_GROWTH_BOUND


# -- a model that fails to load ------------------------------------------------------------
def test_a_model_that_fails_to_load_is_explained_on_the_page(tmp_path):
    from app_server import AppServer

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mmchat.json").write_text('{"bogus": 1}')
    server = AppServer(["--model", str(broken)], tmp_path)
    try:
        c = connect(server)
        with pytest.raises(AppError) as error:
            send(c, "What is this?", RED_CIRCLE)
        c.close()
        page_config = urllib.request.urlopen(server.url + "config").read().decode()
    finally:
        server.stop()
    line = next(line for line in server.output().splitlines() if line.startswith("No model loaded"))
    assert str(broken) in line and "unknown keys ['bogus'] in mmchat.json" in line and "--model" in line
    assert "No model loaded" in str(error.value)
    assert "unknown keys ['bogus'] in mmchat.json" in page_config


def test_missing_demo_model_says_which_model_to_pass(tmp_path, monkeypatch):
    import mmchat.serving.config as serve_config
    from mmchat.serving.loaded_model import load_served_model

    monkeypatch.setattr(serve_config, "DEMO_MODEL", tmp_path / "demo-model")
    served = load_served_model(serve_config.ServeConfig(model=str(tmp_path / "demo-model")))
    assert not served.ready
    assert served.summary.startswith("No model loaded: the embedded demo model is missing")
    assert "python -m finetune.demo --out assets/demo-model" in served.summary
    assert "python app.py --model PATH" in served.summary


# -- configuration and Spaces --------------------------------------------------------------
def test_flags_environment_and_spaces_host(capsys):
    from mmchat.serving.config import DEMO_MODEL, parse_args

    c = parse_args([], {})
    assert (c.model, c.host, c.port, c.share, c.max_sessions, c.load_in) == (str(DEMO_MODEL), "127.0.0.1", 7860, False, 8, None)
    assert c.max_batch == 8 and parse_args([], {"MMCHAT_MAX_BATCH": "3"}).max_batch == 3
    env = {"MMCHAT_MODEL": "m", "MMCHAT_LOAD_IN": "8bit", "MMCHAT_PORT": "9000", "MMCHAT_SHARE": "true",
           "MMCHAT_MAX_SESSIONS": "6"}
    c = parse_args([], env)
    assert (c.model, c.load_in, c.port, c.share, c.max_sessions) == ("m", "8bit", 9000, True, 6)
    c = parse_args(["--model", "flag", "--no-share", "--port", "9001"], env)
    assert (c.model, c.share, c.port) == ("flag", False, 9001), "a flag beats its variable"
    assert parse_args([], {"SPACE_ID": "me/mmchat"}).host == "0.0.0.0"
    assert parse_args([], {"SYSTEM": "spaces"}).host == "0.0.0.0"
    for argv, env, message in [
        (["--max-batch", "0"], {}, "--max-batch 0: must be at least 1"),
        ([], {"MMCHAT_PORT": "web"}, "MMCHAT_PORT='web': must be a whole number"),
        ([], {"MMCHAT_SHARE": "maybe"}, "MMCHAT_SHARE='maybe'"),
        (["--port", "0"], {}, "--port 0"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv, env)
        assert message in capsys.readouterr().err


def test_spaces_gpu_wraps_only_the_generation_function(monkeypatch):
    import sys
    from types import SimpleNamespace

    import app
    from mmchat.serving.loaded_model import ServedModel

    monkeypatch.setitem(sys.modules, "spaces", None)  # makes `import spaces` fail
    assert app.gpu_wrapper()(len) is len, "without the spaces package nothing changes"
    wrapped = []
    monkeypatch.setitem(sys.modules, "spaces", SimpleNamespace(GPU=lambda fn: wrapped.append(fn.__name__) or fn))
    app.build_app(ServedModel(None, "No model loaded: test"), None, gpu=app.gpu_wrapper())
    assert wrapped == ["stream"]


def test_examples_are_what_the_code_draws():
    for example in EXAMPLES:
        stored = np.asarray(Image.open(example_path(example)).convert("RGB"), dtype=np.int16)
        drawn = np.asarray(draw(example), dtype=np.int16)
        assert stored.shape == drawn.shape == (336, 336, 3)
        assert np.abs(stored - drawn).max() <= 2, f"{example.name}.png is stale: run python -m mmchat.serving.examples"
        assert example_path(example).stat().st_size < 20_000
