"""The multimodal model: vision tower -> projector -> LLM, and how to load it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from mmchat import anyres
from mmchat.checkpoint import read_config, read_projector_state, resolve_path
from mmchat.config import LOAD_IN, ModelConfig
from mmchat.image import image_pixels
from mmchat.projector import build_projector
from mmchat.vision import image_features, load_vision_tower, num_image_tokens, patch_size

IMAGE_NEWLINE = "image_newline"
"""An AnyRes model's learned row-end vector [H], kept on the projector (so in `projector.safetensors`)."""


@dataclass
class LoadOptions:
    load_in: str | None = None
    """4bit (NF4, double quant), 8bit, 16bit (bf16) or 32bit weights for the LLM. None picks
    4bit on a GPU and 32bit on a CPU, where bitsandbytes' 4-bit matmuls are slower than plain
    float32 and memory is rarely the limit (the CLI, the app and `finetune.eval` all use this rule)."""
    device: str | None = None
    """cuda, cuda:N or cpu; None picks cuda when available."""

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA GPU is visible; use --device cpu")
        if self.load_in is None:
            self.load_in = "32bit" if torch.device(self.device).type == "cpu" else "4bit"
        if self.load_in not in LOAD_IN:
            raise ValueError(f"--load-in {self.load_in!r}: choose one of {', '.join(LOAD_IN)}")

    @property
    def compute_dtype(self) -> torch.dtype:
        # bf16 matmuls are ~300x slower than fp32 on typical CPUs; GPUs want bf16.
        if torch.device(self.device).type == "cpu":  # also "cpu:0", as accelerate names it
            return torch.bfloat16 if self.load_in == "16bit" else torch.float32
        return torch.float32 if self.load_in == "32bit" else torch.bfloat16


