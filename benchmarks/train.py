"""Stage-2 QLoRA training speed: mmchat's trainer vs a plain transformers + peft loop.

    python -m benchmarks.train --quick         # ≤ 2 minutes on 2 CPU cores
    python -m benchmarks.train                 # 4 layers of SmolLM-135M's shape, 576 image tokens

Both engines train the same random LLaVA (saved in llava-hf format and converted to mmchat) on
the same synthetic records, whose lengths spread like LLaVA-1.5's 665K mix (`benchmarks.llava_mix`),
for one epoch at the same batch size, LoRA config (every linear layer of the LLM, plus the
projector), dtype and gradient checkpointing:

- mmchat: `finetune.qlora`'s own config path (`--config tests/configs/tiny-instruct.yaml` plus
  flags), 4-bit NF4 + LoRA, length-grouped batches, logits only at answer positions.
- plain: `LlavaForConditionalGeneration` loaded 4-bit by transformers (vision tower and projector
  kept unquantized, as LLaVA's loader does), `prepare_model_for_kbit_training` + `get_peft_model`,
  batches in file order padded to the longest, `labels=` loss, torch AdamW. Its ids and labels
  come from the same renderer and dataset code, so both see identical tokens and pixels.

Each engine runs in its own process; the clock covers the whole epoch (data loading included,
no warm-up for either) and peak memory is reset after loading. The run fails if the engines saw
different numbers of tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from benchmarks.common import machine, peak_memory_mb, reset_peak_memory, rss_mb, run_worker, table, write_json
from benchmarks.random_llava import LlavaShape

ENGINES = ("plain", "mmchat", "mmchat-no-grouping")
LLAMA_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
"""The plain loop's LoRA targets: every linear layer of the LLM (CLIP has q/k/v_proj too)."""
MMCHAT_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "configs" / "tiny-instruct.yaml"


@dataclass
class TrainBenchConfig:
    quick: bool = False
    """Set by --quick, which also brings QUICK's values."""
    out: Path = Path("benchmarks/results")
    """Where train.json and train.png go."""
    records: int = 48
    """Records in the timed epoch (a multiple of --batch-size)."""
    batch_size: int = 4
    lora_r: int = 128
    lora_alpha: int = 256
    """LoRA as the shipped 7B config (r 128 / alpha 256 on every linear layer)."""
    text_scale: float = 1.0
    """Multiplies every text length of the LLaVA-like mix."""
    max_length: int = 2048
    sampler_records: int = 20000
    """Size of the LLaVA-like set on which the length-grouping sampler's padding is computed."""
    ungrouped: bool = True
    """Also time mmchat with --no-group-by-length (shows what length grouping is worth)."""
    threads: int = 1
    """torch threads in each engine's process. One by default: on a shared 2-core machine, two
    OpenMP threads slow down several-fold whenever another process is busy."""
    seed: int = 0
    shape: LlavaShape = field(default_factory=lambda: LlavaShape(layers=4))

    def __post_init__(self) -> None:
        if self.records % self.batch_size:
            raise ValueError(f"--records {self.records} must be a multiple of --batch-size {self.batch_size}, "
                             "so both engines run the same full batches")

    @property
    def engines(self) -> list[str]:
        return list(ENGINES) if self.ungrouped else list(ENGINES[:2])


QUICK = {"shape": LlavaShape(layers=2, image_size=224), "records": 24, "text_scale": 0.5, "max_length": 1024,
         "sampler_records": 3000, "ungrouped": False}
"""--quick: 2 layers, 224 px (256 image tokens), half-length text, 24 records, no ungrouped run."""


# ------------------------------------------------------------------ one engine, one process


