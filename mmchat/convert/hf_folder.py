"""What a transformers / llava-hf folder says beside its weights, read as transformers reads it: the
image processor's preprocessing, the stop ids of `generation_config.json`, and the chat template."""
from __future__ import annotations

import json
from pathlib import Path

from mmchat.config import CLIP_MEAN, CLIP_STD, RESAMPLE_FILTERS, VisionConfig
from mmchat.convert.common import ConvertError, log

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


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


def anyres_settings(folder: Path, hf_config):
    """A LlavaNext / LlavaOnevision folder's tiling as `AnyresConfig`, checked against its image
    processor as `AutoImageProcessor` loads it (the torchvision backend, which `mmchat.anyres` matches)."""
    from transformers import AutoImageProcessor
    from transformers.image_utils import PILImageResampling

    from mmchat.anyres import settings_from_transformers
    from mmchat.config import AnyresConfig

    processor = AutoImageProcessor.from_pretrained(folder)
    try:
        settings = settings_from_transformers(hf_config, processor)
    except ValueError as e:
        raise ConvertError(f"{folder}: {e}") from None
    theirs = [list(map(int, p)) for p in processor.image_grid_pinpoints or []]
    if theirs != [list(p) for p in settings.pinpoints]:
        raise ConvertError(f"{folder}: the image processor tiles on image_grid_pinpoints {theirs} but config.json packs on "
                           f"{[list(p) for p in settings.pinpoints]}; transformers would mix them up; make them equal")
    if processor.resample not in (None, PILImageResampling.BICUBIC, 3) or not processor.do_convert_rgb:
        raise ConvertError(f"{folder}: {type(processor).__name__} with resample={processor.resample!r}, "
                           f"do_convert_rgb={processor.do_convert_rgb}; mmchat tiles as llava-hf's do (bicubic, RGB)")
    log(f"anyres tiling: {settings.tile_size} px tiles, grids {[list(p) for p in settings.pinpoints]}"
        + (f", anyres_max_{settings.max_tiles}" if settings.max_tiles else ""))
    return AnyresConfig(pinpoints=[list(p) for p in settings.pinpoints], max_tiles=settings.max_tiles)


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


def decoding(folder: Path) -> dict:
    """The folder's decoding defaults as `ModelConfig` takes them: what transformers' `generate`
    does with its generation config (greedy unless `do_sample`; a folder without one is greedy).
    `max_new_tokens` only when the file sets it (transformers' default `max_length` 20 is a guard,
    not a choice)."""
    from transformers import GenerationConfig

    path = folder / "generation_config.json"
    gen = GenerationConfig.from_pretrained(folder) if path.is_file() else GenerationConfig()
    raw = json.loads(path.read_text()) if path.is_file() else {}
    out = {"temperature": float(gen.temperature or 1.0) if gen.do_sample else 0.0,
           "top_p": float(gen.top_p or 1.0) if gen.do_sample else None,
           "max_new_tokens": raw.get("max_new_tokens")}
    log("decoding as its generation config says: " + (f"sampling at temperature {out['temperature']}, top-p "
        f"{out['top_p']}" if gen.do_sample else "greedy") + (f", at most {out['max_new_tokens']} new tokens"
                                                             if out["max_new_tokens"] else ""))
    return out


def stop_token_ids(folder: Path, tokenizer, end_of_turn: str | None = None) -> list[int] | None:
    """The folder's `generation_config.json` `eos_token_id` (int or list) plus the tokenizer's EOS;
    None when that is the tokenizer's EOS alone (mmchat's default). The chat template's `end_of_turn`
    is added when the generation config lacks it (transformers' generate would run past it)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    ids = list(dict.fromkeys(ids))
    turn_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    if turn_id is not None and turn_id not in ids:
        log(f"note: {folder} stops at {ids} but its chat template ends answers with {end_of_turn!r} ({turn_id}); "
            "mmchat stops there too, where transformers' generate would go on")
        ids.append(turn_id)
    if not ids or ids == [tokenizer.eos_token_id]:
        return None
    log(f"generation stops at token ids {ids} ({', '.join(repr(t) for t in tokenizer.convert_ids_to_tokens(ids))})")
    return ids


def chat_template(folder: Path, tokenizer) -> tuple[str | None, str]:
    """(the folder's chat template or None, the file it came from), looked up as transformers'
    `AutoProcessor` does (processor_config.json's `chat_template`, the legacy chat_template.json,
    chat_template.jinja), else the tokenizer's own (tokenizer_config.json)."""
    processor = folder / "processor_config.json"
    saved = json.loads(processor.read_text()) if processor.is_file() else {}
    if saved.get("chat_template"):
        return _default(saved["chat_template"]), processor.name
    if (folder / "chat_template.json").is_file():
        return _default(json.loads((folder / "chat_template.json").read_text())["chat_template"]), "chat_template.json"
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(), "chat_template.jinja"
    return _default(tokenizer.chat_template), "tokenizer_config.json"


def _default(source: str | dict | list | None) -> str | None:
    """Several named templates (a dict, or a list of {name, template}): the `default` one is for chat."""
    if isinstance(source, list):
        source = {t["name"]: t["template"] for t in source}
    return source.get("default") if isinstance(source, dict) else source


def choose_template(folder: Path, tokenizer, name: str | None = None):
    """The converted checkpoint's prompt template: `name` (--template), else `chat` when the folder has
    a chat template, else `llava_v1`. The folder's chat template is written into `tokenizer`, so the
    checkpoint keeps it whichever is chosen. Returns the resolved `Template` (its end-of-turn token
    is a stop id); a template that cannot render images or answers is a ConvertError."""
    from mmchat.templates import CHAT, resolve_template

    source, where = chat_template(folder, tokenizer)
    if source:
        tokenizer.chat_template = source
    if name is None and not source:
        log(f"note: {folder} has no chat template (processor or tokenizer); prompts use mmchat's llava_v1 "
            "(LLaVA-1.5's format); pass --template to choose another")
        name = "llava_v1"
    try:
        template = resolve_template(name or CHAT, tokenizer)
    except ValueError as e:
        raise ConvertError(f"{folder / where}: {e}" if (name or CHAT) == CHAT else str(e)) from None
    if name is None:
        log(f"chat template from {where}: prompts are rendered with it, as transformers renders them on this folder")
    return template
