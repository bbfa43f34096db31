"""LLaVA-NeXT both ways beyond llava-hf import: `--to llava-hf` of an AnyRes checkpoint, and LLaVA's own
(original-format) NeXT checkpoints.

Export: the tiny llava-hf NeXT folder of tests/test_next.py -> mmchat -> `--to llava-hf` is a folder
`LlavaNextForConditionalGeneration` and `AutoProcessor` read exactly as the original one (same ids,
pixels, logits, greedy tokens, every tensor), and the checkpoint re-imported equals itself; the same for the
OneVision folder of tests/test_onevision.py (`LlavaOnevisionForConditionalGeneration`, anyres_max_9).

Original format: the same weights as LLaVA's repo saves LLaVA-NeXT (`LlavaLlamaForCausalLM` /
`LlavaMistralForCausalLM`, `image_aspect_ratio: anyres`, `mm_patch_merge_type: spatial_unpad`,
`image_grid_pinpoints`, `model.image_newline`, the tower named and passed as a local CLIP folder), converted,
answer as transformers' LlavaNext on the llava-hf folder: logits within 1e-4, the same 20 greedy tokens.
"""
from __future__ import annotations

import json

import pytest
import torch

from mmchat.checkpoint import read_config, read_projector_state
from mmchat.conversation import render
from mmchat.convert.cli import main
from mmchat.model import LoadOptions, load_model
from mmchat.templates import resolve_template
from test_convert import check_hub_layout, converted
from test_next import GRIDS, NEW_TOKENS, PINS, build_next_folder, hf_chat, images, mmchat_logits, transformers_turn
from test_zoo import QUESTIONS, processor_inputs
from tiny_models import build_original_llava


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_next_folder(tmp_path_factory.mktemp("next") / "llava-next")


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory):
    return converted(folder, tmp_path_factory.mktemp("mmchat") / "next")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return converted(checkpoint, tmp_path_factory.mktemp("export") / "llava-next", "--to", "llava-hf")


# ---------------------------------------------------------------- --to llava-hf


def test_export_is_the_original_folder(exported, reference):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    llava, processor = reference
    again = LlavaNextForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()
    ours = AutoProcessor.from_pretrained(exported)
    for field in ("image_grid_pinpoints", "image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                  "projector_hidden_act", "multimodal_projector_bias"):
        assert getattr(again.config, field) == getattr(llava.config, field), field
    assert again.config.image_seq_length == 64  # tokens per tile, as the hub's 576 for 336 px (the tiny folder kept 576)
    assert again.config.vision_config.to_dict() == llava.config.vision_config.to_dict()
    state, theirs = again.state_dict(), llava.state_dict()
    assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in theirs)
    assert ours.image_processor.to_dict() == processor.image_processor.to_dict()
    for field in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "chat_template"):
        assert getattr(ours, field) == getattr(processor, field), field
    assert again.generation_config.eos_token_id in (llava.generation_config.eos_token_id, *llava.generation_config.eos_token_id)
    check_hub_layout(exported, LlavaNextForConditionalGeneration)


@pytest.mark.parametrize("name", list(GRIDS))
def test_export_answers_as_the_original_folder(name, exported, reference):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    llava, processor = reference
    again = LlavaNextForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()
    conversation = hf_chat([(QUESTIONS[0], images()[name], None)])
    inputs, original = processor_inputs(AutoProcessor.from_pretrained(exported), conversation), processor_inputs(processor, conversation)
    assert inputs["input_ids"].tolist() == original["input_ids"].tolist()
    assert torch.equal(inputs["pixel_values"], original["pixel_values"]) and torch.equal(inputs["image_sizes"], original["image_sizes"])
    tokens, logits = transformers_turn(again, inputs)
    theirs, theirs_logits = transformers_turn(llava, original)
    assert tokens == theirs
    torch.testing.assert_close(logits, theirs_logits, atol=1e-4, rtol=0)


def test_exported_checkpoint_reimports_as_itself(checkpoint, exported, tmp_path):
    back = converted(exported, tmp_path / "back")
    before, after = read_config(checkpoint).to_dict(), read_config(back).to_dict()
    before["vision"].pop("open_clip_model"), after["vision"].pop("open_clip_model")  # named after the folder
    assert after == before
    ours, again = load_model(checkpoint, LoadOptions("32bit", "cpu")), load_model(back, LoadOptions("32bit", "cpu"))
    state, theirs = again.state_dict(), ours.state_dict()
    assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in theirs)
    assert torch.equal(read_projector_state(back)["image_newline"], read_projector_state(checkpoint)["image_newline"])


