"""The cross-attention resampler projector (`projector.type: resampler`): shapes, parameter names and
count, 2-D positions that matter, stage 1 + stage 2 training on the tiny model (loss falls, resume is
exact, the model learns the colours), chat = full re-prefill, the API and eval, the llava-hf refusal."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.build import read_projector
from finetune.qlora import main as qlora_main
from finetune.train import train
from finetune.train_config import ConfigError, parse_args
from mmchat.chat import ChatSession
from mmchat.config import ProjectorConfig
from mmchat.conversation import render
from mmchat.generate import GenerationConfig
from mmchat.model import LoadOptions, load_llm, load_model
from mmchat.projector import build_projector, patch_grid, sincos_2d
from mmchat.templates import get_template
from test_chat import naive_greedy
from tiny_models import COLOURS, build_checkpoint, one_torch_thread, tiny_train_config

NAMES = {"query", "kv_proj.weight", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias", "attn.in_proj_weight",
         "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_post.weight", "ln_post.bias",
         "proj.weight", "proj.bias"}
QUERIES = 8
"""The trained tiny model's queries: half the tiny CLIP's 16 patches."""
GREEDY = GenerationConfig(max_new_tokens=10, temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def resampler_params(in_dim: int, dim: int, queries: int) -> int:
    """queries + kv_proj (no bias) + three LayerNorms + attention (in and out) + the output linear."""
    return queries * dim + in_dim * dim + 3 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * dim + dim)


# ---------------------------------------------------------------- the module


def test_shapes_parameter_names_and_count():
    cfg = ProjectorConfig("resampler", in_dim=32, out_dim=64, queries=5)
    assert cfg.heads == 1  # 64 / 128, at least one
    projector = build_projector(cfg)
    assert set(projector.state_dict()) == NAMES
    assert projector(torch.randn(3, 16, 32)).shape == (3, 5, 64)  # 16 patches in, 5 tokens out
    assert projector(torch.randn(2, 576, 32)).shape == (2, 5, 64)  # any square grid, the same queries
    assert sum(p.numel() for p in projector.parameters()) == resampler_params(32, 64, 5)
    # LLaVA-1.5's widths: 64 tokens instead of 576, for 88.4M parameters instead of the MLP's 21.0M.
    big = ProjectorConfig("resampler", in_dim=1024, out_dim=4096)
    assert (big.queries, big.heads) == (64, 32)
    assert sum(p.numel() for p in build_projector(big).parameters()) == resampler_params(1024, 4096, 64) == 88_387_584
    assert sum(p.numel() for p in build_projector(ProjectorConfig(in_dim=1024, out_dim=4096)).parameters()) == 20_979_712


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="queries=0"):
        ProjectorConfig("resampler", 32, 64, queries=0)
    with pytest.raises(ValueError, match="heads=3 does not divide out_dim=64"):
        ProjectorConfig("resampler", 32, 64, heads=3)
    with pytest.raises(ValueError, match="out_dim=66: .* multiple of 4"):
        ProjectorConfig("resampler", 32, 66, heads=1)
    with pytest.raises(ValueError, match="heads=4 with type 'mlp2x_gelu', which has no attention"):
        ProjectorConfig("mlp2x_gelu", 32, 64, heads=4)
    with pytest.raises(ValueError, match="queries=8, heads=None with type 'linear', which has no attention"):
        ProjectorConfig("linear", 32, 64, queries=8)
    assert (ProjectorConfig().queries, ProjectorConfig().heads) == (None, None)  # an MLP's mmchat.json: nulls
    assert patch_grid(576) == 24
    with pytest.raises(ValueError, match="17 vision features .* not a square; use vision select_feature 'patch'"):
        build_projector(ProjectorConfig("resampler", 32, 64))(torch.randn(1, 17, 32))  # a class token + 16 patches
    with pytest.raises(ConfigError, match="--resampler-queries 8 needs --projector-type resampler"):
        parse_args(["--llm", "x", "--data", "d", "--output-dir", "o", "--resampler-queries", "8"])
    with pytest.raises(ConfigError, match="Can't provide both --model and --projector-type"):
        parse_args(["--model", "x", "--data", "d", "--output-dir", "o", "--projector-type", "resampler"])


def test_sincos_positions_are_maes_and_patch_positions_matter(monkeypatch):
    pos = sincos_2d(2, 8)  # 2 × 2 patches, frequencies 1 and 1/100 per axis
    row0_col1 = [0, 0, 1, 1, np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)]
    assert pos.shape == (4, 8) and torch.allclose(pos[1], torch.tensor(row0_col1, dtype=torch.float32))
    assert torch.equal(pos[2, 4:], pos[0, 4:]) and torch.equal(pos[2, :4], pos[3, :4])  # (1, 0): column 0, row 1
    assert len({tuple(row.tolist()) for row in sincos_2d(24, 64)}) == 576  # every patch its own position

    torch.manual_seed(0)
    projector = build_projector(ProjectorConfig("resampler", 32, 64, queries=4)).eval()
    features, shuffle = torch.randn(1, 16, 32), torch.randperm(16)
    with torch.no_grad():
        moved = (projector(features) - projector(features[:, shuffle])).abs().max()
        # Without the positions, cross-attention cannot tell a shuffled image from the original.
        monkeypatch.setattr("mmchat.projector.sincos_2d", lambda grid, dim: torch.zeros(grid * grid, dim))
        blind = (projector(features) - projector(features[:, shuffle])).abs().max()
    assert moved > 0.05 and blind < 1e-5, (moved, blind)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def stage1(tiny_train_checkpoint, colour_data, tmp_path_factory):
    """Stage 1 from parts with a new resampler, through the command's flags."""
    out = tmp_path_factory.mktemp("resampler") / "stage1"
    args = ["--config", str(tiny_config("align")), "--llm", str(tiny_train_checkpoint / "llm"),
            "--vision", str(tiny_train_checkpoint), "--projector-type", "resampler", "--resampler-queries", str(QUERIES),
            "--data", str(colour_data), "--image-root", str(colour_data.parent), "--output-dir", str(out),
            "--max-steps", "12", "--no-progress"]
    with one_torch_thread():
        assert qlora_main(args) == 0
    return out


