"""The training loop: one process, or one per GPU under `accelerate launch` (DDP).

Each optimizer step takes --grad-accum micro-batches; its loss is the mean over every answer
token of the step (all micro-batches, all ranks), so accumulation and more GPUs change nothing
but speed. The data order depends only on (seed, epoch), and checkpoints hold the data position
and every RNG state, so a resumed run continues exactly where the straight run would be.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.batching import RankBatchSampler, collate, global_batches, padding_fraction
from finetune.build import Built, build_model, set_train_mode, trainable_parameters
from finetune.checkpointing import (
    TrainState, export_model, latest_checkpoint, load_training_checkpoint, prepare_output_dir,
    save_training_checkpoint,
)
from finetune.data.io import DataError
from finetune.data.dataset import (
    DataIndex, LlavaDataset, RecordStore, RenderSettings, check_images, load_or_build_index, read_records, record_id,
)
from finetune.objective import AnswerLoss
from finetune.optim import make_optimizer, make_scheduler, optimizer_name, param_groups
from finetune.plots import plot_loss
from finetune.train_config import TrainConfig
from finetune.train_log import TrainLog, bar_disabled, format_step, peak_memory_gb, say
from mmchat.conversation import IGNORE_INDEX
from mmchat.templates import resolve_template

INDEX_FILE = "data_index.npz"
SUMMARY_FILE = "train_summary.json"


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the flags that lower memory use."""


@dataclass
class TrainResult:
    output: Path
    finished: bool
    """False when --stop-after ended the run early (resume it with --resume)."""
    state: TrainState
    history: list[dict]
    built: Built


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class Run:
    """What the training loop works with."""

    cfg: TrainConfig
    accelerator: Any
    built: Built
    loss_module: torch.nn.Module
    """AnswerLoss, wrapped in DDP under several processes."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: RankBatchSampler
    loader: DataLoader
    index: DataIndex
    total_steps: int
    state: TrainState
    log: TrainLog


def train(cfg: TrainConfig) -> TrainResult:
    """Train as `cfg` says; the final mmchat checkpoint goes into --output-dir."""
    run = prepare(cfg)
    stop_at = min(run.total_steps, run.state.step + cfg.stop_after) if cfg.stop_after else run.total_steps
    started = time.perf_counter()
    try:
        train_steps(run, stop_at)
    finally:
        run.log.close()
    return _finish(run, time.perf_counter() - started)


def prepare(cfg: TrainConfig) -> Run:
    """Accelerator, output folder, data, model, optimizer, schedule; restored when resuming."""
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available() and not cfg.cpu
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision="bf16" if bf16 else "no")
    main, device = accelerator.is_main_process, accelerator.device
    resume_from = prepare_output_dir(cfg) if main else None
    accelerator.wait_for_everyone()
    if cfg.resume and not main:
        resume_from = latest_checkpoint(Path(cfg.output_dir))
    optimizer_name(cfg, device)  # fail on a GPU-only optimizer before loading anything
    store = read_records(Path(cfg.data), cfg.progress if main else False)  # bad data fails before the model loads
    if main:
        check_images(store, Path(cfg.image_root) if cfg.image_root else None, cfg.progress)

    seed_everything(cfg.seed)
    built = build_model(cfg, str(device))
    loader, sampler, index = _data(cfg, built, store, accelerator)
    steps_per_epoch = math.ceil(len(sampler.batches) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(param_groups(built.model, cfg), cfg, device)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    set_train_mode(built.model)
    loss_module = AnswerLoss(built.model)
    if accelerator.num_processes > 1:
        loss_module = accelerator.prepare_model(loss_module, device_placement=False)  # DDP
    state = TrainState()
    if resume_from is not None:
        state = load_training_checkpoint(resume_from, cfg, built, optimizer, scheduler, accelerator.process_index,
                                         accelerator.num_processes)
    if main:
        cfg.save(Path(cfg.output_dir) / "train_config.yaml")
        _describe(cfg, built, accelerator, total_steps, steps_per_epoch, optimizer_name(cfg, device))
        if resume_from is not None:
            say(f"resumed from {resume_from}: step {state.step}, epoch {state.epoch}, batch {state.batch}")
    log = TrainLog(Path(cfg.output_dir), state.step if resume_from else None, cfg.tensorboard, main)
    return Run(cfg, accelerator, built, loss_module, optimizer, scheduler, sampler, loader, index, total_steps,
                state, log)


def train_steps(run: Run, stop_at: int) -> None:
    """Optimizer steps until `stop_at`, epoch after epoch, from the state's data position."""
    cfg, state, main = run.cfg, run.state, run.accelerator.is_main_process
    params = list(trainable_parameters(run.built.model).values())
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step",
               disable=not main or bar_disabled(cfg.progress))
    with bar:
        while state.step < stop_at:
            if state.batch >= len(run.sampler.batches):
                state.epoch, state.batch = state.epoch + 1, 0
            run.sampler.set_epoch(state.epoch, state.batch)
            batches = iter(run.loader)
            while state.step < stop_at and (window := list(islice(batches, cfg.grad_accum))):
                tick = time.perf_counter()
                metrics = _step(cfg, run.accelerator, run.loss_module, window, params, run.optimizer, run.scheduler,
                                state)
                state.step, state.batch = state.step + 1, state.batch + len(window)
                record = {"step": state.step, "epoch": round(state.epoch + state.batch / len(run.sampler.batches), 4),
                          **metrics, "tokens_per_s": metrics["tokens"] / (time.perf_counter() - tick),
                          "peak_mem_gb": peak_memory_gb(run.accelerator.device)}
                run.log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}")
                if main and (state.step % cfg.log_every == 0 or state.step == stop_at):
                    say(format_step(record, run.total_steps))
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < run.total_steps:
                    _save(run)
            del batches  # stops its worker processes


