"""The mmchat checkpoint folder: its file names, reading and writing it, and writes that land whole.

    mmchat.json             typed ModelConfig
    projector.safetensors   projector weights (LLaVA `mm_projector` names: `0.*`, `2.*` or `weight`/`bias`)
    vision/                 open_clip config + visual weights, unless the config names a pretrained tag
    llm/                    a transformers model folder with its tokenizer (or only a tokenizer
                            when `llm` names a base model and `adapter/` holds a PEFT LoRA adapter)
    adapter/                optional PEFT adapter
    processor/              optional transformers processor (tokenizer, image processor, chat template)
                            of a converted llava-hf folder; then `tokenizer` names it too

Every writer here (and every other file mmchat writes that a reader may see half-done: datasets,
plots, training checkpoints) goes through `atomic_dir` / `atomic_file`: the new content is
built beside the target and renamed into place, so an interrupted run leaves the old one intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

# The folder names are defined beside ModelConfig's defaults that use them; users import them from here.
from mmchat.config import ADAPTER_DIR, LLM_DIR, PROCESSOR_DIR, TOKENIZER_DIR, ModelConfig  # noqa: F401

if TYPE_CHECKING:
    from torch import nn

# safetensors, torch and open_clip are imported where they are used: `atomic_file` serves the data
# tools too, which should start in a fraction of a second.

CONFIG_FILE = "mmchat.json"
PROJECTOR_FILE = "projector.safetensors"


# ---------------------------------------------------------------- writes that land whole


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside `target`; on success it replaces `target`, on error it
    is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a hidden path beside `target` (same suffix, so writers that pick a format by it still
    do); on success it replaces `target` in one rename, on error it is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is swapped out only once `new` is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


# ---------------------------------------------------------------- reading


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_FILE}: not an mmchat checkpoint; "
            f"convert a LLaVA folder first with `python -m mmchat.convert SRC DST`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or re-convert the checkpoint") from None
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:  # name the file: it is what the user fixes
        raise ValueError(f"{e} in {CONFIG_FILE} ({path})") from None


def read_projector_state(folder: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / PROJECTOR_FILE))


def resolve_path(checkpoint: str | Path, ref: str) -> str:
    """A reference inside a checkpoint (relative folder) or outside it (absolute path / hub id)."""
    local = Path(checkpoint) / ref
    return str(local) if local.exists() else ref


# ---------------------------------------------------------------- writing


def write_config(config: ModelConfig, folder: str | Path) -> None:
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def save_projector(projector: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

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
    processor=None,
) -> Path:
    """Write a checkpoint at `out`, atomically.

    `llm` is saved as a standard transformers folder under `llm/`; `adapter_model` (a PEFT
    model) saves only its adapter under `adapter/`. `vision` is saved when the config has no
    pretrained tag. `processor` (a transformers processor: a converted folder's) is saved under
    `processor/` with `tokenizer` as its tokenizer, and the config's `processor` and `tokenizer` name it.
    """
    from mmchat.vision import save_vision_tower

    out = Path(out)
    if processor is not None:  # the tokenizer travels inside the processor, so its class is the processor's
        config = dataclasses.replace(config, processor=PROCESSOR_DIR, tokenizer=PROCESSOR_DIR)
    elif config.processor is not None:
        raise ValueError(f"the config names processor {config.processor!r} but no processor was given to save")
    if config.vision.pretrained is None and (vision is None or vision_model_cfg is None):
        raise ValueError("a checkpoint without a pretrained vision tag must include the vision tower and its open_clip config")
    with atomic_dir(out) as tmp:
        save_projector(projector, tmp / PROJECTOR_FILE)
        if config.vision.pretrained is None:
            save_vision_tower(vision, vision_model_cfg, tmp)
        if llm is not None:
            llm.save_pretrained(tmp / config.llm)
        if processor is not None:
            processor.tokenizer = tokenizer  # the model's own (training may have added tokens)
            processor.save_pretrained(tmp / PROCESSOR_DIR)
            if llm is not None:  # llm/ stays a whole transformers LLM folder (`--llm CKPT/llm` trains from it)
                tokenizer.save_pretrained(tmp / config.llm)
        else:
            tokenizer.save_pretrained(tmp / config.tokenizer)
        if adapter_model is not None:
            adapter_model.save_pretrained(tmp / (config.adapter or ADAPTER_DIR))
        write_config(config, tmp)  # last: only a complete folder has it
    return out
