"""LLaVA checkpoints (folders or hub ids) -> mmchat checkpoints.

SRC's format is detected from its config.json:
  llava-hf   what `LlavaForConditionalGeneration.save_pretrained` writes (`model_type: llava`,
             `text_config`, `vision_config`); loaded through transformers, which renames its keys.
  original   LLaVA's own `LlavaLlamaForCausalLM` (`mm_vision_tower`, `mm_projector_type`, ...): LLaMA
             weights plus `model.mm_projector.*`; the CLIP tower is named, not included.
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
from mmchat.config import (
    CLIP_MEAN,
    CLIP_STD,
    RESAMPLE_FILTERS,
    ModelConfig,
    ProjectorConfig,
    VisionConfig,
)
from mmchat.projector import build_projector

# The original checkpoints name their tower by hub id; open_clip has the same OpenAI weights.
OPENAI_TOWERS = {
    "openai/clip-vit-large-patch14-336": ("ViT-L-14-336", "openai"),
    "openai/clip-vit-large-patch14": ("ViT-L-14", "openai"),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def to_mmchat(src: str, dst: Path, vision_tower: str | None = None, overwrite: bool = False, pad: bool | None = None) -> Path:
    """Convert a llava-hf or original-format LLaVA checkpoint (folder or hub id) into an mmchat checkpoint.

    `pad` overrides pad-to-square (else: llava-hf follows its image processor's `do_pad`, original
    LLaVA its `image_aspect_ratio`)."""
    dst = check_destination(dst, overwrite)
    folder = fetch(src)
    kind, config = detect_format(folder)
    log(f"{folder}: {kind} checkpoint")
    if kind == "llava-hf":
        if vision_tower:
            raise ConvertError("--vision-tower applies to original-format LLaVA only; a llava-hf checkpoint includes its tower")
        return from_llava_hf(folder, dst, pad)
    return from_original(folder, config, dst, vision_tower, pad)


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
    if config.get("model_type") == "llava" and "text_config" in config and "vision_config" in config:
        return "llava-hf", config
    raise ConvertError(
        f"{config_path}: model_type={config.get('model_type')!r}, architectures={architectures} is neither llava-hf "
        "(LlavaForConditionalGeneration) nor original LLaVA (LlavaLlamaForCausalLM with mm_* keys)"
    )


def from_llava_hf(folder: Path, dst: Path, pad: bool | None = None) -> Path:
    """llava-hf -> mmchat: the tower becomes open_clip, `linear_1/2` the projector's `0/2`, the LLM a causal LM;
    preprocessing follows the folder's image processor, stop ids its generation config."""
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    hf_config = LlavaConfig.from_pretrained(folder)
    check_llava_hf(hf_config)
    log("loading the llava-hf model")
    llava, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        raise ConvertError(f"{folder} is missing weights {sorted(info['missing_keys'])[:5]}; is the download complete?")
    visual, clip_cfg = open_clip_from_hf(llava.model.vision_tower)
    settings = with_pad(image_settings(folder, hf_config.vision_config.image_size), pad)
    try:
        vision = VisionConfig(
            open_clip_model=f"{folder.name}/vision_tower",
            pretrained=None,  # the weights travel in vision/
            select_layer=hf_config.vision_feature_layer,
            select_feature={v: k for k, v in SELECT_STRATEGIES.items()}[hf_config.vision_feature_select_strategy],
            **settings,
        )
    except ValueError as e:
        raise ConvertError(f"{folder}/config.json: {e}") from None
    hf_proj = llava.model.multi_modal_projector
    projector_cfg = ProjectorConfig("mlp2x_gelu", hf_proj.linear_1.in_features, hf_proj.linear_2.out_features)
    projector = build_projector(projector_cfg)
    projector.load_state_dict({f"{i}.{p}": getattr(layer, p).float() for i, layer in ((0, hf_proj.linear_1), (2, hf_proj.linear_2)) for p in ("weight", "bias")})
    llm = causal_lm(hf_config.text_config, llava.model.language_model, llava.lm_head)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = ModelConfig(vision=vision, projector=projector_cfg, template="llava_v1", image_token_id=hf_config.image_token_index,
                         stop_token_ids=stop_token_ids(folder, tokenizer))
    log(f"writing {dst}")
    return save_checkpoint(dst, config, projector, tokenizer, llm=llm, vision=visual, vision_model_cfg=clip_cfg)


