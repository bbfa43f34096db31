"""Each image its own number of image tokens (AnyRes groundwork): renderer, chat session, embed, truncation.

The tiny checkpoint's real model runs behind a stand-in per-image count: an image of width w takes
w // 2 slots, its 16 encoded features repeated or cut to that many, so two images in one
conversation take different counts, neither of them the tower's 16.
"""
import pytest
import torch
from PIL import Image

from finetune.data.dataset import truncate
from mmchat.chat import ChatSession
from mmchat.checkpoint import read_config, write_config
from mmchat.conversation import IGNORE_INDEX, Message, render
from mmchat.generate import GenerationConfig
from mmchat.model import LoadOptions, MultimodalModel, load_model
from mmchat.templates import IMAGE_TOKEN, chat_text, get_template, resolve_template
from test_chat_templates import CHATML, answer_runs, make_tokenizer

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0)
CONV = [
    Message("user", "What colour is the circle?", images=1),
    Message("assistant", "Red."),
    Message("user", "And the square?", images=1),
    Message("assistant", "It is blue."),
]


class VariedCounts(MultimodalModel):
    """The same weights; an image of width w takes w // 2 tokens (its real features, repeated or cut)."""

    def __init__(self, model: MultimodalModel):
        super().__init__(model.config, model.vision, model.projector, model.llm, model.tokenizer)
        self.encoded: list[int] = []

    def image_token_counts(self, images, layout=None):
        return [im.width // 2 for im in images]

    def encode_each(self, images, layout=None):
        self.encoded.append(len(images))
        feats = super().encode_each(images, layout)  # [16, H] each, from the real tower and projector
        return [f[torch.arange(n) % len(f)] for f, n in zip(feats, self.image_token_counts(images))]


class CountsOnly(VariedCounts):
    """Counts that its features (the tower's 16 each) do not have: the session must refuse, naming both."""

    def encode_each(self, images, layout=None):
        return MultimodalModel.encode_each(self, images, layout)


def _load(checkpoint, kind=VariedCounts):
    return kind(load_model(checkpoint, LoadOptions(load_in="32bit", device="cpu")))


@pytest.fixture(scope="module")
def varied(tiny_checkpoint):
    return _load(tiny_checkpoint)


def image(width: int, colour) -> Image.Image:
    out = Image.new("RGB", (width, 30), "white")
    out.paste(colour, (4, 4, width - 4, 26))
    return out


RED, BLUE, GREEN = image(48, (220, 20, 20)), image(30, (20, 20, 220)), image(20, (20, 200, 20))  # 24, 15, 10 tokens


def runs(mask: list[bool]) -> list[int]:
    """Lengths of the runs of image slots, in order."""
    out, previous = [], False
    for m in mask:
        if m and not previous:
            out.append(0)
        if m:
            out[-1] += 1
        previous = m
    return out


def naive_greedy(model, messages, images, template=None) -> list[int]:
    """Reference: re-prefill the whole conversation for every token, no cache; features as a list."""
    template = template or get_template(model.config.template)
    r = render(messages, template, model.tokenizer, model.image_token_counts(images), add_generation_prompt=True,
               image_token_id=model.config.image_token_id)
    feats = model.encode_each(images) or None
    ids, mask, out = list(r.input_ids), list(r.image_mask), []
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):
            token = int(model.llm(inputs_embeds=model.embed(torch.tensor([ids]), torch.tensor([mask]), feats)).logits[0, -1].argmax())
            if token == model.tokenizer.eos_token_id:
                break
            ids, mask, out = ids + [token], mask + [False], out + [token]
    return out


def image_keys(session: ChatSession) -> list:
    """The cached image-slot keys, in order."""
    return [k for k in session._cached_keys if isinstance(k, tuple)]