def _save(run: Run) -> None:
    saved = save_training_checkpoint(run.accelerator, run.cfg, run.state, run.built, run.optimizer, run.scheduler)
    if run.accelerator.is_main_process:
        say(f"checkpoint: {saved}")


def _finish(run: Run, seconds: float) -> TrainResult:
    """A checkpoint when stopped early, else the final model; the plot and the run's summary."""
    cfg, state, out, main = run.cfg, run.state, Path(run.cfg.output_dir), run.accelerator.is_main_process
    finished = state.step >= run.total_steps
    if not finished and not (cfg.save_every and state.step % cfg.save_every == 0):
        _save(run)
    if main:
        plot_loss(run.log.history, out / "loss.png", f"{cfg.stage}: {Path(cfg.data).name}")
        if finished:
            export_model(out, run.built, cfg.stage)
    digests = _gather_digests(run.accelerator, run.built.model)
    if main:
        _write_summary(out, cfg, state, run.log.history, digests, seconds, run.index)
        say(f"done: the model is in {out} (python -m mmchat.cli --model {out})" if finished else
            f"stopped after step {state.step} of {run.total_steps}; continue with --resume")
    run.accelerator.wait_for_everyone()
    return TrainResult(out, finished, state, run.log.history, run.built)


def _data(cfg: TrainConfig, built: Built, store: RecordStore,
          accelerator) -> tuple[DataLoader, RankBatchSampler, DataIndex]:
    """Records -> index (rank 0 builds and caches it) -> a DataLoader of this rank's batches."""
    model, main = built.model, accelerator.is_main_process
    progress = False if not main else cfg.progress
    settings = RenderSettings(model.tokenizer, resolve_template(cfg.template_name, model.tokenizer), model.image_tokens,
                              model.config.image_token_id, cfg.max_length, model.anyres)
    data, image_root = Path(cfg.data), Path(cfg.image_root) if cfg.image_root else None
    stat = data.stat()
    fingerprint = "|".join(map(str, (data.resolve(), stat.st_size, stat.st_mtime_ns, model.tokenizer.name_or_path,
                                     len(model.tokenizer), settings.template, settings.image_tokens,
                                     settings.image_token_id, cfg.max_length)))
    if model.anyres is not None:  # slot counts follow the images' sizes
        fingerprint += f"|{model.anyres}|{image_root and image_root.resolve()}"
    with accelerator.main_process_first():
        index = load_or_build_index(store, settings, Path(cfg.output_dir) / INDEX_FILE, fingerprint, progress,
                                    cfg.num_workers, image_root)
    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = RankBatchSampler(index.lengths, cfg.batch_size, world, rank, cfg.seed, cfg.group_by_length)
    if main:
        _describe_data(cfg, store, index, world)
    pad_id = model.tokenizer.pad_token_id
    pad_id = model.tokenizer.eos_token_id if pad_id is None else pad_id
    loader = DataLoader(
        LlavaDataset(store, settings, model.config.vision, image_root,
                     None if model.processor is None else model.processor.image_processor), batch_sampler=sampler,
        collate_fn=partial(collate, pad_id=pad_id), num_workers=cfg.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # workers' seeds must not draw from the global RNG
    )
    return loader, sampler, index


