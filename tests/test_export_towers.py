"""`--to llava-hf` for a model mmchat trained on an open_clip timm ViT trunk (SigLIP, SigLIP2: no class token):
the tower becomes transformers' `SiglipVisionModel` and the exported folder, run by `LlavaForConditionalGeneration`
and `AutoProcessor`, gives mmchat's pixels, features and logits (CPU, tiny, no network). Trunks transformers'
SigLIP cannot compute exactly are refused in one line, with nothing written."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch

from mmchat.checkpoint import save_checkpoint
from mmchat.config import ModelConfig, ProjectorConfig, VisionConfig
from mmchat.image import preprocess
from mmchat.model import LoadOptions, load_model
from mmchat.projector import build_projector
from mmchat.vision import image_features, load_vision_tower, preprocess_settings
from test_chat_templates import CHATML
from test_convert import converted, sample_image
from tiny_models import SIGLIP_PREPROCESS, TINY_SIGLIP_CFG, build_qwen2_llm, register_open_clip_tower

TAG = "tiny"
# name -> timm VisionTransformer arguments on top of a SigLIP-shaped tiny trunk (32 px, patch 8, 3 blocks, width 32)
TRUNKS = {
    "mmchat_export_siglip_vit": {},  # timm's default exact GELU, eps 1e-6, qkv bias: SigLIP as open_clip builds it
    "mmchat_export_tanh_vit": {"act_layer": "gelu_tanh", "qkv_bias": False},
    "mmchat_export_registers_vit": {"class_token": True, "reg_tokens": 4},
    "mmchat_export_qknorm_vit": {"qk_norm": True, "init_values": 1e-5},
}


def register_timm_vit(name: str, overrides: dict) -> None:
    """Register a tiny timm `VisionTransformer` variant under `name` (once per process: timm cannot unregister)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if name in timm.list_models(name):
        return

    def build(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm passes them to every model
            kwargs.pop(key, None)
        shape = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0,
                 "class_token": False}
        return VisionTransformer(**{**shape, **overrides, **kwargs})

    build.__name__ = build.__qualname__ = name
    register_model(build)


def open_clip_name(trunk: str) -> str:
    return trunk.replace("_", "-")


@pytest.fixture(scope="module", autouse=True)
def towers(tmp_path_factory):
    """Each trunk as a named open_clip SigLIP tower whose tag is a local weights file (undone afterwards)."""
    folder = tmp_path_factory.mktemp("open_clip")
    with pytest.MonkeyPatch.context() as mp:
        for seed, (trunk, overrides) in enumerate(TRUNKS.items()):
            register_timm_vit(trunk, overrides)
            cfg = {**TINY_SIGLIP_CFG, "vision_cfg": {**TINY_SIGLIP_CFG["vision_cfg"], "timm_model_name": trunk}}
            register_open_clip_tower(mp, open_clip_name(trunk), cfg, folder, SIGLIP_PREPROCESS, TAG, seed=seed)
        yield


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A fresh Qwen2-like LLM with no `<image>` token, as a new LLaVA is trained from."""
    return build_qwen2_llm(tmp_path_factory.mktemp("qwen2") / "llm", CHATML)


def build_checkpoint(out, llm_dir, trunk: str, select_layer, in_folder: bool):
    """An mmchat checkpoint as training writes it on a named open_clip tower: the tower's own preprocessing
    (SigLIP's plain resize, mean/std 0.5), `patch` features, a random projector. `in_folder`: the tower's
    weights saved in `vision/` (pretrained None) rather than named by its tag."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = open_clip_name(trunk)
    visual = load_vision_tower(VisionConfig(open_clip_model=name, pretrained=TAG))
    vision = VisionConfig(open_clip_model=name, pretrained=None if in_folder else TAG, select_layer=select_layer,
                          select_feature="patch", **preprocess_settings(visual))
    config = ModelConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", in_dim=32 * len(vision.layers), out_dim=64),
                         template="chat")
    torch.manual_seed(1)
    projector = build_projector(config.projector)
    return save_checkpoint(out, config, projector, AutoTokenizer.from_pretrained(llm_dir),
                           llm=AutoModelForCausalLM.from_pretrained(llm_dir), vision=visual if in_folder else None,
                           vision_model_cfg=open_clip.get_model_config(name) if in_folder else None)


