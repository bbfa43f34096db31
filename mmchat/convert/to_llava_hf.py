"""mmchat checkpoint -> a llava-hf folder (`LlavaForConditionalGeneration` + `AutoProcessor`).

`python -m mmchat.convert --to llava-hf SRC DST` calls `to_llava_hf`, so a model tuned with mmchat
can be served by engines that load llava-hf folders (vLLM, SGLang, TGI). A checkpoint with AnyRes
tiling (`vision.anyres`) becomes the llava-hf class that tiles as mmchat does: LLaVA-NeXT's
`LlavaNextForConditionalGeneration`, or with `max_tiles` (anyres_max_N) LLaVA-OneVision's
`LlavaOnevisionForConditionalGeneration`, each with its processor and the learned `image_newline`.
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
from mmchat.model import IMAGE_NEWLINE
from mmchat.templates import CHAT, IMAGE_TOKEN, get_template, resolve_template
from mmchat.vision import TRANSFORMERS_TOWERS, is_transformers_tower, load_vision_tower, num_image_tokens, tower_tokens

EXPORTABLE_TOWERS = ("open_clip's ViT (OpenAI CLIP, DFN, MetaCLIP) as CLIPVisionModel, timm ViT trunks without class or "
                     "register tokens, qk-norm, layer scale or rope (SigLIP, SigLIP2) as SiglipVisionModel, and "
                     "transformers towers as they are")
VIDEO_TOKEN = "<video>"
"""LlavaOnevision's video slot; its processor and config need the id even for image-only chat."""
# model_type -> transformers' (config class, model class, processor class, image processor class)
HF_CLASSES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", "LlavaProcessor", "LlavaImageProcessor"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration", "LlavaNextProcessor",
                   "LlavaNextImageProcessor"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
                        "LlavaOnevisionImageProcessor"),
}


def to_llava_hf(src: Path, dst: Path, overwrite: bool = False) -> Path:
    """Write an mmchat checkpoint as a folder the llava-hf class of its image layout (`hf_model_type`)
    and `AutoProcessor` load."""
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
    tokens = [IMAGE_TOKEN] + ([VIDEO_TOKEN] if hf_model_type(config.vision) == "llava_onevision" else [])
    token_ids = dict(zip(tokens, add_tokens(tokenizer, llm, tokens)))
    llava = assemble_llava(config, visual, tower, read_projector_state(src), llm, token_ids)
    if config.stop_token_ids:
        llava.generation_config.eos_token_id = list(config.stop_token_ids)
    if config.temperature:  # the checkpoint samples by default: so does `generate` on the export
        llava.generation_config.do_sample = True
        llava.generation_config.temperature = config.temperature
        llava.generation_config.top_p = config.top_p or 1.0
    if config.max_new_tokens:
        llava.generation_config.max_new_tokens = config.max_new_tokens
    processor = llava_processor(config, llava.config, tokenizer)
    log(f"writing {dst} ({type(llava).__name__})")
    with atomic_dir(dst) as tmp:  # complete before it takes DST's name
        llava.save_pretrained(tmp)
        hub_layout(Path(tmp))
        processor.save_pretrained(tmp)
    return dst


def hf_model_type(vision: VisionConfig) -> str:
    """The llava-hf model type that lays images out as this checkpoint does: one square each (`llava`),
    AnyRes tiles (`llava_next`), AnyRes tiles shrunk to about N tiles' worth (`llava_onevision`)."""
    if vision.anyres is None:
        return "llava"
    return "llava_next" if vision.anyres.max_tiles is None else "llava_onevision"