def test_export_of_a_transformers_tower_keeps_it(tmp_path):
    """A CLIP open_clip cannot run exactly (eps 1e-6) stays transformers' model in mmchat and goes back as it was."""
    from transformers import LlavaNextForConditionalGeneration

    folder = build_next_folder(tmp_path / "llava-next", tower_act="gelu", seed=1)
    checkpoint = converted(folder, tmp_path / "mmchat")
    assert read_config(checkpoint).vision.library == "transformers"
    again = LlavaNextForConditionalGeneration.from_pretrained(converted(checkpoint, tmp_path / "back", "--to", "llava-hf"))
    state, theirs = again.state_dict(), LlavaNextForConditionalGeneration.from_pretrained(folder).state_dict()
    assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in theirs)


# ---------------------------------------------------------------- original-format LLaVA-NeXT


def build_original_next(out, folder, llava, architecture: str = "LlavaLlamaForCausalLM", tuned: bool = False,
                        **config_changes):
    """The tiny LlavaNext's weights in LLaVA's own layout (`build_original_llava`'s, plus `model.image_newline`
    and the NeXT config keys); the CLIP tower saved beside it as a transformers folder, with its processor.
    `tuned`: the tower's weights travel in the checkpoint (`model.vision_tower.vision_tower.*`, as LLaVA-1.6
    unfroze its tower) and the folder beside it holds other random weights: its architecture only."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    build_original_llava(out, llava, folder, weights="bin")
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    state["model.image_newline"] = llava.model.image_newline.detach().clone()
    clip = out.parent / f"{out.name}-clip"
    if tuned:
        state.update({f"model.vision_tower.vision_tower.{k}": v.detach().clone()
                      for k, v in llava.model.vision_tower.state_dict().items()})
        torch.manual_seed(1)
        CLIPVisionModel(llava.config.vision_config).save_pretrained(clip)
    torch.save(state, out / "pytorch_model.bin")
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(clip)
    config = json.loads((out / "config.json").read_text())
    config.update({"architectures": [architecture], "model_type": "llava_" + architecture[5:-11].lower(),
                   "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "anyres",
                   "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": PINS, **config_changes})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out, clip


@pytest.mark.parametrize("architecture, tuned", [("LlavaLlamaForCausalLM", False), ("LlavaMistralForCausalLM", True)])
@torch.no_grad()
def test_original_next_answers_as_transformers(architecture, tuned, folder, reference, tmp_path):
    """Mistral's decoder without a sliding window computes as LLaMA's: the same reference serves both."""
    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig

    from transformers import LlavaNextForConditionalGeneration

    llava, processor = reference
    original, clip = build_original_next(tmp_path / "llava-v1.6-tiny", folder, llava, architecture, tuned)
    checkpoint = converted(original, tmp_path / "mmchat", "--vision-tower", str(clip))
    model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    assert model.config.vision.anyres.pinpoints == PINS and model.config.vision.anyres.max_tiles is None
    assert type(model.llm).__name__ == architecture.replace("Llava", "")
    assert model.config.template == ("llava_v1" if "Llama" in architecture else "chat")  # Mistral: its own chat template
    assert torch.equal(model.projector.image_newline, llava.model.image_newline)
    template = resolve_template(model.config.template, model.tokenizer)
    for name, picture in images().items():
        session = ChatSession(model)
        "".join(session.ask(QUESTIONS[0], picture, GenerationConfig(temperature=0, max_new_tokens=NEW_TOKENS)))
        rendered = render(session.messages[:-1], template, model.tokenizer, model.image_token_counts([picture]),
                          add_generation_prompt=True, image_token_id=model.config.image_token_id)
        ids = torch.tensor([rendered.input_ids]).masked_fill(torch.tensor([rendered.image_mask]), llava.config.image_token_index)
        pixels = processor.image_processor(images=[picture], return_tensors="pt")
        theirs, theirs_logits = transformers_turn(llava, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                          "pixel_values": pixels["pixel_values"],
                                                          "image_sizes": pixels["image_sizes"]})
        ours = session.last_stats.answer_ids
        chosen = ours + [model.tokenizer.eos_token_id] if len(ours) < NEW_TOKENS else ours
        assert chosen == theirs, name
        torch.testing.assert_close(mmchat_logits(model, rendered, [picture], chosen), theirs_logits, atol=1e-4, rtol=0)
    # and on to llava-hf: the weights transformers' own NeXT converter gives, tensor for tensor
    exported = LlavaNextForConditionalGeneration.from_pretrained(converted(checkpoint, tmp_path / "export", "--to", "llava-hf"))
    assert exported.config.image_grid_pinpoints == PINS and exported.config.text_config.model_type == architecture[5:-11].lower()
    state, theirs = exported.state_dict(), llava.state_dict()
    assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("changes, expected", [
    ({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type='spatial' with anyres"),
    ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type='flat' with anyres"),
    ({"image_aspect_ratio": "anyres_max_9"}, "image_aspect_ratio='anyres_max_9' (LLaVA-OneVision's tiling"),
    ({"image_aspect_ratio": "stretch"}, "image_aspect_ratio='stretch'"),
    ({"image_aspect_ratio": "pad"}, "mm_patch_merge_type='spatial_unpad' without image_aspect_ratio 'anyres'"),
    ({"image_grid_pinpoints": "(1x1),...,(3x3)"}, "image_grid_pinpoints='(1x1),...,(3x3)'"),
    ({"image_grid_pinpoints": [[56, 100]]}, "not a positive multiple of image_size=56"),
    ({"architectures": ["LlavaQwenForCausalLM"]}, "architectures=['LlavaQwenForCausalLM']"),
])
def test_unsupported_original_variants_are_refused_in_one_line(changes, expected, folder, reference, tmp_path, capsys):
    original, clip = build_original_next(tmp_path / "original", folder, reference[0], **changes)
    capsys.readouterr()
    assert main(["--vision-tower", str(clip), str(original), str(tmp_path / "out")]) == 2
    # One error line, the last; before it progress only (the CLIP folder's "Loading weights" bar, when it loaded).
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any(line.startswith("error: ") for line in err[:-1]), err
    assert expected in err[-1], err[-1]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- --to llava-hf: OneVision (anyres_max_N)


@torch.no_grad()
def test_onevision_export_is_the_original_folder(tmp_path):
    """tests/test_onevision.py's folder -> mmchat -> `--to llava-hf`: every tensor, the processor's ids and pixels for
    one image (tiled, shrunk to about 9 tiles) and for two (each one square), and the greedy answers are the folder's."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    from test_onevision import build_onevision_folder

    folder = build_onevision_folder(tmp_path / "llava-onevision")
    checkpoint = converted(folder, tmp_path / "mmchat")
    exported = converted(checkpoint, tmp_path / "export", "--to", "llava-hf")
    llava, again = (LlavaOnevisionForConditionalGeneration.from_pretrained(f, dtype=torch.float32).eval() for f in (folder, exported))
    for field in ("vision_aspect_ratio", "image_grid_pinpoints", "image_token_index", "video_token_index",
                  "vision_feature_layer", "vision_feature_select_strategy"):
        assert getattr(again.config, field) == getattr(llava.config, field), field
    state, theirs = again.state_dict(), llava.state_dict()
    assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in theirs)
    check_hub_layout(exported, LlavaOnevisionForConditionalGeneration)
    processor, ours = AutoProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(exported)
    for field in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "chat_template"):
        assert getattr(ours, field) == getattr(processor, field), field
    pictures = images()
    for turns in ([(QUESTIONS[0], pictures["photo"], None)], [(QUESTIONS[0], pictures["tall"], None)],
                  [(QUESTIONS[0], pictures["tall"], "A photo."), (QUESTIONS[1], pictures["wide"], None)]):
        inputs, original = processor_inputs(ours, hf_chat(turns)), processor_inputs(processor, hf_chat(turns))
        assert inputs["input_ids"].tolist() == original["input_ids"].tolist()
        assert torch.equal(inputs["pixel_values"], original["pixel_values"])
        tokens, logits = transformers_turn(again, inputs)
        theirs_tokens, theirs_logits = transformers_turn(llava, original)
        assert tokens == theirs_tokens
        torch.testing.assert_close(logits, theirs_logits, atol=1e-4, rtol=0)
    before, after = read_config(checkpoint).to_dict(), read_config(converted(exported, tmp_path / "back")).to_dict()
    before["vision"].pop("open_clip_model"), after["vision"].pop("open_clip_model")
    assert after == before and before["vision"]["anyres"]["max_tiles"] == 9
