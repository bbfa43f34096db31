"""The mmchat checkpoint folder, written atomically.

    mmchat.json             typed ModelConfig
    projector.safetensors   projector weights (LLaVA `mm_projector` names: `0.*`, `2.*` or `weight`/`bias`)
    vision/                 open_clip config + visual weights, unless the config names a pretrained tag
    llm/                    a transformers model folder with its tokenizer (or only a tokenizer
                            when `llm` names a base model and `adapter/` holds a PEFT LoRA adapter)
    adapter/                optional PEFT adapter
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from mmchat.config import CONFIG_FILE, ModelConfig
from mmchat.vision import save_vision_tower

PROJECTOR_FILE = "projector.safetensors"


def save_projector(projector: nn.Module, path: Path) -> None:
    state = {k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()}
    save_file(state, str(path))


def save_checkpoint(
    out: str | Path,
    config: ModelConfig,
    projector: nn.Module,
    tokenizer,
    llm: nn.Module | None = None,
    vision: nn.Module | None = None,
    vision_model_cfg: dict | None = None,
    adapter_model: nn.Module | None = None,
) -> Path:
    """Write a checkpoint into a temporary folder beside `out`, then rename it into place.

    `llm` is saved as a standard transformers folder under `llm/`; `adapter_model` (a PEFT
    model) saves only its adapter under `adapter/`. `vision` is saved when the config has no
    pretrained tag.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_projector(projector, tmp / PROJECTOR_FILE)
    if config.vision.pretrained is None:
        if vision is None or vision_model_cfg is None:
            raise ValueError("a checkpoint without a pretrained vision tag must include the vision tower and its open_clip config")
        save_vision_tower(vision, vision_model_cfg, tmp)
    if llm is not None:
        llm.save_pretrained(tmp / config.llm)
    tokenizer.save_pretrained(tmp / config.tokenizer)
    if adapter_model is not None:
        adapter_model.save_pretrained(tmp / (config.adapter or "adapter"))
    config.save(tmp)
    replace_dir(tmp, out)
    return out


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is swapped out only once `new` is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def resolve_checkpoint(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """An mmchat checkpoint for `source`: itself, or a LLaVA folder / hub id converted once into a cache."""
    if is_checkpoint(source):
        return Path(source)
    from mmchat.convert import to_mmchat

    cache = Path(cache_dir or os.environ.get("MMCHAT_CACHE", Path.home() / ".cache" / "mmchat")) / "converted"
    key = str(Path(source).resolve()) if Path(source).exists() else str(source)
    out = cache / (Path(key).name + "-" + hashlib.sha1(key.encode()).hexdigest()[:10])
    if not is_checkpoint(out):
        to_mmchat(str(source), out)
    return out
