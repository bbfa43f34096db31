"""`python -m mmchat.convert`: converted models give the reference model's features, logits and tokens."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmchat.convert.clip_weights import hf_to_open_clip, open_clip_to_hf
from mmchat.checkpoint import read_config
from mmchat.conversation import USER, Message, render
from mmchat.convert.cli import main
from mmchat.convert.from_llava import resolve_tower
from mmchat.convert.to_llava_hf import chat_template
from mmchat.image import preprocess
from mmchat.model import LoadOptions, load_model
from mmchat.templates import get_template, prompt_text, segments
from mmchat.vision import image_features
from tiny_models import build_original_llava

REPO = Path(__file__).resolve().parents[1]
QUESTION = "what colour is the circle?"
NEW_TOKENS = 20


def convert_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmchat.convert", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


def converted(src: Path, dst: Path, *flags: str, cli: bool = False) -> Path:
    """Run the converter: as `python -m mmchat.convert`, or in-process through the same `main` (faster)."""
    if cli:
        proc = convert_cli(*flags, src, dst)
        assert proc.returncode == 0, proc.stderr
    else:
        assert main([*flags, str(src), str(dst)]) == 0
    return dst


def sample_image() -> Image.Image:
    # Not square, so LLaVA's pad-to-square matters.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (30, 48, 3), dtype=np.uint8))


def prompt(model):
    """Rendered ids [1, L], image mask [1, L] and pixels [1, 3, S, S] for one question about one image."""
    rendered = render([Message(USER, QUESTION, images=1)], get_template(model.config.template), model.tokenizer,
                      model.image_tokens, add_generation_prompt=True, image_token_id=model.config.image_token_id)
    ids = torch.tensor([rendered.input_ids])
    mask = torch.tensor([rendered.image_mask])
    pixels = preprocess(sample_image(), model.config.vision)[None]
    return ids, mask, pixels


@torch.no_grad()
def greedy_mmchat(model, ids, mask, pixels, eos: int) -> list[int]:
    """Plain greedy decoding over `MultimodalModel.forward`, no KV cache."""
    out = []
    for _ in range(NEW_TOKENS):
        token = int(model(input_ids=ids, image_mask=mask, pixel_values=pixels).logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        mask = torch.cat([mask, torch.tensor([[False]])], dim=1)
    return out


@torch.no_grad()
def check_parity(checkpoint: Path, reference) -> float:
    """Features, logits at every position and 20 greedy tokens of `checkpoint` equal `reference`'s
    (a `LlavaForConditionalGeneration`); returns the max abs logit difference."""
    model = load_model(checkpoint, LoadOptions(load_in="32bit", device="cpu"))
    ids, mask, pixels = prompt(model)
    assert int(mask.sum()) == 16

    ours = image_features(model.vision, pixels, model.config.vision)
    theirs = reference.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    ref_ids = ids.masked_fill(mask, reference.config.image_token_index)  # llava-hf finds slots by its id
    logits = model(input_ids=ids, image_mask=mask, pixel_values=pixels).logits
    ref_logits = reference(input_ids=ref_ids, pixel_values=pixels).logits
    vocab = logits.shape[-1]
    diff = (logits - ref_logits[..., :vocab]).abs().max().item()
    assert diff <= 1e-4, diff

    eos = model.tokenizer.eos_token_id
    tokens = greedy_mmchat(model, ids, mask, pixels, eos)
    generated = reference.generate(input_ids=ref_ids, attention_mask=torch.ones_like(ref_ids), pixel_values=pixels,
                                   max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert tokens == generated[0, ids.shape[1]:].tolist()
    print(f"{checkpoint.name}: max |logit diff| = {diff:.2e}, greedy tokens {tokens}")
    return diff


def hub_layout(folder: Path, out: Path) -> Path:
    """A copy of a llava-hf folder with the hub checkpoints' key names (`vision_tower.vision_model.*`)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("layout", ["saved", "hub"])
