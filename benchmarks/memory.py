"""Peak GPU memory of stage-2 QLoRA, from an analytic model fitted to measured training steps.

    python -m benchmarks.memory --quick                                   # ≤ 2 minutes on 2 CPU cores
    python -m benchmarks.memory --model-size 7b --seq-len 2048 --batch 1  # five fit shapes (~3 minutes)

Random mmchat checkpoints of a few small LLaMA shapes (LLaMA's MLP ratio and vocabulary) train
real stage-2 steps (`finetune.build` + `AnswerLoss` + AdamW, 4-bit NF4 + LoRA) at several sequence
lengths, batch sizes, answer shares, with and without gradient checkpointing, each shape in its
own process. What a step adds over the loaded model is measured (peak RSS on CPU, with glibc told
to return freed blocks; torch's allocator peak on GPU), the coefficients `benchmarks.memory_model`
cannot derive are fitted by least squares, and the model then predicts LLaMA-7B/13B + CLIP
ViT-L/14-336 on a GPU, which fits on 12, 16 and 24 GB cards, and how that compares with
published figures. What stays loaded is checked against the tensors' own byte counts.

`--image-tokens` (mlp, resampler with `--queries`, anyres with `--grid`) sets how the image becomes
tokens: the sequence keeps `--seq-len`'s text and answers and takes the strategy's image tokens, and the
projector's saved tensors are counted on every tile; a table compares the three strategies at 7B.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import machine, peak_memory_mb, reset_peak_memory, rss_mb, run_worker
from benchmarks.image_strategy import STRATEGIES, ImageTokens, add_flags, from_flags
from benchmarks.memory_model import CLIP_L_336, LLAMA
from benchmarks.memory_report import report

VOCAB = 32000  # LLaMA's: the logits term is per vocabulary entry
MLP_RATIO = 11008 / 4096  # LLaMA's
VISION = {"vision_width": 128, "vision_layers": 2, "image_size": 112, "patch": 14}  # 64 image tokens


@dataclass
class MemoryBenchConfig:
    model_size: str = "7b"
    """The model to predict: 7b or 13b (LLaMA-1/2 shapes; CLIP ViT-L/14-336)."""
    seq_len: int = 2048
    batch: int = 1
    lora_r: int = 128
    """LoRA rank of the prediction (the shipped config: 128 on every linear layer)."""
    answer_fraction: float = 0.5
    """Share of positions that are followed by an answer token (the only ones with logits)."""
    image_tokens: ImageTokens = field(default_factory=ImageTokens)
    """How the image becomes tokens. `seq_len` and `answer_fraction` describe LLaVA-1.5's sequence (576
    image tokens); another strategy keeps its text and answers and swaps the image's tokens."""
    vision_dtype: str = "fp32"
    """The frozen tower as mmchat keeps it (fp32), or bf16."""
    quick: bool = False
    """Two fit shapes (≤ 2 minutes on 2 CPU cores); the full run fits five."""
    out: Path = Path("benchmarks/results")
    device: str = "cpu"
    """Where the fit is measured: cpu, or cuda when a GPU is there."""
    threads: int = 1
    """torch threads; memory does not depend on it, and one thread is robust on a busy machine."""
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    """Fit shapes (hidden, layers, LoRA r); set from --quick."""
    points: list[tuple[int, int, bool, float]] = field(default_factory=list)
    """Steps measured on each shape: (batch, seq_len, gradient checkpointing, answer fraction)."""

    def __post_init__(self) -> None:
        if self.model_size not in LLAMA:
            raise ValueError(f"--model-size {self.model_size!r}: choose one of {', '.join(LLAMA)}")
        if self.vision_dtype not in ("fp32", "bf16"):
            raise ValueError(f"--vision-dtype {self.vision_dtype!r}: choose fp32 or bf16")
        if not 0 < self.answer_fraction <= 1:
            raise ValueError(f"--answer-fraction must be in (0, 1], got {self.answer_fraction}")
        if self.seq_len < 1 or self.batch < 1:
            raise ValueError(f"--seq-len {self.seq_len} and --batch {self.batch} must be at least 1")
        text = self.seq_len - CLIP_L_336.tokens
        if self.answer_fraction * self.seq_len > text:
            raise ValueError(f"--answer-fraction {self.answer_fraction} of --seq-len {self.seq_len} is more answer "
                             f"positions than the {max(text, 0)} text tokens beside {CLIP_L_336.tokens} image tokens")
        if not self.shapes:
            self.shapes = [(256, 2, 16), (512, 2, 128)] if self.quick else [
                (256, 2, 16), (512, 2, 128), (768, 2, 256), (512, 4, 16), (1024, 2, 64)]
        if not self.points:
            # Answer shares from 2% to 50% make each moment of a step the peak somewhere (short
            # sequences with few answers: the gradients; long ones with few: the recomputed layer).
            self.points = [(1, 256, True, 0.5), (1, 512, True, 0.5), (1, 512, True, 0.05), (1, 1024, True, 0.02),
                           (1, 96, True, 0.02), (1, 256, False, 0.5), (1, 512, False, 0.5), (1, 512, False, 0.1)]
            if not self.quick:
                self.points += [(2, 384, True, 0.3), (1, 1024, True, 0.5), (2, 512, False, 0.2), (2, 768, True, 0.05)]