def _step(cfg: TrainConfig, accelerator, loss_module, window: list[dict], params, optimizer, scheduler,
          state: TrainState) -> dict:
    """One optimizer step over `window` (the micro-batches); returns its metrics."""
    for batch in window:
        if "error" in batch:
            raise DataError(batch["error"])
    device, world = accelerator.device, accelerator.num_processes
    answers = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    answers = accelerator.reduce(torch.tensor(float(answers), device=device), "sum")
    scale = world / max(float(answers), 1.0)  # DDP averages over ranks; undo that, divide by all tokens
    loss_sum = torch.zeros((), device=device)
    try:
        for i, batch in enumerate(window):
            batch = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in batch.items()}
            sync = nullcontext() if i == len(window) - 1 else accelerator.no_sync(loss_module)
            with sync:
                with accelerator.autocast():
                    loss = loss_module(batch["input_ids"], batch["image_mask"], batch["attention_mask"],
                                       batch["labels"], batch["pixel_values"], batch["image_sizes"],
                                       batch["image_tiles"])
                accelerator.backward(loss * scale)
            loss_sum += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}  # this step's, before the schedule moves
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        longest = max(b["input_ids"].shape[1] for b in window)
        raise OutOfMemory(
            f"out of GPU memory at step {state.step + 1} (micro-batch of {cfg.batch_size} × up to {longest} tokens); "
            f"lower --batch-size (raise --grad-accum to keep the global batch), lower --max-length"
            + (" (--gradient-checkpointing is on)" if cfg.gradient_checkpointing else
               ", or turn on --gradient-checkpointing")) from None
    tokens = sum(int(b["attention_mask"].sum()) for b in window)
    positions = sum(b["attention_mask"].numel() for b in window)
    totals = accelerator.reduce(torch.tensor([float(loss_sum), tokens, positions], device=device), "sum")
    record = {"loss": float(totals[0]) / max(float(answers), 1.0), "lr": lrs.get("llm", lrs["projector"])}
    if "llm" in lrs:
        record["lr_projector"] = lrs["projector"]
    record.update(grad_norm=float(grad_norm), answer_tokens=int(answers), tokens=int(totals[1]),
                  padding=1.0 - float(totals[1]) / float(totals[2]))
    return record


def _gather_digests(accelerator, model) -> list[str]:
    """Every rank's SHA-256 of its trainable weights: equal when the ranks stayed in sync."""
    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, p in sorted(trainable_parameters(model).items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return gather_object([digest.hexdigest()])


def _describe(cfg, built, accelerator, total_steps, steps_per_epoch, optimizer) -> None:
    trainable = trainable_parameters(built.model)
    projector = sum(p.numel() for n, p in trainable.items() if n.startswith("projector."))
    llm = sum(p.numel() for n, p in trainable.items() if n.startswith("llm."))
    what = {"align": "projector only", "full": "projector + all LLM weights",
            "instruct": f"projector + LoRA r {cfg.lora_r} alpha {cfg.lora_alpha} on {' '.join(built.lora_targets)}"}
    say(f"stage {cfg.stage}: {what[cfg.stage]}; LLM {built.llm_ref} in {cfg.llm_load_in}, template {cfg.template_name}")
    say(f"trainable: {llm + projector:,} parameters (LLM {llm:,}, projector {projector:,})")
    say(f"{accelerator.num_processes} process(es) on {accelerator.device}, {accelerator.mixed_precision} autocast, "
        f"{optimizer}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    say(f"global batch {cfg.batch_size * cfg.grad_accum * accelerator.num_processes} = {cfg.batch_size} × "
        f"{cfg.grad_accum} accumulation × {accelerator.num_processes} process(es); {total_steps} optimizer steps "
        f"({steps_per_epoch} per epoch), lr {cfg.lr:g}"
        + (f", projector lr {cfg.projector_lr:g}" if cfg.projector_lr else ""))


def _describe_data(cfg: TrainConfig, store, index: DataIndex, world: int) -> None:
    n = len(store)
    with_image = len(store.images)
    say(f"data: {n:,} records ({with_image:,} with an image, {n - with_image:,} text-only) from {cfg.data}")
    long = index.full_lengths > cfg.max_length
    if long.any():
        say(f"{int(long.sum()):,} record(s) longer than --max-length {cfg.max_length} are truncated "
            f"(longest {int(index.full_lengths.max()):,} tokens)")
    empty = np.flatnonzero(index.answer_tokens == 0)
    if len(empty):
        ids = ", ".join(record_id(store[i], i + 1) for i in empty[:5])
        say(f"warning: {len(empty):,} record(s) have no answer token within --max-length and train nothing "
            f"(e.g. {ids}); raise --max-length or shorten them")
    grouped, shuffled = (
        padding_fraction(global_batches(index.lengths, cfg.batch_size, world, cfg.seed, 0, group), index.lengths, world)
        for group in (True, False))
    say(f"tokens per record: mean {index.lengths.mean():.0f}, max {int(index.lengths.max())}; padding "
        f"{grouped:.1%} with length grouping, {shuffled:.1%} without"
        + ("" if cfg.group_by_length else " (--no-group-by-length)"))


def _write_summary(out: Path, cfg, state, history, digests, seconds, index) -> None:
    summary = {
        "stage": cfg.stage, "steps": state.step, "seconds": round(seconds, 1),
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "mean_tokens_per_s": float(np.mean([r["tokens_per_s"] for r in history])) if history else None,
        "mean_padding": float(np.mean([r["padding"] for r in history])) if history else None,
        "peak_mem_gb": max((r["peak_mem_gb"] for r in history), default=None),
        "truncated_records": int((index.full_lengths > cfg.max_length).sum()),
        "rank_digests": digests, "ranks_in_sync": len(set(digests)) == 1,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["ranks_in_sync"]:
        say(f"warning: the ranks' trainable weights differ ({digests}); DDP fell out of sync")