def test_llava_hf_to_mmchat(tiny_llava_hf_model, tmp_path, layout):
    folder, reference = tiny_llava_hf_model
    if layout == "hub":
        checkpoint = converted(hub_layout(folder, tmp_path / "llava-1.5-tiny-hf"), tmp_path / "mmchat")
    else:
        checkpoint = converted(folder, tmp_path / "mmchat", cli=True)
    config = read_config(checkpoint)
    assert config.image_token_id == reference.config.image_token_index
    # The tiny folder's processor is a CLIPImageProcessor (no do_pad), as the hub's llava-1.5-7b-hf: no pad, crop.
    assert (config.vision.select_layer, config.vision.select_feature, config.vision.pad_to_square) == (-2, "patch", False)
    assert config.vision.image_size == 32 and config.projector.type == "mlp2x_gelu"
    check_parity(checkpoint, reference)
    if layout == "saved":  # and back: llava-hf -> mmchat -> llava-hf reproduces every tensor exactly
        from transformers import LlavaForConditionalGeneration

        back = converted(checkpoint, tmp_path / "back", "--to", "llava-hf")
        back = LlavaForConditionalGeneration.from_pretrained(back).state_dict()
        state = reference.state_dict()
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("weights", ["sharded", "bin"])
def test_original_llava_to_mmchat(tiny_llava_hf_model, tiny_tokenizer_dir, tmp_path, weights):
    _, reference = tiny_llava_hf_model
    original = build_original_llava(tmp_path / "llava-v1.5-tiny", reference, tiny_tokenizer_dir, weights)
    checkpoint = converted(original, tmp_path / "mmchat")
    config = read_config(checkpoint)
    assert config.image_token_id is None and config.vision.pretrained is None
    assert config.vision.pad_to_square  # `image_aspect_ratio: pad`, whatever the tower's processor says
    check_parity(checkpoint, reference)