@pytest.fixture(scope="module")
def stage2(stage1, colour_data, tmp_path_factory):
    """Stage 2 (4-bit QLoRA + the resampler) from stage 1's output, 40 steps."""
    out = tmp_path_factory.mktemp("resampler") / "stage2"
    with one_torch_thread():
        return train(tiny_train_config("instruct", model=str(stage1), data=str(colour_data),
                                       image_root=str(colour_data.parent), output_dir=str(out), max_steps=40))


def tiny_config(name: str) -> Path:
    return Path(__file__).resolve().parent / "configs" / f"tiny-{name}.yaml"


def log_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_stage1_trains_only_a_new_resampler(stage1, tiny_train_checkpoint):
    losses = log_losses(stage1)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3]), losses
    config = json.loads((stage1 / "mmchat.json").read_text())["projector"]
    assert config == {"type": "resampler", "in_dim": 32, "out_dim": 64, "bias": True, "act": "gelu",
                      "queries": QUERIES, "heads": 1}
    assert set(load_file(str(stage1 / "projector.safetensors"))) == NAMES
    model = load_model(stage1, LoadOptions("4bit", "cpu"))
    assert model.image_tokens == QUERIES
    fresh = load_llm(str(tiny_train_checkpoint / "llm"), LoadOptions("4bit", "cpu")).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.llm.state_dict().items())  # the LLM did not train


def test_stage2_learns_the_colours_through_the_resampler(stage2, stage1, colour_data):
    from finetune.eval import EvalConfig, evaluate

    losses = [r["loss"] for r in stage2.history]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.1 * np.mean(losses[:3]), losses
    start, trained = read_projector(stage1), stage2.built.model.projector.state_dict()
    assert all(not torch.equal(start[k], v.cpu()) for k, v in trained.items())  # every resampler tensor trained
    model = load_model(stage2.output, LoadOptions("4bit", "cpu"))
    answers = {c: "".join(ChatSession(model).ask("What colour is it?", colour_data.parent / "images" / f"{c}.png", GREEDY))
               for c in COLOURS}
    assert answers == {c: c for c in COLOURS}
    result = evaluate(EvalConfig(str(stage2.output), colour_data, colour_data.parent, load_in="4bit", device="cpu",
                                 limit=8, progress=False))
    assert result["questions"] == 8 and result["accuracy"] == 1.0, result


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_resume_equals_a_straight_run(stage, stage1, colour_data, tmp_path):
    def cfg(out, **extra):
        return tiny_train_config(stage, model=str(stage1), data=str(colour_data), image_root=str(colour_data.parent),
                                 output_dir=str(out), max_steps=6, batch_size=2, grad_accum=2, **extra)

    straight = train(cfg(tmp_path / "a"))
    assert not train(cfg(tmp_path / "b", stop_after=3)).finished
    resumed = train(cfg(tmp_path / "b", resume=True))
    assert resumed.finished and resumed.state.step == 6
    names = ["projector.safetensors"] + (["adapter/adapter_model.safetensors"] if stage == "instruct" else [])
    for name in names:
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(load_file(str(tmp_path / "a" / names[0]))["query"], read_projector(stage1)["query"])
    assert log_losses(tmp_path / "b") == [r["loss"] for r in straight.history]


