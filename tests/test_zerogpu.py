"""The app on ZeroGPU: each call of the `spaces.GPU` function runs in a forked worker whose changes
to memory are lost, yet conversations keep their history.

A fake `spaces` module forks a process per call, pickles the arguments across as ZeroGPU does,
and sends back what the function yields (or raises). Property: the forked app answers every turn
as one in-process `ChatSession` does for the same conversation, and so does the app without
`spaces` (which also reuses the KV cache and records each turn once).
"""
from __future__ import annotations

import functools
import multiprocessing
import pickle
import sys
from types import SimpleNamespace

import pytest
import torch

from mmchat.chat import ChatSession
from mmchat.generate import GenerationConfig
from mmchat.serving.examples import EXAMPLES, example_path
from mmchat.serving.sessions import SessionPool, prepare_image

GREEDY = GenerationConfig(max_new_tokens=16, temperature=0.0)
CIRCLE, TWO_CIRCLES = str(example_path(EXAMPLES[0])), str(example_path(EXAMPLES[3]))
FIRST, SECOND, OTHER, THIRD = "What colour is it?", "And what shape?", "Is it big?", "How many are there?"


def forked_gpu(fn):
    """`spaces.GPU` as ZeroGPU behaves: each call runs `fn` (a generator function) in a new forked
    process on a pickled copy of its arguments; the items it yields and the exception it raises
    come back pickled. Closing the caller's generator ends the worker."""
    fork = multiprocessing.get_context("fork")

    @functools.wraps(fn)
    def call(*args, **kwargs):
        payload = pickle.dumps((args, kwargs))
        receive, send = fork.Pipe(duplex=False)

        def worker():
            # libgomp's thread pool does not survive fork (a child that uses it hangs); ZeroGPU's workers
            # compute on the GPU, this stand-in on one CPU thread.
            torch.set_num_threads(1)
            try:
                worker_args, worker_kwargs = pickle.loads(payload)
                for item in fn(*worker_args, **worker_kwargs):
                    send.send(("item", item))
                send.send(("done", None))
            except BaseException as e:  # noqa: BLE001 -- everything goes back to the caller
                send.send(("error", e))

        process = fork.Process(target=worker, daemon=True)
        process.start()
        send.close()
        try:
            while True:
                kind, value = receive.recv()
                if kind == "error":
                    raise value
                if kind == "done":
                    return
                yield value
        finally:
            if process.is_alive():
                process.terminate()
            process.join()
            receive.close()

    return call


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from mmchat.model import LoadOptions, load_model

    return load_model(tiny_checkpoint, LoadOptions("32bit", "cpu"))


def build_handlers(model, monkeypatch, forked: bool):
    """The app's handlers as `main` builds them, with or without the (fake) `spaces` package."""
    import app
    from mmchat.serving.loaded_model import ServedModel

    spaces = SimpleNamespace(GPU=forked_gpu) if forked else None  # None makes `import spaces` fail
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    return app.Handlers(ServedModel(model, "tiny"), SessionPool(model), app.gpu_wrapper())


def request(key: str):
    return SimpleNamespace(headers={}, session_hash=key)


def ask(h, key: str, text: str, image: str | None = None):
    """(final chatbot, final stats line) of one question."""
    *_, (chat, stats) = h.answer(key, {"text": text, "files": [image] if image else []}, GREEDY)
    return chat, stats


def answer_of(chat: list[dict]) -> str:
    assert chat[-1]["role"] == "assistant"
    return chat[-1]["content"][-1]


def reference(model, turns: list[tuple[str, str | None]]) -> tuple[list[str], ChatSession]:
    """The answers of one in-process session to `turns`, images prepared as the app does."""
    session = ChatSession(model)
    answers = []
    for text, image in turns:
        image = None if image is None else prepare_image(image)
        answers.append("".join(session.ask(text, image, GREEDY)).strip())
    return answers, session


@pytest.fixture(params=["forked", "in-process"])
def mode(request):
    return request.param