def exportable_config(src: Path) -> ModelConfig:
    """The checkpoint's config, if llava-hf can express the model."""
    if not is_checkpoint(src):
        raise ConvertError(f"SRC {src} is not an mmchat checkpoint (no mmchat.json); convert LLaVA folders without --to")
    config = read_config(src)
    if config.projector.type == "resampler":  # before the adapter: merging would not help
        raise ConvertError(f"{src}: projector type 'resampler' has no llava-hf equivalent (llava-hf projects each patch "
                           "to one token); the checkpoint runs in mmchat's chat, app, server and eval")
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
                   token_ids: dict[str, int]) -> nn.Module:
    """The llava-hf model (`hf_model_type`) around the LLM's own modules, `tower` (mmchat's `visual` as
    transformers' model, `llava_tower`), the projector's `0/2` as `linear_1/2` and, with AnyRes, its
    `image_newline`, all in the LLM's dtype. `token_ids`: `<image>` (and OneVision's `<video>`) ids."""
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[hf_model_type(config.vision)][:2])
    dtype = llm.get_input_embeddings().weight.dtype
    tower = tower.to(dtype).eval()
    hf_config = config_class(
        vision_config=tower.config,
        text_config=llm.config,
        image_token_index=token_ids[IMAGE_TOKEN],
        projector_hidden_act=config.projector.act,
        multimodal_projector_bias=config.projector.bias,
        vision_feature_layer=config.vision.select_layer,
        vision_feature_select_strategy=select_strategy(visual, config.vision.select_feature),
        **layout_fields(config.vision, num_image_tokens(visual, config.vision), token_ids),
    )
    with torch.device("meta"):  # every module is replaced below; nothing is allocated twice
        llava = model_class(hf_config)
    projector = type(llava.model.multi_modal_projector)(hf_config)  # built outside meta: real tensors
    params = ("weight", "bias") if config.projector.bias else ("weight",)
    projector.load_state_dict({f"linear_{n}.{p}": projector_state[f"{i}.{p}"] for n, i in ((1, 0), (2, 2)) for p in params})
    llava.model.vision_tower = tower
    llava.model.multi_modal_projector = projector.to(dtype)
    if config.vision.anyres is not None:
        llava.model.image_newline = nn.Parameter(projector_state[IMAGE_NEWLINE].to(dtype))
    llava.model.language_model = getattr(llm, llm.base_model_prefix)
    llava.lm_head = llm.get_output_embeddings()
    assert not any(t.is_meta for t in [*llava.parameters(), *llava.buffers()]), "llava left with meta tensors"
    return llava.eval()


def layout_fields(vision: VisionConfig, tile_tokens: int, token_ids: dict[str, int]) -> dict:
    """The config fields that say how an image becomes tokens: LLaVA's tokens per image; NeXT's
    pinpoints (and tokens per tile, as the hub's folders record it); OneVision's pinpoints, its
    anyres_max_N and its `<video>` id."""
    if vision.anyres is None:
        return {"image_seq_length": tile_tokens}
    pinpoints = {"image_grid_pinpoints": [list(p) for p in vision.anyres.pinpoints]}
    if vision.anyres.max_tiles is None:
        return {**pinpoints, "image_seq_length": tile_tokens}
    return {**pinpoints, "vision_aspect_ratio": f"anyres_max_{vision.anyres.max_tiles}",
            "video_token_index": token_ids[VIDEO_TOKEN]}


def llava_processor(config: ModelConfig, hf_config, tokenizer):
    """The processor of `hf_config`'s model type: the tokenizer, an image processor with mmchat's
    preprocessing (`hf_folder.image_settings` / `anyres_settings` read each setting back) and a chat
    template rendering mmchat's prompt."""
    import transformers

    *_, processor_name, image_processor_name = HF_CLASSES[hf_config.model_type]
    processor_class = getattr(transformers, processor_name)
    image_processor = getattr(transformers, image_processor_name)(**image_processor_settings(config.vision))
    common = {"image_processor": image_processor, "tokenizer": tokenizer,
              "vision_feature_select_strategy": hf_config.vision_feature_select_strategy,
              "chat_template": chat_template(config.template, tokenizer)}
    # CLIP's CLS (the "default" strategy drops it again); SigLIP has none
    extra_tokens = TRANSFORMERS_TOWERS[hf_config.vision_config.model_type]
    if hf_config.model_type != "llava_onevision":
        return processor_class(**common, patch_size=hf_config.vision_config.patch_size,
                               num_additional_image_tokens=extra_tokens)
    from transformers import LlavaOnevisionVideoProcessor

    vision = config.vision
    video_processor = LlavaOnevisionVideoProcessor(size={"height": vision.image_size, "width": vision.image_size},
                                                   image_mean=list(vision.mean), image_std=list(vision.std))
    grid = hf_config.vision_config.image_size // hf_config.vision_config.patch_size
    # The processor counts `num_image_tokens` for the base tile and takes one off for `default`.
    tile_tokens = grid * grid + (extra_tokens if hf_config.vision_feature_select_strategy == "default" else 0)
    return processor_class(**common, video_processor=video_processor, num_image_tokens=tile_tokens,
                           vision_aspect_ratio=hf_config.vision_aspect_ratio)


