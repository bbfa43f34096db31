"""LLaVA checkpoints (folders or hub ids) -> mmchat checkpoints.

SRC's format is detected from its config.json:
  llava-hf   what `LlavaForConditionalGeneration.save_pretrained` writes (`model_type: llava`,
             `text_config`, `vision_config`), or LlavaNext's / LlavaOnevision's (`llava_next`,
             `llava_onevision`: AnyRes tiling); loaded through transformers, which renames its keys.
  original   LLaVA's own `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` (`mm_vision_tower`,
             `mm_projector_type`, ...): LLM weights plus `model.mm_projector.*` (LLaVA-NeXT's also
             `image_aspect_ratio: anyres` and `model.image_newline`); the CLIP tower is named, and
             included only when it was tuned (`model.vision_tower.vision_tower.*`, as xtuner's checkpoints).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from mmchat.checkpoint import is_checkpoint, save_checkpoint
from mmchat.convert.clip_weights import open_clip_from_hf
from mmchat.convert.common import SELECT_STRATEGIES, ConvertError, check_destination, log
from mmchat.convert.hf_folder import anyres_settings, choose_template, decoding, image_settings, stop_token_ids, with_pad
from mmchat.convert.original_next import NEWLINE_KEY, is_next, next_tiling, tiling_problems
from mmchat.convert.towers import TUNED_TOWER_PREFIX, tower_from_hf, with_tuned_tower
from mmchat.config import (
    CLIP_MEAN,
    CLIP_STD,
    PROJECTOR_ACTS,
    ModelConfig,
    ProjectorConfig,
    VisionConfig,
)
from mmchat.model import add_image_newline
from mmchat.projector import build_projector
from mmchat.templates import IMAGE_TOKEN
from mmchat.vision import TRANSFORMERS_TOWERS

# The original checkpoints name their tower by hub id; open_clip has the same OpenAI weights.
OPENAI_TOWERS = {
    "openai/clip-vit-large-patch14-336": ("ViT-L-14-336", "openai"),
    "openai/clip-vit-large-patch14": ("ViT-L-14", "openai"),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Original LLaVA's architectures -> the transformers (config, causal LM) its LLM weights load into.
ORIGINAL_LLMS = {"LlavaLlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
                 "LlavaMistralForCausalLM": ("MistralConfig", "MistralForCausalLM")}
# Vision-language models users mistake for LLaVA-1.5-style ones: config.json's model_type -> what it is.
UNSUPPORTED = {
    "llava_next_video": "LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration) is not yet supported",
    "vipllava": "VipLlava (VipLlavaForConditionalGeneration: several tower layers, visual prompts) is not supported",
    "mllama": "Llama 3.2 Vision (MllamaForConditionalGeneration: cross-attention layers) is not supported",
    "qwen2_vl": "Qwen2-VL (Qwen2VLForConditionalGeneration: its own tower, dynamic resolution) is not supported",
    "qwen2_5_vl": "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) is not supported",
    "pixtral": "Pixtral (PixtralVisionModel) is not supported",
    "mistral3": "Mistral 3 (Mistral3ForConditionalGeneration: a Pixtral tower) is not supported",
    "paligemma": "PaliGemma (PaliGemmaForConditionalGeneration) is not supported",
    "idefics2": "Idefics2 (Idefics2ForConditionalGeneration: a perceiver resampler) is not supported",
    "idefics3": "Idefics3 (Idefics3ForConditionalGeneration) is not supported",
}
SUPPORTED = ("mmchat converts llava-hf LlavaForConditionalGeneration folders (llava-1.5, bakLlava, llava-interleave, "
             "xtuner llava-llama-3 / llava-phi-3, llava-gemma), LlavaNextForConditionalGeneration (llava-v1.6), "
             "LlavaOnevisionForConditionalGeneration (llava-onevision) and original LLaVA-1.5 / LLaVA-NeXT (LlavaLlamaForCausalLM, "
             "LlavaMistralForCausalLM)")
# llava-hf model types -> transformers' class; NeXT adds AnyRes tiling and a learned image_newline.
LLAVA_HF_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                    "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def to_mmchat(src: str, dst: Path, vision_tower: str | None = None, overwrite: bool = False, pad: bool | None = None,
              template: str | None = None, image_backend: str | None = None) -> Path:
    """Convert a llava-hf or original-format LLaVA checkpoint (folder or hub id) into an mmchat checkpoint.

    `pad` overrides pad-to-square (else: llava-hf follows its image processor's `do_pad`, original
    LLaVA its `image_aspect_ratio`); `template` the prompt template (else: the folder's chat
    template as `chat` when it has one, `llava_v1` otherwise)."""
    dst = check_destination(dst, overwrite)
    folder = fetch(src)
    kind, config = detect_format(folder)
    log(f"{folder}: {kind} checkpoint")
    if kind == "llava-hf":
        if vision_tower:
            raise ConvertError("--vision-tower applies to original-format LLaVA only; a llava-hf checkpoint includes its tower")
        return from_llava_hf(folder, dst, pad, template, image_backend)
    if image_backend:
        raise ConvertError("--image-backend applies to llava-hf folders; an original LLaVA checkpoint has no image "
                           "processor (mmchat preprocesses as LLaVA's own code, PIL-exact)")
    return from_original(folder, config, dst, vision_tower, pad, template)


def fetch(src: str) -> Path:
    """A local folder, or a hub id downloaded with `huggingface_hub.snapshot_download`."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"SRC {src} is a file; pass the checkpoint folder")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", src) or src.startswith("."):
        raise ConvertError(f"SRC {src} does not exist")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(src, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]))
    except Exception as e:  # offline, unknown repo, gated, network: all end the same way for the user
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise ConvertError(f"{src!r} is not a local folder and could not be fetched from the Hugging Face Hub ({why}); download it and pass the local folder") from None


