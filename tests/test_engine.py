"""Continuous batching (`mmchat.engine`): conversations decoded together answer as they do alone.

Greedy tokens of a random model sometimes sit at a near-tie, where a batched matmul's different
summation order may flip the choice; the comparison allows a difference only there (both runs'
margin between their two best logits under the tolerance), as the chat benchmark does.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from matplotlib import cbook
from PIL import Image

from mmchat.answer import Answer
from mmchat.chat import ChatSession
from mmchat.engine import Engine
from mmchat.generate import GenerationConfig
from mmchat.model import LoadOptions, load_model

GREEDY = GenerationConfig(max_new_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, LoadOptions(load_in="32bit", device="cpu"))


@pytest.fixture(autouse=True)
def margins(monkeypatch):
    """Record each chosen token's margin over the runner-up in its turn's stats (the real `push` runs)."""
    push = Answer.push

    def recording(self, logits):
        top = torch.topk(logits.float(), 2).values
        self.stats.margins = [*getattr(self.stats, "margins", []), float(top[0] - top[1])]
        return push(self, logits)

    monkeypatch.setattr(Answer, "push", recording)


def agree(a, b, tol: float) -> bool:
    """Same tokens, or the first difference is a near-tie in both runs."""
    k = next((i for i, (x, y) in enumerate(zip(a.answer_ids, b.answer_ids)) if x != y),
             min(len(a.answer_ids), len(b.answer_ids)))
    if a.answer_ids == b.answer_ids:
        return True
    return a.margins[k] < tol and b.margins[k] < tol


def photo() -> Image.Image:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def questions(i: int) -> list[tuple[str, Image.Image | None]]:
    """Conversation `i`: prompts of different lengths, with and without images."""
    first = [("What is in this picture?", photo()), ("Describe the colour.", Image.new("RGB", (40, 30), "red")),
             ("Tell me a long story about everything you can think of, with many details, " * (1 + i % 3), None),
             ("Hi.", None)][i % 4]
    return [first, (f"And then what happened, {i}?", None)]


def talk(session: ChatSession, i: int, gen: GenerationConfig = GREEDY) -> list:
    turns = []
    for text, image in questions(i):
        "".join(session.ask(text, image, gen))
        turns.append(session.last_stats)
    return turns


def run_together(model, engine: Engine, n: int, gen: GenerationConfig = GREEDY) -> tuple[list, list[ChatSession]]:
    sessions = [ChatSession(model, engine=engine) for _ in range(n)]
    results: list = [None] * n
    errors = []

    def one(i):
        try:
            results[i] = talk(sessions[i], i, gen)
        except Exception as e:  # surfaced below, with the conversation's number
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results, sessions


def test_conversations_decoded_together_answer_as_alone(model):
    alone = [talk(ChatSession(model), i) for i in range(8)]
    engine = Engine(model, max_batch=8, prefill_chunk=64)
    try:
        together, sessions = run_together(model, engine, 8)
    finally:
        engine.close()
    assert engine.stats.largest_batch > 1, "the answers were never decoded together"
    assert engine.stats.tokens > engine.stats.steps, "each step should feed several conversations"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert agree(a[0], b[0], 1e-4), f"conversation {i}, turn 1: {a[0].answer_ids} vs {b[0].answer_ids}"
        if a[0].answer_ids == b[0].answer_ids:  # same history: the second turn must agree too
            assert agree(a[1], b[1], 1e-4), f"conversation {i}, turn 2: {a[1].answer_ids} vs {b[1].answer_ids}"
            # The batch handed the row back as the session's cache: turn 2 prefilled only its new tokens.
            assert b[1].prefill_tokens == a[1].prefill_tokens < b[1].prompt_tokens
        assert sessions[i].messages[-1].role == "assistant"


def test_chunked_prefill_answers_as_one_prefill(model):
    whole = talk(ChatSession(model), 0)
    engine = Engine(model, max_batch=2, prefill_chunk=5)  # the 16 image slots span chunks
    try:
        chunked = talk(ChatSession(model, engine=engine), 0)
    finally:
        engine.close()
    for a, b in zip(whole, chunked):
        assert agree(a, b, 1e-4), (a.answer_ids, b.answer_ids)
        assert a.prefill_tokens == b.prefill_tokens and a.prompt_tokens == b.prompt_tokens


def test_a_stopped_answer_leaves_the_batch_and_keeps_its_words(model):
    engine = Engine(model, max_batch=4)
    long = GenerationConfig(max_new_tokens=400, temperature=0)
    try:
        stopped = ChatSession(model, engine=engine)
        other = ChatSession(model, engine=engine)
        other_answer = []
        runner = threading.Thread(target=lambda: other_answer.append("".join(other.ask("Tell me everything.", None, long))))
        runner.start()
        deltas = stopped.ask("Tell me everything too.", photo(), long)
        shown = "".join(d for _, d in zip(range(3), deltas))
        deltas.close()  # Stop: returns once the engine let go of the session
        assert stopped.messages[-1].role == "assistant" and stopped.messages[-1].text.startswith(shown.strip()[:5])
        kept = stopped.last_stats.new_tokens
        assert 3 <= kept < 400 and stopped.cached_tokens == stopped.last_stats.prompt_tokens + kept - 1
        runner.join()
        assert other.last_stats.new_tokens > kept, "the other answer went on after the stopped one left"
        # The stopped conversation goes on from its kept cache, as a fresh session with its history would.
        "".join(stopped.ask("Shorter, please.", None, GREEDY))
        assert stopped.last_stats.prefill_tokens < stopped.last_stats.prompt_tokens
        deadline = time.monotonic() + 5
        while engine.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.busy == 0
    finally:
        engine.close()


def test_one_at_a_time_with_max_batch_1(model):
    engine = Engine(model, max_batch=1)
    try:
        together, _ = run_together(model, engine, 3)
    finally:
        engine.close()
    assert engine.stats.largest_batch == 1 and engine.stats.tokens == engine.stats.steps
    alone = [talk(ChatSession(model), i) for i in range(3)]
    for a, b in zip(alone, together):
        assert agree(a[0], b[0], 1e-4)


def test_4bit_batches_agree_under_the_near_tie_policy(tiny_checkpoint):
    model = load_model(tiny_checkpoint, LoadOptions(load_in="4bit", device="cpu"))
    assert "Linear4bit" in type(model.llm.model.layers[0].self_attn.q_proj).__name__
    alone = [talk(ChatSession(model), i) for i in range(4)]
    engine = Engine(model, max_batch=4)
    try:
        together, _ = run_together(model, engine, 4)
    finally:
        engine.close()
    assert engine.stats.largest_batch > 1
    for i, (a, b) in enumerate(zip(alone, together)):
        # bitsandbytes' CPU kernel rounds inputs to bf16: logits move by ~1e-2 (benchmarks.agreement)
        assert agree(a[0], b[0], 0.03), f"conversation {i}: {a[0].answer_ids} vs {b[0].answer_ids}"


def test_sampling_follows_each_requests_seed_in_a_batch(model):
    seeded = GenerationConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    alone = talk(ChatSession(model), 1, seeded)
    engine = Engine(model, max_batch=4)
    try:
        together, _ = run_together(model, engine, 4, seeded)
    finally:
        engine.close()
    # Same seed, same conversation: the same draws (each answer has its own generator).
    assert together[1][0].answer_ids == alone[0].answer_ids


def test_a_conversation_alone_decodes_in_its_own_buffers(model):
    """Alone in a batch, a conversation's cache is used in place and handed back without a copy, also
    after its buffers grew longer (rows grow only for more rows); a second row copies it in."""
    from mmchat.kv_cache import BatchCache, new_cache

    def prefilled(length: int):
        out = model.llm(input_ids=torch.arange(5, 5 + length).unsqueeze(0), cache=new_cache(model.llm.config),
                        use_cache=True, logits_to_keep=1)
        return out.cache

    with torch.inference_mode():
        own = prefilled(20)
        buffer = own.layers[0]._key_buffer
        batch = BatchCache(own, max_rows=16)
        assert batch._keys[0] is buffer
        batch._reserve(1, buffer.shape[2] + 1)  # a long answer outgrows the spare room
        assert batch._keys[0].shape[0] == 1, "growing longer must not add rows"
        back = batch.remove(0)
        assert back.layers[0]._key_buffer is batch._keys[0] and back.get_seq_length() == 20
        assert torch.equal(back.layers[0].keys, own.layers[0].keys)

        two = BatchCache(prefilled(7), max_rows=16)
        two.add(prefilled(12))
        assert two.lens == [7, 12] and two._keys[0].shape[0] == 2
        mask, positions = two.step_inputs("cpu")
        assert mask.tolist() == [[1] * 8 + [0] * 5, [1] * 13] and positions.tolist() == [[7], [12]]
        first = two.remove(0)  # the last row moves into the gap
        assert two.lens == [12] and first.get_seq_length() == 7


def test_a_long_answer_in_the_batch_keeps_the_cache_as_a_session_alone_does(model):
    """Past the buffers' spare room: the handed-back cache holds what a session alone would hold,
    so the next turn prefills the same tokens (the answer's text re-tokenised may differ from its
    ids, in which case both re-prefill from there)."""
    long = GenerationConfig(max_new_tokens=300, temperature=0, repetition_penalty=1.3)
    engine = Engine(model, max_batch=16)
    try:
        runs = []
        for session in (ChatSession(model), ChatSession(model, engine=engine)):
            stats = []
            for text, gen in (("Hi.", GREEDY), ("Now a long one.", long), ("And?", GREEDY)):
                "".join(session.ask(text, None, gen))
                stats.append(session.last_stats)
                assert session.cached_tokens == session._cache.get_seq_length()
            runs.append(stats)
    finally:
        engine.close()
    alone, batched = runs
    assert alone[1].new_tokens > 256 and batched[1].answer_ids == alone[1].answer_ids
    assert [s.prefill_tokens for s in batched] == [s.prefill_tokens for s in alone]


class Poisoned(Exception):
    """What a broken answer raises in the engine's thread."""