def image_processor_settings(vision: VisionConfig) -> dict:
    """The image processor's arguments. LLaVA-1.5: mmchat's preprocessing field by field (`do_pad` is
    LLaVA's pad to square). AnyRes: tiles and the base image are `image_size` squares, bicubic, 1/255 and
    mean/std, as `mmchat.anyres` always tiles (the other fields do not apply); the resize keeps the
    checkpoint's form, `do_pad` pads a batch's tile counts, and crop_size gives the tile side."""
    side = vision.image_size
    square = {"height": side, "width": side}
    crop = vision.resize == "shortest_edge"
    if vision.anyres is not None:
        return {"size": {"shortest_edge": side} if crop else square, "crop_size": square, "do_center_crop": crop,
                "image_grid_pinpoints": [list(p) for p in vision.anyres.pinpoints], "resample": 3, "do_resize": True,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(vision.mean),
                "image_std": list(vision.std), "do_convert_rgb": True, "do_pad": True}
    return {"do_pad": vision.pad_to_square, "size": {"shortest_edge": vision.shortest_edge or side} if crop else square,
            "do_center_crop": crop, "crop_size": square, "resample": vision.resample, "do_rescale": vision.rescale,
            "rescale_factor": vision.rescale_factor, "do_normalize": vision.normalize,
            "image_mean": list(vision.mean), "image_std": list(vision.std), "do_convert_rgb": vision.convert_rgb}


def add_tokens(tokenizer, llm: nn.Module, tokens: list[str]) -> list[int]:
    """The tokenizer's ids of `tokens` (`<image>`, ...), each added as a special token if missing; the LLM's
    vocabulary grows (to a multiple of 64, as llava-hf's 32064) only when an id does not fit."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    old = llm.get_input_embeddings().weight.shape[0]
    if max(ids) >= old:
        llm.resize_token_embeddings(max(ids) + 1, pad_to_multiple_of=64, mean_resizing=False)
        with torch.no_grad():
            # New rows get the mean row: the input row is overwritten by image features anyway, and a
            # mean output row scores an average logit, far below any likely next token.
            for layer in {llm.get_input_embeddings(), llm.get_output_embeddings()}:
                layer.weight[old:] = layer.weight[:old].mean(0)
        log(f"added {', '.join(f'{t} as token {i}' for t, i in zip(tokens, ids) if i >= old)}; "
            f"vocabulary {old} -> {llm.get_input_embeddings().weight.shape[0]}")
    return ids


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



HUB_PREFIXES = {"vision_tower.": "vision_tower.vision_model."}
"""Key prefixes `save_pretrained` writes -> the hub's llava-hf folders' (llava-1.5-7b-hf, interleave, v1.6,
OneVision). transformers 5 flattens CLIP/SigLIP vision models and saves the tower's keys as
`vision_tower.embeddings...`; it renames either form on load, but vLLM (0.32) loads only the hub's
`vision_tower.vision_model...` (its own CLIP/SigLIP keep `vision_model`). The rest of the keys
(`language_model.model.`, `language_model.lm_head.`, `multi_modal_projector.`, `image_newline`) are
already the hub's."""


def hub_layout(folder: Path) -> None:
    """Rename the keys of the safetensors weights `save_pretrained` wrote in `folder` (and its shard index)
    to the hub's layout (`HUB_PREFIXES`). Only the headers are rewritten: the tensor bytes are copied as
    they are, so no weight is loaded."""
    def rename(key: str) -> str:
        for old, new in HUB_PREFIXES.items():
            if key.startswith(old) and not key.startswith(new):
                return new + key[len(old):]
        return key

    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for path in folder.glob("*.safetensors"):
        rename_safetensors(path, rename)


def rename_safetensors(path: Path, rename) -> None:
    """Rewrite a safetensors file's header with each tensor key `k` as `rename(k)`. The format is an 8-byte
    little-endian header length, the JSON header (names -> dtype, shape, offsets into the data that
    follows) and the data; offsets count from the data's start, so a new header keeps them valid."""
    import shutil
    import struct

    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        renamed = {(k if k == "__metadata__" else rename(k)): v for k, v in header.items()}
        if renamed.keys() == header.keys():
            return
        raw = json.dumps(renamed, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(f, out, 16 << 20)
    tmp.replace(path)
