"""The GPU check's stage-2 step: QLoRA at LLaVA-1.5-7B's shape, peak memory per batch vs `benchmarks.memory`'s model.

The NF4 model of `benchmarks.gpu_model` gets what `finetune.build` gives a checkpoint for stage 2
(LoRA r 128 on every linear layer, gradient checkpointing, the projector trainable in float32) and
`benchmarks.stage2_step`'s optimizer and step (bf16 autocast, paged 8-bit AdamW on a GPU). Each
batch size's peak (torch's allocator: no CUDA context) is set against the analytic model's
prediction from the committed fit (`benchmarks/results/memory.json`) without its CUDA context.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import peak_memory_mb, reset_peak_memory

FIT = Path(__file__).parent / "results" / "memory.json"
"""The committed fit of `python -m benchmarks.memory` (coefficients, the bf16 ratio, the projector's saved bytes)."""


def predicted_parts(shape, vision_params: int, batch: int, seq_len: int, lora_r: int, device: str) -> dict[str, float]:
    """`benchmarks.memory_model`'s bytes per part at the peak of a stage-2 step of `shape` (its LLM and
    tower), `batch` × `seq_len` tokens, half of them answers, checkpointing on (the fit's workload)."""
    from benchmarks.memory_model import CPU, CUDA_CONTEXT, Coefficients, LlmShape, VisionShape, breakdown, cuda_precision
    from benchmarks.memory_report import strategy_case

    data = json.loads(FIT.read_text())
    side = next(s for s in data["image_side"] if s["strategy"] == "mlp")
    cfg = {**data["config"], "seq_len": seq_len, "batch": batch, "lora_r": lora_r}
    _, work = strategy_case(cfg, side, "7b")  # the projector's saved bytes are 7B's (its width)
    vision = VisionShape("random tower", vision_params, shape.vision_width, (shape.image_size // shape.patch) ** 2)
    work = replace(work, seq_len=seq_len, answer_fraction=0.5)
    llm = LlmShape("random LLM", shape.layers, shape.hidden, shape.intermediate, shape.vocab,
                   shape.hidden * shape.kv_heads // shape.heads)
    prec = cuda_precision(data["bf16_ratio"]) if device.startswith("cuda") else replace(CPU, constant=0.0)
    parts = breakdown(llm, vision, work, prec, Coefficients(**data["coefficients"]))
    parts.pop("CUDA context", None)  # torch's allocator, which the measurement reads, holds none of it
    parts.pop("workspace", None)
    return {**parts, "total": sum(parts.values()), "cuda_context_assumed": CUDA_CONTEXT}


def stage2_check(shape, device: str, work: Path, batches: list[int], seq_len: int, lora_r: int, seed: int = 0) -> dict:
    """Build `shape` in NF4 on `device`, make it trainable as stage 2, and time one step per batch size."""
    from benchmarks.gpu_model import as_mmchat, build_random_llava
    from benchmarks.stage2_step import stage2_config, train_step, with_optimizer
    from finetune.build import _set_trainable  # finetune.build's own LoRA setup, on a model loaded in memory

    built = build_random_llava(shape, work, device, seed)
    model = as_mmchat(built)
    built.llava = None  # its bf16 tower and projector: mmchat holds its own copies
    cfg = stage2_config("random weights in memory", lora_r, device)
    model.llm, _ = _set_trainable(model.llm, cfg, None)
    model.projector.to(device, torch.float32).requires_grad_(True)
    st = with_optimizer(model, cfg, device)
    vision_params = sum(p.numel() for p in model.vision.parameters())
    train_step(st, 1, model.image_tokens + 16, 0.1)  # creates the optimizer states, as a run's first step does
    rows = []
    for batch in batches:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        reset_peak_memory(device)
        tick = time.perf_counter()
        try:
            train_step(st, batch, seq_len, 0.5)
        except torch.OutOfMemoryError as e:
            rows.append({"batch": batch, "error": f"out of memory: {str(e).splitlines()[0]}"})
            st.optimizer.zero_grad(set_to_none=True)
            continue
        peak = peak_memory_mb(device) * 2**20  # synchronizes first
        seconds = time.perf_counter() - tick
        parts = predicted_parts(shape, vision_params, batch, seq_len, lora_r, device)
        rows.append({"batch": batch, "seq_len": seq_len, "seconds": seconds, "tokens_per_s": batch * seq_len / seconds,
                     "peak_bytes": peak, "predicted_bytes": parts["total"], "measured_over_predicted": peak / parts["total"],
                     "reserved_bytes": torch.cuda.max_memory_reserved() if device.startswith("cuda") else None,
                     "predicted_parts": parts})
    return {"shape": shape.describe(), "lora_r": lora_r, "trainable": sum(p.numel() for p in st.params), "batches": rows}
