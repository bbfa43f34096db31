"""Resumable training checkpoints and the final mmchat checkpoint, all written atomically.

    OUTPUT_DIR/                     the trained model: an mmchat checkpoint (`mmchat.cli --model OUTPUT_DIR`)
      mmchat.json, projector.safetensors, adapter/ (PEFT), tokenizer/ [, vision/] [, llm/ for --stage full]
      checkpoints/step-0000500/     every --save-every steps, the newest --keep-checkpoints kept
        model/                      an mmchat checkpoint of that step (loadable the same way)
        optimizer.pt, scheduler.pt, rng-rank{N}.pt, trainer_state.json (step, data position, options)
      train_log.jsonl, loss.png, train_config.yaml, data_index.npz [, tensorboard/]

Each checkpoint is written into a hidden temporary folder and renamed into place when complete,
so an interrupted save never leaves a checkpoint that looks whole.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.build import Built
from finetune.train_config import RESUME_SAFE, ConfigError, TrainConfig, flag
from mmchat.checkpoint import (
    ADAPTER_DIR,
    CONFIG_FILE,
    LLM_DIR,
    PROJECTOR_FILE,
    TOKENIZER_DIR,
    replace_dir,
    save_checkpoint,
)

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
PREVIOUS_RUN = (CHECKPOINTS, "train_log.jsonl", "tensorboard", CONFIG_FILE)
"""What marks a folder as holding a previous run (and what --overwrite removes)."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch: int = 0
    """Global batches of `epoch` already trained on (the data position)."""


def prepare_output_dir(cfg: TrainConfig) -> Path | None:
    """Check --output-dir against --resume / --overwrite; the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir)
    if cfg.resume:
        latest = latest_checkpoint(out)
        if latest is None:
            raise ConfigError(f"--resume: {out / CHECKPOINTS} holds no checkpoint; run without --resume "
                              "(checkpoints are written every --save-every steps)")
        return latest
    previous = [name for name in PREVIOUS_RUN if (out / name).exists()]
    if previous and not cfg.overwrite:
        raise ConfigError(f"--output-dir {out} holds a previous run ({', '.join(previous)}); pass --resume to "
                          "continue it, --overwrite to start again, or choose another --output-dir")
    for name in previous:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def output_config(built: Built, stage: str):
    """The mmchat config of a saved model: the base LLM by reference plus adapter, or the whole LLM."""
    config = copy.deepcopy(built.model.config)
    if stage == "full":
        config.llm, config.tokenizer, config.adapter = LLM_DIR, LLM_DIR, None
    else:
        config.llm, config.tokenizer = built.llm_ref, TOKENIZER_DIR
        config.adapter = ADAPTER_DIR if _is_peft(built.model.llm) else None
    return config


def save_model(out: Path, built: Built, stage: str) -> Path:
    """An mmchat checkpoint of the current weights at `out` (atomic; see `mmchat.checkpoint`)."""
    model = built.model
    peft = _is_peft(model.llm)
    return save_checkpoint(
        out, output_config(built, stage), model.projector, model.tokenizer,
        llm=model.llm if stage == "full" else None,
        vision=model.vision, vision_model_cfg=built.vision_model_cfg,
        adapter_model=model.llm if peft else None, processor=model.processor,
    )


def export_model(out_dir: Path, built: Built, stage: str) -> Path:
    """Write the final model into `out_dir` itself, beside the run's logs; mmchat.json goes last,
    so the folder is a loadable checkpoint only once every file is in place."""
    staging = save_model(out_dir / ".final", built, stage)
    entries = sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_FILE)
    for entry in entries:
        target = out_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    staging.rmdir()
    return out_dir


def save_training_checkpoint(accelerator, cfg: TrainConfig, state: TrainState, built: Built, optimizer,
                             scheduler) -> Path:
    """Weights (as a loadable mmchat checkpoint), optimizer, scheduler, every rank's RNG, data position."""
    root = Path(cfg.output_dir) / CHECKPOINTS
    final = root / f"step-{state.step:07d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(tmp / MODEL_DIR, built, cfg.stage)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        info = {**asdict(state), "world_size": accelerator.num_processes, "config": cfg.to_dict()}
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, final)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_training_checkpoint(path: Path, cfg: TrainConfig, built: Built, optimizer, scheduler, rank: int,
                             world_size: int) -> TrainState:
    """Restore everything `save_training_checkpoint` wrote; the options must match the checkpoint's run."""
    info = json.loads((path / STATE_FILE).read_text())
    _check_same_run(info, cfg, world_size, path)
    model = built.model
    model.projector.load_state_dict(load_file(str(path / MODEL_DIR / PROJECTOR_FILE)))
    if cfg.stage == "instruct":
        from peft import set_peft_model_state_dict

        weights = load_file(str(path / MODEL_DIR / ADAPTER_DIR / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model.llm, weights)
        if result.unexpected_keys:
            raise ConfigError(f"--resume: {path} holds adapter weights this model lacks: {result.unexpected_keys[:3]}")
    elif cfg.stage == "full":
        _load_llm_weights(model.llm, path / MODEL_DIR / LLM_DIR)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-rank{rank}.pt", weights_only=True))
    return TrainState(info["step"], info["epoch"], info["batch"])


def _check_same_run(info: dict, cfg: TrainConfig, world_size: int, path: Path) -> None:
    if info["world_size"] != world_size:
        raise ConfigError(f"--resume: {path} was written by {info['world_size']} processes, this run has "
                          f"{world_size}; relaunch with the same number of GPUs")
    now = cfg.to_dict()
    changed = [f"{flag(k)} {v!r} (now {now[k]!r})" for k, v in info["config"].items()
               if k not in RESUME_SAFE and k in now and now[k] != v]
    if changed:
        raise ConfigError(f"--resume: the run in {path.parent.parent} used {', '.join(changed)}; resume with the "
                          "same options, or start a new run in another --output-dir")


def _load_llm_weights(llm: torch.nn.Module, folder: Path) -> None:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = llm.load_state_dict(state, strict=False)
    current = llm.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]  # tied weights are saved once
    if unexpected or untied:
        raise ConfigError(f"--resume: {folder} does not match the LLM (missing {untied[:3]}, unexpected {unexpected[:3]})")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_peft(llm) -> bool:
    from peft import PeftModel

    return isinstance(llm, PeftModel)
