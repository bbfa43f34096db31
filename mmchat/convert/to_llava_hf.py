"""mmchat checkpoint -> a llava-hf folder (`LlavaForConditionalGeneration` + `AutoProcessor`).

`python -m mmchat.convert --to llava-hf SRC DST` calls `to_llava_hf`, so a model tuned with mmchat
can be served by engines that load llava-hf folders (vLLM, SGLang, TGI).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.timm_model import TimmModel
from torch import nn

from mmchat.checkpoint import atomic_dir, is_checkpoint, read_config, read_projector_state, resolve_path
from mmchat.config import ModelConfig, VisionConfig
from mmchat.convert.clip_weights import UnsupportedTower, hf_from_open_clip
from mmchat.convert.common import MERGE_HINT, SELECT_STRATEGIES, ConvertError, check_destination, log
from mmchat.convert.timm_weights import siglip_from_timm
from mmchat.templates import CHAT, IMAGE_TOKEN, get_template, resolve_template
from mmchat.vision import TRANSFORMERS_TOWERS, is_transformers_tower, load_vision_tower, num_image_tokens, tower_tokens

EXPORTABLE_TOWERS = ("open_clip's ViT (OpenAI CLIP, DFN, MetaCLIP) as CLIPVisionModel, timm ViT trunks without class or "
                     "register tokens, qk-norm, layer scale or rope (SigLIP, SigLIP2) as SiglipVisionModel, and "
                     "transformers towers as they are")


def to_llava_hf(src: Path, dst: Path, overwrite: bool = False) -> Path:
    """Write an mmchat checkpoint as a folder `LlavaForConditionalGeneration` and `AutoProcessor` load."""
    from transformers import AutoModelForCausalLM

    from mmchat.model import load_tokenizer

    dst = check_destination(dst, overwrite)
    config = exportable_config(Path(src))
    try:
        visual = load_vision_tower(config.vision, src)
    except RuntimeError as e:  # a named open_clip tower that cannot be downloaded
        raise ConvertError(str(e)) from None
    tower = llava_tower(visual, config.vision)  # refuses a tower llava-hf cannot run before the LLM loads
    log("loading the language model")
    llm = AutoModelForCausalLM.from_pretrained(resolve_path(src, config.llm), dtype="auto")
    tokenizer = load_tokenizer(resolve_path(src, config.tokenizer))
    llava = assemble_llava(config, visual, tower, read_projector_state(src), llm, add_image_token(tokenizer, llm))
    if config.stop_token_ids:
        llava.generation_config.eos_token_id = list(config.stop_token_ids)
    if config.temperature:  # the checkpoint samples by default: so does `generate` on the export
        llava.generation_config.do_sample = True
        llava.generation_config.temperature = config.temperature
        llava.generation_config.top_p = config.top_p or 1.0
    if config.max_new_tokens:
        llava.generation_config.max_new_tokens = config.max_new_tokens
    processor = llava_processor(config, llava.config, tokenizer)
    log(f"writing {dst}")
    with atomic_dir(dst) as tmp:  # complete before it takes DST's name
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return dst


def exportable_config(src: Path) -> ModelConfig:
    """The checkpoint's config, if llava-hf can express the model."""
    if not is_checkpoint(src):
        raise ConvertError(f"SRC {src} is not an mmchat checkpoint (no mmchat.json); convert LLaVA folders without --to")
    config = read_config(src)
    if config.projector.type == "resampler":  # before the adapter: merging would not help
        raise ConvertError(f"{src}: projector type 'resampler' has no llava-hf equivalent (llava-hf projects each patch "
                           "to one token); the checkpoint runs in mmchat's chat, app, server and eval")
    if config.vision.anyres is not None:
        raise ConvertError(f"{src}: --to llava-hf does not yet write LlavaNext / LlavaOnevision folders (anyres tiling); "
                           "the checkpoint runs in mmchat's chat, app and server")
    if config.adapter:
        raise ConvertError(f"{src} holds a PEFT adapter on top of {config.llm}, not a full LLM; {MERGE_HINT}")
    if config.projector.type != "mlp2x_gelu":
        raise ConvertError(f"projector type {config.projector.type!r}: llava-hf always has linear_1 -> act -> linear_2 (mlp2x_gelu)")
    if config.vision.select_feature not in SELECT_STRATEGIES:
        raise ConvertError(f"vision select_feature={config.vision.select_feature!r}: llava-hf supports {sorted(SELECT_STRATEGIES)}")
    return config


def llava_tower(visual: nn.Module, vision: VisionConfig) -> nn.Module:
    """mmchat's tower as transformers' model llava-hf runs, float32: a transformers tower as it is, open_clip's
    ViT as `CLIPVisionModel`, a timm ViT trunk (open_clip's `TimmModel`: SigLIP, SigLIP2) as `SiglipVisionModel`."""
    if is_transformers_tower(visual):
        return visual.float().eval()
    try:
        if isinstance(visual, TimmModel):
            return siglip_from_timm(visual)
        return hf_from_open_clip(visual)
    except UnsupportedTower as e:
        raise ConvertError(f"vision tower {vision.open_clip_model}: cannot export to llava-hf: {e}; "
                           f"--to llava-hf exports {EXPORTABLE_TOWERS}") from None