@pytest.mark.parametrize("trunk, select_layer, in_folder, act", [
    ("mmchat_export_siglip_vit", -2, False, "gelu"),
    ("mmchat_export_tanh_vit", [-3, -1], True, "gelu_pytorch_tanh"),
])
@torch.no_grad()
def test_timm_trunk_exports_as_siglip_and_answers_as_mmchat(qwen2, tmp_path, trunk, select_layer, in_folder, act):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    checkpoint = build_checkpoint(tmp_path / "mmchat", qwen2, trunk, select_layer, in_folder)
    folder = converted(checkpoint, tmp_path / "llava-hf", "--to", "llava-hf")
    model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")  # mmchat matches the PIL backend (see test_zoo)

    vision = llava.config.vision_config
    assert (vision.model_type, vision.hidden_act, vision.layer_norm_eps, vision.vision_use_head) == (
        "siglip_vision_model", act, 1e-6, False)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (3, 32, 32, 8)
    assert (llava.config.vision_feature_select_strategy, llava.config.vision_feature_layer) == ("full", select_layer)
    assert processor.num_additional_image_tokens == 0 and llava.config.image_seq_length == model.image_tokens == 16
    assert not any("head" in k for k in llava.model.vision_tower.state_dict())

    image = sample_image()  # 48 x 30: the plain resize squashes it, no pad, no crop
    batch = processor(text="<image>\nWhat colour is it?", images=image, return_tensors="pt")
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    ours_pixels = preprocess(image, model.config.vision)[None]
    torch.testing.assert_close(pixels, ours_pixels, atol=1e-6, rtol=0)

    # Tower features: mmchat's (timm trunk) vs transformers' hidden states on the same pixels.
    hidden = llava.model.vision_tower(pixel_values=ours_pixels, output_hidden_states=True).hidden_states
    theirs = torch.cat([hidden[layer] for layer in vision_layers(select_layer)], dim=-1)
    ours = image_features(model.vision, ours_pixels, model.config.vision)
    assert ours.shape == theirs.shape == (1, 16, 32 * len(vision_layers(select_layer)))
    feature_diff = (ours - theirs).abs().max().item()
    assert feature_diff <= 1e-5, feature_diff
    projected = llava.model.get_image_features(pixel_values=ours_pixels, vision_feature_layer=select_layer,
                                               vision_feature_select_strategy="full").pooler_output
    assert (model.encode_images(ours_pixels) - torch.stack(list(projected))).abs().max().item() <= 1e-5

    # Logits on the processor's ids: mmchat fills the same slots (its LLM has no <image> id, so any id goes there).
    mask = ids == llava.config.image_token_index
    assert int(mask.sum()) == model.image_tokens
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    logits = model(input_ids=ids.masked_fill(mask, 0), image_mask=mask, pixel_values=ours_pixels).logits
    reference = llava(input_ids=ids, pixel_values=pixels).logits[..., :vocab]
    logit_diff = (logits - reference).abs().max().item()
    assert logit_diff <= 1e-4, logit_diff
    assert logits[0, -1].argmax() == reference[0, -1].argmax()
    print(f"{trunk}: max |feature diff| {feature_diff:.1e}, max |logit diff| {logit_diff:.1e}")


def vision_layers(select_layer) -> list[int]:
    return select_layer if isinstance(select_layer, list) else [select_layer]


@pytest.mark.parametrize("trunk, problems", [
    ("mmchat_export_registers_vit", "a class token, 4 register tokens"),
    ("mmchat_export_qknorm_vit", "qk-norm, layer scale"),
])
def test_unmappable_trunk_is_refused_in_one_line(qwen2, tmp_path, capsys, trunk, problems):
    from mmchat.convert.cli import main

    checkpoint = build_checkpoint(tmp_path / "mmchat", qwen2, trunk, -1, in_folder=False)
    dst = tmp_path / "llava-hf"
    assert main(["--to", "llava-hf", str(checkpoint), str(dst)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    print(lines[0])
    assert open_clip_name(trunk) in lines[0] and f"has {problems};" in lines[0], lines[0]
    assert "SiglipVisionModel" in lines[0] and "(SigLIP, SigLIP2)" in lines[0]
    assert not dst.exists() and not list(tmp_path.glob("llava-hf*"))
    assert json.loads((checkpoint / "mmchat.json").read_text())["vision"]["open_clip_model"] == open_clip_name(trunk)
