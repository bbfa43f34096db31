"""A trainable `MultimodalModel`, from an mmchat checkpoint or from parts, frozen per stage.

- align:    projector trainable; vision tower and LLM frozen (the LLM may be 4-bit).
- instruct: projector + LoRA adapters on the LLM (QLoRA when the LLM is 4-bit NF4).
- full:     projector + every LLM weight (16/32-bit; for small models).
The vision tower is always frozen, float32 and in eval mode. An AnyRes (LLaVA-NeXT) model's learned
`image_newline` sits on the projector, so it trains, saves and loads with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from finetune.train_config import ALL_LINEAR, ConfigError, TrainConfig
from mmchat.checkpoint import PROJECTOR_FILE, is_checkpoint, read_config, resolve_path
from mmchat.config import ModelConfig, ProjectorConfig, VisionConfig
from mmchat.model import (
    IMAGE_NEWLINE, LoadOptions, MultimodalModel, add_image_newline, checkpoint_tokenizer, load_llm, load_tokenizer,
)
from mmchat.projector import build_projector, patch_grid
from mmchat.templates import CHAT, resolve_template
from mmchat.vision import (
    OPEN_CLIP_CONFIG, VISION_DIR, feature_block, feature_width, load_vision_tower, num_image_tokens, preprocess_settings,
)

LLAVA_PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")


@dataclass
class Built:
    model: MultimodalModel
    llm_ref: str
    """The base LLM as the output checkpoint names it: a hub id or an absolute folder."""
    vision_model_cfg: dict | None
    """open_clip config of a vision tower whose weights travel in the checkpoint; None for a named tag."""
    lora_targets: list[str]
    """Module names LoRA wraps (empty unless stage instruct)."""


def build_model(cfg: TrainConfig, device: str) -> Built:
    """Load the parts named by `cfg` onto `device` and set which parameters train."""
    options = LoadOptions(cfg.llm_load_in, device)
    if cfg.model:
        config, vision, vision_cfg, projector, llm_ref, tokenizer_ref, adapter = _from_checkpoint(cfg)
    else:
        config, vision, vision_cfg, projector, llm_ref, tokenizer_ref, adapter = _from_parts(cfg)
    if adapter and cfg.stage == "full":
        raise ConfigError(f"--model {cfg.model} holds a LoRA adapter; merge it first "
                          "(python -m finetune.merge) to train every weight with --stage full")
    # A converted folder's processor (its tokenizer class, its image processor) trains as it chats.
    tokenizer, processor = checkpoint_tokenizer(cfg.model, config) if cfg.model else (load_tokenizer(tokenizer_ref), None)
    _check_template(cfg, tokenizer)
    llm = load_llm(llm_ref, options, adapter, trainable=adapter is not None and cfg.stage == "instruct")
    newline, fresh = None, projector is None
    if projector is None:  # a new projector: its input is the tower's width, its output the LLM's
        config.projector = _new_projector_config(cfg, vision, config.vision, _embedding_width(llm))
        projector = build_projector(config.projector)
    elif isinstance(projector, dict):
        state = dict(projector)
        newline = state.pop(IMAGE_NEWLINE, None)
        config.projector = _projector_config(state, cfg.projector_type, config.projector.act, config.projector.heads)
        projector = build_projector(config.projector)
        projector.load_state_dict(state)
    if config.vision.anyres is not None:
        _add_newline(cfg, projector, config.projector, newline, fresh)
    config.template = cfg.template_name
    llm, targets = _set_trainable(llm, cfg, adapter)
    projector.to(device, torch.float32).requires_grad_(True)
    model = MultimodalModel(config, vision.to(device), projector, llm, tokenizer, processor)
    _check_widths(model)
    return Built(model, llm_ref, vision_cfg, targets)


def _from_checkpoint(cfg: TrainConfig):
    ckpt = Path(cfg.model)
    if not is_checkpoint(ckpt):
        raise ConfigError(f"--model {ckpt} is not an mmchat checkpoint (no mmchat.json); convert a LLaVA "
                          "folder with `python -m mmchat.convert SRC DST`, or start from parts with --llm")
    config = read_config(ckpt)
    vision = load_vision_tower(config.vision, ckpt)
    vision_cfg = vision_model_cfg(ckpt) if config.vision.pretrained is None else None
    projector = read_projector(Path(cfg.projector) if cfg.projector else ckpt / PROJECTOR_FILE)
    adapter = str(Path(resolve_path(ckpt, config.adapter)).resolve()) if config.adapter else None
    return (config, vision, vision_cfg, projector, _absolute(resolve_path(ckpt, config.llm)),
            resolve_path(ckpt, config.tokenizer), adapter)


def _from_parts(cfg: TrainConfig):
    source = Path(cfg.vision)
    if is_checkpoint(source):  # reuse another checkpoint's tower with its settings
        vision_config = read_config(source).vision
        vision = load_vision_tower(vision_config, source)
        vision_cfg = vision_model_cfg(source) if vision_config.pretrained is None else None
    else:
        if not cfg.vision_pretrained:
            raise ConfigError(f"--vision {cfg.vision} needs --vision-pretrained (e.g. openai), or name an mmchat "
                              "checkpoint folder whose vision tower to use")
        vision = load_vision_tower(VisionConfig(open_clip_model=cfg.vision, pretrained=cfg.vision_pretrained))
        vision_config = VisionConfig(
            open_clip_model=cfg.vision, pretrained=cfg.vision_pretrained, select_layer=cfg.vision_layers,
            select_feature=cfg.vision_select_feature, **preprocess_settings(vision))
        _check_features(vision, vision_config)
        vision_cfg = None
    projector = read_projector(Path(cfg.projector)) if cfg.projector else None
    llm_ref = _absolute(cfg.llm)
    config = ModelConfig(vision=vision_config, llm=llm_ref)
    return config, vision, vision_cfg, projector, llm_ref, llm_ref, None


def _add_newline(cfg: TrainConfig, projector: nn.Module, config: ProjectorConfig, value: torch.Tensor | None,
                 fresh: bool) -> None:
    """An AnyRes model's `image_newline`: the loaded projector's, or for a new one random at
    1/sqrt(width) (LLaVA-NeXT's initialisation)."""
    if config.type == "resampler":
        raise ConfigError("--projector-type resampler: an AnyRes (LLaVA-NeXT) tower's tiles are packed as patch grids, "
                          "which a resampler's queries are not; use mlp2x_gelu or linear")
    if value is None and not fresh:
        source = f"--projector {cfg.projector}" if cfg.projector else f"--model {cfg.model}"
        raise ConfigError(f"{source}: the projector has no {IMAGE_NEWLINE}, which an AnyRes (LLaVA-NeXT) model needs; "
                          "pass a NeXT checkpoint's projector, or none (from parts) to start a new one")
    if value is None:
        value = torch.randn(config.out_dim) / config.out_dim**0.5
    add_image_newline(projector, config.out_dim, value)


def _check_features(vision: nn.Module, config: VisionConfig) -> None:
    """--vision-select-layer / --vision-select-feature against the tower, before any training."""
    try:
        num_image_tokens(vision, config)
    except ValueError as e:
        raise ConfigError(f"--vision {config.open_clip_model} --vision-select-feature: {e}") from None
    try:
        for layer in config.layers:
            feature_block(vision, layer)
    except ValueError as e:
        raise ConfigError(f"--vision {config.open_clip_model} --vision-select-layer: {e}") from None


def _check_template(cfg: TrainConfig, tokenizer) -> None:
    """A `chat` template whose answers end in no token would train a model that never stops."""
    if cfg.template_name != CHAT:
        return
    try:
        template = resolve_template(CHAT, tokenizer)
    except ValueError as e:
        raise ConfigError(f"--template chat: {e}") from None
    if template.end_of_turn is None:
        raise ConfigError(f"--template chat: the chat template of tokenizer {tokenizer.name_or_path!r} closes answers "
                          "with no token, so the labels hold no stop token and the model would never learn to stop; "
                          "pick a --template that closes answers with a token (e.g. llava_v1)")


def _absolute(ref: str) -> str:
    """A local folder as an absolute path (the output checkpoint refers to it); a hub id as is."""
    return str(Path(ref).resolve()) if Path(ref).exists() else ref


def vision_model_cfg(ckpt: Path) -> dict:
    """The config of a vision tower whose weights travel in the checkpoint's `vision/` folder: the
    open_clip model config, or a transformers tower's `config.json` (`library: transformers`)."""
    folder = ckpt / VISION_DIR
    if read_config(ckpt).vision.library == "transformers":
        return json.loads((folder / "config.json").read_text())
    return json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model_cfg"]


def _embedding_width(llm: nn.Module) -> int:
    return llm.get_input_embeddings().embedding_dim


def read_projector(path: Path) -> dict[str, torch.Tensor]:
    """Projector weights from projector.safetensors, an mmchat checkpoint, or LLaVA's mm_projector.bin."""
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise ConfigError(f"--projector {path}: file not found")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for prefix in LLAVA_PROJECTOR_PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return {k: v.float() for k, v in state.items()}


def _new_projector_config(cfg: TrainConfig, vision: nn.Module, vision_config: VisionConfig, hidden: int) -> ProjectorConfig:
    """--projector-type from the tower's feature width to the LLM's; a resampler needs a square patch grid."""
    if cfg.projector_type == "resampler":
        try:
            patch_grid(num_image_tokens(vision, vision_config))
        except ValueError as e:
            raise ConfigError(f"--projector-type resampler: {e} (--vision-select-feature)") from None
    try:
        return ProjectorConfig(cfg.projector_type, feature_width(vision, vision_config), hidden,
                               queries=cfg.resampler_queries if cfg.projector_type == "resampler" else None)
    except ValueError as e:
        raise ConfigError(f"--projector-type {cfg.projector_type}: {e}") from None


def _projector_config(state: dict[str, torch.Tensor], wanted: str, act: str = "gelu", heads: int | None = None) -> ProjectorConfig:
    """The projector type, widths and bias its weights imply (LLaVA names: `weight` or `0.*`/`2.*`; the
    resampler's `query`, `kv_proj.*`, ...); `act` and the resampler's `heads` are the checkpoint's
    (weights do not say them; none for heads: the default for the width)."""
    if "query" in state:
        queries, out_dim = state["query"].shape
        return ProjectorConfig("resampler", state["kv_proj.weight"].shape[1], out_dim, bias="proj.bias" in state,
                               queries=queries, heads=heads)
    bias = "bias" in state or "0.bias" in state
    if set(state) == {"weight", "bias"} or set(state) == {"weight"}:
        out_dim, in_dim = state["weight"].shape
        return ProjectorConfig("linear", in_dim, out_dim, bias=bias)
    if set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"} or set(state) == {"0.weight", "2.weight"}:
        out_dim, in_dim = state["0.weight"].shape
        return ProjectorConfig("mlp2x_gelu", in_dim, out_dim, bias=bias, act=act)
    raise ConfigError(f"--projector: unrecognised weights {sorted(state)}; expected a {wanted} projector "
                      "(keys `0.*`, `2.*` or `weight`, `bias`, optionally prefixed `model.mm_projector.`; a "
                      "resampler's `query`, `kv_proj.weight`, ...)")


def _check_widths(model: MultimodalModel) -> None:
    width, hidden = feature_width(model.vision, model.config.vision), _embedding_width(model.llm)
    cfg = model.config.projector
    if (cfg.in_dim, cfg.out_dim) != (width, hidden):
        raise ConfigError(f"the projector maps {cfg.in_dim} -> {cfg.out_dim} but the vision tower gives {width} "
                          f"and the LLM takes {hidden}; use a matching --projector, or none to start a new one")


def linear_names(llm: nn.Module) -> list[str]:
    """Names (last component) of the LLM's linear layers, 4/8-bit ones included, except lm_head."""
    head = llm.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return sorted(names)


def _set_trainable(llm: nn.Module, cfg: TrainConfig, adapter: str | None) -> tuple[nn.Module, list[str]]:
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (LoRA on a frozen embedding).
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    llm.config.use_cache = False
    if cfg.stage == "full":
        return llm.requires_grad_(True), []
    if cfg.stage == "align" or isinstance(llm, PeftModel):  # align; or instruct continuing an adapter
        if cfg.stage == "align":
            llm.requires_grad_(False)
        return llm, _adapter_targets(llm) if cfg.stage == "instruct" else []
    llm.requires_grad_(False)
    available = linear_names(llm)
    targets = available if cfg.lora_targets == [ALL_LINEAR] else cfg.lora_targets
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ConfigError(f"--lora-targets {' '.join(unknown)}: no such linear layer in the LLM; "
                          f"its linear layers are {' '.join(available)}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(llm, lora), targets


def _adapter_targets(llm) -> list[str]:
    targets = llm.peft_config["default"].target_modules
    return [targets] if isinstance(targets, str) else sorted(targets)


def set_train_mode(model: MultimodalModel) -> None:
    """Training mode (LoRA dropout on), except the frozen vision tower."""
    model.train()
    model.vision.eval()


def trainable_parameters(model: MultimodalModel) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
