"""A new LLaVA from parts (issue 17): a fresh Qwen2-like LLM with its own ChatML template, and any
open_clip tower with patch tokens (CPU, tiny, no network).

`python -m finetune.qlora --llm QWEN --vision NAME --vision-pretrained TAG`: the towers are tiny open_clip
configs registered here (a SigLIP-shaped `TimmModel`, an OpenAI-CLIP-shaped `VisionTransformer`, an
RN50-shaped `ModifiedResNet`) whose tag names a local weights file, as a downloaded tag would. Stage 1
(projector only) then stage 2 (4-bit NF4 + LoRA, `--template chat`) on a tokenizer with no `<image>` token:
the loss falls, resume is exact, labels are the answers and `<|im_end|>`, and the result chats with
cached decoding equal to re-prefill. Towers that cannot serve are refused in one line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.data.dataset import LlavaDataset, RenderSettings, read_records
from finetune.qlora import main as qlora_main
from finetune.train import train
from mmchat.chat import ChatSession
from mmchat.config import VisionConfig
from mmchat.conversation import IGNORE_INDEX, render
from mmchat.generate import GenerationConfig
from mmchat.image import preprocess
from mmchat.model import LoadOptions, load_model
from mmchat.templates import ASSISTANT, IMAGE_TOKEN, USER, Message, resolve_template
from mmchat.vision import image_features, load_vision_tower, save_vision_tower
from test_chat_templates import CHATML
from tiny_models import (
    CLIP_PREPROCESS, COLOURS, SIGLIP_PREPROCESS, TINY_CLIP_CFG, TINY_RN_CFG, TINY_SIGLIP_CFG, build_colour_data,
    build_qwen2_llm, one_torch_thread, register_open_clip_tower, tiny_train_config,
)

CONFIGS = Path(__file__).resolve().parent / "configs"
SIGLIP, CLIP, RESNET = "mmchat-tiny-siglip", "mmchat-tiny-clip", "mmchat-tiny-rn"
TAG = "tiny"
GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0)
# A chat template that marks answers with {% generation %} and closes them with no token (as llava-1.5's).
NO_END_OF_TURN = (
    "{% for message in messages %}{{ message['role'] + ': ' }}{% if message['content'] is string %}"
    "{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
TEXT_ONLY = (  # Qwen2-Instruct's ChatML as shipped: a message's content is a string
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def towers(tmp_path_factory):
    """The three open_clip towers, named and tagged as if shipped with open_clip (undone afterwards)."""
    folder = tmp_path_factory.mktemp("open_clip")
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        register_open_clip_tower(mp, SIGLIP, TINY_SIGLIP_CFG, folder, SIGLIP_PREPROCESS, TAG)
        register_open_clip_tower(mp, CLIP, TINY_CLIP_CFG, folder, {**CLIP_PREPROCESS, "quick_gelu": True}, TAG)
        register_open_clip_tower(mp, RESNET, TINY_RN_CFG, folder, CLIP_PREPROCESS, TAG)
        yield


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_qwen2_llm(tmp_path_factory.mktemp("qwen2") / "llm", CHATML)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_colour_data(tmp_path_factory.mktemp("colours"), records=32)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, qwen2, data):
    """Stage 1 from parts: the fresh LLM + the SigLIP-shaped tower, projector only."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    cfg = tiny_train_config("align", llm=str(qwen2), vision=SIGLIP, vision_pretrained=TAG, vision_select_layer=["-1"],
                            data=str(data), image_root=str(data.parent), output_dir=str(out), max_steps=8)
    return train(cfg)


def instruct(stage1, data, out, **extra):
    return tiny_train_config("instruct", model=str(stage1.output), template="chat", data=str(data),
                             image_root=str(data.parent), output_dir=str(out), **extra)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, stage1, data):
    """Stage 2: 4-bit NF4 LLM + LoRA, the tokenizer's own ChatML template."""
    return train(instruct(stage1, data, tmp_path_factory.mktemp("stage2") / "run", max_steps=30))