def test_mmchat_to_llava_hf_round_trip(tiny_checkpoint, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = converted(tiny_checkpoint, tmp_path / "llava-hf", "--to", "llava-hf")
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    check_parity(tiny_checkpoint, llava)  # features, logits and greedy tokens

    model = load_model(tiny_checkpoint, LoadOptions(load_in="32bit", device="cpu"))
    _, _, pixels = prompt(model)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert llava.config.image_token_index == image_id == len(model.tokenizer)  # added, vocabulary grew
    assert llava.config.text_config.vocab_size % 64 == 0

    # The processor: same prompt string as mmchat's template, one image -> 16 slots, padded pixels.
    messages = [Message(USER, QUESTION, images=1)]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == prompt_text(segments(get_template("llava_v1"), messages, True))
    batch = processor(text=text, images=sample_image(), return_tensors="pt")
    assert int((batch["input_ids"] == image_id).sum()) == 16
    assert processor.image_processor.do_pad
    # transformers resizes with torchvision, mmchat with PIL: same geometry, slightly different filters.
    pixel_diff = (batch["pixel_values"] - pixels).abs()
    print(f"processor vs mmchat pixels: mean |diff| {pixel_diff.mean():.3f}, max {pixel_diff.max():.3f}")
    assert pixel_diff.max() < 0.05


HUB_KEY_PREFIXES = ("vision_tower.vision_model.", "language_model.model.", "language_model.lm_head.",
                    "multi_modal_projector.", "image_newline")
"""How the hub's llava-hf folders name their weights (llava-1.5-7b-hf's index); vLLM loads only these for the tower."""


def check_hub_layout(folder: Path, model_class) -> None:
    """`folder`'s weights carry the hub's key names and load into `model_class` with nothing missing or left over."""
    from safetensors import safe_open

    keys = [k for f in folder.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert keys and all(k.startswith(HUB_KEY_PREFIXES) for k in keys), sorted(set(k.split(".")[1] for k in keys))
    assert any(k.startswith("vision_tower.vision_model.embeddings.") for k in keys)
    _, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_llava_hf_export_writes_the_hub_layout(tiny_checkpoint, tmp_path):
    """vLLM refuses transformers 5's own `vision_tower.embeddings...`; the export renames it in place, and
    transformers still reloads every tensor and answers as mmchat."""
    from transformers import LlavaForConditionalGeneration

    out = converted(tiny_checkpoint, tmp_path / "llava-hf", "--to", "llava-hf")
    check_hub_layout(out, LlavaForConditionalGeneration)
    check_parity(tiny_checkpoint, LlavaForConditionalGeneration.from_pretrained(out).eval())


def test_chat_template_multi_turn():
    from jinja2 import Template

    from mmchat.conversation import ASSISTANT

    messages = [Message(USER, "hi", images=1), Message(ASSISTANT, "hello"), Message(USER, "and?")]
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    text = Template(chat_template("llava_v1")).render(messages=conversation, add_generation_prompt=True)
    assert text == prompt_text(segments(get_template("llava_v1"), messages, True))


def test_clip_state_round_trip():
    """HF -> open_clip -> HF is the identity, including `visual_projection` <-> `proj`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from tiny_models import TINY_HF_CLIP_CFG

    torch.manual_seed(0)
    state = CLIPVisionModel(CLIPVisionConfig(**TINY_HF_CLIP_CFG)).state_dict()
    projection = torch.randn(16, 32)
    oc = hf_to_open_clip(state, 3, projection, 16)
    back, back_projection = open_clip_to_hf(oc, 3)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert torch.equal(back_projection, projection)
    assert torch.equal(hf_to_open_clip(state, 3, None, 16)["proj"], torch.zeros(32, 16))


def test_resolve_checkpoint_converts_once(tiny_llava_hf_dir, tmp_path):
    from mmchat.checkpoint import is_checkpoint
    from mmchat.convert import resolve_checkpoint

    first = resolve_checkpoint(tiny_llava_hf_dir, cache_dir=tmp_path)
    assert is_checkpoint(first)
    mtime = (first / "mmchat.json").stat().st_mtime_ns
    assert resolve_checkpoint(tiny_llava_hf_dir, cache_dir=tmp_path) == first
    assert (first / "mmchat.json").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- errors: one line, exit 2


def one_line_error(capsys, argv: list) -> str:
    capsys.readouterr()  # drop what setup printed
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Progress lines may come first; the error itself is the one last line, with no traceback.
    assert err[-1].startswith("error: ") and all(line.startswith("[convert]") for line in err[:-1]), err
    return err[-1]


def test_hub_id_offline_is_one_line(tmp_path):
    proc = convert_cli("someone/llava-v1.5-7b", tmp_path / "out", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'someone/llava-v1.5-7b'" in lines[0] and "local folder" in lines[0]
    assert not (tmp_path / "out").exists()


def test_errors(capsys, tmp_path, tiny_checkpoint, tiny_llava_hf_dir):
    unknown = tmp_path / "bert"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert "'bert'" in one_line_error(capsys, [unknown, tmp_path / "out"])
    assert "no config.json" in one_line_error(capsys, [tmp_path, tmp_path / "out"])
    assert "does not exist" in one_line_error(capsys, [tmp_path / "missing", tmp_path / "out"])
    assert "already exists" in one_line_error(capsys, [tiny_llava_hf_dir, unknown])
    assert "already an mmchat checkpoint" in one_line_error(capsys, [tiny_checkpoint, tmp_path / "out"])
    assert "not an mmchat checkpoint" in one_line_error(capsys, ["--to", "llava-hf", tiny_llava_hf_dir, tmp_path / "out"])
    assert "--vision-tower" in one_line_error(capsys, ["--to", "llava-hf", "--vision-tower", "x/y", tiny_checkpoint, tmp_path / "o"])
    assert "--pad/--no-pad" in one_line_error(capsys, ["--to", "llava-hf", "--no-pad", tiny_checkpoint, tmp_path / "o"])
    assert not (tmp_path / "out").exists()


def test_adapter_checkpoint_must_be_merged(capsys, tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "with-adapter"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "mmchat.json").read_text())
    (ckpt / "mmchat.json").write_text(json.dumps({**config, "adapter": "adapter"}))
    assert "python -m finetune.merge" in one_line_error(capsys, ["--to", "llava-hf", ckpt, tmp_path / "out"])


def test_unknown_vision_tower_names_the_flag(capsys, tmp_path, tiny_tokenizer_dir, tiny_llava_hf_model):
    original = build_original_llava(tmp_path / "orig", tiny_llava_hf_model[1], tiny_tokenizer_dir)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "someone/siglip-so400m"}))
    error = one_line_error(capsys, [original, tmp_path / "out"])
    assert "someone/siglip-so400m" in error and "--vision-tower" in error
    error = one_line_error(capsys, ["--vision-tower", "NoSuchViT/tag", original, tmp_path / "out"])
    assert "NoSuchViT/tag" in error and "--vision-tower" in error
    # A real open_clip NAME/TAG is accepted, then checked against the projector's input width.
    error = one_line_error(capsys, ["--vision-tower", "ViT-L-14-336/openai", original, tmp_path / "out"])
    assert "mm_hidden_size=32" in error and "1024" in error


def test_named_vision_towers():
    """Original checkpoints name OpenAI's CLIP by hub id; open_clip has the same weights under a tag."""
    settings, visual, _, width = resolve_tower("openai/clip-vit-large-patch14-336", from_flag=False)
    assert (settings["open_clip_model"], settings["pretrained"], settings["image_size"], width) == ("ViT-L-14-336", "openai", 336, 1024)
    assert visual is None  # recorded by name; open_clip loads the weights at load time
    settings, _, _, width = resolve_tower("ViT-B-16/openai", from_flag=True)
    assert (settings["open_clip_model"], settings["image_size"], width) == ("ViT-B-16", 224, 768)