def fit_shape(hidden: int) -> dict:
    """A small LLaMA with LLaMA-7B's proportions: heads of 64, MLP ratio 2.69, 32K vocabulary."""
    from benchmarks.random_llava import LlavaShape

    heads = hidden // 64
    return asdict(LlavaShape(hidden=hidden, heads=heads, kv_heads=heads, intermediate=round(hidden * MLP_RATIO / 16) * 16,
                             vocab=VOCAB, **VISION))


# ------------------------------------------------------------------ one shape, one process


def _trim() -> None:
    """Hand freed memory back to the OS so RSS follows live tensors (with MALLOC_MMAP_THRESHOLD_)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _tensor_bytes(model, optimizer) -> dict:
    """Bytes the loaded model and optimizer hold, counted from the tensors (NF4 with its constants)."""
    import bitsandbytes as bnb

    nf4_params = nf4_bytes = 0
    quantised = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, qs = module.weight, module.weight.quant_state
            nf4_params += qs.shape.numel()
            nf4_bytes += w.data.nbytes + qs.absmax.nbytes + qs.code.nbytes
            if qs.nested:
                nf4_bytes += qs.state2.absmax.nbytes + qs.state2.code.nbytes
            quantised.add(w.data_ptr())
    seen, other = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in quantised and ptr not in seen:
            seen.add(ptr)
            other += t.untyped_storage().nbytes()
    states = sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values()
                 if hasattr(v, "untyped_storage") and v.dim())  # not AdamW's scalar step counters
    return {"nf4_params": nf4_params, "nf4_bytes": nf4_bytes, "other_bytes": other, "optimizer_bytes": states}


def measure_shape(job: dict) -> dict:
    """Load `job["checkpoint"]` for stage 2 and measure what each step of `job["points"]` adds."""
    import peft  # noqa: F401  (imported before the baseline: code pages are not the model's)
    import torch

    from benchmarks.stage2_step import load_stage2, train_step

    device = job["device"]
    on_gpu = device.startswith("cuda")
    _trim()
    before = torch.cuda.memory_allocated() if on_gpu else rss_mb() * 2**20
    st = load_stage2(job["checkpoint"], job["lora_r"], device)
    model = st.model
    base_llm = model.llm.get_base_model()
    train_step(st, 1, model.image_tokens + 16, 0.1)  # creates the optimizer states: from here on they are "loaded"
    _trim()
    loaded = torch.cuda.memory_allocated() if on_gpu else rss_mb() * 2**20
    out = {"trainable": sum(p.numel() for p in st.params), "loaded_bytes": loaded - before,
           "tensors": _tensor_bytes(model, st.optimizer), "vision_params": sum(p.numel() for p in model.vision.parameters()),
           "image_tokens": model.image_tokens, "points": []}
    for batch, seq, checkpointing, answers in job["points"]:
        if checkpointing:
            base_llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base_llm.activation_checkpointing_disable()
        _trim()
        start_bytes = torch.cuda.memory_allocated() if on_gpu else rss_mb() * 2**20
        reset_peak_memory(device)
        tick = time.perf_counter()
        train_step(st, batch, seq, answers)
        peak = peak_memory_mb(device) * 2**20
        out["points"].append({"batch": batch, "seq_len": seq, "gradient_checkpointing": checkpointing,
                              "answer_fraction": max(1, int(answers * seq)) / seq, "step_bytes": peak - start_bytes,
                              "seconds": time.perf_counter() - tick})
    return out


def saved_bytes(module, forward, autocast: bool) -> int:
    """Bytes autograd keeps for backward while `forward()` runs, `module`'s own weights left out
    (a bf16 copy that autocast makes of one is counted)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        forward()
    return sum(seen.values())


