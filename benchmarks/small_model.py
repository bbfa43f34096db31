"""A real small LLaVA on a CPU: what `python app.py --model llava-hf/llava-interleave-qwen-0.5b-hf` needs.

    python -m benchmarks.small_model --quick   # real widths, 2 LLM layers + 2 SigLIP blocks, small vocab (< 1 min)
    python -m benchmarks.small_model           # the real shape: 0.86B parameters (several minutes)

The hub model cannot be downloaded here, so this builds a look-alike with random weights: a llava-hf
`LlavaForConditionalGeneration` folder with llava-interleave-qwen-0.5b-hf's exact shapes
(`benchmarks.random_llava.InterleaveShape`: Qwen1.5-0.5B-Chat as a `qwen2` LLM, SigLIP so400m/14 at
384 px, 729 image tokens), its processor (plain resize, mean/std 0.5), its ChatML chat template and a
byte-level tokenizer with Qwen's special ids (the embedding has all 152000 rows; text encodes to a
few thousand BPE tokens, the rest are fillers). Random weights answer gibberish; the cost is the
shape's, not the words'.

Then, as `--model FOLDER` does, the folder is converted (`mmchat.convert.resolve_checkpoint`, a
temporary cache) and loaded on the CPU as the app loads it (`LoadOptions(None, "cpu")`: float32; also
4-bit), and each engine × precision runs in its own process: load time, resident memory after load and
the peak while chatting, time to first token on turn 1 (with the image) and on follow-ups (mmchat
reuses the KV cache), decode tokens/s, ~24 greedy tokens a turn, 3 turns. transformers'
`LlavaForConditionalGeneration` on the folder (float32, `processor.apply_chat_template` +
`generate`, the whole conversation and the image again every turn) is the comparison.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import FirstTokenTimer, machine, peak_memory_mb, reset_peak_memory, rss_mb, run_worker, table, write_json
from benchmarks.random_llava import InterleaveShape

QUESTIONS = ["What is in the picture?", "What colour is the circle?", "Where is the square?"]
QUICK_SHAPE = InterleaveShape(layers=2, vision_layers=2, vocab=8192, regular_tokens=4092, bpe_tokens=1500)
"""Real widths and image size (729 image tokens), few layers, a small vocabulary: the code path, fast."""


@dataclass
class SmallModelConfig:
    quick: bool = False
    """2 LLM layers, 2 SigLIP blocks, an 8k vocabulary, 8 tokens a turn: under a minute on 2 CPU cores."""
    out: Path = Path("benchmarks/results")
    """Where small_model.json and small_model.png go."""
    turns: int = 3
    new_tokens: int = 24
    precisions: list[str] = field(default_factory=lambda: ["app", "4bit"])
    """mmchat's: `app` is `LoadOptions(None, "cpu")` (float32 on a CPU, as the app loads it), or a --load-in value."""
    transformers: bool = True
    """Also run transformers' LlavaForConditionalGeneration (float32) on the folder."""
    threads: int = 1
    """torch threads per engine process (one, as the other benchmarks: a shared 2-core machine thrashes with two)."""
    seed: int = 0
    keep: Path | None = None
    """Keep the built folder and the converted checkpoint here instead of deleting them."""
    shape: InterleaveShape = field(default_factory=InterleaveShape)

    def __post_init__(self) -> None:
        if self.quick:
            self.shape = QUICK_SHAPE
            self.new_tokens = min(self.new_tokens, 8)
            self.precisions = ["app"]
        if self.turns < 2:
            raise ValueError(f"--turns {self.turns}: use at least 2 (turn 2 is the follow-up that reuses the cache)")


# ------------------------------------------------------------------ workers (one process each)


def _memory(job: dict, start_rss: float, load_s: float) -> dict:
    import psutil

    return {"load_s": load_s, "rss_before_load_mb": start_rss, "rss_after_load_mb": psutil.Process().memory_info().rss / 2**20,
            "peak_load_mb": peak_memory_mb("cpu")}


