"""The model behind the web app: loaded, or a message that says why not and how to fix it.

A model that fails to load must not take the app down with a stack trace: the page shows the
reason and the flag that fixes it, and the same line is printed on the console.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmchat.model import LoadOptions, MultimodalModel, describe_preprocessing
from mmchat.serving.config import ServeConfig

FIX = ("start with `python app.py --model PATH` (an mmchat checkpoint, a LLaVA folder or a hub id), "
       "or set MMCHAT_MODEL on a Space")
NO_DEMO = (f"No model loaded: the embedded demo model is missing from assets/demo-model; rebuild it with "
           f"`python -m finetune.demo --out assets/demo-model` (under an hour on a CPU), or {FIX}.")
DEMO_LIMITS = ("The demo model is tiny and was trained here, from nothing, on drawn scenes: circles, squares and "
               "triangles in six colours on white, one per cell of a 3×3 grid. Ask it how many shapes there are, "
               "whether there is a blue square, for a description, or a shape's colour or place (try the "
               "examples); it is right about 98% of the time there, least often counting three shapes. It cannot "
               "read photos. Serve a full LLaVA-1.5 with --model for real images.")
WEIGHTS = {"4bit": "4-bit NF4", "8bit": "8-bit", "16bit": "bfloat16", "32bit": "float32"}


@dataclass
class ServedModel:
    model: MultimodalModel | None
    summary: str
    """Markdown line for the page: model, weights, device and limits, or why nothing is served."""

    @property
    def ready(self) -> bool:
        return self.model is not None


def load_served_model(config: ServeConfig) -> ServedModel:
    """Load `config.model` (converting a LLaVA folder / hub id once), or explain the failure."""
    from mmchat.checkpoint import is_checkpoint
    from mmchat.convert import resolve_checkpoint
    from mmchat.model import load_model

    if config.is_demo_model and not is_checkpoint(config.model):
        return ServedModel(None, NO_DEMO)
    try:
        options = LoadOptions(config.load_in, config.device)
        print(f"Loading {config.model} ({options.load_in} on {options.device}) ...", flush=True)
        model = load_model(resolve_checkpoint(config.model), options)
    except Exception as e:  # any failure becomes a message on the page; the app keeps serving it
        return ServedModel(None, f"No model loaded: {config.model} failed to load ({type(e).__name__}: "
                                 f"{_first_line(e)}). {_hint(e)}")
    return ServedModel(model, describe(model, config, options))


def describe(model: MultimodalModel, config: ServeConfig, options: LoadOptions) -> str:
    """The status line: which model, weights and device, its LLM family, vision tower and image tokens."""
    name = "the demo model" if config.is_demo_model else _display_name(config.model)
    line = (f"Serving {name} · {WEIGHTS[options.load_in]} weights · {options.device} · "
            f"{model.llm.config.model_type} LLM, {_tower(model)}, {_image_tokens(model)}, "
            f"{model.max_context}-token context · pixels and tokens: {describe_preprocessing(model)}")
    return f"{line}. {DEMO_LIMITS}" if config.is_demo_model else line


def _image_tokens(model: MultimodalModel) -> str:
    if model.anyres is not None and model.anyres.tiles_only_alone:  # OneVision: tiles for a lone image only
        return (f"AnyRes (anyres_max_{model.anyres.max_tiles}): {model.image_tokens} tokens per tile, a tile grid "
                f"for a lone image, {model.anyres.square_tokens} tokens per image when there are several")
    if model.anyres is not None:  # LLaVA-NeXT: a base tile plus a grid, per the image's shape
        return f"AnyRes: {model.image_tokens} tokens per tile, a tile grid per image's shape"
    return f"{model.image_tokens} tokens per image"


def _tower(model: MultimodalModel) -> str:
    vision = model.config.vision
    # open_clip's class is its ViT (a CLIP); transformers' classes name themselves (SiglipVisionModel)
    kind = {"VisionTransformer": "CLIP ViT"}.get(type(model.vision).__name__, type(model.vision).__name__)
    named = f" {vision.open_clip_model}/{vision.pretrained}" if vision.pretrained else ""
    return f"{kind}{named} tower at {vision.image_size} px"


def _display_name(model: str) -> str:
    path = Path(model)
    return path.resolve().name if path.exists() else model


def _first_line(error: Exception) -> str:
    text = str(error).strip() or "no details"
    return text.splitlines()[0][:300]


def _hint(error: Exception) -> str:
    import torch

    text = f"{type(error).__name__} {error}".lower()
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text:
        return "Fix: use --load-in 4bit, a smaller model, or a GPU with more memory."
    if "bitsandbytes" in text:
        return "Fix: install bitsandbytes (pip install bitsandbytes), or use --load-in 16bit or --load-in 32bit."
    if isinstance(error, ModuleNotFoundError) and "mmchat.convert" in text:
        return ("Fix: converting LLaVA checkpoints needs mmchat.convert, which this version lacks; "
                "pass an mmchat checkpoint folder with --model.")
    if isinstance(error, ValueError) and "--" in str(error):
        return "Fix: change the flag named above."
    return f"Fix: check the path or hub id; {FIX}."