def test_a_follow_up_remembers_the_first_turn(model, monkeypatch, mode):
    h = build_handlers(model, monkeypatch, forked=mode == "forked")
    (first, second), ref = reference(model, [(FIRST, CIRCLE), (SECOND, None)])
    alone = ChatSession(model)
    "".join(alone.ask(SECOND, None, GREEDY))

    chat, stats = ask(h, "a", FIRST, CIRCLE)
    assert answer_of(chat) == first and "prompt tokens" in stats
    chat, stats = ask(h, "a", SECOND)
    assert answer_of(chat) == second, "turn 2 answers as one session does"
    transcript = h.transcript(request("a"))
    assert transcript["prompt_tokens"] == ref.last_stats.prompt_tokens > alone.last_stats.prompt_tokens, \
        "turn 2's prompt holds turn 1 (and its image)"
    assert [(m["role"], m["text"], m["images"]) for m in transcript["messages"]] == \
        [("user", FIRST, 1), ("assistant", first, 0), ("user", SECOND, 0), ("assistant", second, 0)], \
        "each turn recorded once"
    assert [c["content"][:-1] for c in chat] == [[{"path": CIRCLE}], [], [], []], "the image shows where it was sent"
    with h.pool.use("a") as conversation:
        assert conversation.session.last_stats.answer_ids == ref.last_stats.answer_ids
    if mode == "forked":  # each worker starts from the forked snapshot, with no cache: all re-prefilled
        assert transcript["prefill_tokens"] == transcript["prompt_tokens"] and transcript["cached_tokens"] == 0
    else:
        assert transcript["prefill_tokens"] < transcript["prompt_tokens"], "the KV cache of turn 1 is reused"


def test_regenerate_undo_and_a_new_image(model, monkeypatch, mode):
    h = build_handlers(model, monkeypatch, forked=mode == "forked")
    (first, second), _ = reference(model, [(FIRST, CIRCLE), (SECOND, None)])
    (_, other, third), _ = reference(model, [(FIRST, CIRCLE), (OTHER, None), (THIRD, TWO_CIRCLES)])
    ask(h, "a", FIRST, CIRCLE)
    ask(h, "a", SECOND)
    *_, (chat, stats) = h.regenerate(0.0, 1.0, GREEDY.max_new_tokens, request("a"))
    assert answer_of(chat) == second and len(chat) == 4 and "prompt tokens" in stats, "greedy regeneration repeats itself"
    chat, _ = h.undo(request("a"))
    assert [m["role"] for m in chat] == ["user", "assistant"]
    chat, _ = ask(h, "a", OTHER)
    assert answer_of(chat) == other, "the undone turn is forgotten, the first one is not"
    chat, _ = ask(h, "a", THIRD, TWO_CIRCLES)
    assert answer_of(chat) == third
    assert [c["content"][:-1] for c in chat] == [[{"path": CIRCLE}], [], [], [], [{"path": TWO_CIRCLES}], []]
    assert [m["images"] for m in h.transcript(request("a"))["messages"]] == [1, 0, 0, 0, 1, 0]
    h.undo(request("a"))
    with h.pool.use("a") as conversation:
        assert len(conversation.session.images) == 1 and conversation.image_files == [CIRCLE]


def test_stop_keeps_the_partial_answer(model, monkeypatch, mode):
    import app

    monkeypatch.setattr(app, "UPDATE_SECONDS", 0.0)  # every piece of text is shown: Stop can come mid-answer
    h = build_handlers(model, monkeypatch, forked=mode == "forked")
    (full,), _ = reference(model, [(FIRST, CIRCLE)])
    updates = h.answer("a", {"text": FIRST, "files": [CIRCLE]}, GREEDY)
    shown = [answer_of(chat) for chat, _ in [next(updates) for _ in range(4)]]
    updates.close()  # what Stop does
    assert shown[-1] and full.startswith(shown[-1]) and shown[-1] != full
    chat, stats = h.show(request("a"))
    kept = answer_of(chat)
    assert full.startswith(kept) and len(kept) >= len(shown[-1].strip()), "the partial answer is kept"
    assert "prompt tokens" in stats and " 0 new" not in stats
    chat, _ = ask(h, "a", SECOND)
    assert len(chat) == 4, "the conversation goes on after Stop"


def test_refused_questions_change_nothing(model, monkeypatch):
    import gradio as gr

    h = build_handlers(model, monkeypatch, forked=True)
    ask(h, "a", FIRST, CIRCLE)
    too_long = "colour " * model.max_context
    with pytest.raises(gr.Error, match="context holds"):  # raised in the worker, re-raised here
        list(h.answer("a", {"text": too_long, "files": []}, GREEDY))
    with pytest.raises(gr.Error, match="empty"):  # refused here, before any worker runs
        list(h.answer("a", {"text": " ", "files": []}, GREEDY))
    assert len(h.transcript(request("a"))["messages"]) == 2