def run_convert(job: dict) -> dict:
    """`--model FOLDER`'s first run: the folder converted into a cache, as the app does it."""
    from mmchat.convert.cache import resolve_checkpoint

    start = time.perf_counter()
    checkpoint = resolve_checkpoint(job["folder"], cache_dir=job["cache"])
    return {"convert_s": time.perf_counter() - start, "peak_mb": peak_memory_mb("cpu"), "checkpoint": str(checkpoint)}


def run_mmchat(job: dict) -> dict:
    from PIL import Image

    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig
    from mmchat.model import LoadOptions, load_model

    start_rss = rss_mb()
    started = time.perf_counter()
    options = LoadOptions(None if job["precision"] == "app" else job["precision"], "cpu")
    model = load_model(job["checkpoint"], options)
    result = {**_memory(job, start_rss, time.perf_counter() - started), "load_in": options.load_in,
              "image_tokens": model.image_tokens}
    "".join(ChatSession(model).ask("Hello.", None, GenerationConfig(max_new_tokens=2, temperature=0.0)))  # warm-up, text only
    image = Image.open(job["image"]).convert("RGB")
    gen = GenerationConfig(max_new_tokens=job["new_tokens"], temperature=0.0)
    session, turns = ChatSession(model), []
    reset_peak_memory("cpu")
    for i, question in enumerate(job["questions"]):
        "".join(session.ask(question, image if i == 0 else None, gen))
        st = session.last_stats
        turns.append({"ttft_s": st.time_to_first_token, "decode_tps": st.decode_tokens_per_second,
                      "new_tokens": st.new_tokens, "prompt_tokens": st.prompt_tokens, "prefilled_tokens": st.prefill_tokens,
                      "peak_mb": peak_memory_mb("cpu")})
    return {**result, "turns": turns, "peak_chat_mb": peak_memory_mb("cpu"), "rss_after_chat_mb": rss_mb()}


