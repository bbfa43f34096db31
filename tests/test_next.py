"""LLaVA-NeXT (AnyRes) folders converted and chatted with: the answers transformers gives on the folder.

A tiny random `LlavaNextForConditionalGeneration` (CLIP 56 px / patch 7 -> 8x8 tokens a tile, LLaMA, the
hub's five pinpoints scaled from 336 to 56 px) saved with a `LlavaNextProcessor`, the llava-1.5 chat
template and a generation config. The reference is transformers on that folder: `AutoProcessor` with
its default (torchvision) image processor backend, which `mmchat.anyres` reproduces to the bit (the PIL
backend, which tests/test_zoo.py compares LLaVA-1.5 against, resamples differently), and
`generate(do_sample=False)`. matplotlib's photo (512 wide x 600 high) and a tall and a wide crop of it
pick three different grids.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from matplotlib import cbook
from PIL import Image

from mmchat.anyres import grid_shape
from mmchat.checkpoint import read_config, read_projector_state
from mmchat.conversation import render
from mmchat.convert.cli import main
from mmchat.templates import resolve_template
from test_zoo import CORPUS, LLAMA_SPECIALS, LLAVA_15, QUESTIONS, one_line_error, processor_inputs
from tiny_models import assert_tiles_equal_the_processors, build_chat_tokenizer, sample_photo

PINS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
NEW_TOKENS = 20
GRIDS = {"photo": (2, 2), "tall": (3, 1), "wide": (1, 3)}


def images() -> dict[str, Image.Image]:
    """The photo, a tall crop (100 x 500) and a wide crop (500 x 90)."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    return {"photo": photo, "tall": photo.crop((200, 50, 300, 550)), "wide": photo.crop((0, 300, 500, 390))}


