"""LLaVA-OneVision folders converted and chatted with: the answers transformers gives on the folder.

A tiny random `LlavaOnevisionForConditionalGeneration` (SigLIP 60 px / patch 7 -> 8x8 tokens a tile:
like SigLIP-384 / 14, the tile is not a multiple of the patch; Qwen2; pinpoints 1..6 tiles a side as
the hub's 384..2304; anyres_max_9) saved with a `LlavaOnevisionProcessor` (which needs a video
processor), OneVision's ChatML chat template and a generation config. The reference is transformers on
that folder through `apply_chat_template`, which hands the processor each conversation's images as one
list: a lone image is tiled (and its map shrunk to about 9 tiles), several images are each padded to
a square and read as one tile plus a newline. So the first image of a chat changes its tokens when a
second one arrives, and mmchat's cache must notice.
"""
from __future__ import annotations

import json

import pytest
import torch

from mmchat.checkpoint import read_config, read_projector_state
from mmchat.convert.cli import main
from mmchat.convert.common import SELECT_STRATEGIES
from mmchat.templates import resolve_template
from test_next import NEW_TOKENS, chat_as_transformers, hf_chat, images, transformers_turn
from test_zoo import CORPUS, QUESTIONS, processor_inputs
from tiny_models import assert_tiles_equal_the_processors, build_chat_tokenizer, sample_photo