class MultimodalModel(nn.Module):
    """LLaVA-1.5: image features from the tower's `select_layer`, projected into the LLM's image slots."""

    def __init__(self, config: ModelConfig, vision: nn.Module, projector: nn.Module, llm: nn.Module, tokenizer,
                 processor=None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.processor = processor
        """A converted folder's transformers processor (`ModelConfig.processor`): its image processor makes
        the pixels; None: `mmchat.image.preprocess` / `mmchat.anyres` from `config.vision`."""
        self.anyres = None if config.vision.anyres is None else anyres.settings_from_config(config.vision, patch_size(vision))
        if self.anyres is not None:
            tokens = num_image_tokens(vision, config.vision)
            if tokens != self.anyres.grid ** 2:
                raise ValueError(f"anyres tiles are stitched from {self.anyres.grid}x{self.anyres.grid} patch grids, but "
                                 f"vision select_feature={config.vision.select_feature!r} gives {tokens} tokens a tile; "
                                 "use patch for a CLIP tower (llava-hf's default), cls_patch for SigLIP (full)")
            if not isinstance(getattr(projector, IMAGE_NEWLINE, None), torch.Tensor):
                raise ValueError("an anyres model's projector must carry its learned image_newline (see add_image_newline)")

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def image_tokens(self) -> int:
        if self.config.projector.type == "resampler":  # its queries, whatever the tower's grid
            return self.config.projector.queries
        return num_image_tokens(self.vision, self.config.vision)

    @property
    def max_context(self) -> int:
        return int(getattr(self.llm.config, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, S, S] -> projected features [N, T, H] (LLM embedding dtype)."""
        vision_device = next(self.vision.parameters()).device
        feats = image_features(self.vision, pixels.to(vision_device), self.config.vision)  # [N, T, D] fp32
        proj_param = next(self.projector.parameters())
        out = self.projector(feats.to(proj_param.device, proj_param.dtype))
        return out.to(self.llm.get_input_embeddings().weight.dtype)

    def image_layout(self, images_in_prompt: int) -> str:
        """How each image of a prompt holding `images_in_prompt` images is read: `square` (one
        tower-sized square: LLaVA-1.5, and OneVision's images when a prompt has several, as
        transformers reads them) or `tiles` (AnyRes: LLaVA-NeXT always, OneVision when alone)."""
        if self.anyres is None or (self.anyres.tiles_only_alone and images_in_prompt > 1):
            return "square"
        return "tiles"

    def image_token_counts(self, images: Sequence[Image.Image], layout: str | None = None) -> list[int]:
        """Slots each image takes in a prompt, in order (what `render` is given). `layout`: as
        `image_layout` says; None when `images` are all of one prompt's images. LLaVA-1.5 squashes
        every image to one tower-sized square, so each takes `image_tokens`; an AnyRes model's count
        depends on the image's size (`mmchat.anyres.num_image_tokens`)."""
        layout = layout or self.image_layout(len(images))
        if layout == "tiles":
            return [anyres.num_image_tokens((im.height, im.width), self.anyres) for im in images]
        if self.anyres is not None:
            return [self.anyres.square_tokens] * len(images)
        return [self.image_tokens] * len(images)

    def encode_each(self, images: Sequence[Image.Image], layout: str | None = None) -> list[torch.Tensor]:
        """Images -> each one's projected features [T_i, H], T_i its `image_token_counts` entry."""
        if not images:
            return []
        layout = layout or self.image_layout(len(images))
        if layout == "tiles":
            return [self._encode_anyres(im) for im in images]
        if self.anyres is not None:  # OneVision's several images: one padded square and a newline each
            squares = self.encode_images(self.pixels(images, layout))
            newline = getattr(self.projector, IMAGE_NEWLINE)
            return [anyres.pack_image_features(square[None], newline, (im.height, im.width), self.anyres)
                    for square, im in zip(squares, images)]
        return list(self.encode_images(self.pixels(images, layout)))

    def pixels(self, images: Sequence[Image.Image], layout: str) -> torch.Tensor:
        """`image_pixels` of one prompt's `images` for this model."""
        image_processor = None if self.processor is None else self.processor.image_processor
        return image_pixels(images, layout, self.config.vision, self.anyres, image_processor)

    def _encode_anyres(self, image: Image.Image) -> torch.Tensor:
        """One image -> base tile + grid tiles through tower and projector -> packed features [T, H]
        (`LlavaNextModel.get_image_features` / `LlavaOnevisionModel`'s for one image)."""
        tiles = self.encode_images(self.pixels([image], "tiles"))  # [1 + rows*cols, g*g, H]
        return anyres.pack_image_features(tiles, getattr(self.projector, IMAGE_NEWLINE), (image.height, image.width),
                                          self.anyres)

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
              features: torch.Tensor | Sequence[torch.Tensor] | None) -> torch.Tensor:
        """Token embeddings [B, L, H] with the image slots (row by row) replaced by image features in order.

        `features`: [N, T, H] (N images of T tokens each), a list of [T_i, H] (each image its own
        count), [sum T_i, H] (already concatenated), or None when there are no slots.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        rows, described = _feature_rows(features)
        slots, given = int(image_mask.sum()), 0 if rows is None else rows.shape[0]
        if slots != given:
            raise ValueError(f"image slots and image features disagree: {slots} slot positions vs {given} "
                             f"feature vectors ({described})")
        if slots:
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), rows.to(embeds.dtype))
        return embeds

    def forward(self, input_ids, image_mask, attention_mask=None, pixel_values=None, labels=None,
                image_sizes=None, image_tiles=None, **llm_kwargs):
        """Training / scoring forward: [B, L] ids, masks and labels; pixel_values [N, 3, S, S], the
        batch's images in order. An AnyRes model takes every image's tiles instead: pixel_values
        [sum tiles_i, 3, S, S], image_sizes [N, 2] (height, width) and image_tiles [N] (tiles_i)."""
        features = None
        if pixel_values is not None and len(pixel_values):
            features = self.encode_images(pixel_values)  # [N or sum tiles_i, T, H]
            if self.anyres is not None:
                features = self.pack_tiles(features, image_sizes, image_tiles)  # [T_i, H] each
        embeds = self.embed(input_ids, image_mask, features)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)

    def pack_tiles(self, tiles: torch.Tensor, image_sizes: torch.Tensor | None,
                   image_tiles: torch.Tensor | None) -> list[torch.Tensor]:
        """A batch's projected tiles [sum tiles_i, g*g, H], image i's tiles_i in a row (its base
        first), -> each image packed [T_i, H] (`mmchat.anyres.pack_image_features`)."""
        if image_sizes is None or image_tiles is None:
            raise ValueError("an anyres model's pixel_values are tiles: pass image_sizes [N, 2] and image_tiles [N] "
                             "(finetune.batching.collate does)")
        if len(image_sizes) != len(image_tiles) or int(image_tiles.sum()) != tiles.shape[0]:
            raise ValueError(f"{tiles.shape[0]} tiles, but image_tiles {image_tiles.tolist()} for "
                             f"{len(image_sizes)} image sizes")
        newline = getattr(self.projector, IMAGE_NEWLINE)
        return [anyres.pack_image_features(each, newline, (h, w), self.anyres)
                for each, (h, w) in zip(tiles.split(image_tiles.tolist()), image_sizes.tolist())]


def _feature_rows(features) -> tuple[torch.Tensor | None, str]:
    """`embed`'s features as one [sum T_i, H] tensor (None: no features) and words for an error."""
    if features is None:
        return None, "no images"
    if isinstance(features, torch.Tensor) and features.dim() == 3:
        return features.reshape(-1, features.shape[-1]), f"{features.shape[0]} images × {features.shape[1]} tokens"
    if isinstance(features, torch.Tensor) and features.dim() == 2:
        return features, f"[{features.shape[0]}, {features.shape[1]}] concatenated features"
    if isinstance(features, torch.Tensor):
        raise ValueError(f"image features of shape {tuple(features.shape)}; expected [N, T, H] or [sum T_i, H]")
    if any(f.dim() != 2 for f in features):
        raise ValueError(f"image features of shapes {[tuple(f.shape) for f in features]}; expected [T_i, H] each")
    counts = [f.shape[0] for f in features]
    described = f"{len(counts)} images of {' + '.join(map(str, counts)) or 0} tokens"
    return (torch.cat(list(features)) if counts else None), described


def add_image_newline(projector: nn.Module, width: int, value: torch.Tensor | None = None) -> nn.Module:
    """Give an anyres model's projector its `image_newline` [width] (zeros until loaded), saved and loaded with it."""
    newline = torch.zeros(width) if value is None else value.detach().float().reshape(width).clone()
    projector.register_parameter(IMAGE_NEWLINE, nn.Parameter(newline, requires_grad=False))
    return projector


def quantization_config(options: LoadOptions):
    """transformers' `BitsAndBytesConfig` for 4-bit NF4 (double quant) or 8-bit; None otherwise."""
    from transformers import BitsAndBytesConfig

    if options.load_in == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=options.compute_dtype,
        )
    if options.load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_llm(path: str, options: LoadOptions, adapter: str | None = None, trainable: bool = False):
    """A transformers causal LM at `options.load_in` precision, with an optional PEFT adapter."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization_config(options),
        dtype=options.compute_dtype,
        device_map={"": options.device},
        trust_remote_code=False,
    )
    if adapter:
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, adapter, is_trainable=trainable)
    return llm


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_processor(path: str, backend: str | None = None):
    """A checkpoint's transformers processor (`ModelConfig.processor`), loaded as `AutoProcessor` loads the
    source folder's: the tokenizer class its files name, the image processor with `backend` (None: the
    default, torchvision where it is installed)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False, **({"backend": backend} if backend else {}))
    if processor.tokenizer.chat_template is None:  # mmchat's templates read the tokenizer's
        processor.tokenizer.chat_template = processor.chat_template
    return processor


