"""Typed configuration of an mmchat model, saved as `mmchat.json` beside the weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# OpenAI CLIP's normalisation; LLaVA pads with this mean as an 8-bit colour, (122, 116, 104).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SELECT_FEATURES = ("patch", "cls_patch", "cls")
RESIZE_MODES = ("shortest_edge", "exact")
# PIL's resampling filter codes, as image processor configs write them (`resample: 3`).
RESAMPLE_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "resampler")
# Parameter-free activations of transformers' ACT2FN (llava-hf's `projector_hidden_act`).
PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "quick_gelu", "relu", "silu", "tanh")
# Who runs the vision tower: open_clip (trainable from named weights; exact for CLIP) or transformers' own
# vision model, kept for converted towers open_clip cannot reproduce exactly (see mmchat.vision).
VISION_LIBRARIES = ("open_clip", "transformers")
LOAD_IN = ("4bit", "8bit", "16bit", "32bit")
IMAGE_BACKENDS = (None, "torchvision", "pil")
"""transformers' image processor backends (None: its default)."""


@dataclass
class AnyresConfig:
    """LLaVA-NeXT's AnyRes (OneVision's anyres_max_N with `max_tiles`): each image is read as the whole
    image squashed to one `image_size` tile plus a grid of tiles chosen from `pinpoints`, the tiles'
    feature maps stitched, cropped to the image and ended row by row with the projector's learned
    `image_newline` (`mmchat.anyres`). Tiles are preprocessed as transformers' default (torchvision)
    image processor does, bicubic, with this VisionConfig's mean and std; the other preprocessing fields
    do not apply."""

    pinpoints: list[list[int]]
    """Grid resolutions (height, width) in pixels, multiples of `image_size` (`image_grid_pinpoints`)."""
    max_tiles: int | None = None
    """OneVision's anyres_max_N: maps larger than about N tiles are shrunk bilinearly; None: LLaVA-NeXT."""

    def __post_init__(self) -> None:
        self.pinpoints = [[int(h), int(w)] for h, w in self.pinpoints]
        if not self.pinpoints:
            raise ValueError("anyres pinpoints=[]: give at least one (height, width) grid resolution")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"anyres max_tiles={self.max_tiles}: use a positive N (anyres_max_N) or null")