PINS = [[60 * i, 60 * j] for i in range(1, 7) for j in range(1, 7)]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>"]
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's chat template: images, then videos, then the text; the
# answers marked with {% generation %}.
ONEVISION = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_onevision_folder(out, seed: int = 0):
    """The tiny LlavaOnevision folder, as the hub's are."""
    from transformers import (GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              Qwen2Config, SiglipVisionConfig)

    tokenizer = build_chat_tokenizer(SPECIALS, None, "<|im_end|>", True, False, CORPUS)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    text = Qwen2Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=stops[0], pad_token_id=stops[1])
    tower = SiglipVisionConfig(image_size=60, patch_size=7, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                               vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=tower, text_config=text, image_grid_pinpoints=PINS,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(seed)
    llava = LlavaOnevisionForConditionalGeneration(config).eval()
    llava.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=stops[1])
    llava.save_pretrained(out)
    image_processor = LlavaOnevisionImageProcessor(size={"height": 60, "width": 60}, image_grid_pinpoints=PINS,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=64,
                            vision_feature_select_strategy="full", chat_template=ONEVISION,
                            vision_aspect_ratio="anyres_max_9").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_onevision_folder(tmp_path_factory.mktemp("onevision") / "llava-onevision")


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_processor.backend == "torchvision"
    return LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(), processor


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmchat") / "onevision"
    assert main([str(folder), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    from mmchat.model import LoadOptions, load_model

    return load_model(checkpoint, LoadOptions("32bit", "cpu"))


def test_conversion_keeps_the_tiling_the_shrink_and_the_newline(checkpoint, reference, model):
    llava, processor = reference
    config = read_config(checkpoint)
    assert config.vision.anyres.pinpoints == PINS and config.vision.anyres.max_tiles == 9
    assert config.template == "chat" and SELECT_STRATEGIES[config.vision.select_feature] == "full"
    assert config.image_token_id == llava.config.image_token_index
    assert torch.equal(read_projector_state(checkpoint)["image_newline"], llava.model.image_newline.float())
    # The photo's map is far more than 9 tiles: it is shrunk, and the count says so as transformers' does.
    photo = images()["photo"]
    inputs = processor_inputs(processor, hf_chat([(QUESTIONS[0], photo, None)]))
    assert model.image_token_counts([photo]) == [int((inputs["input_ids"] == config.image_token_id).sum())]
    assert model.image_token_counts([photo]) != [(9 * 64) + 64]


@pytest.mark.parametrize("name", ["photo", "tall", "wide"])
def test_one_image_answers_as_transformers_over_two_turns(name, model, reference):
    llava, processor = reference
    picture = images()[name]
    assert model.image_layout(1) == "tiles"
    answers = chat_as_transformers(model, llava, processor, [(QUESTIONS[0], picture), (QUESTIONS[1], None)])
    assert all(answers)


def test_a_second_image_turns_both_into_squares_as_in_transformers(model, reference):
    """Turn 1 tiles the photo; turn 2 brings the wide crop, and transformers then reads both as one
    padded square + newline each: the photo's slots change, so its cached prefix cannot be reused."""
    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig

    llava, processor = reference
    pictures = images()
    alone = model.image_token_counts([pictures["photo"]])
    together = model.image_token_counts([pictures["photo"], pictures["wide"]])
    assert model.image_layout(2) == "square" and together == [65, 65] and alone[0] > 65
    chat_as_transformers(model, llava, processor, [(QUESTIONS[0], pictures["photo"]), (QUESTIONS[1], pictures["wide"])])
    # In one session the second turn re-prefills from the first image on, not from the cached end of turn 1.
    session = ChatSession(model)
    gen = GenerationConfig(temperature=0, max_new_tokens=4)
    "".join(session.ask(QUESTIONS[0], pictures["photo"], gen))
    "".join(session.ask(QUESTIONS[1], pictures["wide"], gen))
    assert session.last_stats.prefill_tokens > 2 * 65
    assert [k[2] for k in session._cached_keys if isinstance(k, tuple)] == ["square"] * 130


def test_multi_turn_chat_equals_full_reprefill_and_undo_goes_back_to_tiles(model):
    from mmchat.chat import ChatSession
    from test_image_tokens import GREEDY, naive_greedy

    pictures = images()
    session, answers = ChatSession(model), []
    for question, picture in ((QUESTIONS[0], pictures["tall"]), (QUESTIONS[1], pictures["wide"]), ("And?", None)):
        "".join(session.ask(question, picture, GREEDY))
        answers.append(session.last_stats.answer_ids)
    assert session.last_stats.prefill_tokens < session.last_stats.prompt_tokens / 4  # turn 3 reused the cache
    template = resolve_template(model.config.template, model.tokenizer)
    for turn, shown in enumerate(([pictures["tall"]], [pictures["tall"], pictures["wide"]],
                                  [pictures["tall"], pictures["wide"]])):
        assert naive_greedy(model, session.messages[: 2 * turn + 1], shown, template) == answers[turn], turn
    # Undo the second image's turn (and the third): the tall crop is alone again, so tiled again.
    session.undo()
    session.undo()
    "".join(session.ask(QUESTIONS[1], None, GREEDY))
    expected = naive_greedy(model, session.messages[:-1], [pictures["tall"]], template)
    assert session.last_stats.answer_ids == expected
    assert {k[2] for k in session._cached_keys if isinstance(k, tuple)} == {"tiles"}


def test_cli_answers_a_onevision_folder_as_transformers(folder, reference, tmp_path, monkeypatch, capsys):
    from mmchat.cli import main as cli

    llava, processor = reference
    picture = images()["wide"]
    tokens, _ = transformers_turn(llava, processor_inputs(processor, hf_chat([(QUESTIONS[0], picture, None)])))
    picture.save(tmp_path / "wide.png")
    monkeypatch.setenv("MMCHAT_CACHE", str(tmp_path / "cache"))
    assert cli(["--model", str(folder), "--image", str(tmp_path / "wide.png"), "--prompt", QUESTIONS[0],
                "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--json"]) == 0
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"answers": [expected]}


def test_several_images_are_padded_squares_to_the_bit(model, reference):
    """The processor's pixels for a conversation of several images: each padded with the mean colour
    (odd padding to the right / bottom) and resized to one tile, exactly."""
    from mmchat.anyres import preprocess_square

    _, processor = reference
    pictures = [images()["tall"], images()["wide"], images()["photo"].crop((0, 0, 301, 300))]
    theirs = processor.image_processor([pictures], return_tensors="pt")
    assert theirs["batch_num_images"].tolist() == [3]
    for i, picture in enumerate(pictures):
        assert torch.equal(preprocess_square(picture, model.anyres)[0], theirs["pixel_values"][i][0])
    assert model.processor is not None  # the converted checkpoint's pixels come from the folder's own processor
    assert torch.equal(model.pixels(pictures, "square"), theirs["pixel_values"][:, 0])


@pytest.mark.parametrize("name", ["grace_hopper", "cheetah", "tower"])
def test_tiles_equal_the_default_processor_to_the_bit(model, reference, name):
    assert_tiles_equal_the_processors(model, reference[1], sample_photo(name))


def test_the_status_line_says_when_images_are_tiled(model, checkpoint):
    from mmchat.model import LoadOptions
    from mmchat.serving.config import ServeConfig
    from mmchat.serving.loaded_model import describe

    line = describe(model, ServeConfig(model=str(checkpoint)), LoadOptions(load_in="32bit", device="cpu"))
    assert "AnyRes (anyres_max_9): 64 tokens per tile" in line and "65 tokens per image when there are several" in line


def test_the_api_answers_as_transformers_and_refuses_video_with_a_400(checkpoint, reference, tmp_path):
    """The OpenAI API on the converted folder: one image (tiled), then a second (both squares), each
    answer transformers' own; a video part is refused in one line, not a 500."""
    import io

    import openai

    from test_api import KEY, ApiServer, data_url

    llava, processor = reference
    photo, wide = images()["photo"], images()["wide"]

    def url(picture):
        out = io.BytesIO()
        picture.save(out, format="PNG")
        return data_url(out.getvalue())

    server = ApiServer(checkpoint, tmp_path)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        history, messages = [], []
        for question, picture in ((QUESTIONS[0], photo), (QUESTIONS[1], wide)):
            tokens, _ = transformers_turn(llava, processor_inputs(processor, hf_chat(history + [(question, picture, None)])))
            expected = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(picture)}},
                                                         {"type": "text", "text": question}]})
            answer = client.chat.completions.create(model="onevision", messages=messages, temperature=0, max_tokens=NEW_TOKENS)
            # Random weights pick stray bytes: where they make invalid UTF-8, text decoded as it streams
            # may group the replacement characters differently from one decode of all the ids.
            assert answer.choices[0].message.content == expected  # stray bytes (invalid UTF-8) included
            messages.append({"role": "assistant", "content": expected})
            history.append((question, picture, expected))
        video = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                             {"type": "text", "text": "What happens?"}]}
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="onevision", messages=[video], max_tokens=4)
        assert "video" in str(refused.value)
    finally:
        server.stop()