def checkpoint_tokenizer(checkpoint: str | Path, config: ModelConfig):
    """(tokenizer, processor or None) of a checkpoint: a converted folder's processor and the tokenizer
    inside it, else the tokenizer `config.tokenizer` names."""
    if config.processor:
        processor = load_processor(resolve_path(checkpoint, config.processor), config.image_backend)
        return processor.tokenizer, processor
    return load_tokenizer(resolve_path(checkpoint, config.tokenizer)), None


def describe_preprocessing(model: MultimodalModel) -> str:
    """Which code makes a model's pixels, for status lines: the checkpoint's transformers image processor
    and its backend, or mmchat's own preprocessing."""
    tokenizer = type(model.tokenizer).__name__
    if model.processor is None:
        kind = "AnyRes tiles as transformers' torchvision backend" if model.anyres else "PIL-exact, as LLaVA's own code"
        return f"mmchat's preprocessing ({kind}), {tokenizer}"
    image_processor = model.processor.image_processor
    backend = getattr(image_processor, "backend", None) or ("pil" if type(image_processor).__name__.endswith("Pil") else "torchvision")
    return f"the checkpoint's {type(image_processor).__name__} ({backend} backend), {tokenizer}"


def load_model(checkpoint: str | Path, options: LoadOptions | None = None) -> MultimodalModel:
    """Load an mmchat checkpoint folder (see `mmchat.checkpoint`) for inference."""
    options = options or LoadOptions()
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    vision = load_vision_tower(config.vision, checkpoint).to(options.device)
    projector = build_projector(config.projector)
    if config.vision.anyres is not None:
        add_image_newline(projector, config.projector.out_dim)
    projector.load_state_dict(read_projector_state(checkpoint))
    projector.to(options.device, options.compute_dtype).eval().requires_grad_(False)
    adapter = resolve_path(checkpoint, config.adapter) if config.adapter else None
    llm = load_llm(resolve_path(checkpoint, config.llm), options, adapter).eval()
    tokenizer, processor = checkpoint_tokenizer(checkpoint, config)
    return MultimodalModel(config, vision, projector, llm, tokenizer, processor)
