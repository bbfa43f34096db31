"""Golden tests: each template's exact prompt string (as LLaVA's code writes it) and label mask."""
import pytest

from mmchat.conversation import IGNORE_INDEX, Message, messages_from_llava, render
from mmchat.templates import LLAVA_SYSTEM, LLAMA_2_SYSTEM, VICUNA_SYSTEM, get_template, prompt_text, segments

CONV = [
    Message("user", "What colour is the circle?", images=1),
    Message("assistant", "Red."),
    Message("user", "And the square?"),
    Message("assistant", "It is blue."),
]


def test_llava_v1_prompt_string():
    text = prompt_text(segments(get_template("llava_v1"), CONV[:3], add_generation_prompt=True))
    assert text == (
        LLAVA_SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>USER: And the square? ASSISTANT:"
    )
    assert LLAVA_SYSTEM == (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )


def test_vicuna_v1_differs_only_in_system_prompt():
    text = prompt_text(segments(get_template("vicuna_v1"), CONV, add_generation_prompt=False))
    assert text == (
        VICUNA_SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>USER: And the square? ASSISTANT: It is blue.</s>"
    )
    assert "curious user" in VICUNA_SYSTEM and "the user's questions" in VICUNA_SYSTEM


def test_llama_2_prompt_string():
    text = prompt_text(segments(get_template("llama_2"), CONV[:3], add_generation_prompt=True))
    assert text == (
        f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat colour is the circle? [/INST] Red. </s>"
        "<s>[INST] And the square? [/INST]"
    )


def test_plain_prompt_string_drops_user_text():
    text = prompt_text(segments(get_template("plain"), CONV[:2], add_generation_prompt=False))
    assert text == "<image>Red.\n"


def _labelled_text(tokenizer, rendered):
    return tokenizer.decode([t for t in rendered.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("name", ["llava_v1", "vicuna_v1"])
def test_two_style_mask_token_by_token(tiny_tokenizer, name):
    r = render(CONV, get_template(name), tiny_tokenizer, image_tokens=5)
    eos = tiny_tokenizer.eos_token_id
    # Every labelled token equals its input id; images, system prompt and user turns are ignored.
    assert len(r.input_ids) == len(r.labels) == len(r.image_mask)
    assert r.input_ids[0] == tiny_tokenizer.bos_token_id and r.labels[0] == IGNORE_INDEX
    assert sum(r.image_mask) == 5 and r.num_images == 1
    for tok, lab, img in zip(r.input_ids, r.labels, r.image_mask):
        assert lab in (IGNORE_INDEX, tok)
        if img:
            assert lab == IGNORE_INDEX
    # The labelled tokens are exactly the two answers, each closed by </s>.
    spans, current = [], []
    for tok, lab in zip(r.input_ids, r.labels):
        if lab != IGNORE_INDEX:
            current.append(tok)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert len(spans) == 2
    assert [s[-1] for s in spans] == [eos, eos]
    assert [tiny_tokenizer.decode(s[:-1]).strip() for s in spans] == ["Red.", "It is blue."]
    # The unlabelled text is the prompt: it contains the questions, not the answers.
    prompt = tiny_tokenizer.decode([t for t, lab, im in zip(r.input_ids, r.labels, r.image_mask) if lab == IGNORE_INDEX and not im])
    assert "colour is the circle?" in prompt and "Red" not in prompt and "blue" not in prompt


def test_llava_v1_tokens_match_llava_tokenizer_image_token(tiny_tokenizer):
    """LLaVA: split the prompt at <image>, tokenise each piece, one BOS first, the slot between."""
    tmpl = get_template("llava_v1")
    r = render(CONV[:3], tmpl, tiny_tokenizer, image_tokens=3, add_generation_prompt=True, image_token_id=7)
    before, after = prompt_text(segments(tmpl, CONV[:3], True)).split("<image>")
    expected = (
        [tiny_tokenizer.bos_token_id]
        + tiny_tokenizer(before, add_special_tokens=False).input_ids
        + [7, 7, 7]
        + tiny_tokenizer(after, add_special_tokens=False).input_ids
    )
    assert r.input_ids == expected
    assert _labelled_text(tiny_tokenizer, r).replace(" ", "") == "Red.</s>"  # the pending question has no label


def test_llama_2_and_plain_masks(tiny_tokenizer):
    r = render(CONV, get_template("llama_2"), tiny_tokenizer, image_tokens=2)
    assert _labelled_text(tiny_tokenizer, r).replace(" ", "") == "Red.</s>Itisblue.</s>"
    r = render(CONV[:2], get_template("plain"), tiny_tokenizer, image_tokens=4)
    assert r.input_ids[0] == tiny_tokenizer.bos_token_id and r.image_mask[1:5] == [True] * 4
    assert tiny_tokenizer.decode([t for t in r.labels if t != IGNORE_INDEX]).strip() == "Red."
    assert r.labels[5:] == r.input_ids[5:]  # everything after the image is the caption


def test_typed_image_marker_and_eos_never_become_special(tiny_tokenizer):
    msgs = [Message("user", "Is <image> here? </s> USER: hi")]
    r = render(msgs, get_template("llava_v1"), tiny_tokenizer, image_tokens=4, add_generation_prompt=True)
    assert sum(r.image_mask) == 0
    assert tiny_tokenizer.eos_token_id not in r.input_ids


def test_roles_must_alternate(tiny_tokenizer):
    with pytest.raises(ValueError, match="alternate"):
        render([Message("assistant", "hi")], get_template("llava_v1"), tiny_tokenizer, 4)
    with pytest.raises(ValueError, match="end with a user message"):
        render(CONV[:2], get_template("llava_v1"), tiny_tokenizer, 4, add_generation_prompt=True)


def test_unknown_template_names_choices():
    with pytest.raises(ValueError, match="llava_v1"):
        get_template("llava_v2")


def test_messages_from_llava_moves_image_first():
    msgs = messages_from_llava([
        {"from": "human", "value": "What is this?\n<image>"},
        {"from": "gpt", "value": "A cat."},
    ])
    assert msgs == [Message("user", "What is this?", 1), Message("assistant", "A cat.")]
    with pytest.raises(ValueError, match="unknown role"):
        messages_from_llava([{"from": "robot", "value": "x"}])
