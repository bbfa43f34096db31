"""`python app.py` also serves the OpenAI-compatible routes (`/v1`) on its own port, with its own model.

One live app answers the page (gradio_client) and the `openai` client, also both at once (they take
turns on the model); a live app with `--api-key` refuses /v1 without it and keeps the page open.
`--no-api` (no /v1) and no model loaded (/v1 answers 503 in OpenAI's error shape, with the page's
reason) are checked on the server app `main` hands Gradio, in this process: starting is slow.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from app_server import AppServer  # noqa: E402
from mmchat.serving.loaded_model import ServedModel  # noqa: E402
from test_app import RED_CIRCLE, connect, send, text_of  # noqa: E402


def in_process(args: list[str]):
    """The server app `python app.py ARGS` would launch, without the model's load or a port:
    what `main` hands Gradio (`launch(app_kwargs={"routes": ...})` -> `App.create_app`)."""
    import gradio as gr
    from fastapi.testclient import TestClient

    import app
    from mmchat.serving.loaded_model import load_served_model

    config = app.parse_args(args)
    served = load_served_model(config) if "--model" in args else ServedModel(None, "No model loaded: a test")
    demo = app.build_app(served, None)
    return TestClient(gr.routes.App.create_app(demo, app_kwargs={"routes": app.api_routes(config, served, None)}))


def api_client(server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "v1", api_key=key, max_retries=0, timeout=60)


def http(server, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path.lstrip("/"), data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def ask_api(client, model: str, text: str = "What is this?", stream: bool = False):
    image = "data:image/png;base64," + base64.b64encode(open(RED_CIRCLE, "rb").read()).decode()
    return client.chat.completions.create(
        model=model, max_tokens=8, temperature=0, stream=stream,
        messages=[{"role": "user", "content": [{"type": "text", "text": text},
                                                {"type": "image_url", "image_url": {"url": image}}]}])


def test_the_page_and_the_api_answer_from_one_server(app_server, tiny_checkpoint):
    page = connect(app_server)
    api = api_client(app_server)
    try:
        assert [m.id for m in api.models.list().data] == [tiny_checkpoint.name]
        reply = ask_api(api, tiny_checkpoint.name)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        chunks = list(ask_api(api, tiny_checkpoint.name, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert text_of(send(page, "What is this?", RED_CIRCLE)[-1][-1]) != ""
        # both at once, several times: they take turns on the model and neither waits forever
        with ThreadPoolExecutor(4) as pool:
            pages = [pool.submit(lambda: send(connect(app_server), "Colour?", RED_CIRCLE, max_new_tokens=16))
                     for _ in range(2)]
            apis = [pool.submit(ask_api, api, tiny_checkpoint.name, f"Shape {i}?") for i in range(3)]
            assert all(text_of(f.result(timeout=120)[-1][-1]) for f in pages)
            assert all(f.result(timeout=120).choices[0].message.content is not None for f in apis)
    finally:
        page.close()
    assert app_server.process.poll() is None


def test_no_api_leaves_v1_out():
    with in_process(["--no-api"]) as server:
        assert server.get("/v1/models").status_code == 404
        assert server.get("/gradio_api/info").status_code == 200
    with in_process([]) as server:  # the routes are on by default (here with no model: 503)
        assert server.get("/v1/models").status_code == 503


def test_an_api_key_guards_v1_but_not_the_page(tiny_checkpoint, tmp_path):
    server = AppServer(["--model", str(tiny_checkpoint), "--api-key", "s3cret"], tmp_path)
    try:
        check_the_key(server, tiny_checkpoint)
    finally:
        server.stop()


def check_the_key(server, tiny_checkpoint):
    status, body = http(server, "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        api_client(server, "wrong").models.list()
    assert ask_api(api_client(server, "s3cret"), tiny_checkpoint.name).choices[0].message.role == "assistant"
    page = connect(server)
    assert text_of(send(page, "What is this?", RED_CIRCLE, max_new_tokens=8)[-1][-1]) != ""
    page.close()


def test_with_no_model_v1_answers_503_with_the_pages_reason(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mmchat.json").write_text('{"bogus": 1}')
    with in_process(["--model", str(broken)]) as server:
        response = server.post("/v1/chat/completions",
                               json={"model": "broken", "messages": [{"role": "user", "content": "Hi"}]})
        status, body = response.status_code, response.json()
        assert server.get("/v1/models").status_code == 503
        page = server.get("/config").text
    assert "unknown keys ['bogus'] in mmchat.json" in page  # the page's reason...
    assert status == 503
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and error["code"] == "model_not_loaded"
    assert error["message"].startswith("No model loaded") and "unknown keys ['bogus'] in mmchat.json" in error["message"]
