"""How the demo model's images become tokens: the projector stages 1-2 train, and whether images are tiled.

- `mlp2x_gelu` (the default): each of the CLIP's nine patches becomes one token, the cell word the
  LLM learnt to read there (`finetune.demo.lookups`).
- `resampler` (`--projector resampler`): learned queries cross-attend to the nine patches.
- AnyRes (`--anyres`): the same MLP, but the images are drawn at twice the CLIP's side and read as
  LLaVA-NeXT reads them: the whole image squashed to one CLIP-sized tile (the nine tokens the LLM
  knows), then the 2×2 grid of tiles stitched into a 6×6 map with a learned `image_newline` after
  each row (`mmchat.anyres`): 9 + 6 × 7 = 51 tokens an image.

`cfg` is a `finetune.demo.build.DemoConfig`.
"""
from __future__ import annotations


def image_side(cfg) -> int:
    """Pixels per side of the demo's images: the CLIP's input, or with AnyRes twice it (a 2×2 grid)."""
    return 2 * cfg.clip.image_size if cfg.anyres else cfg.clip.image_size


def anyres_config(cfg):
    """The AnyRes pinpoints for the demo's tower, or None: one tile by two either way, and two by two
    (the square images' grid; LLaVA-NeXT's own list is the same shapes at 336 px)."""
    from mmchat.config import AnyresConfig

    if not cfg.anyres:
        return None
    side = cfg.clip.image_size
    return AnyresConfig(pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side]])


def new_projector(cfg):
    """A new projector from the CLIP's width to the LLM's, and its config: the same initial weights in
    every build. With AnyRes it also carries a new `image_newline`, random × 1/√width as LLaVA-NeXT
    starts it (and as `finetune.qlora` does for a new AnyRes projector)."""
    import torch

    from finetune.demo.pretrain import seeded
    from mmchat.config import ProjectorConfig
    from mmchat.model import add_image_newline
    from mmchat.projector import build_projector

    config = ProjectorConfig(cfg.projector, cfg.clip.width, cfg.lm.hidden,
                             queries=cfg.resampler_queries if cfg.projector == "resampler" else None)
    with seeded(0):
        projector = build_projector(config)
        if cfg.anyres:
            add_image_newline(projector, config.out_dim, torch.randn(config.out_dim) / config.out_dim**0.5)
    return config, projector


def new_stage0_projector(cfg) -> None:
    """Stage 0 with a new projector and tiling of this build: reused pretraining may come from a build
    that trained another projector, or tiled its images or did not."""
    from mmchat.checkpoint import PROJECTOR_FILE, atomic_file, read_config, save_projector, write_config

    stage0 = cfg.work / "stage0"
    config = read_config(stage0)
    config.projector, projector = new_projector(cfg)
    config.vision.anyres = anyres_config(cfg)
    with atomic_file(stage0 / PROJECTOR_FILE) as tmp:
        save_projector(projector, tmp)
    write_config(config, stage0)


def describe(cfg) -> tuple[str, str]:
    """(what the model card says of the image tokens, the `python -m finetune.demo` flags that chose them)."""
    if cfg.projector == "resampler":
        return (f"`resampler`, {cfg.resampler_queries} learned queries (image tokens) attending to the patches",
                f" --projector resampler --resampler-queries {cfg.resampler_queries}")
    if cfg.anyres:
        side, g = cfg.clip.image_size, cfg.clip.image_size // cfg.clip.patch_size
        return (f"`mlp2x_gelu` with AnyRes: each {2 * side}-px image read as the whole image squashed to one "
                f"{side}-px tile, then a 2×2 grid of tiles with a learned `image_newline` after each row of "
                f"their stitched map ({g * g} + {2 * g} × {2 * g + 1} = {g * g + 2 * g * (2 * g + 1)} image tokens)",
                " --anyres")
    return "`mlp2x_gelu` (one image token per patch)", ""