def run_mmchat(job: dict) -> dict:
    """One epoch through `finetune.train.prepare` and `train_steps` (the final export is not timed)."""
    from finetune.build import trainable_parameters
    from finetune.train import prepare, train_steps
    from finetune.train_config import parse_args

    flags = ["--config", str(MMCHAT_CONFIG), "--model", job["checkpoint"], "--data", job["data"],
             "--image-root", job["image_root"], "--output-dir", job["output_dir"], "--overwrite",
             "--batch-size", str(job["batch_size"]), "--max-length", str(job["max_length"]),
             "--lora-r", str(job["lora_r"]), "--lora-alpha", str(job["lora_alpha"]), "--epochs", "1",
             "--no-tensorboard", "--no-progress", "--seed", str(job["seed"])]
    cfg = parse_args(flags + ([] if job["group_by_length"] else ["--no-group-by-length"]))
    run = prepare(cfg)
    loaded = rss_mb()
    reset_peak_memory("cpu")
    start = time.perf_counter()
    train_steps(run, run.total_steps)
    seconds = time.perf_counter() - start
    run.log.close()
    history = run.log.history
    tokens = sum(r["tokens"] for r in history)
    positions = sum(r["tokens"] / (1 - r["padding"]) for r in history)
    trainable = sum(p.numel() for p in trainable_parameters(run.built.model).values())
    return {"seconds": seconds, "steps": len(history), "tokens": tokens, "positions": round(positions),
            "trainable": trainable, "loaded_mb": loaded, "peak_mb": peak_memory_mb("cpu"), "final_loss": history[-1]["loss"]}