@dataclass
class VisionConfig:
    open_clip_model: str = "ViT-L-14-336"
    """open_clip architecture name (informative when the weights live in the checkpoint)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag; None means the weights are in the checkpoint's `vision/` folder."""
    library: str = "open_clip"
    """`open_clip`: `vision/` holds an open_clip config + visual weights (or `pretrained` names them);
    `transformers`: `vision/` holds a transformers `CLIPVisionModel` / `SiglipVisionModel` folder, run
    as llava-hf runs it (converted towers open_clip cannot reproduce exactly, e.g. SigLIP)."""
    select_layer: int | list[int] = -2
    """Which hidden state feeds the projector, counted as transformers' `hidden_states`
    (0 = embeddings, -1 = last block). LLaVA-1.5 takes -2: the second-to-last block's output.
    A list concatenates those hidden states along the width, in order (llava-hf's list form)."""
    select_feature: str = "patch"
    """`patch` drops the first token (CLS; llava-hf's `default`, which drops it even on towers
    without one), `cls_patch` keeps every token (llava-hf's `full`; on SigLIP: all patches),
    `cls` keeps only the first token."""
    image_size: int = 336
    """Side of the square the tower sees: the centre crop, or the plain resize's height and width."""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    """LLaVA-1.5 (`image_aspect_ratio: pad`) centres the image on a square of the mean colour;
    llava-hf processors do so only with `do_pad` (hub llava-hf/llava-1.5-7b-hf does not)."""
    resize: str = "shortest_edge"
    """`shortest_edge`: the short side to `shortest_edge`, aspect kept, then a centre crop of
    image_size × image_size (CLIP, LLaVA-1.5); `exact`: straight to image_size × image_size,
    aspect not kept, no crop (SigLIP's `size: {height, width}`)."""
    shortest_edge: int | None = None
    """With `resize: shortest_edge`, the short side before the crop; None = image_size."""
    resample: int = 3
    """PIL filter code, as processor configs write it: 3 bicubic (CLIP, SigLIP), 2 bilinear."""
    rescale: bool = True
    """Multiply the 8-bit pixels by `rescale_factor` (transformers' `do_rescale`)."""
    rescale_factor: float = 1 / 255
    normalize: bool = True
    """Subtract `mean` and divide by `std` (transformers' `do_normalize`)."""
    convert_rgb: bool = True
    """Convert other modes to RGB (alpha on white). `load_image` always does; False makes
    `preprocess` refuse a non-RGB image instead (transformers' `do_convert_rgb`)."""
    anyres: AnyresConfig | None = None
    """LLaVA-NeXT / OneVision tiling; None: one `image_size` square per image (LLaVA-1.5)."""

    def __post_init__(self) -> None:
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature={self.select_feature!r}; choose one of {SELECT_FEATURES}")
        if isinstance(self.select_layer, (list, tuple)):
            if not self.select_layer:
                raise ValueError("select_layer=[] selects no hidden state; use -2 (LLaVA) or a list of layers")
            self.select_layer = [int(layer) for layer in self.select_layer]
        if 0 in self.layers:
            raise ValueError(f"select_layer={self.select_layer} takes 0, the embedding output, not a block; use -2 (LLaVA) or block numbers")
        if self.library not in VISION_LIBRARIES:
            raise ValueError(f"vision library={self.library!r}; choose one of {VISION_LIBRARIES}")
        if self.library == "transformers" and self.pretrained is not None:
            raise ValueError(f"vision library='transformers' keeps the tower in the checkpoint's vision/ folder; "
                             f"pretrained={self.pretrained!r} must be null")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r}; choose one of {RESIZE_MODES}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample={self.resample!r}: not a PIL filter code; use one of {RESAMPLE_FILTERS}")
        if self.shortest_edge is not None and self.shortest_edge < self.image_size:
            raise ValueError(f"shortest_edge={self.shortest_edge} is below image_size={self.image_size}: the crop would not fit")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if isinstance(self.anyres, dict):
            self.anyres = AnyresConfig(**self.anyres)
        if self.anyres is not None:
            if self.select_feature == "cls":
                raise ValueError("vision select_feature='cls' with anyres: tiles are stitched from their patch grids; "
                                 "use patch or cls_patch")
            bad = [p for p in self.anyres.pinpoints if p[0] <= 0 or p[1] <= 0 or p[0] % self.image_size or p[1] % self.image_size]
            if bad:
                raise ValueError(f"anyres pinpoint {bad[0]} is not a positive multiple of image_size={self.image_size}")

    @property
    def layers(self) -> list[int]:
        """`select_layer` as a list: the hidden states concatenated, in order."""
        return list(self.select_layer) if isinstance(self.select_layer, list) else [self.select_layer]


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"
    """`linear`, or `mlp2x_gelu`: linear -> `act` -> linear (LLaVA's name; llava-hf's projector): one
    token per feature; or `resampler`: `queries` learned queries cross-attend to the patch features
    (Qwen-VL's resampler), `queries` tokens per image."""
    in_dim: int = 1024
    """The vision feature width, times the number of `select_layer`s when it is a list."""
    out_dim: int = 4096
    bias: bool = True
    """Both linears have a bias (llava-hf's `multimodal_projector_bias`); the resampler's output linear."""
    act: str = "gelu"
    """mlp2x_gelu's activation, by transformers' name (`projector_hidden_act`): `gelu` is exact
    (erf) GELU, as LLaVA's `nn.GELU()`; `gelu_pytorch_tanh` the tanh approximation."""
    queries: int | None = None
    """resampler: learned queries, so image tokens per image; none = 64 (IDEFICS2: 64; Qwen-VL: 256)."""
    heads: int | None = None
    """resampler: attention heads; none = out_dim / 128, at least 1 (Qwen-VL: 4096 / 128 = 32)."""

    def __post_init__(self) -> None:
        if self.type not in PROJECTOR_TYPES:
            raise ValueError(f"projector type={self.type!r}; choose one of {PROJECTOR_TYPES}")
        if self.act not in PROJECTOR_ACTS:
            raise ValueError(f"projector act={self.act!r}; choose one of {PROJECTOR_ACTS}")
        if self.type != "mlp2x_gelu" and self.act != "gelu":
            raise ValueError(f"projector act={self.act!r} with type {self.type!r}, which has no activation; use mlp2x_gelu")
        if self.type == "resampler":
            self._check_resampler()
        elif self.queries is not None or self.heads is not None:
            raise ValueError(f"projector queries={self.queries}, heads={self.heads} with type {self.type!r}, which has no "
                             "attention; use resampler (or null)")

    def _check_resampler(self) -> None:
        if self.queries is None:
            self.queries = 64
        if self.queries < 1:
            raise ValueError(f"projector queries={self.queries}: the resampler needs at least 1 query")
        if self.heads is None:
            self.heads = max(1, self.out_dim // 128)
        if self.out_dim % 4:  # half the width per axis of the 2-D position, half of that sines
            raise ValueError(f"projector out_dim={self.out_dim}: the resampler's 2-D sin-cos positions need a multiple of 4")
        if self.heads < 1 or self.out_dim % self.heads:
            raise ValueError(f"projector heads={self.heads} does not divide out_dim={self.out_dim}")


# The checkpoint's folders (mmchat.checkpoint owns the format; the defaults below name them).
LLM_DIR, TOKENIZER_DIR, ADAPTER_DIR, PROCESSOR_DIR = "llm", "tokenizer", "adapter", "processor"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: str = LLM_DIR
    """The language model: a folder inside the checkpoint, or a base model's path or hub id
    (when `adapter` holds the fine-tuned part)."""
    tokenizer: str = LLM_DIR
    """Tokenizer folder inside the checkpoint, a path, or a hub id (`processor`'s folder when that is set)."""
    processor: str | None = None
    """A transformers processor folder inside the checkpoint (`AutoProcessor.save_pretrained`: tokenizer,
    image processor, chat template), kept from a converted llava-hf folder. Set: the tokenizer is the
    processor's (the class its tokenizer_config.json names) and images are preprocessed by its image
    processor as `AutoProcessor.from_pretrained` loads it (the torchvision backend where torchvision is
    installed), exactly as transformers does on the source folder. None (checkpoints mmchat trained on
    open_clip towers, original LLaVA): `mmchat.image.preprocess` from this config's vision fields."""
    image_backend: str | None = None
    """The backend `processor`'s image processor is loaded with: `torchvision` or `pil` (`python -m
    mmchat.convert --image-backend`); None: transformers' default (torchvision where it is installed)."""
    adapter: str | None = None
    """A PEFT LoRA adapter folder inside the checkpoint, applied on top of `llm`."""
    template: str = "llava_v1"
    image_token_id: int | None = None
    """Token id written into image slots (the embeddings there are replaced by image features).
    Kept for export to llava-hf, whose models expect their own `<image>` id; None uses pad/unk."""
    stop_token_ids: list[int] | None = None
    """Generation ends at any of these ids (a llava-hf folder's `generation_config.json`
    `eos_token_id` plus the tokenizer's EOS); None = the tokenizer's EOS only."""
    temperature: float | None = None
    """The checkpoint's own decoding default: a converted llava-hf folder's generation config (0,
    greedy, unless it sets `do_sample`, as transformers' `generate` decides). None = LLaVA's web
    demo defaults (temperature 0.2, top-p 0.7); flags and the app's sliders override it."""
    top_p: float | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.image_backend not in IMAGE_BACKENDS:
            raise ValueError(f"image_backend={self.image_backend!r}; choose one of {IMAGE_BACKENDS}")
        if self.stop_token_ids is not None:
            if not self.stop_token_ids:
                raise ValueError("stop_token_ids=[] would never stop; use null for the tokenizer's EOS")
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        data = dict(data)
        data["vision"] = VisionConfig(**data.get("vision", {}))
        data["projector"] = ProjectorConfig(**data.get("projector", {}))
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)