def slots_of(session: ChatSession, widths: list[int], first: int = 0) -> list:
    """The keys the session's images from `first` on must have: their uid on each of their width // 2 slots."""
    images = session._images[first:]
    assert [im.image.width for im in images] == widths
    return [("img", im.uid, "square") for im in images for _ in range(im.image.width // 2)]


# -- the renderer ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llava_v1", "llama_2", "plain"])
def test_render_gives_each_image_its_own_slots(tiny_tokenizer, name):
    template = get_template(name)
    r = render(CONV, template, tiny_tokenizer, [3, 7])
    assert len(r.input_ids) == len(r.labels) == len(r.image_mask) == len(render(CONV, template, tiny_tokenizer, 1)) + 2 + 6
    assert runs(r.image_mask) == [3, 7]
    assert all(lab == IGNORE_INDEX for lab, img in zip(r.labels, r.image_mask) if img)
    uniform = render(CONV, template, tiny_tokenizer, 5)
    # The text around the images, and its labels, do not depend on the counts.
    assert [t for t, m in zip(r.input_ids, r.image_mask) if not m] == [t for t, m in zip(uniform.input_ids, uniform.image_mask) if not m]
    assert [t for t, m in zip(r.labels, r.image_mask) if not m] == [t for t, m in zip(uniform.labels, uniform.image_mask) if not m]
    assert render(CONV, template, tiny_tokenizer, [5, 5]) == uniform  # a list of equal counts is the int
    with pytest.raises(ValueError, match=r"2 image\(s\) but 1 image token count\(s\) were given: \[3\]"):
        render(CONV, template, tiny_tokenizer, [3])
    with pytest.raises(ValueError, match=r"at least one image token; got counts \[3, 0\]"):
        render(CONV, template, tiny_tokenizer, [3, 0])


@pytest.mark.parametrize("image_token", [True, False], ids=["one-call", "split"])
def test_chat_template_gives_each_image_its_own_slots(image_token):
    tokenizer = make_tokenizer("chatml", image_token=image_token)
    template = resolve_template("chat", tokenizer)
    r = render(CONV, template, tokenizer, [3, 7])
    assert runs(r.image_mask) == [3, 7] and len(r.input_ids) == len(r.labels) == len(r.image_mask)
    # Labels follow the answers wherever the images pushed them.
    assert answer_runs(tokenizer, r) == answer_runs(tokenizer, render(CONV, template, tokenizer, 1)) == [
        "Red.<|im_end|>", "It is blue.<|im_end|>"]
    if image_token:  # llava-hf's processors: each <image> expanded to its own count, one tokenizer call
        pieces = chat_text(template, CONV, tokenizer, add_generation_prompt=False)[0].split(IMAGE_TOKEN)
        expanded = pieces[0] + IMAGE_TOKEN * 3 + pieces[1] + IMAGE_TOKEN * 7 + pieces[2]
        assert r.input_ids == tokenizer(expanded)["input_ids"]


def test_truncate_drops_a_cut_image_whole_with_per_image_counts(tiny_tokenizer):
    template = get_template("llava_v1")
    r = render(CONV, template, tiny_tokenizer, [3, 7])
    second = [i for i in range(1, len(r)) if r.image_mask[i] and not r.image_mask[i - 1]][1]  # where image 2 starts
    short = truncate(r, second + 4, [3, 7])  # inside the second image: it goes whole
    assert len(short) == second and runs(short.image_mask) == [3]
    kept = truncate(r, second + 9, [3, 7])  # past it: kept whole
    assert len(kept) == second + 9 and runs(kept.image_mask) == [3, 7]
    uniform = render(CONV, template, tiny_tokenizer, 5)
    for length in range(1, len(uniform)):
        assert truncate(uniform, length, 5) == truncate(uniform, length, [5, 5])


# -- the model -------------------------------------------------------------------------------

def test_embed_takes_each_image_its_own_count_and_names_the_counts(varied):
    hidden = varied.llm.config.hidden_size
    ids = torch.zeros(1, 14, dtype=torch.long)
    mask = torch.tensor([[False] + [True] * 5 + [False] * 2 + [True] * 5 + [False]])
    first, second = torch.randn(5, hidden), torch.randn(5, hidden)
    as_list = varied.embed(ids, mask, [first, second])
    assert torch.equal(as_list[0, mask[0]], torch.cat([first, second]))
    assert torch.equal(as_list, varied.embed(ids, mask, torch.stack([first, second])))  # [N, T, H]
    assert torch.equal(as_list, varied.embed(ids, mask, torch.cat([first, second])))  # [sum T_i, H]
    with pytest.raises(ValueError, match=r"10 slot positions vs 12 feature vectors \(2 images of 5 \+ 7 tokens\)"):
        varied.embed(ids, mask, [first, torch.randn(7, hidden)])
    with pytest.raises(ValueError, match=r"10 slot positions vs 0 feature vectors \(no images\)"):
        varied.embed(ids, mask, None)


def test_session_refuses_features_that_disagree_with_the_count(tiny_checkpoint):
    s = ChatSession(_load(tiny_checkpoint, CountsOnly))
    with pytest.raises(ValueError, match="encoded an image into 16 features but counts 24 slots"):
        "".join(s.ask("What colour is it?", RED, GREEDY))


# -- the chat session ------------------------------------------------------------------------

def test_two_images_with_their_own_counts_equal_full_reprefill(varied):
    assert varied.image_token_counts([RED, BLUE]) == [24, 15] and varied.image_tokens == 16
    varied.encoded.clear()
    s = ChatSession(varied)
    answers = []
    for question, picture in (("What colour is the shape?", RED), ("And this one?", BLUE), ("Which is bigger?", None)):
        "".join(s.ask(question, picture, GREEDY))
        answers.append(s.last_stats.answer_ids)
    assert varied.encoded == [1, 1]  # each image through the tower once, on its own turn
    assert s.last_stats.prefill_tokens < s.last_stats.prompt_tokens / 4  # turn 3 reused the cache
    assert image_keys(s) == slots_of(s, [48, 30])
    assert any(answers)
    for turn, images in enumerate(([RED], [RED, BLUE], [RED, BLUE])):
        assert naive_greedy(varied, s.messages[: 2 * turn + 1], images) == answers[turn], turn


def test_undo_regenerate_and_dropped_turns_keep_keys_consistent(varied):
    s = ChatSession(varied)
    "".join(s.ask("Describe it.", RED, GREEDY))
    "".join(s.ask("And this one?", BLUE, GREEDY))
    before = s.last_stats.answer_ids
    "".join(s.regenerate(GREEDY))
    assert s.last_stats.answer_ids == before and s.last_stats.prefill_tokens == 1
    assert image_keys(s) == slots_of(s, [48, 30])
    s.undo()
    # Same question, another image of another count where blue's 15 slots are cached.
    "".join(s.ask("And this one?", GREEN, GREEDY))
    assert image_keys(s) == slots_of(s, [48, 20])
    assert naive_greedy(varied, s.messages[:3], [RED, GREEN]) == s.last_stats.answer_ids

    # Many turns, each with an image: the oldest turns go, and with them their images' slots.
    s = ChatSession(varied)
    pictures = [RED, BLUE, GREEN] * 3
    for picture in pictures:
        "".join(s.ask("what colour is the circle on the left " * 6, picture, GREEDY))
    dropped = s.last_stats.dropped_turns
    assert dropped > 0 and s.last_stats.prompt_tokens + GREEDY.max_new_tokens <= varied.max_context
    assert image_keys(s) == slots_of(s, [p.width for p in pictures[dropped:]], dropped)
    assert naive_greedy(varied, s.messages[2 * dropped:-1], pictures[dropped:]) == s.last_stats.answer_ids


@pytest.mark.parametrize("image_token", [True, False], ids=["one-call", "split"])
def test_chat_template_session_with_its_own_counts_equals_full_reprefill(tmp_path, tiny_tokenizer_dir, image_token):
    from transformers import AutoTokenizer

    from tiny_models import build_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>",
                                  "additional_special_tokens": ["<|im_start|>"] + [IMAGE_TOKEN] * image_token})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    ckpt = build_checkpoint(tmp_path / "ckpt", tmp_path / "tokenizer")
    config = read_config(ckpt)
    config.template = "chat"
    write_config(config, ckpt)
    model = _load(ckpt)
    template = resolve_template("chat", model.tokenizer)
    s = ChatSession(model)
    answers = []
    for question, picture in (("What colour is the shape?", RED), ("And this one?", BLUE)):
        "".join(s.ask(question, picture, GREEDY))
        answers.append(s.last_stats.answer_ids)
    assert s.last_stats.prefill_tokens < s.last_stats.prompt_tokens / 2 and any(answers)
    assert image_keys(s) == slots_of(s, [48, 30])
    r = render(s.messages[:3], template, model.tokenizer, [24, 15], add_generation_prompt=True)
    assert runs(r.image_mask) == [24, 15]
    for turn, images in enumerate(([RED], [RED, BLUE])):
        assert naive_greedy(model, s.messages[: 2 * turn + 1], images, template) == answers[turn], turn