def check_llava_hf(config) -> None:
    problems = []
    if config.vision_config.model_type != "clip_vision_model":
        problems.append(f"vision tower {config.vision_config.model_type!r} (mmchat runs CLIP through open_clip)")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={config.vision_feature_layer} (several layers)")
    if config.vision_feature_select_strategy not in SELECT_STRATEGIES.values():
        problems.append(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}")
    if config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act={config.projector_hidden_act!r} (mlp2x_gelu uses exact gelu)")
    if not config.multimodal_projector_bias:
        problems.append("a projector without bias")
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


def image_settings(folder: Path, default_size: int) -> dict:
    """VisionConfig's preprocessing fields from the folder's image processor, read as transformers
    reads it (PIL backend); without one, LlavaImageProcessor's defaults at the tower's size."""
    if not any((folder / f).is_file() for f in PROCESSOR_FILES):
        log(f"note: {folder} has no {' or '.join(PROCESSOR_FILES)}; preprocessing with LlavaImageProcessor's defaults: "
            f"no pad, shortest edge {default_size} + centre crop, bicubic, CLIP mean/std")
        return {"image_size": default_size, "mean": CLIP_MEAN, "std": CLIP_STD, "pad_to_square": False}
    from transformers import AutoImageProcessor
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    size, crop, saved = processor.size, processor.crop_size, processor.to_dict()
    kind = saved["image_processor_type"]
    where = f"{folder}: {kind} (size {saved.get('size')}, crop {saved.get('crop_size')})"
    if not processor.do_resize:
        raise ConvertError(f"{where} does not resize (do_resize false); the vision tower needs {default_size} px images")
    if size.shortest_edge and not size.longest_edge and processor.do_center_crop and crop.height == crop.width <= size.shortest_edge:
        geometry = {"resize": "shortest_edge", "image_size": crop.height,
                    "shortest_edge": None if size.shortest_edge == crop.height else size.shortest_edge}
    elif size.height and size.height == size.width and (not processor.do_center_crop or crop.height == crop.width == size.height):
        geometry = {"resize": "exact", "image_size": size.height}
    else:
        raise ConvertError(f"{where}: mmchat supports a shortest-edge resize + square centre crop (CLIP) or a square resize (SigLIP)")
    if geometry["image_size"] != default_size:
        raise ConvertError(f"{where} makes {geometry['image_size']} px images but the vision tower takes {default_size} px")
    # Only LLaVA's own image processors pad to square; CLIP's `do_pad` pads a batch to its largest image.
    pads = bool(processor.do_pad) and isinstance(processor, (LlavaImageProcessor, LlavaImageProcessorPil))
    resample = PILImageResampling.BILINEAR if processor.resample is None else processor.resample  # PilBackend's default
    settings = {
        **geometry,
        "pad_to_square": pads,
        "resample": int(resample),
        "rescale": bool(processor.do_rescale),
        "rescale_factor": float(processor.rescale_factor),
        "normalize": bool(processor.do_normalize),
        "mean": channels(processor.image_mean, CLIP_MEAN),
        "std": channels(processor.image_std, CLIP_STD),
        "convert_rgb": bool(processor.do_convert_rgb),
    }
    log(f"image processor {kind}: {describe(VisionConfig(**settings))}")
    return settings


def describe(vision: VisionConfig) -> str:
    """One line of preprocessing, for the log."""
    side = vision.image_size
    steps = ["pad to square" if vision.pad_to_square else "no pad",
             f"shortest edge {vision.shortest_edge or side} + centre crop {side}" if vision.resize == "shortest_edge" else f"resize to {side}×{side}",
             RESAMPLE_FILTERS[vision.resample]]
    if vision.normalize:
        steps.append(f"mean {list(vision.mean)}, std {list(vision.std)}")
    return ", ".join(steps)


def channels(value, default: tuple[float, float, float]) -> tuple[float, float, float]:
    """A processor's `image_mean` / `image_std`: a list, one number for every channel, or None."""
    if value is None:
        return default
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def with_pad(settings: dict, pad: bool | None) -> dict:
    """`--pad` / `--no-pad` win over what the folder says."""
    if pad is None or pad == settings.get("pad_to_square"):
        return settings
    log(f"{'--pad' if pad else '--no-pad'}: {'padding' if pad else 'not padding'} images to square, whatever the folder says")
    return {**settings, "pad_to_square": pad}


