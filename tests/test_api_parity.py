"""The API answers as transformers does on the same folder: a real `python -m mmchat.serve`, the official
`openai` client, a photo far larger than the tower (512×600 on a 32-px tower: no pre-shrink may change
its pixels) and messages that reach the chat template as the client sent them.

The folder is qwen2-chatml of the zoo (byte-level BPE, ChatML, llava-interleave's template), whose
answers start with a space as byte-level tokenizers' do: a client that sends such an answer back must
get the prompt transformers' processor renders (a stripped answer is other tokens: 3 more per answer
on llava-interleave-shaped folders) and the cache of the tokens the server generated.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from test_api import KEY, ApiServer, data_url
from test_zoo import FAMILIES, build_folder, converted, photo, processor_inputs, reference_processor

QUESTIONS = ("What is shown in this photo?", "Describe it in a few words.", "What is the person?",
             "Is it a photo?", "What is it?")
NEW_TOKENS = 12


def photo_png() -> bytes:
    out = io.BytesIO()
    photo().save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """qwen2-chatml, its lm_head rows of space-led tokens scaled up so that answers start with a space."""
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("parity")
    folder, _ = build_folder(root, "qwen2-chatml")
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = reference_processor(folder).tokenizer
    spaced = [i for t, i in tokenizer.get_vocab().items() if t.startswith("Ġ") and len(t) > 1]
    with torch.no_grad():
        llava.lm_head.weight[spaced] *= 4
    llava.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(), reference_processor(folder)


@pytest.fixture(scope="module")
def client(folder, tmp_path_factory):
    checkpoint = converted(folder, tmp_path_factory.mktemp("mmchat") / "qwen2")
    server = ApiServer(checkpoint, tmp_path_factory.mktemp("serve"), "--max-batch", "8", "--max-sessions", "8")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    server.stop()


def transformers_messages(history: list[tuple[str, str]], question: str) -> list[dict]:
    """The conversation as an OpenAI client sends it, in transformers' form (the image with the first question)."""
    out = []
    for i, (q, a) in enumerate(history):
        out += [{"role": "user", "content": [{"type": "image", "image": photo()}] * (i == 0) + [{"type": "text", "text": q}]},
                {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    image = [{"type": "image", "image": photo()}] if not history else []
    return out + [{"role": "user", "content": image + [{"type": "text", "text": question}]}]


def api_messages(history: list[tuple[str, str]], question: str) -> list[dict]:
    url = {"type": "image_url", "image_url": {"url": data_url(photo_png())}}
    out = []
    for i, (q, a) in enumerate(history):
        out += [{"role": "user", "content": [url] * (i == 0) + [{"type": "text", "text": q}]},
                {"role": "assistant", "content": a}]
    return out + [{"role": "user", "content": [url] * (not history) + [{"type": "text", "text": question}]}]


@torch.no_grad()
def transformers_answer(reference, history, question) -> tuple[str, int]:
    """(transformers' greedy answer as its user reads it, the prompt's token count)."""
    llava, processor = reference
    inputs = processor_inputs(processor, transformers_messages(history, question))
    stops = [processor.tokenizer.convert_tokens_to_ids(t) for t in FAMILIES["qwen2-chatml"].stops]
    out = llava.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), inputs["input_ids"].shape[1]


def conversation(client, reference, turns: int, offset: int = 0) -> list[dict]:
    """`turns` turns through the API, each answer sent back as received; per turn what both engines said."""
    history, out = [], []
    for turn in range(turns):
        question = QUESTIONS[(turn + offset) % len(QUESTIONS)]
        reply = client.chat.completions.create(model="qwen2", messages=api_messages(history, question),
                                               temperature=0, max_tokens=NEW_TOKENS)
        theirs, prompt_tokens = transformers_answer(reference, history, question)
        out.append({"ours": reply.choices[0].message.content, "theirs": theirs, "usage": reply.usage,
                    "reference_prompt_tokens": prompt_tokens})
        history.append((question, reply.choices[0].message.content))
    return out


def test_two_turns_on_a_large_photo_answer_as_transformers(client, reference):
    for turn, said in enumerate(conversation(client, reference, 2)):
        assert said["ours"] == said["theirs"], f"turn {turn + 1}"
        assert said["usage"].prompt_tokens == said["reference_prompt_tokens"]


def test_answers_starting_with_a_space_render_as_the_processor_renders_and_hit_the_cache(client, reference):
    turns = conversation(client, reference, 5)
    assert sum(t["ours"].startswith(" ") for t in turns) >= 3, [t["ours"] for t in turns]  # what this test is about
    for turn, said in enumerate(turns):
        assert said["ours"] == said["theirs"], f"turn {turn + 1}"
        assert said["usage"].prompt_tokens == said["reference_prompt_tokens"], f"turn {turn + 1}"
        if turn:  # the earlier prompt and the answer's tokens come from the cache (the last pick is never fed)
            before = turns[turn - 1]["usage"]
            cached = said["usage"].prompt_tokens_details.cached_tokens
            assert cached >= before.prompt_tokens + before.completion_tokens - 1, f"turn {turn + 1}: {cached}"


def test_eight_concurrent_clients_answer_as_transformers(client, reference):
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda k: conversation(client, reference, 2, offset=k), range(8)))
    for k, turns in enumerate(runs):
        for turn, said in enumerate(turns):
            assert said["ours"] == said["theirs"], f"client {k}, turn {turn + 1}"


def test_the_page_answers_two_turns_on_a_large_photo_as_transformers(folder, reference, tmp_path_factory):
    """The page (gradio_client against `python app.py`): it shows answers stripped and sends them back so,
    as a transformers user who strips `decode(...)` does."""
    from matplotlib import cbook

    from app_server import AppServer
    from test_app import connect, send, text_of

    checkpoint = converted(folder, tmp_path_factory.mktemp("page") / "qwen2")
    server = AppServer(["--model", str(checkpoint)], tmp_path_factory.mktemp("app"))
    try:
        page = connect(server)
        history = []
        for turn, question in enumerate(QUESTIONS[:2]):
            image = str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) if turn == 0 else None
            shown = text_of(send(page, question, image, max_new_tokens=NEW_TOKENS)[-1][-1])
            theirs, _ = transformers_answer(reference, history, question)
            assert shown == theirs.strip(), f"turn {turn + 1}"
            history.append((question, theirs.strip()))
    finally:
        server.stop()