def build_next_folder(out, tower_act: str = "quick_gelu", seed: int = 0, llm: str = "LlamaConfig",
                      tokenizer=None, template: str = LLAVA_15, stops: list[str] | None = None):
    """The tiny LlavaNext folder, as the hub's are. `tower_act` quick_gelu: open_clip runs the tower;
    with layer-norm eps 1e-6 it stays transformers' CLIPVisionModel. `llm` (a transformers config
    class), `tokenizer`, `template` and `stops` (generation_config's eos tokens; default the
    tokenizer's EOS) give another LLM family; by default LLaMA with llava-1.5's template."""
    import transformers
    from transformers import (CLIPVisionConfig, GenerationConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor)

    tokenizer = tokenizer or build_chat_tokenizer(LLAMA_SPECIALS, "<s>", "</s>", False, True, CORPUS)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.eos_token_id}
    text = getattr(transformers, llm)(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, tie_word_embeddings=False, **ids)
    tower = CLIPVisionConfig(image_size=56, patch_size=7, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, projection_dim=16, hidden_act=tower_act,
                             layer_norm_eps=1e-5 if tower_act == "quick_gelu" else 1e-6)
    config = LlavaNextConfig(vision_config=tower, text_config=text, image_grid_pinpoints=PINS,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    llava = LlavaNextForConditionalGeneration(config).eval()
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in stops] if stops else [tokenizer.eos_token_id]
    llava.generation_config = GenerationConfig(eos_token_id=stop_ids, **{
        k: v for k, v in ids.items() if k != "eos_token_id"})
    llava.save_pretrained(out)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                              image_grid_pinpoints=PINS)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=template).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_next_folder(tmp_path_factory.mktemp("next") / "llava-next")


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_processor.backend == "torchvision"
    return LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(), processor


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmchat") / "next"
    assert main([str(folder), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    from mmchat.model import LoadOptions, load_model

    return load_model(checkpoint, LoadOptions("32bit", "cpu"))


def hf_chat(turns: list[tuple[str, Image.Image | None, str | None]]) -> list[dict]:
    """transformers' messages: (question, image or None, answer or None for the last question)."""
    out = []
    for question, image, answer in turns:
        parts = [{"type": "image", "image": image}] if image is not None else []
        out.append({"role": "user", "content": parts + [{"type": "text", "text": question}]})
        if answer is not None:
            out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


@torch.no_grad()
def transformers_turn(llava, inputs: dict) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (a final stop id included) and the logits [n, V] each was picked from."""
    out = llava.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.stack(out.logits)[:, 0].float()


@torch.no_grad()
def mmchat_logits(model, rendered, pictures: list[Image.Image], chosen: list[int]) -> torch.Tensor:
    """mmchat's logits [len(chosen), V] for each picked token, from one forward over prompt + picks."""
    ids = torch.tensor([rendered.input_ids + chosen[:-1]])
    mask = torch.tensor([rendered.image_mask + [False] * (len(chosen) - 1)])
    logits = model.llm(inputs_embeds=model.embed(ids, mask, model.encode_each(pictures))).logits[0]
    return logits[len(rendered.input_ids) - 1:].float()


def chat_as_transformers(model, llava, processor, turns: list[tuple[str, Image.Image | None]]) -> list[list[int]]:
    """Ask `turns` in one ChatSession and in transformers; each turn's ids, logits and tokens must agree.
    Returns mmchat's answer ids per turn."""
    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig

    session, history, answers = ChatSession(model), [], []
    template = resolve_template(model.config.template, model.tokenizer)
    stop = model.tokenizer.eos_token_id
    for turn, (question, image) in enumerate(turns):
        inputs = processor_inputs(processor, hf_chat(history + [(question, image, None)]))
        theirs, theirs_logits = transformers_turn(llava, inputs)
        "".join(session.ask(question, image, GenerationConfig(temperature=0, max_new_tokens=NEW_TOKENS)))
        pictures = [im for _, im, *_ in [*history, (question, image)] if im is not None]
        rendered = render(session.messages[:-1], template, model.tokenizer, model.image_token_counts(pictures),
                          add_generation_prompt=True, image_token_id=model.config.image_token_id)
        assert rendered.input_ids == inputs["input_ids"][0].tolist(), f"turn {turn + 1}: ids"
        ours = session.last_stats.answer_ids
        chosen = ours + [stop] if len(ours) < NEW_TOKENS else ours  # mmchat drops the stop id it stopped at
        ours_logits = mmchat_logits(model, rendered, pictures, chosen)
        assert chosen == theirs, f"turn {turn + 1}"
        torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-4, rtol=0)
        history.append((question, image, processor.decode(theirs, skip_special_tokens=True).strip()))
        assert session.messages[-1].text == history[-1][2]
        answers.append(ours)
    return answers


def test_conversion_keeps_the_tiling_and_the_newline(checkpoint, reference, model):
    llava, _ = reference
    config = read_config(checkpoint)
    assert config.vision.anyres.pinpoints == PINS and config.vision.anyres.max_tiles is None
    assert config.vision.library == "open_clip" and config.template == "chat"
    assert config.image_token_id == llava.config.image_token_index
    assert torch.equal(read_projector_state(checkpoint)["image_newline"], llava.model.image_newline.float())
    assert torch.equal(model.projector.image_newline, llava.model.image_newline.float())


@pytest.mark.parametrize("name", ["grace_hopper", "cheetah", "tower"])
def test_tiles_equal_the_default_processor_to_the_bit(model, reference, name):
    assert_tiles_equal_the_processors(model, reference[1], sample_photo(name))


def test_checkpoints_without_anyres_load_unchanged(checkpoint):
    from mmchat.config import ModelConfig

    saved = json.loads((checkpoint / "mmchat.json").read_text())
    older = {**saved, "vision": {k: v for k, v in saved["vision"].items() if k != "anyres"}}
    assert ModelConfig.from_dict(older).vision.anyres is None  # an mmchat.json written before NeXT
    assert json.loads(json.dumps(ModelConfig.from_dict(saved).to_dict())) == saved
    with pytest.raises(ValueError, match="not a positive multiple of image_size=56"):
        ModelConfig.from_dict({**saved, "vision": {**saved["vision"], "anyres": {"pinpoints": [[56, 100]]}}})


@pytest.mark.parametrize("name", list(GRIDS))
def test_answers_as_transformers_over_two_turns(name, model, reference):
    llava, processor = reference
    picture = images()[name]
    assert grid_shape((picture.height, picture.width), model.anyres) == GRIDS[name]
    counts = model.image_token_counts([picture])
    assert [f.shape[0] for f in model.encode_each([picture])] == counts
    answers = chat_as_transformers(model, llava, processor, [(QUESTIONS[0], picture), (QUESTIONS[1], None)])
    assert all(answers)


def test_two_images_of_different_shapes_in_one_conversation(model, reference):
    llava, processor = reference
    pictures = images()
    counts = model.image_token_counts([pictures["photo"], pictures["wide"]])
    assert counts[0] != counts[1]
    chat_as_transformers(model, llava, processor, [(QUESTIONS[0], pictures["photo"]), (QUESTIONS[1], pictures["wide"])])


def test_multi_turn_chat_equals_full_reprefill(model):
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


def test_transformers_tower_answers_as_transformers(tmp_path):
    """A CLIP open_clip cannot run exactly (eps 1e-6) stays transformers' model and tiles the same way."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mmchat.model import LoadOptions, load_model

    folder = build_next_folder(tmp_path / "llava-next", tower_act="gelu", seed=1)
    assert main([str(folder), str(tmp_path / "mmchat")]) == 0
    model = load_model(tmp_path / "mmchat", LoadOptions("32bit", "cpu"))
    assert model.config.vision.library == "transformers"
    llava = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    chat_as_transformers(model, llava, AutoProcessor.from_pretrained(folder), [(QUESTIONS[0], images()["wide"])])


def test_cli_answers_a_next_folder_as_transformers(folder, reference, tmp_path, monkeypatch, capsys):
    from mmchat.cli import main as cli

    llava, processor = reference
    picture = images()["tall"]
    tokens, _ = transformers_turn(llava, processor_inputs(processor, hf_chat([(QUESTIONS[0], picture, None)])))
    picture.save(tmp_path / "tall.png")
    monkeypatch.setenv("MMCHAT_CACHE", str(tmp_path / "cache"))
    assert cli(["--model", str(folder), "--image", str(tmp_path / "tall.png"), "--prompt", QUESTIONS[0],
                "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--json"]) == 0
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"answers": [expected]}


def test_what_is_not_supported_is_refused_in_one_line(folder, tmp_path, capsys):
    # The processor tiling on other pinpoints than the model packs on: transformers would mix them up.
    other = shutil.copytree(folder, tmp_path / "other")
    saved = json.loads((other / "processor_config.json").read_text())
    saved["image_processor"]["image_grid_pinpoints"] = PINS[:3]
    (other / "processor_config.json").write_text(json.dumps(saved))
    line = one_line_error(capsys, [str(other), str(tmp_path / "dst")])
    assert "image_grid_pinpoints" in line and not (tmp_path / "dst").exists()


def test_the_status_line_says_anyres(model, checkpoint):
    from mmchat.model import LoadOptions
    from mmchat.serving.config import ServeConfig
    from mmchat.serving.loaded_model import describe

    line = describe(model, ServeConfig(model=str(checkpoint)), LoadOptions(load_in="32bit", device="cpu"))
    assert f"AnyRes: {model.image_tokens} tokens per tile" in line and "tokens per image" not in line