def stop_token_ids(folder: Path, tokenizer) -> list[int] | None:
    """The folder's `generation_config.json` `eos_token_id` (int or list) plus the tokenizer's EOS;
    None when that is the tokenizer's EOS alone (mmchat's default)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    ids = list(dict.fromkeys(ids))
    if not ids or ids == [tokenizer.eos_token_id]:
        return None
    log(f"generation stops at token ids {ids} ({', '.join(repr(t) for t in tokenizer.convert_ids_to_tokens(ids))})")
    return ids


def from_original(folder: Path, config: dict, dst: Path, vision_tower: str | None, pad: bool | None = None) -> Path:
    """Original LLaVA -> mmchat: LLaMA weights as a causal LM, `model.mm_projector.*` as the projector."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    check_original(folder, config)
    tower_name = vision_tower or config.get("mm_vision_tower")
    if not tower_name:
        raise ConvertError(f"{folder}/config.json names no mm_vision_tower; pass --vision-tower")
    vision_kwargs, visual, clip_cfg, width = resolve_tower(tower_name, from_flag=vision_tower is not None)
    if config.get("mm_hidden_size", width) != width:
        raise ConvertError(f"mm_hidden_size={config['mm_hidden_size']} but vision tower {tower_name} is {width} wide; pass the right --vision-tower")
    projector_state = read_tensors(folder, weight_files(folder), "model.mm_projector.")
    if not projector_state:
        raise ConvertError(f"{folder} has no model.mm_projector.* weights; is it a LLaVA checkpoint?")
    first = projector_state.get("0.weight", projector_state.get("weight"))
    # LLaVA pads (`image_aspect_ratio: pad`) before its tower's processor, whatever that processor says.
    pads = config.get("image_aspect_ratio") == "pad"
    log(f"image_aspect_ratio={config.get('image_aspect_ratio')!r}: {'pad to square' if pads else 'no pad'}")
    vision_kwargs = with_pad({**vision_kwargs, "pad_to_square": pads}, pad)
    try:
        vision = VisionConfig(
            select_layer=config["mm_vision_select_layer"],
            select_feature=config.get("mm_vision_select_feature", "patch"),  # LLaVA's default
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

    llama_keys = set(LlamaConfig().to_dict()) | {"rope_scaling", "rope_theta", "torch_dtype"}
    llama_config = LlamaConfig(**{k: v for k, v in config.items() if k in llama_keys and k != "model_type"})
    log("loading the language model")
    llm, info = LlamaForCausalLM.from_pretrained(folder, config=llama_config, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        raise ConvertError(f"{folder} is missing LLaMA weights {sorted(info['missing_keys'])[:5]}; is the download complete?")
    if any(".vision_tower." in k for k in info["unexpected_keys"]):
        log(f"note: ignoring vision tower weights stored in the checkpoint; the tower comes from {tower_name}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config_out = ModelConfig(vision=vision, projector=projector_cfg, template="llava_v1", stop_token_ids=stop_token_ids(folder, tokenizer))
    log(f"writing {dst}")
    return save_checkpoint(dst, config_out, projector, tokenizer, llm=llm, vision=visual, vision_model_cfg=clip_cfg)


def check_original(folder: Path, config: dict) -> None:
    architectures = config.get("architectures") or ["LlavaLlamaForCausalLM"]
    if (folder / "adapter_config.json").is_file():
        raise ConvertError(f"{folder} is a LLaVA LoRA checkpoint; merge it into its base with LLaVA's scripts/merge_lora_weights.py first")
    problems = []
    if architectures != ["LlavaLlamaForCausalLM"]:
        problems.append(f"architectures={architectures} (only LlavaLlamaForCausalLM is supported)")
    if "mm_vision_select_layer" not in config:
        problems.append("no mm_vision_select_layer")
    if config.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end=true (image start/end tokens)")
    if config.get("image_aspect_ratio") not in (None, "pad", "square"):
        problems.append(f"image_aspect_ratio={config['image_aspect_ratio']!r} (LLaVA-NeXT tiling)")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type={config['mm_patch_merge_type']!r}")
    if problems:
        raise ConvertError(f"{folder}/config.json: {'; '.join(problems)}; mmchat supports LLaVA-1.5-style checkpoints")


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


