"""Typed configuration of an mmchat model, saved as `mmchat.json` beside the weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# OpenAI CLIP's normalisation; LLaVA pads with this mean as an 8-bit colour, (122, 116, 104).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SELECT_FEATURES = ("patch", "cls_patch", "cls")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
LOAD_IN = ("4bit", "8bit", "16bit", "32bit")


@dataclass
class VisionConfig:
    open_clip_model: str = "ViT-L-14-336"
    """open_clip architecture name (informative when the weights live in the checkpoint)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag; None means the weights are in the checkpoint's `vision/` folder."""
    select_layer: int = -2
    """Which hidden state feeds the projector, counted as transformers' CLIP `hidden_states`
    (0 = embeddings, -1 = last block). LLaVA-1.5 takes -2: the second-to-last block's output."""
    select_feature: str = "patch"
    """`patch` drops CLS (LLaVA), `cls_patch` keeps it first, `cls` keeps only the global token."""
    image_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    """LLaVA-1.5 (`image_aspect_ratio: pad`) centres the image on a square of the mean colour."""

    def __post_init__(self) -> None:
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature={self.select_feature!r}; choose one of {SELECT_FEATURES}")
        if self.select_layer == 0:
            raise ValueError("select_layer=0 is the embedding output, not a block; use -2 (LLaVA) or a block number")
        self.mean, self.std = tuple(self.mean), tuple(self.std)


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"
    in_dim: int = 1024
    out_dim: int = 4096

    def __post_init__(self) -> None:
        if self.type not in PROJECTOR_TYPES:
            raise ValueError(f"projector type={self.type!r}; choose one of {PROJECTOR_TYPES}")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: str = "llm"
    """The language model: a folder inside the checkpoint, or a base model's path or hub id
    (when `adapter` holds the fine-tuned part)."""
    tokenizer: str = "llm"
    """Tokenizer folder inside the checkpoint, a path, or a hub id."""
    adapter: str | None = None
    """A PEFT LoRA adapter folder inside the checkpoint, applied on top of `llm`."""
    template: str = "llava_v1"
    image_token_id: int | None = None
    """Token id written into image slots (the embeddings there are replaced by image features).
    Kept for export to llava-hf, whose models expect their own `<image>` id; None uses pad/unk."""

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
