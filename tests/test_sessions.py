"""The app's conversation pool: bounded caches that are re-prefilled transparently."""
from __future__ import annotations

import threading

import pytest
from PIL import Image

from mmchat.serving.examples import EXAMPLES, example_path
from mmchat.generate import GenerationConfig
from mmchat.image import ImageError
from mmchat.serving.sessions import MAX_SERVED_PIXELS, Busy, SessionPool, prepare_image

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)
CIRCLE, TWO_CIRCLES = str(example_path(EXAMPLES[0])), str(example_path(EXAMPLES[3]))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from mmchat.model import LoadOptions, load_model

    return load_model(tiny_checkpoint, LoadOptions("32bit", "cpu"))


def ask(pool: SessionPool, key: str, text: str, image: str | None = None) -> str:
    with pool.use(key, generate=True) as conversation:
        return "".join(conversation.ask(text, image, GREEDY))


def test_evicted_conversations_answer_as_if_never_evicted(model):
    """max_cached=1 drops a's cache when b speaks; a's next answer equals an unevicted run."""
    script = [("a", "What colour is it?", CIRCLE), ("b", "Describe this picture.", TWO_CIRCLES),
              ("a", "And the shape?", None), ("b", "What colour is the roof?", None), ("a", "Is it big?", None)]
    small, large = SessionPool(model, max_cached=1), SessionPool(model, max_cached=8)
    for key, text, image in script:
        answer = ask(small, key, text, image)
        assert answer and answer == ask(large, key, text, image)
        other = "b" if key == "a" else "a"
        with small.use(other) as conversation:
            assert conversation.session.cached_tokens == 0, "the other conversation's cache was evicted"
    assert small.cached_keys == ["a"]
    with small.use("a") as a, small.use("b") as b:
        assert len(a.session.messages) == 6 and len(b.session.messages) == 4, "histories survive eviction"
        assert len(a.image_files) == 1 and len(b.image_files) == 1


def test_oldest_conversations_are_forgotten_beyond_the_limit(model):
    pool = SessionPool(model, max_cached=1, max_conversations=2)
    for key in "abc":
        ask(pool, key, "Is there a circle?")
    assert len(pool) == 2
    with pool.use("a") as a:
        assert a.session.messages == [], "a was forgotten and starts afresh"
    pool.forget("a")
    assert len(pool) == 1 and "a" not in pool.cached_keys


def test_one_request_at_a_time_per_conversation(model):
    pool = SessionPool(model, wait_seconds=0.2)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with pool.use("a"):
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(5)
    with pytest.raises(Busy, match="still answering"):
        with pool.use("a"):
            pass
    with pool.use("b"):  # other conversations are not blocked
        pass
    release.set()
    thread.join()


def test_undo_keeps_the_shown_images_in_step(model):
    pool = SessionPool(model)
    ask(pool, "a", "What colour is it?", CIRCLE)
    ask(pool, "a", "And this one?", TWO_CIRCLES)
    with pool.use("a") as conversation:
        assert [t.image_files for t in conversation.thread()] == [[CIRCLE], [], [TWO_CIRCLES], []]
        conversation.undo()
        assert [t.image_files for t in conversation.thread()] == [[CIRCLE], []]
        conversation.clear()
        assert conversation.thread() == [] and conversation.image_files == []


def test_an_interrupted_question_must_be_answered_or_undone(model):
    pool = SessionPool(model)
    with pool.use("a", generate=True) as conversation:
        deltas = conversation.ask("What colour is it?", CIRCLE, GREEDY)
        next(deltas)
        deltas.close()  # Stop: the partial answer is kept
        assert conversation.session.messages[-1].role == "assistant"
        conversation.session.messages.pop()  # as if the generation had failed
        with pytest.raises(ValueError, match="press Regenerate to answer it, or Undo"):
            conversation.ask("Another?", None, GREEDY)
        assert "".join(conversation.regenerate(GREEDY))


def test_prepare_image_keeps_every_pixel_bounds_size_and_names_the_file(tmp_path):
    """No downscale (it would change the pixels the model sees, unlike transformers); too large is refused."""
    Image.new("RGB", (2000, 1000), "red").save(tmp_path / "wide.png")
    assert prepare_image(str(tmp_path / "wide.png")).size == (2000, 1000)
    assert MAX_SERVED_PIXELS < 5000 * 4000 <= 50_000_000  # above the page's limit, below what load_image opens
    Image.new("RGB", (5000, 4000), "red").save(tmp_path / "huge.png")
    with pytest.raises(ImageError, match="downscale it below 16 megapixels"):
        prepare_image(str(tmp_path / "huge.png"))
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    with pytest.raises(ImageError, match="1×1 pixels, too small"):
        prepare_image(str(tmp_path / "dot.png"))
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ImageError) as error:
        prepare_image(str(tmp_path / "fake.png"))
    assert str(error.value).startswith("fake.png is not a readable image") and str(tmp_path) not in str(error.value)