def run_transformers(job: dict) -> dict:
    """What a transformers user does: processor.apply_chat_template(tokenize=True) + generate, every turn
    the whole conversation (and the image) again; the answer comes back decoded, as the next turn's history."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    start_rss = rss_mb()
    started = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(job["folder"], dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(job["folder"])
    result = {**_memory(job, start_rss, time.perf_counter() - started), "load_in": "32bit",
              "image_tokens": model.config.image_seq_length}
    stops = GenerationConfig.from_pretrained(job["folder"]).eos_token_id
    image = Image.open(job["image"]).convert("RGB")

    def generate(conversation: list[dict], max_new: int):
        timer = FirstTokenTimer()
        start = time.perf_counter()
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, streamer=timer, eos_token_id=stops,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        return new, inputs["input_ids"].shape[1], start, timer

    generate([{"role": "user", "content": [{"type": "text", "text": "Hello."}]}], 2)  # warm-up, text only
    conversation, turns = [], []
    reset_peak_memory("cpu")
    for i, question in enumerate(job["questions"]):
        parts = ([{"type": "image", "image": image}] if i == 0 else []) + [{"type": "text", "text": question}]
        conversation.append({"role": "user", "content": parts})
        new, prompt_len, start, timer = generate(conversation, job["new_tokens"])
        answer = [t for t in new if t not in ([stops] if isinstance(stops, int) else stops)]
        ttft = (timer.first or timer.end_time) - start
        decode = timer.end_time - (timer.first or timer.end_time)
        turns.append({"ttft_s": ttft, "decode_tps": (len(answer) - 1) / decode if len(answer) > 1 and decode > 0 else 0.0,
                      "new_tokens": len(answer), "prompt_tokens": prompt_len, "prefilled_tokens": prompt_len,
                      "peak_mb": peak_memory_mb("cpu")})
        text = processor.decode(answer, skip_special_tokens=True).strip()
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return {**result, "turns": turns, "peak_chat_mb": peak_memory_mb("cpu"), "rss_after_chat_mb": rss_mb()}


def _worker(job_file: Path) -> None:
    import torch

    job = json.loads(job_file.read_text())
    torch.set_num_threads(job["threads"])
    run = {"convert": run_convert, "mmchat": run_mmchat, "transformers": run_transformers}[job["engine"]]
    job_file.with_suffix(".out.json").write_text(json.dumps(run(job)))


# ------------------------------------------------------------------ orchestration


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run(cfg: SmallModelConfig) -> dict:
    from benchmarks.image_strategy import draw_picture
    from benchmarks.random_llava import build_llava_interleave

    work = Path(tempfile.mkdtemp(prefix="mmchat-bench-small-", dir=cfg.keep))
    started = time.perf_counter()
    try:
        folder = work / "llava-interleave-qwen-0.5b-random"
        print(f"building random weights: {cfg.shape.describe()}", file=sys.stderr)
        tick = time.perf_counter()
        params = build_llava_interleave(folder, cfg.shape, cfg.seed)
        build = {"params": params, "build_s": time.perf_counter() - tick, "folder_mb": _folder_mb(folder)}
        draw_picture(work / "image.png", (360, 480))  # the chat benchmark's picture
        common = {"folder": str(folder), "image": str(work / "image.png"), "questions": (QUESTIONS * cfg.turns)[:cfg.turns],
                  "new_tokens": cfg.new_tokens, "threads": cfg.threads}
        print("converting (as --model FOLDER does)", file=sys.stderr)
        convert = run_worker("benchmarks.small_model", {**common, "engine": "convert", "cache": str(work / "cache")},
                             work / "convert.json", "conversion")
        convert["checkpoint_mb"] = _folder_mb(Path(convert["checkpoint"]))
        runs = {}
        jobs = [("mmchat", p) for p in cfg.precisions] + ([("transformers", "32bit")] if cfg.transformers else [])
        for engine, precision in jobs:
            print(f"running {engine} {precision}", file=sys.stderr)
            job = {**common, "engine": engine, "precision": precision, "checkpoint": convert["checkpoint"]}
            runs[f"{engine}/{precision}"] = run_worker("benchmarks.small_model", job, work / f"{engine}-{precision}.json",
                                                       f"{engine} {precision}")
    finally:
        if cfg.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return {"config": {**asdict(cfg), "out": str(cfg.out), "keep": str(cfg.keep) if cfg.keep else None},
            "model": "llava-hf/llava-interleave-qwen-0.5b-hf's shape, random weights", "shape": cfg.shape.describe(),
            "image_tokens": cfg.shape.image_tokens, "machine": machine(), "seconds": time.perf_counter() - started,
            "build": build, "convert": convert, "runs": runs}


def _label(key: str, run: dict) -> str:
    engine, precision = key.split("/")
    return f"{engine} {run['load_in']}" + (" (app default)" if precision == "app" else "")


def report(data: dict, out: Path) -> int:
    rows = []
    for key, r in data["runs"].items():
        t = r["turns"]
        rows.append([_label(key, r), r["load_s"], r["rss_before_load_mb"] / 1024, r["rss_after_load_mb"] / 1024, r["rss_after_chat_mb"] / 1024, r["peak_chat_mb"] / 1024,
                     t[0]["ttft_s"], t[1]["ttft_s"], t[-1]["ttft_s"], sum(x["decode_tps"] for x in t) / len(t),
                     " / ".join(str(x["prefilled_tokens"]) for x in t)])
    b, c = data["build"], data["convert"]
    print(f"machine: {data['machine']}, {data['config']['threads']} torch thread(s) per process\n"
          f"model: {data['model']}: {data['shape']}; {b['params'] / 1e9:.3g}B parameters\n"
          f"build {b['build_s']:.0f} s ({b['folder_mb'] / 1024:.2f} GB bf16 folder); conversion {c['convert_s']:.0f} s, "
          f"peak {c['peak_mb'] / 1024:.2f} GB, checkpoint {c['checkpoint_mb'] / 1024:.2f} GB\n")
    print(table(["engine", "load s", "RSS before load GB", "RSS after load GB", "RSS after chat GB", "peak chat GB", "TTFT 1 s", "TTFT 2 s",
                 f"TTFT {len(next(iter(data['runs'].values()))['turns'])} s", "decode tok/s", "prefilled tokens"], rows))
    summary = {key: {"load_s": r["load_s"], "rss_after_load_mb": r["rss_after_load_mb"], "peak_chat_mb": r["peak_chat_mb"],
                     "ttft_turn1_s": r["turns"][0]["ttft_s"], "ttft_followup_s": sum(t["ttft_s"] for t in r["turns"][1:]) / (len(r["turns"]) - 1),
                     "decode_tps": sum(t["decode_tps"] for t in r["turns"]) / len(r["turns"])}
               for key, r in data["runs"].items()}
    data["summary"] = summary
    write_json(out / "small_model.json", data)
    _plot(data, out / "small_model.png")
    print(f"\nresults: {out / 'small_model.json'}, chart: {out / 'small_model.png'}")
    app = summary.get("mmchat/app")
    if app:
        line = (f"headline: llava-interleave-qwen-0.5b's shape on this CPU, mmchat as the app loads it (float32): "
                f"{app['rss_after_load_mb'] / 1024:.2f} GB after load ({app['load_s']:.0f} s), peak {app['peak_chat_mb'] / 1024:.2f} GB; "
                f"first token {app['ttft_turn1_s']:.1f} s with the image, {app['ttft_followup_s']:.2f} s on follow-ups; "
                f"{app['decode_tps']:.1f} tok/s")
        ref = summary.get("transformers/32bit")
        if ref:
            line += f" (transformers: follow-ups {ref['ttft_followup_s']:.1f} s, {ref['decode_tps']:.1f} tok/s)"
        print(line)
    return 0


def _plot(data: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    keys = list(data["runs"])
    labels = [_label(k, data["runs"][k]).replace(" (app default)", "\n(app default)") for k in keys]
    turns = len(data["runs"][keys[0]]["turns"])
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax1.bar([i + j * width for i in range(turns)], [t["ttft_s"] for t in data["runs"][key]["turns"]], width,
                label=labels[j].replace("\n", " "))
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(turns)], [f"turn {i + 1}" for i in range(turns)])
    ax1.set(ylabel="time to first token (s)", title="Time to first token (turn 1 has the image)", yscale="log")
    ax1.legend(fontsize=7)
    ax2.bar(labels, [sum(t["decode_tps"] for t in data["runs"][k]["turns"]) / turns for k in keys])
    ax2.set(ylabel="decode tokens/s (mean over turns)", title="Decode speed")
    x = range(len(keys))
    ax3.bar([i - 0.2 for i in x], [data["runs"][k]["rss_after_load_mb"] / 1024 for k in keys], 0.4, label="after load")
    ax3.bar([i + 0.2 for i in x], [data["runs"][k]["peak_chat_mb"] / 1024 for k in keys], 0.4, label="peak while chatting")
    ax3.set_xticks(list(x), labels)
    ax3.set(ylabel="resident memory (GB)", title="Memory")
    ax3.legend(fontsize=7)
    for ax in (ax2, ax3):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(textwrap.fill(f"{data['model']}: {data['shape']}", 170) + f"\n{data['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 LLM layers, 2 SigLIP blocks, 8k vocab, mmchat float32 only (< 1 min)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--precision", action="append", choices=["app", "4bit", "8bit", "16bit", "32bit"],
                   help="mmchat's, repeat for several (default: app = float32 on a CPU, and 4bit)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' LlavaForConditionalGeneration")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine process (default: %(default)s)")
    p.add_argument("--keep", type=Path, help="keep the built folder and checkpoint under this folder")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return 0
    cfg = SmallModelConfig(quick=a.quick, out=a.out, turns=a.turns, new_tokens=a.new_tokens,
                           precisions=a.precision or ["app", "4bit"], transformers=not a.no_transformers,
                           threads=a.threads, keep=a.keep)
    if a.quick and a.precision:
        cfg.precisions = a.precision
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(main())