def test_a_new_resampler_refuses_a_class_token_in_one_line(tiny_train_checkpoint, colour_data, tmp_path, monkeypatch,
                                                           capsys):
    from tiny_models import CLIP_PREPROCESS, TINY_CLIP_CFG, register_open_clip_tower

    register_open_clip_tower(monkeypatch, "mmchat-tiny-clip", TINY_CLIP_CFG, tmp_path / "open_clip",
                             {**CLIP_PREPROCESS, "quick_gelu": True})
    args = ["--config", str(tiny_config("align")), "--llm", str(tiny_train_checkpoint / "llm"), "--vision",
            "mmchat-tiny-clip", "--vision-pretrained", "tiny", "--projector-type", "resampler", "--data", str(colour_data),
            "--image-root", str(colour_data.parent), "--max-steps", "1", "--no-progress"]
    assert qlora_main([*args, "--vision-select-feature", "cls_patch", "--output-dir", str(tmp_path / "a")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: --projector-type resampler: the resampler places the 17 vision "
                                                   "features on a square grid"), lines
    assert qlora_main([*args, "--output-dir", str(tmp_path / "b")]) == 0  # the 16 patches alone: a 4 × 4 grid


# ---------------------------------------------------------------- chat, API, export


@pytest.fixture(scope="module")
def resampler_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """A random tiny checkpoint with a resampler of 64 queries on the tiny CLIP's 16 patches."""
    return build_checkpoint(tmp_path_factory.mktemp("resampler-ckpt") / "tiny", tiny_tokenizer_dir,
                            projector_type="resampler")


def test_chat_turns_equal_a_full_reprefill(resampler_checkpoint):
    model = load_model(resampler_checkpoint, LoadOptions("32bit", "cpu"))
    assert model.image_tokens == 64 != 16
    red = Image.new("RGB", (48, 30), "white")
    red.paste((220, 20, 20), (10, 5, 30, 25))
    blue = Image.new("RGB", (30, 30), (20, 40, 220))
    encoded = []
    original = model.encode_images
    model.encode_images = lambda px: encoded.append(len(px)) or original(px)
    try:
        s = ChatSession(model)
        "".join(s.ask("What colour is the shape?", red, GREEDY))
        "".join(s.ask("And where is it?", None, GREEDY))
        "".join(s.ask("And this one?", blue, GREEDY))
        "".join(s.ask("Is it big?", None, GREEDY))
    finally:
        model.encode_images = original
    assert encoded == [1, 1] and s.last_stats.prompt_tokens > 3 * s.last_stats.prefill_tokens
    prompt = render(s.messages[:-1], get_template(model.config.template), model.tokenizer, model.image_tokens, True)
    assert sum(prompt.image_mask) == 2 * 64
    for turn, images in ((0, [red]), (1, [red]), (2, [red, blue]), (3, [red, blue])):
        assert naive_greedy(model, s.messages[:2 * turn + 1], images, GREEDY.max_new_tokens) == s.messages[2 * turn + 1].text


def test_api_answers_as_a_fresh_session(resampler_checkpoint):
    from fastapi.testclient import TestClient

    from mmchat.conversation import ASSISTANT, USER, Message
    from mmchat.serving.api import create_app
    from mmchat.serving.api_requests import image_key
    from mmchat.serving.sessions import prepare_image

    model = load_model(resampler_checkpoint, LoadOptions("32bit", "cpu"))
    png = io.BytesIO()
    Image.new("RGB", (40, 30), COLOURS["blue"]).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    first = [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                          {"type": "image_url", "image_url": {"url": url}}]}]

    def ask(client, messages) -> dict:
        response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8,
                                                              "temperature": 0})
        assert response.status_code == 200, response.text
        return response.json()

    with TestClient(create_app(model, "tiny")) as client:
        one = ask(client, first)["choices"][0]["message"]["content"]
        two = ask(client, first + [{"role": "assistant", "content": one}, {"role": "user", "content": "And then?"}])
    assert 64 < two["usage"]["prompt_tokens_details"]["cached_tokens"] < two["usage"]["prompt_tokens"]
    image = prepare_image(png.getvalue())
    cold = ChatSession(model).answer(
        [Message(USER, "Describe it.", 1), Message(ASSISTANT, one.strip()), Message(USER, "And then?")],
        [(image_key(image), image)], GenerationConfig(max_new_tokens=8, temperature=0))
    assert "".join(cold) == two["choices"][0]["message"]["content"]


def test_to_llava_hf_refuses_the_resampler_in_one_line(stage2, tmp_path, capsys):
    from mmchat.convert.cli import main as convert_main

    assert convert_main(["--to", "llava-hf", str(stage2.output), str(tmp_path / "export")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {stage2.output}: projector type 'resampler' has no llava-hf equivalent (llava-hf projects "
                     "each patch to one token); the checkpoint runs in mmchat's chat, app, server and eval"]
    assert not (tmp_path / "export").exists()
