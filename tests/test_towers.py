"""Every llava-hf tower runs as transformers runs it: SigLIP, lists of feature layers, `default` / `full`,
projectors without bias or with another activation, and original checkpoints' tuned towers."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mmchat.checkpoint import read_config
from mmchat.config import ModelConfig, ProjectorConfig
from mmchat.convert.common import ConvertError
from mmchat.convert.from_llava import check_llava_hf
from mmchat.model import LoadOptions, load_model
from mmchat.projector import build_projector
from mmchat.vision import image_features
from test_convert import NEW_TOKENS, converted, greedy_mmchat, sample_image
from tiny_models import (
    LLAVA_HF_VOCAB, TINY_HF_CLIP_CFG, add_tuned_tower, build_llava_hf_tower, build_original_llava, llama_config,
)

TEXT = "USER: <image>\nwhat colour is the circle? ASSISTANT:"


def processor_inputs(folder):
    """input_ids [1, L] (image slots expanded) and pixel_values [1, 3, S, S] from the folder's own processor."""
    from transformers import AutoProcessor

    batch = AutoProcessor.from_pretrained(folder)(text=TEXT, images=sample_image(), return_tensors="pt")
    return batch["input_ids"], batch["pixel_values"]


@torch.no_grad()
def check_matches_transformers(checkpoint, reference, folder) -> None:
    """Projected image features (vs `get_image_features`), logits at every position and 20 greedy tokens
    of the mmchat checkpoint equal the `LlavaForConditionalGeneration`'s on the folder processor's inputs."""
    model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    ids, pixels = processor_inputs(folder)
    mask = ids == reference.config.image_token_index
    assert int(mask.sum()) == model.image_tokens

    ours = model.encode_images(pixels)
    theirs = reference.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=reference.config.vision_feature_layer,
        vision_feature_select_strategy=reference.config.vision_feature_select_strategy).pooler_output
    feature_diff = (ours - torch.stack(list(theirs))).abs().max().item()
    assert feature_diff <= 1e-5, feature_diff

    logits = model(input_ids=ids, image_mask=mask, pixel_values=pixels).logits
    logit_diff = (logits - reference(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
    assert logit_diff <= 1e-4, logit_diff

    eos = model.tokenizer.eos_token_id
    tokens = greedy_mmchat(model, ids, mask, pixels, eos)
    generated = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                   max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert tokens == generated[0, ids.shape[1]:].tolist()
    print(f"{checkpoint.name}: max |feature diff| {feature_diff:.1e}, max |logit diff| {logit_diff:.1e}, tokens {tokens}")


def check_round_trip(checkpoint, reference, out) -> None:
    """mmchat -> llava-hf gives back every tensor and every tower / projector setting of `reference`."""
    from transformers import LlavaForConditionalGeneration

    back = LlavaForConditionalGeneration.from_pretrained(converted(checkpoint, out, "--to", "llava-hf")).eval()
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act", "multimodal_projector_bias"):
        assert getattr(back.config, key) == getattr(reference.config, key), key
    ignored = {"dtype": None, "architectures": None}  # save_pretrained of the tower alone names its class
    assert back.config.vision_config.to_diff_dict() | ignored == reference.config.vision_config.to_diff_dict() | ignored
    state, expected = back.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # The exported processor fills as many image slots as the original one, with the same pixels.
    ids, pixels = processor_inputs(out)
    ref_ids, ref_pixels = processor_inputs(checkpoint.parent / "llava-hf")
    image_id = reference.config.image_token_index
    assert int((ids == image_id).sum()) == int((ref_ids == image_id).sum()) == 16
    with torch.no_grad():  # and transformers runs the exported folder as it ran the original
        assert torch.equal(back(input_ids=ref_ids, pixel_values=ref_pixels).logits, reference(input_ids=ref_ids, pixel_values=ref_pixels).logits)
    torch.testing.assert_close(pixels, ref_pixels, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory, tiny_tokenizer_dir):
    """(llava-hf folder, its model, the mmchat checkpoint converted from it): SigLIP + Qwen2, as llava-interleave."""
    root = tmp_path_factory.mktemp("siglip")
    reference = build_llava_hf_tower(root / "llava-hf", tiny_tokenizer_dir, vision="siglip", llm="qwen2")
    return root / "llava-hf", reference, converted(root / "llava-hf", root / "mmchat")


def test_siglip_runs_as_transformers(siglip):
    folder, reference, checkpoint = siglip
    vision = read_config(checkpoint).vision
    assert (vision.library, vision.select_layer, vision.select_feature) == ("transformers", -1, "cls_patch")
    assert (vision.resize, vision.image_size, vision.mean, vision.pad_to_square) == ("exact", 32, (0.5,) * 3, False)
    assert json.loads((checkpoint / "vision" / "config.json").read_text())["model_type"] == "siglip_vision_model"
    check_matches_transformers(checkpoint, reference, folder)


def test_siglip_needs_its_tanh_gelu(siglip):
    """Why SigLIP stays transformers' model: the same weights with exact GELU (timm's, in open_clip) differ."""
    from transformers import SiglipVisionModel

    _, reference, checkpoint = siglip
    model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = SiglipVisionModel(reference.config.vision_config.__class__(**{**reference.config.vision_config.to_dict(), "hidden_act": "gelu"}))
    exact.load_state_dict(reference.model.vision_tower.state_dict())
    ours = image_features(model.vision, pixels, model.config.vision)
    theirs = exact.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    diff = (ours - theirs).abs().max().item()
    print(f"exact instead of tanh GELU: max |feature diff| {diff:.1e}")
    assert diff > 1e-5


def test_siglip_round_trip(siglip, tmp_path):
    _, reference, checkpoint = siglip
    check_round_trip(checkpoint, reference, tmp_path / "back")


@pytest.mark.parametrize("eps, library", [(1e-5, "open_clip"), (1e-6, "transformers")])
def test_clip_layer_list_without_projector_bias(tmp_path, tiny_tokenizer_dir, eps, library):
    """Hidden states -2 and -1 concatenated, `default` (CLS dropped), a bias-free tanh-GELU projector; a
    CLIP open_clip can express runs on open_clip, one it cannot (eps 1e-6) stays transformers'."""
    folder = tmp_path / "llava-hf"
    reference = build_llava_hf_tower(folder, tiny_tokenizer_dir, vision="clip", llm="llama", vision_overrides={"layer_norm_eps": eps},
                                     vision_feature_layer=[-2, -1], multimodal_projector_bias=False,
                                     projector_hidden_act="gelu_pytorch_tanh")
    checkpoint = converted(folder, tmp_path / "mmchat")
    config = read_config(checkpoint)
    assert (config.vision.library, config.vision.select_layer, config.vision.select_feature) == (library, [-2, -1], "patch")
    assert (config.projector.in_dim, config.projector.bias, config.projector.act) == (64, False, "gelu_pytorch_tanh")
    check_matches_transformers(checkpoint, reference, folder)
    check_round_trip(checkpoint, reference, tmp_path / "back")


def test_original_llava_keeps_its_tuned_tower(tiny_llava_hf_model, tiny_tokenizer_dir, tmp_path):
    """A checkpoint that tuned its CLIP (`model.vision_tower.vision_tower.*`) is converted with that tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _, reference = tiny_llava_hf_model
    original = build_original_llava(tmp_path / "llava-v1.5-tuned", reference, tiny_tokenizer_dir)
    torch.manual_seed(1)
    tuned = CLIPVisionModel(CLIPVisionConfig(**TINY_HF_CLIP_CFG)).eval()
    checkpoint = converted(add_tuned_tower(original, tuned), tmp_path / "mmchat")
    model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    assert model.config.vision.pretrained is None and model.config.vision.library == "open_clip"

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = image_features(model.vision, pixels, model.config.vision)
    with torch.no_grad():
        theirs = tuned(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        named = reference.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - named).abs().max() > 0.1  # not the tower mm_vision_tower names


def test_check_llava_hf_refuses_in_one_line():
    from transformers import CLIPVisionConfig, LlavaConfig

    config = LlavaConfig(vision_config=CLIPVisionConfig(**TINY_HF_CLIP_CFG), text_config=llama_config(LLAVA_HF_VOCAB))
    check_llava_hf(config)
    config.vision_feature_layer, config.projector_hidden_act = [0, -1], "prelu"
    with pytest.raises(ConvertError) as error:
        check_llava_hf(config)
    message = str(error.value)
    assert "\n" not in message and "vision_feature_layer=[0, -1]" in message and "'prelu'" in message


def test_configs_without_the_new_fields_load_as_before():
    """mmchat.json files written before `library`, `bias` and `act` existed: open_clip, LLaVA's projector."""
    config = ModelConfig.from_dict({"vision": {"pretrained": None, "image_size": 32},
                                    "projector": {"type": "mlp2x_gelu", "in_dim": 32, "out_dim": 64}})
    assert (config.vision.library, config.vision.layers, config.projector.bias, config.projector.act) == ("open_clip", [-2], True, "gelu")
    projector = build_projector(config.projector)
    torch.manual_seed(0)
    llava = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    projector.load_state_dict(llava.state_dict())  # the same keys: 0.*, 2.*
    x = torch.randn(3, 32)
    assert torch.equal(projector(x), llava(x))
    with pytest.raises(ValueError, match="act"):
        ProjectorConfig(act="prelu")


def test_training_builds_on_a_converted_siglip_checkpoint(siglip, tmp_path):
    """finetune keeps the converted tower (frozen, transformers') and the projector's settings."""
    from finetune.build import build_model
    from tiny_models import tiny_train_config

    _, _, checkpoint = siglip
    built = build_model(tiny_train_config("align", model=str(checkpoint), data="unused", output_dir=str(tmp_path)), "cpu")
    assert built.model.config.projector == read_config(checkpoint).projector
    assert built.vision_model_cfg["model_type"] == "siglip_vision_model"
    assert not any(p.requires_grad for p in built.model.vision.parameters())