def falls(history) -> bool:
    losses = [r["loss"] for r in history]
    return np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_stage1_takes_the_towers_own_preprocessing_and_trains_the_projector(stage1):
    config = json.loads((stage1.output / "mmchat.json").read_text())
    vision = config["vision"]
    assert (vision["open_clip_model"], vision["pretrained"], vision["select_layer"], vision["select_feature"]) == (
        SIGLIP, TAG, -1, "patch")
    # SigLIP's tag: mean/std 0.5, a plain resize to the square (open_clip's `squash`), no pad.
    assert (vision["image_size"], vision["mean"], vision["std"], vision["resize"], vision["pad_to_square"]) == (
        32, [0.5] * 3, [0.5] * 3, "exact", False)
    assert config["projector"]["in_dim"] == 32 and config["projector"]["out_dim"] == 64 and config["adapter"] is None
    model = stage1.built.model
    assert model.image_tokens == 16  # a 4x4 grid, no class token
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"projector"}
    assert falls(stage1.history)


def test_stage2_chat_template_labels_answers_and_im_end(stage2, data):
    model = stage2.built.model
    tokenizer = model.tokenizer
    assert IMAGE_TOKEN not in tokenizer.get_added_vocab() and tokenizer.bos_token is None
    template = resolve_template("chat", tokenizer)
    assert template.end_of_turn == "<|im_end|>"
    settings = RenderSettings(tokenizer, template, model.image_tokens, None, 512)
    example = LlavaDataset(read_records(data), settings, model.config.vision, data.parent)[0]
    ids, labels, slots = example["input_ids"].tolist(), example["labels"].tolist(), example["image_mask"].tolist()
    assert example["pixel_values"].shape == (1, 3, 32, 32) and sum(slots) == 16
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))
    labelled = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "red<|im_end|>"
    first = labels.index(labelled[0])
    assert labels[first:first + len(labelled)] == labelled  # one run, right after the assistant header
    assert tokenizer.decode([t for t, s in zip(ids[:first], slots) if not s]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\nWhat colour is it?"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert ids[first + len(labelled):] == tokenizer("\n", add_special_tokens=False)["input_ids"]  # unlabelled


def test_stage2_loss_falls_and_only_lora_and_projector_train(stage2, stage1):
    assert stage2.finished and falls(stage2.history)
    config = json.loads((stage2.output / "mmchat.json").read_text())
    assert config["template"] == "chat" and config["adapter"] == "adapter" and config["vision"]["pretrained"] == TAG
    model = stage2.built.model
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"projector", "llm"}
    assert all("lora_" in n for n, p in model.llm.named_parameters() if p.requires_grad)
    assert type(model.llm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    start = load_file(str(stage1.output / "projector.safetensors"))
    assert all(not torch.equal(start[k], v.cpu()) for k, v in model.projector.state_dict().items())


def test_resume_equals_a_straight_run(stage1, data, tmp_path):
    def cfg(out, **extra):
        return instruct(stage1, data, out, max_steps=6, batch_size=2, grad_accum=2, lora_dropout=0.1, **extra)

    straight = train(cfg(tmp_path / "a"))
    assert not train(cfg(tmp_path / "b", stop_after=3)).finished
    resumed = train(cfg(tmp_path / "b", resume=True))
    assert resumed.finished and resumed.state.step == 6
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = [json.loads(line)["loss"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log == [r["loss"] for r in straight.history]


def reprefill(model, template, messages, feats, max_new_tokens: int) -> str:
    """Greedy decoding that re-reads the whole conversation for every token (no cache)."""
    r = render(messages, template, model.tokenizer, model.image_tokens, add_generation_prompt=True)
    ids, mask, out = list(r.input_ids), list(r.image_mask), []
    stops = {model.tokenizer.eos_token_id, model.tokenizer.convert_tokens_to_ids(template.end_of_turn)}
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model.llm(inputs_embeds=model.embed(torch.tensor([ids]), torch.tensor([mask]), feats)).logits[0, -1].argmax())
            if token in stops:
                break
            ids, mask, out = ids + [token], mask + [False], out + [token]
    return model.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_trained_model_loads_and_chats_with_cache_equal_to_reprefill(stage2, data):
    model = load_model(stage2.output, LoadOptions("32bit", "cpu"))
    red = Image.open(data.parent / "images" / "red.png")
    session = ChatSession(model)
    answers = ["".join(session.ask("What colour is it?", red, GREEDY)), "".join(session.ask("Is it red?", None, GREEDY))]
    assert answers[0] == "red"
    assert session.last_stats.prefill_tokens < session.last_stats.prompt_tokens / 2  # turn 2 reused the cache
    template = resolve_template("chat", model.tokenizer)
    feats = model.encode_images(preprocess(red, model.config.vision).unsqueeze(0))
    for turn in range(2):
        assert reprefill(model, template, session.messages[: 2 * turn + 1], feats, GREEDY.max_new_tokens) == answers[turn]
    # Every colour, each in a fresh session.
    images = {c: data.parent / "images" / f"{c}.png" for c in COLOURS}
    assert {c: "".join(ChatSession(model).ask("What colour is it?", p, GREEDY)) for c, p in images.items()} == {c: c for c in COLOURS}


def test_timm_tower_saved_into_a_checkpoint_loads_back(tmp_path):
    import open_clip

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in (SIGLIP, CLIP):
        named = load_vision_tower(VisionConfig(open_clip_model=name, pretrained=TAG))
        save_vision_tower(named, open_clip.get_model_config(name), tmp_path / name)
        back = load_vision_tower(VisionConfig(open_clip_model=name, pretrained=None), tmp_path / name)
        assert type(back) is type(named)
        cfg = VisionConfig(open_clip_model=name, pretrained=None, select_layer=[-2, -1])
        assert torch.equal(image_features(back, x, cfg), image_features(named, x, cfg)), name


def test_clip_tower_layer_list_concatenates_widths_and_keeps_clip_preprocessing(qwen2, data, tmp_path):
    from finetune.build import build_model

    cfg = tiny_train_config("align", llm=str(qwen2), vision=CLIP, vision_pretrained=TAG, vision_select_layer=["-2", "-1"],
                            data=str(data), output_dir=str(tmp_path))
    model = build_model(cfg, "cpu").model
    vision = model.config.vision
    assert (vision.select_layer, vision.resize, vision.pad_to_square, vision.image_size) == ([-2, -1], "shortest_edge", True, 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    both = image_features(model.vision, x, vision)
    assert both.shape == (2, 16, 32 * 2) and model.config.projector.in_dim == 64
    single = [image_features(model.vision, x, VisionConfig(pretrained=None, select_layer=layer)) for layer in (-2, -1)]
    assert torch.equal(both, torch.cat(single, dim=-1))


def error_line(capsys, *args) -> str:
    assert qlora_main([*args, "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_towers_and_templates_that_cannot_serve_are_refused_in_one_line(qwen2, data, tmp_path, capsys):
    base = ["--config", str(CONFIGS / "tiny-align.yaml"), "--data", str(data), "--image-root", str(data.parent),
            "--output-dir", str(tmp_path / "out"), "--overwrite", "--vision-pretrained", TAG]
    message = error_line(capsys, *base, "--llm", str(qwen2), "--vision", RESNET)
    assert RESNET in message and "ModifiedResNet gives no patch tokens" in message and "SigLIP" in message
    message = error_line(capsys, *base, "--llm", str(qwen2), "--vision", SIGLIP, "--vision-select-feature", "cls_patch")
    assert SIGLIP in message and "no class token" in message and "--vision-select-feature" in message
    message = error_line(capsys, *base, "--llm", str(qwen2), "--vision", CLIP, "--vision-select-layer", "-2", "-9")
    assert "--vision-select-layer" in message and "select_layer=-9 is out of range for a 3-block tower" in message
    assert "not an open_clip model name" in error_line(capsys, *base, "--llm", str(qwen2), "--vision", "no-such-tower")
    # A chat template that closes answers with no token (it marks them with {% generation %}): nothing to stop on.
    silent = tmp_path / "silent-llm"
    shutil.copytree(qwen2, silent)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(silent)
    tokenizer.chat_template = NO_END_OF_TURN
    tokenizer.save_pretrained(silent)
    assert resolve_template("chat", tokenizer).end_of_turn is None
    message = error_line(capsys, *base, "--llm", str(silent), "--vision", SIGLIP, "--template", "chat")
    assert message.startswith("error: --template chat:") and "never learn to stop" in message
    # A text-only template (a stock LLM's: content must be a string) takes LLaVA-OneVision's format:
    # `<image>\n` before the user's text, the answer labelled up to and with <|im_end|>.
    tokenizer.chat_template = TEXT_ONLY
    template = resolve_template("chat", tokenizer)
    assert template.user_text and template.end_of_turn == "<|im_end|>"
    rendered = render([Message(USER, "Colour?", 1), Message(ASSISTANT, "red")], template, tokenizer, 4)
    assert tokenizer.decode([t for t in rendered.labels if t != IGNORE_INDEX]) == "red<|im_end|>"
    assert sum(rendered.image_mask) == 4
    assert tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.image_mask) if not m]) == (
        "<|im_start|>user\n\nColour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