def run_plain(job: dict) -> dict:
    """The loop most QLoRA scripts write: fixed-order padded batches, `labels=` loss, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, BitsAndBytesConfig, LlavaForConditionalGeneration

    from finetune.batching import collate
    from finetune.data.dataset import LlavaDataset, RenderSettings, read_records
    from mmchat.checkpoint import read_config
    from mmchat.templates import get_template

    torch.manual_seed(job["seed"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    model = LlavaForConditionalGeneration.from_pretrained(job["folder"], quantization_config=quant,
                                                          dtype=torch.float32, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"], lora_dropout=0.05, target_modules=LLAMA_LINEARS)
    model = get_peft_model(model, lora)
    model.base_model.model.model.multi_modal_projector.requires_grad_(True)  # LLaVA trains it with LoRA
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    tokenizer = AutoTokenizer.from_pretrained(job["folder"])
    settings = RenderSettings(tokenizer, get_template("llava_v1"), model.config.image_seq_length,
                              model.config.image_token_index, job["max_length"])
    vision = read_config(Path(job["checkpoint"])).vision  # LLaVA-1.5's pad-to-square preprocessing
    dataset = LlavaDataset(read_records(Path(job["data"])), settings, vision, Path(job["image_root"]))
    loader = DataLoader(dataset, batch_size=job["batch_size"], shuffle=False,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    loaded = rss_mb()
    reset_peak_memory("cpu")
    tokens = positions = steps = 0
    start = time.perf_counter()
    for batch in loader:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        positions += batch["attention_mask"].numel()
        steps += 1
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "tokens": tokens, "positions": positions,
            "trainable": sum(p.numel() for p in params), "loaded_mb": loaded, "peak_mb": peak_memory_mb("cpu"), "final_loss": float(out.loss.detach())}


# ------------------------------------------------------------------ orchestration


def run_engine(job: dict) -> dict:
    return (run_plain if job["engine"] == "plain" else run_mmchat)(job)


def _worker(job_file: Path) -> None:
    import torch

    job = json.loads(job_file.read_text())
    torch.set_num_threads(job["threads"])
    job_file.with_suffix(".out.json").write_text(json.dumps(run_engine(job)))


def _run_job(job: dict, workdir: Path) -> dict:
    return run_worker("benchmarks.train", job, workdir / f"{job['engine']}.json", job["engine"])


def _write_data(cfg: TrainBenchConfig, work: Path, lexicon: list[str]) -> tuple[Path, dict]:
    """The timed records (data.json + images) and the sampler's padding on a large set like them."""
    import numpy as np
    from transformers import AutoTokenizer

    from benchmarks.llava_mix import draw_images, make_records, tokens_per_word
    from finetune.batching import global_batches, padding_fraction
    from finetune.data.dataset import RenderSettings, render_record, truncate
    from mmchat.templates import IMAGE_TOKEN, get_template

    tokenizer = AutoTokenizer.from_pretrained(work / "llava-hf")
    images = draw_images(work / "images", seed=cfg.seed)
    per_word = tokens_per_word(tokenizer, lexicon, cfg.seed)
    records = make_records(cfg.records, lexicon, images, per_word, cfg.text_scale, cfg.seed)
    data = work / "data.json"
    data.write_text(json.dumps(records))
    slots = (cfg.shape.image_size // cfg.shape.patch) ** 2
    settings = RenderSettings(tokenizer, get_template("llava_v1"), slots, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                              cfg.max_length)
    large = make_records(cfg.sampler_records, lexicon, images, per_word, cfg.text_scale, cfg.seed + 1)
    lengths = np.array([len(truncate(render_record(r, settings), cfg.max_length, slots)) for r in large])
    padding = {}
    for batch in (4, 8, 16):
        padding[batch] = {name: padding_fraction(global_batches(lengths, batch, 1, cfg.seed, 0, group), lengths)
                          for name, group in (("grouped", True), ("shuffled", False))}
    counts, edges = np.histogram(lengths, bins=60)
    return data, {"records": cfg.sampler_records, "median": float(np.median(lengths)), "max": int(lengths.max()),
                  "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}, "padding": padding}


def measure(cfg: TrainBenchConfig, work: Path, lexicon: list[str], runner=None) -> dict:
    """Write the data into `work` (which holds llava-hf/ and mmchat/) and time each engine.

    `runner(job, work)` runs one engine; by default in its own process.
    """
    runner = runner or _run_job
    data, sampler = _write_data(cfg, work, lexicon)
    results = {}
    for engine in cfg.engines:
        print(f"training: {engine}", file=sys.stderr)
        job = {"engine": engine, "folder": str(work / "llava-hf"), "checkpoint": str(work / "mmchat"),
               "data": str(data), "image_root": str(work / "images"), "output_dir": str(work / f"run-{engine}"),
               "batch_size": cfg.batch_size, "max_length": cfg.max_length, "lora_r": cfg.lora_r,
               "lora_alpha": cfg.lora_alpha, "seed": cfg.seed, "threads": cfg.threads,
               "group_by_length": engine != "mmchat-no-grouping"}
        results[engine] = runner(job, work)
    return {"config": {**asdict(cfg), "out": str(cfg.out)}, "shape": cfg.shape.describe(), "machine": machine(),
            "engines": results, "sampler": sampler}


def run(cfg: TrainBenchConfig) -> dict:
    from benchmarks.random_llava import build_llava_hf
    from mmchat.convert import to_mmchat

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmchat-bench-train-") as folder:
        work = Path(folder)
        print(f"building random weights: {cfg.shape.describe()}", file=sys.stderr)
        lexicon = build_llava_hf(work / "llava-hf", cfg.shape, cfg.seed)
        to_mmchat(str(work / "llava-hf"), work / "mmchat")
        return {**measure(cfg, work, lexicon), "seconds": time.perf_counter() - started}


def report(data: dict, out: Path) -> int:
    engines = data["engines"]
    for r in engines.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["padding"] = 1 - r["tokens"] / r["positions"]
        r["training_mb"] = r["peak_mb"] - r["loaded_mb"]
    plain = engines["plain"]
    cfg = data["config"]
    print(f"machine: {data['machine']}, {cfg['threads']} torch threads\nmodel: {data['shape']}\n"
          f"LoRA r {cfg['lora_r']} / alpha {cfg['lora_alpha']} on every LLM linear layer + projector; "
          f"4-bit NF4, float32 compute, gradient checkpointing; batch {cfg['batch_size']}, "
          f"{cfg['records']} records (one epoch)\n")
    rows = [[name, f"{r['trainable']:,}", r["steps"], r["tokens"], f"{r['padding']:.1%}", f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.0f}",
             f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}", f"{r['peak_mb']:.0f}", f"{r['training_mb']:.0f}"]
            for name, r in engines.items()]
    print(table(["engine", "trainable", "steps", "tokens", "padding", "seconds", "tokens/s", "× plain", "peak RSS MB",
                 "above loaded MB"], rows))
    sampler = data["sampler"]
    print(f"\npadding of the batch order on {sampler['records']:,} LLaVA-like records "
          f"(lengths: median {sampler['median']:.0f}, max {sampler['max']}):")
    print(table(["batch", "mmchat (length-grouped)", "shuffled / fixed order"],
                [[b, f"{p['grouped']:.1%}", f"{p['shuffled']:.1%}"] for b, p in sampler["padding"].items()]))
    token_counts = {r["tokens"] for r in engines.values()}
    mm = engines["mmchat"]
    data["summary"] = {"tokens_per_s_ratio": mm["tokens_per_s"] / plain["tokens_per_s"],
                       "peak_memory_ratio": mm["peak_mb"] / plain["peak_mb"],
                       "training_memory_ratio": mm["training_mb"] / plain["training_mb"],
                       "padding": {name: r["padding"] for name, r in engines.items()},
                       "same_tokens": len(token_counts) == 1}
    write_json(out / "train.json", data)
    _plot(data, out / "train.png")
    print(f"\nresults: {out / 'train.json'}, chart: {out / 'train.png'}")
    if len(token_counts) != 1:
        print(f"FAIL: the engines trained on different token counts: { {n: r['tokens'] for n, r in engines.items()} }")
        return 1
    s = data["summary"]
    print(f"headline: training tokens/s, mmchat ÷ plain transformers + peft: {s['tokens_per_s_ratio']:.2f}× "
          f"(padding {mm['padding']:.1%} vs {plain['padding']:.1%}; memory above the loaded model "
          f"{s['training_memory_ratio']:.2f}×)")
    return 0


def _plot(data: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    names = list(data["engines"])
    ax1.bar(names, [data["engines"][n]["tokens_per_s"] for n in names], color=["grey", "C0", "C9"][:len(names)])
    plain = data["engines"]["plain"]["tokens_per_s"]
    for i, n in enumerate(names):
        r = data["engines"][n]
        ax1.annotate(f"padding {r['padding']:.0%}", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                     fontsize=8, color="white")
        ax1.annotate(f"{r['tokens_per_s'] / plain:.2f}×", (i, r["tokens_per_s"]), xytext=(0, 3),
                     textcoords="offset points", ha="center", fontsize=9)
    ax1.set(ylabel="non-padding tokens/s", title="Stage-2 QLoRA training speed")
    histogram = data["sampler"]["histogram"]
    ax2.stairs(histogram["counts"], histogram["edges"], fill=True, color="C1")
    ax2.set(xlabel="tokens per record (image slots included)", ylabel="records",
            title=f"LLaVA-like length mix ({data['sampler']['records']:,} records)")
    batches = list(data["sampler"]["padding"])
    for name, style in (("grouped", "-o"), ("shuffled", "--s")):
        ax3.plot([int(b) for b in batches], [100 * data["sampler"]["padding"][b][name] for b in batches], style,
                 label="mmchat length-grouped" if name == "grouped" else "shuffled / fixed order")
    ax3.set(xlabel="batch size", ylabel="padding (% of positions)", title="Padding by batch order", xscale="log")
    ax3.set_xticks([int(b) for b in batches], batches, minor=False)
    ax3.minorticks_off()
    ax3.legend()
    fig.suptitle(f"{data['shape']}\n{data['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 layers, 256 image tokens, half-length text, 24 records (≤ 2 min on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--records", type=int, help="records in the timed epoch (default: 48; --quick: 24)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layers", type=int, help="LLM layers (default: 4; --quick: 2)")
    p.add_argument("--ungrouped", action=argparse.BooleanOptionalAction,
                   help="also time mmchat with --no-group-by-length (default: on; off with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine (default: 1)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return 0
    given = {"records": a.records, "ungrouped": a.ungrouped}
    kwargs = {**(QUICK if a.quick else {}), **{k: v for k, v in given.items() if v is not None}}
    if a.layers:
        kwargs["shape"] = replace(kwargs.get("shape", LlavaShape(layers=4)), layers=a.layers)
    cfg = TrainBenchConfig(quick=a.quick, out=a.out, batch_size=a.batch_size, threads=a.threads, **kwargs)
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(main())