def select_strategy(visual: nn.Module, select_feature: str) -> str:
    """llava-hf's `vision_feature_select_strategy` for mmchat's `select_feature` on this tower. `default` drops
    the first token, `full` keeps all: mmchat's `patch` is every token on an open_clip tower without a class
    token (a SigLIP trunk: `full`), the tokens after the class token on one with it (`default`), and on a
    transformers tower mmchat already counts as llava-hf does."""
    if select_feature == "patch" and not is_transformers_tower(visual) and tower_tokens(visual)[0] == 0:
        return "full"
    return SELECT_STRATEGIES[select_feature]


def assemble_llava(config: ModelConfig, visual: nn.Module, tower: nn.Module, projector_state: dict, llm: nn.Module,
                   image_token_id: int) -> nn.Module:
    """A `LlavaForConditionalGeneration` around the LLM's own modules, `tower` (mmchat's `visual` as
    transformers' model, `llava_tower`) and the projector's `0/2` as `linear_1/2`, all in the LLM's dtype."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    dtype = llm.get_input_embeddings().weight.dtype
    tower = tower.to(dtype).eval()
    hf_config = LlavaConfig(
        vision_config=tower.config,
        text_config=llm.config,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens(visual, config.vision),
        projector_hidden_act=config.projector.act,
        multimodal_projector_bias=config.projector.bias,
        vision_feature_layer=config.vision.select_layer,
        vision_feature_select_strategy=select_strategy(visual, config.vision.select_feature),
    )
    with torch.device("meta"):  # every module is replaced below; nothing is allocated twice
        llava = LlavaForConditionalGeneration(hf_config)
    projector = LlavaMultiModalProjector(hf_config)
    params = ("weight", "bias") if config.projector.bias else ("weight",)
    projector.load_state_dict({f"linear_{n}.{p}": projector_state[f"{i}.{p}"] for n, i in ((1, 0), (2, 2)) for p in params})
    llava.model.vision_tower = tower
    llava.model.multi_modal_projector = projector.to(dtype)
    llava.model.language_model = getattr(llm, llm.base_model_prefix)
    llava.lm_head = llm.get_output_embeddings()
    assert not any(t.is_meta for t in [*llava.parameters(), *llava.buffers()]), "llava left with meta tensors"
    return llava.eval()


def llava_processor(config: ModelConfig, hf_config, tokenizer):
    """`LlavaProcessor`: the tokenizer, a LLaVA image processor with mmchat's preprocessing (`do_pad`
    is LLaVA's pad to square; `hf_folder.image_settings` reads each setting back) and a chat
    template rendering mmchat's prompt."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    vision = config.vision
    side = vision.image_size
    crop = vision.resize == "shortest_edge"
    image_processor = LlavaImageProcessor(
        do_pad=vision.pad_to_square,
        size={"shortest_edge": vision.shortest_edge or side} if crop else {"height": side, "width": side},
        do_center_crop=crop,
        crop_size={"height": side, "width": side},
        resample=vision.resample,
        do_rescale=vision.rescale,
        rescale_factor=vision.rescale_factor,
        do_normalize=vision.normalize,
        image_mean=list(vision.mean),
        image_std=list(vision.std),
        do_convert_rgb=vision.convert_rgb,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=hf_config.vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        # CLIP's CLS (the "default" strategy drops it again); SigLIP has none
        num_additional_image_tokens=TRANSFORMERS_TOWERS[hf_config.vision_config.model_type],
        chat_template=chat_template(config.template, tokenizer),
    )


def add_image_token(tokenizer, llm: nn.Module) -> int:
    """The tokenizer's `<image>` id, added as a special token if missing; the LLM's vocabulary grows
    (to a multiple of 64, as llava-hf's 32064) only when the id does not fit."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old = llm.get_input_embeddings().weight.shape[0]
    if image_id >= old:
        llm.resize_token_embeddings(image_id + 1, pad_to_multiple_of=64, mean_resizing=False)
        with torch.no_grad():
            # New rows get the mean row: the input row is overwritten by image features anyway, and a
            # mean output row scores an average logit, far below any likely next token.
            for layer in {llm.get_input_embeddings(), llm.get_output_embeddings()}:
                layer.weight[old:] = layer.weight[:old].mean(0)
        log(f"added {IMAGE_TOKEN} as token {image_id}; vocabulary {old} -> {llm.get_input_embeddings().weight.shape[0]}")
    return image_id


def chat_template(name: str, tokenizer=None) -> str | None:
    """A Jinja chat template rendering the same prompt string as mmchat's template: the tokenizer's
    own for `chat`, one written here for the `two` style (llava_v1, vicuna_v1)."""
    if name == CHAT:
        return resolve_template(CHAT, tokenizer).chat_template
    template = get_template(name)
    if template.style != "two":
        log(f"note: no chat_template written for the {name!r} template; only llava_v1-style prompts are exported")
        return None
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
        "{%- else -%}{%- set system = " + json.dumps(template.system) + " -%}{%- endif -%}"
        "{{- system + ' ' -}}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set images = 0 -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' + '<image>\\n' * images + text + ' ' -}}"
        "{%- else -%}{{- 'ASSISTANT: ' + text + '</s>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


# ---------------------------------------------------------------- command line