def bf16_ratio(hidden: int = 256, layers: int = 2, seq: int = 128) -> float:
    """Bytes autograd saves under bf16 autocast (bf16 weights, float32 LoRA: the GPU setup) ÷ in float32.

    Counted with saved-tensor hooks on the CPU, whose autocast casts the same matmuls as CUDA's;
    weights that autograd keeps a reference to are not counted.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=round(hidden * MLP_RATIO),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)

    def saved(dtype, autocast: bool) -> int:
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(config).to(dtype), LoraConfig(
            r=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])).train()
        ids = torch.randint(0, 1024, (1, seq))
        return saved_bytes(model, lambda: model(input_ids=ids, logits_to_keep=1), autocast)

    return saved(torch.bfloat16, True) / saved(torch.float32, False)


def projector_saved_bytes(projector, patches: int) -> tuple[float, float]:
    """(bytes per tile, bytes per step) the projector of `ProjectorConfig` `projector` keeps for its
    backward under bf16 autocast (the GPU setup), on tiles of `patches` tower features.

    Counted with saved-tensor hooks at the real widths on 1 and 2 tiles of 16 and 36 patches (a bf16
    matmul over 576 is slow on a CPU), then extrapolated: both counts are linear in the patches (the
    resampler's attention too: its queries are fixed). Per step: the bf16 weight copies its backward uses.
    """
    import torch

    from mmchat.projector import build_projector

    with torch.device("meta"):  # no initialisation: the bytes do not depend on the values
        module = build_projector(projector)
    module = module.to_empty(device="cpu").float().requires_grad_(True)
    g = torch.Generator().manual_seed(0)

    def count(tiles: int, n: int) -> int:
        features = torch.randn(tiles, n, projector.in_dim, generator=g)  # the tower's output: no gradient
        return saved_bytes(module, lambda: module(features), autocast=True)

    one = {n: count(1, n) for n in (16, 36)}
    per_tile = {n: count(2, n) - one[n] for n in (16, 36)}
    slope = (per_tile[36] - per_tile[16]) / 20
    return per_tile[16] + slope * (patches - 16), one[16] - per_tile[16]


def image_side(chosen: ImageTokens) -> list[dict]:
    """Each strategy (`chosen`'s settings for its own) on CLIP ViT-L/14-336: image tokens, tiles, and what
    the projector keeps for backward at each model size's width."""
    from mmchat.config import ProjectorConfig

    vision, out, cache = CLIP_L_336, [], {}
    for name in STRATEGIES:
        strategy = chosen if chosen.strategy == name else ImageTokens(name)
        saved = {}
        for size, llm in LLAMA.items():
            queries = strategy.queries if name == "resampler" else None
            key = (queries, llm.hidden)
            if key not in cache:
                cache[key] = projector_saved_bytes(ProjectorConfig(
                    "resampler" if queries else "mlp2x_gelu", vision.width, llm.hidden, queries=queries), vision.tokens)
            per_tile, per_step = cache[key]
            saved[size] = {"per_sequence": per_tile * strategy.tiles, "per_step": per_step}
        out.append({**strategy.to_dict(), "image_tokens": strategy.count(336, 14), "saved": saved})
    return out


# ------------------------------------------------------------------ orchestration


def _run_job(job: dict, workdir: Path, name: str) -> dict:
    # Small mmap/trim thresholds return freed memory to the OS, so RSS follows what is in use.
    return run_worker("benchmarks.memory", job, workdir / f"{name}.json", name,
                      MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")


def _worker(job_file: Path) -> None:
    import torch

    job = json.loads(job_file.read_text())
    torch.set_num_threads(job["threads"])
    job_file.with_suffix(".out.json").write_text(json.dumps(measure_shape(job)))


def run(cfg: MemoryBenchConfig) -> dict:
    import torch

    from benchmarks.random_llava import LlavaShape, build_mmchat, train_tokenizer

    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    shapes = []
    with tempfile.TemporaryDirectory(prefix="mmchat-bench-memory-") as folder:
        work = Path(folder)
        train_tokenizer(work / "tokenizer", 512)
        for hidden, layers, r in cfg.shapes:
            shape = LlavaShape(**{**fit_shape(hidden), "layers": layers})
            print(f"measuring {layers} layers × {hidden} hidden, LoRA r {r}", file=sys.stderr)
            build_mmchat(work / f"h{hidden}-l{layers}", shape, work / "tokenizer")
            job = {"checkpoint": str(work / f"h{hidden}-l{layers}"), "lora_r": r, "points": cfg.points,
                   "device": cfg.device, "threads": cfg.threads}
            shapes.append({"hidden": hidden, "layers": layers, "lora_r": r, "shape": asdict(shape),
                           **_run_job(job, work, f"h{hidden}-l{layers}-r{r}")})
    print("counting saved activation bytes under bf16 autocast (the LLM, the projectors)", file=sys.stderr)
    ratio = bf16_ratio()
    return {"config": {**asdict(cfg), "image_tokens": cfg.image_tokens.to_dict(), "out": str(cfg.out)},
            "machine": machine(), "seconds": time.perf_counter() - started, "bf16_ratio": ratio,
            "image_side": image_side(cfg.image_tokens), "shapes": shapes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="7b", choices=sorted(LLAMA))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--answer-fraction", type=float, default=0.5,
                   help="share of positions followed by an answer token (default: 0.5)")
    p.add_argument("--vision-dtype", default="fp32", choices=["fp32", "bf16"])
    add_flags(p)
    p.add_argument("--quick", action="store_true", help="two fit shapes (≤ 2 min on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", default="cpu", help="where to measure the fit: cpu, or cuda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return 0
    try:
        cfg = MemoryBenchConfig(model_size=a.model_size, seq_len=a.seq_len, batch=a.batch, lora_r=a.lora_r,
                                answer_fraction=a.answer_fraction, vision_dtype=a.vision_dtype,
                                image_tokens=from_flags(a), quick=a.quick, out=a.out, device=a.device, threads=a.threads)
    except ValueError as e:
        p.error(str(e))
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(main())