def detect_format(folder: Path) -> tuple[str, dict]:
    """`llava-hf` or `original`, with the folder's config.json."""
    if is_checkpoint(folder):
        raise ConvertError(f"{folder} is already an mmchat checkpoint; load it directly (convert it with --to llava-hf to export)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{folder} has no config.json: not a LLaVA checkpoint (expected a llava-hf or original LLaVA folder)")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if any(k.startswith("mm_") for k in config) or any(a.startswith("Llava") and a.endswith("ForCausalLM") for a in architectures):
        return "original", config
    what = UNSUPPORTED.get(config.get("model_type"))
    if config.get("model_type") == "llava" and (config.get("vision_config") or {}).get("model_type") == "pixtral":
        what = "Pixtral (LlavaForConditionalGeneration with a Pixtral vision tower) is not supported"
    if what:
        raise ConvertError(f"{config_path}: {what}; {SUPPORTED}")
    if config.get("model_type") in LLAVA_HF_CLASSES and "text_config" in config and "vision_config" in config:
        return "llava-hf", config
    raise ConvertError(
        f"{config_path}: model_type={config.get('model_type')!r}, architectures={architectures} is neither llava-hf "
        f"(LlavaForConditionalGeneration) nor original LLaVA (LlavaLlamaForCausalLM with mm_* keys); {SUPPORTED}"
    )