@pytest.mark.parametrize("at", [0, 3])  # its first token (chosen after the prefill) or mid-decode
def test_a_failure_inside_one_answer_fails_only_that_answer(model, monkeypatch, at):
    """One conversation's token choice raises inside the engine while others decode: that request gets the
    error, its neighbours finish with their solo answers, and the engine goes on serving."""
    alone = [talk(ChatSession(model), i) for i in range(3)]
    push = Answer.push

    def poisoned(self, logits):
        if poisoned.on and self.stats is victim.last_stats and len(self.generated) >= at:
            raise Poisoned("sampling failed")
        return push(self, logits)

    poisoned.on = True
    monkeypatch.setattr(Answer, "push", poisoned)
    engine = Engine(model, max_batch=4)
    try:
        victim = ChatSession(model, engine=engine)
        errors, results = [], {}

        def other(i):
            results[i] = talk(ChatSession(model, engine=engine), i)

        threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        with pytest.raises(Poisoned):
            "".join(victim.ask("Poisoned question, please?", None, GenerationConfig(max_new_tokens=16, temperature=0)))
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 3 and engine.stats.largest_batch > 1
        for i in range(3):
            for a, b in zip(alone[i], results[i]):
                assert agree(a, b, 1e-4), (i, a.answer_ids, b.answer_ids)
        poisoned.on = False
        assert victim.messages[-1].role == "user", "the failed question stays, unanswered, for a retry"
        assert "".join(victim.respond(GREEDY)), "the engine still serves, the same session too"
    finally:
        engine.close()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1e-300), (1e-4, 1.0), (1e4, 0.5), (1.0, 5e-324), (2.0, 1.0)])
def test_extreme_but_valid_sampling_values_answer(model, temperature, top_p):
    """top_p below float32's smallest number is 0 there: the most likely token alone stays (it used to
    drop every token and raise); tiny and huge temperatures answer too, in a batch with a greedy neighbour."""
    engine = Engine(model, max_batch=2)
    try:
        gen = GenerationConfig(max_new_tokens=8, temperature=temperature, top_p=top_p, seed=1)
        other = threading.Thread(target=lambda: talk(ChatSession(model, engine=engine), 1))
        other.start()
        session = ChatSession(model, engine=engine)
        assert "".join(session.ask("What is in this picture?", photo(), gen)) is not None
        assert session.last_stats.new_tokens >= 1
        other.join(timeout=120)
        if top_p < 1e-30:  # only the top token survives: greedy
            greedy = ChatSession(model)
            "".join(greedy.ask("What is in this picture?", photo(), GenerationConfig(max_new_tokens=8, temperature=0)))
            assert session.last_stats.answer_ids == greedy.last_stats.answer_ids
    finally:
        engine.close()


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_unusable_temperatures_are_refused_in_one_line(temperature):
    with pytest.raises(ValueError, match="temperature=.*must be a finite number >= 0"):
        GenerationConfig(temperature=temperature)
