"""Contrastive pretraining of a tiny open_clip CLIP on synthetic image–caption pairs.

The model is an open_clip `CLIP` built from a custom model config written in open_clip's own
`local-dir` layout (`open_clip_config.json` with `model_cfg` and `preprocess_cfg`) and created
with `open_clip.create_model("local-dir:FOLDER")`: open_clip's public way to use a config it does
not ship, without adding to its global registry. The loss is open_clip's `ClipLoss`. The text
tower reads the demo tokenizer's ids (pooled at `</s>`), so no second vocabulary is needed.

After training, the folder also holds the whole CLIP's weights (`open_clip_model.safetensors`),
so `open_clip.create_model_and_transforms("local-dir:FOLDER")` loads it like any open_clip model;
the mmchat checkpoint keeps only the vision tower (`mmchat.vision.save_vision_tower`).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finetune.demo.pretrain import seeded, train_loop, warmup_cosine
from finetune.demo.world import Scene, WorldConfig, draw, sample_scene, scene_rng, twin
from finetune.demo.texts import caption
from mmchat.config import CLIP_MEAN, CLIP_STD

CURRICULUM_IMAGES = 2048
"""One-shape scenes for the curriculum's first steps (the one-shape world is small)."""
OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"


@dataclass
class ClipConfig:
    """The tiny CLIP and how it is trained."""

    image_size: int = 72
    patch_size: int = 24
    """72 / 24: the patches are the world's 3×3 cells, so each image token sees one cell (one
    shape at most) and where a shape is comes from which token it is."""
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    pool: str = "tok"
    """Image embedding: `tok` (CLS) or `avg` (mean of patch tokens: each token trained directly)."""
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    context_length: int = 48
    """Caption tokens, `</s>` included; longer captions are cut (the demo's are under 40)."""
    images: int = 8192
    """Scenes drawn up front, each with its twin (`finetune.demo.world.twin`); captions are drawn
    afresh for every batch."""
    steps: int = 1500
    batch_size: int = 256
    """Half scenes, half their twins: every scene meets its one-change neighbour in the batch."""
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    curriculum_steps: int = 0
    """Steps on one-shape scenes first: colour, kind and place are learnt before binding them."""
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")

    def model_cfg(self, vocab_size: int, eos_id: int, pad_id: int) -> dict:
        """open_clip's model config (`open_clip.CLIP(**model_cfg)`)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.width,
                           "layers": self.layers, "head_width": self.width // self.heads, "mlp_ratio": self.mlp_ratio,
                           "pool_type": self.pool},
            "text_cfg": {"context_length": self.context_length, "vocab_size": vocab_size, "width": self.text_width,
                         "heads": max(1, self.text_width // 32), "layers": self.text_layers, "pool_type": "eos",
                         "eos_id": eos_id, "pad_id": pad_id},
        }


@dataclass
class ClipResult:
    model: torch.nn.Module
    model_cfg: dict
    history: list[dict]
    """Per logged step: loss, and held-out caption-matching accuracy at evaluations."""
    seconds: float


def write_open_clip_config(folder: Path, model_cfg: dict, image_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")


def draw_all(scenes: list[Scene], size: int) -> torch.Tensor:
    """Scenes drawn as 8-bit RGB: [N, 3, S, S] uint8 (a quarter of float32's memory)."""
    return torch.from_numpy(np.stack([np.asarray(draw(s, size), dtype=np.uint8) for s in scenes])).permute(0, 3, 1, 2)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] uint8 -> float32 normalised as `mmchat.image.preprocess` does."""
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (images.float() / 255.0 - mean) / std


def encode_captions(texts: list[str], tokenizer, context_length: int) -> torch.Tensor:
    """Captions -> [N, context_length] ids: the text's tokens, `</s>`, then `<pad>`."""
    out = torch.full((len(texts), context_length), tokenizer.pad_token_id, dtype=torch.long)
    for row, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        ids = ids[: context_length - 1] + [tokenizer.eos_token_id]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def pretrain_clip(cfg: ClipConfig, tokenizer, folder: Path, log=print) -> ClipResult:
    """Train the tiny CLIP; write its config and weights into `folder` (open_clip local-dir layout)."""
    import open_clip
    from safetensors.torch import save_file

    started = time.perf_counter()
    model_cfg = cfg.model_cfg(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    write_open_clip_config(folder, model_cfg, cfg.image_size)
    with seeded(cfg.seed):
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, output_dict=True)
        pools = [_pool(cfg.world, cfg.images, cfg.seed, cfg.image_size)]
        if cfg.curriculum_steps:
            single = replace(cfg.world, min_shapes=1, max_shapes=1)
            pools.insert(0, _pool(single, CURRICULUM_IMAGES, cfg.seed + 2, cfg.image_size))
        held_out = [sample_scene(scene_rng(cfg.seed + 1, i), cfg.world) for i in range(256)]
        held_out_images = normalise(draw_all(held_out, cfg.image_size))
        log(f"clip: {sum(len(p[0]) for p in pools)} scenes drawn in {time.perf_counter() - started:.0f} s; "
            f"{sum(p.numel() for p in model.visual.parameters()):,} vision parameters")

        loss_fn = open_clip.ClipLoss()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
        rng = random.Random(cfg.seed)

        def step_loss(step: int) -> float:
            scenes, images = pools[0] if step <= cfg.curriculum_steps else pools[-1]
            pairs = rng.sample(range(len(scenes) // 2), cfg.batch_size // 2)
            batch = pairs + [len(scenes) // 2 + i for i in pairs]  # each scene with its twin
            texts = encode_captions([caption(scenes[i], rng) for i in batch], tokenizer, cfg.context_length)
            out = model(normalise(images[batch]), texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            return loss.item()

        def clamp(step: int) -> None:
            with torch.no_grad():  # CLIP's clamp: the temperature may not exceed 100
                model.logit_scale.clamp_(0, math.log(100))

        def evaluate() -> tuple[dict, str]:
            accuracy = caption_match_accuracy(model, held_out, held_out_images, tokenizer, cfg)
            return {"match_accuracy": accuracy}, f"held-out caption match {accuracy:.1%}"

        history = train_loop(model, optimizer, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps), cfg.steps, step_loss,
                        evaluate, every=100, name="clip", log=log, after_step=clamp, started=started)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    return ClipResult(model, model_cfg, history, time.perf_counter() - started)


def _pool(world: WorldConfig, count: int, seed: int, size: int) -> tuple[list[Scene], torch.Tensor]:
    """`count` scenes followed by their twins, and their drawings [2 * count, 3, S, S] uint8."""
    scenes = [sample_scene(scene_rng(seed, i), world) for i in range(count)]
    scenes += [twin(s, scene_rng(seed, -1 - i), world) for i, s in enumerate(scenes)]
    return scenes, draw_all(scenes, size)


@torch.no_grad()
def caption_match_accuracy(model, scenes: list[Scene], images: torch.Tensor, tokenizer, cfg: ClipConfig) -> float:
    """Share of held-out images whose own description scores above the descriptions of the other
    images of the set (a 256-way choice; chance 0.4%)."""
    from finetune.demo.texts import description

    model.eval()
    texts = encode_captions([description(s) for s in scenes], tokenizer, cfg.context_length)
    image_emb = F.normalize(model.encode_image(images), dim=-1)
    text_emb = F.normalize(model.encode_text(texts), dim=-1)
    return float((image_emb @ text_emb.T).argmax(dim=1).eq(torch.arange(len(scenes))).float().mean())