def from_llava_hf(folder: Path, dst: Path, pad: bool | None = None, template: str | None = None,
                  image_backend: str | None = None) -> Path:
    """llava-hf -> mmchat: the tower becomes open_clip or stays transformers' (`towers.tower_from_hf`),
    `linear_1/2` the projector's `0/2`, the LLM a causal LM;
    preprocessing follows the folder's image processor, prompts its chat template, stop ids its generation config.
    LlavaNext: its pinpoints become `vision.anyres`, its `image_newline` goes with the projector."""
    import transformers
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, LLAVA_HF_CLASSES[hf_config.model_type])
    check_llava_hf(hf_config)
    tiling = anyres_settings(folder, hf_config) if hf_config.model_type != "llava" else None
    if hf_config.model_type == "llava_onevision":
        log(f"note: {folder} also reads videos (video_token_index {hf_config.video_token_index}); mmchat converts "
            "it for images only: videos are out of scope")
    processor, tokenizer = folder_processor(folder, image_backend)
    check_image_token(folder, tokenizer, hf_config.image_token_index)
    prompt = choose_template(folder, tokenizer, template)  # before the weights load: a bad template fails fast
    if processor is not None:
        processor.chat_template = tokenizer.chat_template
    log(f"loading the llava-hf model ({model_class.__name__})")
    llava, info = model_class.from_pretrained(folder, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        raise ConvertError(f"{folder} is missing weights {sorted(info['missing_keys'])[:5]}; is the download complete?")
    library, visual, clip_cfg = tower_from_hf(llava.model.vision_tower)
    settings = with_pad(image_settings(folder, hf_config.vision_config.image_size), pad)
    if processor is not None and tiling is None and pad is not None:
        processor.image_processor = padded(processor.image_processor, settings["pad_to_square"], image_backend)
    try:
        vision = VisionConfig(
            open_clip_model=f"{folder.name}/vision_tower",
            pretrained=None,  # the weights travel in vision/
            library=library,
            select_layer=hf_config.vision_feature_layer,
            select_feature={v: k for k, v in SELECT_STRATEGIES.items()}[hf_config.vision_feature_select_strategy],
            anyres=tiling,
            **settings,
        )
    except ValueError as e:
        raise ConvertError(f"{folder}/config.json: {e}") from None
    hf_proj = llava.model.multi_modal_projector
    projector_cfg = ProjectorConfig("mlp2x_gelu", hf_proj.linear_1.in_features, hf_proj.linear_2.out_features,
                                    bias=hf_config.multimodal_projector_bias, act=hf_config.projector_hidden_act)
    projector = build_projector(projector_cfg)
    projector.load_state_dict({f"{i}.{p}": v.float() for i, layer in ((0, hf_proj.linear_1), (2, hf_proj.linear_2)) for p, v in layer.named_parameters()})
    if tiling is not None:
        add_image_newline(projector, projector_cfg.out_dim, llava.model.image_newline)
    llm = causal_lm(hf_config.text_config, llava.model.language_model, llava.lm_head)
    config = ModelConfig(vision=vision, projector=projector_cfg, template=prompt.name, image_token_id=hf_config.image_token_index,
                         stop_token_ids=stop_token_ids(folder, tokenizer, prompt.end_of_turn),
                         image_backend=image_backend if processor is not None else None, **decoding(folder))
    log(f"writing {dst}")
    return save_checkpoint(dst, config, projector, tokenizer, llm=llm, vision=visual, vision_model_cfg=clip_cfg,
                           processor=processor)


def folder_processor(folder: Path, backend: str | None = None):
    """(the folder's processor or None, its tokenizer) as transformers' `AutoProcessor` loads them: the
    tokenizer class the folder's tokenizer_config.json names, the image processor with `backend` (None: the
    default). The checkpoint keeps the processor, so every path tokenizes and preprocesses as transformers
    does here."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=False, **({"backend": backend} if backend else {}))
    except OSError:  # no image processor config: transformers' processor cannot load either
        loaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if getattr(loaded, "image_processor", None) is None:
        tokenizer = getattr(loaded, "tokenizer", loaded)
        log(f"note: {folder} has no image processor; the tokenizer is {type(tokenizer).__name__}, images are "
            "preprocessed by mmchat from the settings below")
        return None, tokenizer
    log(f"processor {type(loaded).__name__}: tokenizer {type(loaded.tokenizer).__name__}, image processor "
        f"{type(loaded.image_processor).__name__} (kept in the checkpoint; it makes the pixels)")
    return loaded, loaded.tokenizer


def padded(image_processor, pad: bool, backend: str | None = None):
    """`--pad` / `--no-pad` on a converted folder's image processor: transformers' `LlavaImageProcessor`
    with the same settings and `do_pad` (LLaVA's pad to square with the mean colour), on `backend`."""
    import transformers

    name = "LlavaImageProcessorPil" if backend == "pil" else "LlavaImageProcessor"
    saved = {**image_processor.to_dict(), "image_processor_type": name, "do_pad": pad}
    return getattr(transformers, name).from_dict(saved)


def check_image_token(folder: Path, tokenizer, image_token_id: int) -> None:
    """The tokenizer's `<image>` must be the id the model replaces with image features."""
    found = tokenizer.get_vocab().get(IMAGE_TOKEN)
    if found is not None and found != image_token_id:
        raise ConvertError(f"{folder}: the tokenizer's {IMAGE_TOKEN} is token {found} but config.json has "
                           f"image_token_index={image_token_id}; fix image_token_index")


def check_llava_hf(config) -> None:
    """Refuse, in one line, what mmchat cannot run as transformers runs it."""
    problems = []
    vision = config.vision_config
    if vision.model_type not in TRANSFORMERS_TOWERS:
        problems.append(f"vision tower {vision.model_type!r} (mmchat runs {', '.join(sorted(TRANSFORMERS_TOWERS))})")
    layers = [config.vision_feature_layer] if isinstance(config.vision_feature_layer, int) else list(config.vision_feature_layer)
    blocks = vision.num_hidden_layers
    if not layers or any(layer == 0 or not -blocks - 1 <= layer <= blocks for layer in layers):
        problems.append(f"vision_feature_layer={config.vision_feature_layer} (mmchat takes block outputs 1..{blocks} or -1..-{blocks})")
    if config.vision_feature_select_strategy not in SELECT_STRATEGIES.values():
        problems.append(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} "
                        f"(mmchat runs {', '.join(sorted(SELECT_STRATEGIES.values()))})")
    if config.projector_hidden_act not in PROJECTOR_ACTS:
        problems.append(f"projector_hidden_act={config.projector_hidden_act!r} (mmchat runs {', '.join(PROJECTOR_ACTS)})")
    if problems:
        raise ConvertError(f"this llava-hf checkpoint has {'; '.join(problems)}, which mmchat does not support")


def causal_lm(text_config, base_model: nn.Module, lm_head: nn.Module) -> nn.Module:
    """`AutoModelForCausalLM.from_config(text_config)` around existing modules (no second copy in memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    setattr(llm, llm.base_model_prefix, base_model)
    llm.set_output_embeddings(lm_head)
    assert not any(t.is_meta for t in [*llm.parameters(), *llm.buffers()]), "causal LM left with meta tensors"
    return llm


def from_original(folder: Path, config: dict, dst: Path, vision_tower: str | None, pad: bool | None = None,
                  template: str | None = None) -> Path:
    """Original LLaVA -> mmchat: LLaMA (or Mistral) weights as a causal LM, `model.mm_projector.*` as the
    projector; LLaVA-NeXT's (`image_aspect_ratio: anyres`) tiling as `vision.anyres` and its
    `model.image_newline` beside the projector, tiled as transformers' LlavaNext (`original_next`)."""
    from transformers import AutoTokenizer

    check_original(folder, config)
    tower_name = vision_tower or config.get("mm_vision_tower")
    if not tower_name:
        raise ConvertError(f"{folder}/config.json names no mm_vision_tower; pass --vision-tower")
    vision_kwargs, visual, clip_cfg, width = resolve_tower(tower_name, from_flag=vision_tower is not None)
    if config.get("mm_hidden_size", width) != width:
        raise ConvertError(f"mm_hidden_size={config['mm_hidden_size']} but vision tower {tower_name} is {width} wide; pass the right --vision-tower")
    tuned = read_tensors(folder, weight_files(folder), TUNED_TOWER_PREFIX)
    if tuned:  # a tower tuned with the LLM (xtuner's; LLaVA's unfrozen tower) travels in the checkpoint
        vision_kwargs, visual, clip_cfg = with_tuned_tower(vision_kwargs, visual, clip_cfg, tuned, tower_name)
    projector_state = read_tensors(folder, weight_files(folder), "model.mm_projector.")
    if not projector_state:
        raise ConvertError(f"{folder} has no model.mm_projector.* weights; is it a LLaVA checkpoint?")
    first = projector_state.get("0.weight", projector_state.get("weight"))
    # LLaVA pads (`image_aspect_ratio: pad`) before its tower's processor, whatever that processor says.
    pads = config.get("image_aspect_ratio") == "pad"
    log(f"image_aspect_ratio={config.get('image_aspect_ratio')!r}: {'pad to square' if pads else 'no pad'}")
    vision_kwargs = with_pad({**vision_kwargs, "pad_to_square": pads}, pad)
    tiling = next_tiling(folder, config) if is_next(config) else None
    try:
        vision = VisionConfig(
            select_layer=config["mm_vision_select_layer"],
            select_feature=config.get("mm_vision_select_feature", "patch"),  # LLaVA's default
            anyres=tiling,
            **vision_kwargs,
        )
        projector_cfg = ProjectorConfig(config.get("mm_projector_type", "linear"), first.shape[1], first.shape[0])
    except ValueError as e:
        raise ConvertError(f"{folder}/config.json: {e}") from None
    projector = build_projector(projector_cfg)
    if set(projector_state) != set(projector.state_dict()):
        raise ConvertError(
            f"model.mm_projector.* holds {sorted(projector_state)} but mm_projector_type={projector_cfg.type!r} "
            f"has {sorted(projector.state_dict())}; fix mm_projector_type in {folder}/config.json"
        )
    projector.load_state_dict({k: v.float() for k, v in projector_state.items()})
    if tiling is not None:
        newline = read_tensors(folder, weight_files(folder), NEWLINE_KEY).get("")
        if newline is None or newline.numel() != projector_cfg.out_dim:
            raise ConvertError(f"{folder}: an anyres checkpoint needs {NEWLINE_KEY} of {projector_cfg.out_dim} values, found "
                               f"{None if newline is None else tuple(newline.shape)}; is the download complete?")
        add_image_newline(projector, projector_cfg.out_dim, newline)

    llm = original_llm(folder, config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # LLaVA's own format unless --template; LLaVA-NeXT-Mistral's tokenizer carries Mistral's [INST] chat template.
    mistral = (config.get("architectures") or [""])[0] == "LlavaMistralForCausalLM"
    prompt = choose_template(folder, tokenizer, template or (None if mistral else "llava_v1"))
    config_out = ModelConfig(vision=vision, projector=projector_cfg, template=prompt.name,
                             stop_token_ids=stop_token_ids(folder, tokenizer, prompt.end_of_turn))
    log(f"writing {dst}")
    return save_checkpoint(dst, config_out, projector, tokenizer, llm=llm, vision=visual, vision_model_cfg=clip_cfg)


def original_llm(folder: Path, config: dict) -> nn.Module:
    """The causal LM of an original checkpoint: config.json's LLM fields, the weights less LLaVA's own."""
    import transformers

    architecture = (config.get("architectures") or ["LlavaLlamaForCausalLM"])[0]
    config_class, model_class = (getattr(transformers, name) for name in ORIGINAL_LLMS[architecture])
    keys = set(config_class().to_dict()) | {"rope_scaling", "rope_theta", "torch_dtype"}
    llm_config = config_class(**{k: v for k, v in config.items() if k in keys and k != "model_type"})
    log(f"loading the language model ({model_class.__name__})")
    llm, info = model_class.from_pretrained(folder, config=llm_config, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        raise ConvertError(f"{folder} is missing {model_class.__name__} weights {sorted(info['missing_keys'])[:5]}; "
                           "is the download complete?")
    stray = sorted(k for k in info["unexpected_keys"] if "vision_tower" in k and not k.startswith(TUNED_TOWER_PREFIX))
    if stray:
        raise ConvertError(f"{folder} stores vision tower weights as {stray[0]}, ...; mmchat reads a tuned tower from {TUNED_TOWER_PREFIX}*")
    return llm


def check_original(folder: Path, config: dict) -> None:
    architectures = config.get("architectures") or ["LlavaLlamaForCausalLM"]
    if (folder / "adapter_config.json").is_file():
        raise ConvertError(f"{folder} is a LLaVA LoRA checkpoint; merge it into its base with LLaVA's scripts/merge_lora_weights.py first")
    problems = []
    if len(architectures) != 1 or architectures[0] not in ORIGINAL_LLMS:
        problems.append(f"architectures={architectures} (mmchat reads {' or '.join(ORIGINAL_LLMS)})")
    if "mm_vision_select_layer" not in config:
        problems.append("no mm_vision_select_layer")
    if config.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end=true (image start/end tokens)")
    problems += tiling_problems(config)
    if problems:
        raise ConvertError(f"{folder}/config.json: {'; '.join(problems)}; mmchat supports LLaVA-1.5- and LLaVA-NeXT-style "
                           "checkpoints")


def resolve_tower(name: str, from_flag: bool) -> tuple[dict, nn.Module | None, dict | None, int]:
    """The CLIP an original checkpoint needs: (VisionConfig fields, open_clip visual or None, its config, width)."""
    import open_clip

    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        visual, clip_cfg = load_hf_clip(folder)
        settings = image_settings(folder, clip_cfg["vision_cfg"]["image_size"])
        return {"open_clip_model": folder.name, "pretrained": None, **settings}, visual, clip_cfg, clip_cfg["vision_cfg"]["width"]
    model, tag = OPENAI_TOWERS.get(name) or (name.split("/", 1) if from_flag and "/" in name else (None, None))
    if model is None or model not in open_clip.list_models() or tag not in open_clip.list_pretrained_tags_by_model(model):
        source = "--vision-tower" if from_flag else "mm_vision_tower in config.json"
        raise ConvertError(
            f"unknown vision tower {name!r} ({source}); pass --vision-tower as an open_clip NAME/TAG "
            "(e.g. ViT-L-14-336/openai) or a local folder with a transformers CLIP model"
        )
    vision_cfg = open_clip.get_model_config(model)["vision_cfg"]
    pretrained = open_clip.get_pretrained_cfg(model, tag)
    settings = {
        "open_clip_model": model,
        "pretrained": tag,
        "image_size": vision_cfg["image_size"],
        "mean": tuple(pretrained.get("mean") or CLIP_MEAN),
        "std": tuple(pretrained.get("std") or CLIP_STD),
    }
    return settings, None, None, vision_cfg["width"]


def load_hf_clip(folder: Path) -> tuple[nn.Module, dict]:
    """A transformers CLIPModel / CLIPVisionModel folder -> (open_clip visual, its config)."""
    from transformers import CLIPVisionModelWithProjection

    model_type = json.loads((folder / "config.json").read_text()).get("model_type") if (folder / "config.json").is_file() else None
    if model_type not in ("clip", "clip_vision_model"):
        raise ConvertError(f"vision tower folder {folder} holds model_type={model_type!r}, not a transformers CLIP; pass --vision-tower")
    tower, info = CLIPVisionModelWithProjection.from_pretrained(folder, output_loading_info=True)
    missing = set(info["missing_keys"]) - {"visual_projection.weight"}
    if missing:
        raise ConvertError(f"vision tower folder {folder} is missing weights {sorted(missing)[:5]}")
    projection = None if "visual_projection.weight" in info["missing_keys"] else tower.visual_projection.weight
    return open_clip_from_hf(tower.vision_model, projection)


def weight_files(folder: Path) -> dict[str, list[str]]:
    """Weight files of a transformers folder, each with the keys it holds (None = read the file to know)."""
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            files: dict[str, list[str]] = {}
            for key, file in json.loads(index.read_text())["weight_map"].items():
                files.setdefault(file, []).append(key)
            return files
        if (folder / name).is_file():
            return {name: None}
    raise ConvertError(f"{folder} has no {' or '.join(WEIGHT_FILES)} (or a sharded index); a projector-only (stage-1) checkpoint cannot be converted alone")


def read_tensors(folder: Path, files: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose key starts with `prefix`, prefix removed. `.bin` files load with weights_only."""
    from safetensors import safe_open

    out = {}
    for file, keys in files.items():
        if keys is not None and not any(k.startswith(prefix) for k in keys):
            continue
        if file.endswith(".safetensors"):
            with safe_open(str(folder / file), "pt") as f:
                out.update({k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        else:
            state = torch.load(folder / file, map_location="cpu", weights_only=True, mmap=True)
            out.update({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return out


