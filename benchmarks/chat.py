"""Multi-turn chat latency: mmchat's cached session vs transformers' LLaVA re-prefilling every turn.

    python -m benchmarks.chat --quick          # ≤ 2 minutes on 2 CPU cores
    python -m benchmarks.chat                  # SmolLM-135M-shaped LLM, 10 turns

Both engines load the same random weights (saved in llava-hf format) and answer the same
10-turn conversation about one image greedily. The reference does what LLaVA's web worker and
`LlavaForConditionalGeneration.generate` servers do: re-tokenise and re-prefill the whole
conversation and re-encode the image every turn. Each engine × precision runs in its own
process so peak memory is its own. mmchat runs first and its answers are the reference's history
too, so both engines see the same prompt every turn. The run fails if the engines' greedy tokens
differ anywhere but at a near-tie that float rounding can explain (`benchmarks.agreement`).

`--image-tokens anyres` (`--grid`) saves the same weights as a `LlavaNextForConditionalGeneration`
(llava-v1.6's pinpoints) and draws the picture the grid's size, so both engines read it as the base tile
plus the grid (2,928 tokens for 2x2 at 336 px); `--image-tokens resampler` (`--queries`) swaps mmchat's
projector for a random resampler, which transformers has no class for: mmchat runs alone. Results of
another strategy than mlp go to chat-STRATEGY.json and .png.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import FirstTokenTimer, machine, peak_memory_mb, reset_peak_memory, run_worker, table, write_json
from benchmarks.image_strategy import ImageTokens, add_flags, from_flags
from benchmarks.random_llava import LlavaShape

@dataclass
class ChatBenchConfig:
    quick: bool = False
    """Fewer layers and tokens: ≤ 2 minutes on 2 CPU cores."""
    out: Path = Path("benchmarks/results")
    """Where chat.json and chat.png go."""
    turns: int = 10
    new_tokens: int = 24
    """Tokens generated per turn (both engines stop at EOS earlier if the model says so)."""
    precisions: list[str] = field(default_factory=lambda: ["4bit", "32bit"])
    threads: int = 1
    """torch threads per engine process; one keeps a shared 2-core machine from thrashing."""
    device: str | None = None
    seed: int = 0
    shape: LlavaShape = field(default_factory=LlavaShape)
    image_tokens: ImageTokens = field(default_factory=ImageTokens)
    """How the image becomes tokens: mlp (the tower's patches), resampler (mmchat alone), anyres."""

    def __post_init__(self) -> None:
        if self.quick:
            self.shape = LlavaShape(layers=6)
            self.new_tokens = min(self.new_tokens, 12)
        if self.turns < 2:
            raise ValueError(f"--turns {self.turns}: the benchmark compares later turns, use at least 2")

    @property
    def engines(self) -> tuple[str, ...]:
        """mmchat first: its answers are the reference's history. transformers has no resampler."""
        return ("mmchat",) if self.image_tokens.strategy == "resampler" else ("mmchat", "reference")

    @property
    def name(self) -> str:
        """The results' file name: chat, or chat-STRATEGY for another strategy than mlp."""
        return "chat" if self.image_tokens.strategy == "mlp" else f"chat-{self.image_tokens.strategy}"


# ------------------------------------------------------------------ one engine, one process


def _turns(questions: list[str], image_path: str):
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    return [(q, image if i == 0 else None) for i, q in enumerate(questions)]


def run_mmchat(job: dict) -> list[dict]:
    from mmchat.model import LoadOptions, load_model

    return mmchat_turns(load_model(job["checkpoint"], LoadOptions(job["precision"], job["device"])), job)


def mmchat_turns(model, job: dict) -> list[dict]:
    """`job`'s conversation through a `ChatSession` of `model`; each turn's numbers, its logits to job["logits"]."""
    import torch

    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=job["new_tokens"], temperature=0.0)
    turns = _turns(job["questions"], job["image"])
    image_tokens = model.image_token_counts([turns[0][1]])[0]
    "".join(ChatSession(model).ask("warm up", turns[0][1], GenerationConfig(max_new_tokens=2, temperature=0.0)))
    session, out, steps, logits = ChatSession(model), [], [], []
    # Keep a reference to the logits each token is picked from: the prefill's (its generator's return
    # value) and each decode step's.
    prefill, step = session.prefill_steps, session._step

    def prefill_steps(*args):
        steps.append((yield from prefill(*args)))
        return steps[-1]

    session.prefill_steps = prefill_steps
    session._step = lambda *args: steps.append(step(*args)) or steps[-1]
    for question, image in turns:
        reset_peak_memory(model.device.type)
        "".join(session.ask(question, image, gen))
        st = session.last_stats
        logits.append(torch.stack(steps).float().cpu())
        steps.clear()
        out.append({"ttft_s": st.time_to_first_token, "decode_tps": st.decode_tokens_per_second,
                    "session_overhead_s_per_token": (st.decode_seconds - st.decode_model_seconds) / max(1, st.new_tokens - 1),
                    "session_overhead_share": 1 - st.decode_model_seconds / st.decode_seconds if st.decode_seconds else 0.0,
                    "peak_mb": peak_memory_mb(model.device.type), "prompt_tokens": st.prompt_tokens,
                    "prefilled_tokens": st.prefill_tokens, "image_tokens": image_tokens, "tokens": st.answer_ids,
                    "chosen": st.answer_ids + [model.tokenizer.eos_token_id] * (len(logits[-1]) > len(st.answer_ids)),
                    "answer": session.messages[-1].text})
    torch.save(logits, job["logits"])
    return out


def run_reference(job: dict) -> list[dict]:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from mmchat.checkpoint import read_config
    from mmchat.model import LoadOptions, quantization_config

    options = LoadOptions(job["precision"], job["device"])
    quant = quantization_config(options)
    if quant is not None:
        # transformers would quantize the CLIP tower and projector too; LLaVA's loader (and mmchat)
        # keeps the tower unquantized, so both engines compute the same function.
        quant.llm_int8_skip_modules = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    vision_cfg = read_config(Path(job["checkpoint"])).vision  # the folder's preprocessing, as converted
    llava_class = LlavaForConditionalGeneration if vision_cfg.anyres is None else LlavaNextForConditionalGeneration
    model = llava_class.from_pretrained(job["folder"], quantization_config=quant, dtype=options.compute_dtype,
                                        device_map={"": options.device}).eval()
    return reference_turns(model, AutoTokenizer.from_pretrained(job["folder"]), vision_cfg, options, job)


def reference_turns(model, tokenizer, vision_cfg, options, job: dict) -> list[dict]:
    """`job`'s conversation through llava-hf `model.generate`, re-prefilling every turn (`vision_cfg`:
    mmchat's preprocessing of the same folder; `options`: device and compute dtype)."""
    import torch

    from mmchat import anyres
    from mmchat.conversation import Message, render
    from mmchat.image import preprocess
    from mmchat.templates import get_template

    template, image_id = get_template("llava_v1"), model.config.image_token_index
    tiling = None if vision_cfg.anyres is None else anyres.settings_from_config(vision_cfg, model.config.vision_config.patch_size)

    def image_inputs(images) -> tuple[list[int] | int, dict]:
        """Slots per image and the pixels (with NeXT's image sizes): pixels equal to the folder's processor's."""
        if tiling is None:
            return model.config.image_seq_length, {"pixel_values": torch.stack([preprocess(im, vision_cfg) for im in images])}
        tiles, sizes = zip(*(anyres.preprocess_anyres(im, tiling) for im in images))  # one grid: the same picture
        return ([anyres.num_image_tokens(size, tiling) for size in sizes],
                {"pixel_values": torch.stack(tiles), "image_sizes": torch.tensor(sizes)})

    def generate(messages, images, max_new):
        slots, pixels = image_inputs(images)
        r = render(messages, template, tokenizer, slots, add_generation_prompt=True, image_token_id=image_id)
        ids = torch.tensor([r.input_ids], device=options.device)
        pixels = {k: v.to(options.device, options.compute_dtype) if v.is_floating_point() else v.to(options.device)
                  for k, v in pixels.items()}
        timer = FirstTokenTimer()
        start = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels,
                                 max_new_tokens=max_new, do_sample=False, streamer=timer, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        chosen = gen.sequences[0, ids.shape[1]:].tolist()
        new = [t for t in chosen if t != tokenizer.eos_token_id]
        return new, chosen, torch.cat(gen.logits).float().cpu(), len(r.input_ids), start, timer

    turns = _turns(job["questions"], job["image"])
    generate([Message("user", "warm up", 1)], [turns[0][1]], 2)
    messages, images, out, logits = [], [], [], []
    for i, (question, image) in enumerate(turns):
        if image is not None:
            images.append(image)
        messages.append(Message("user", question, 1 if image is not None else 0))
        reset_peak_memory(options.device)
        new, chosen, turn_logits, prompt_len, start, timer = generate(messages, images, job["new_tokens"])
        ttft = (timer.first or timer.end_time) - start
        decode = timer.end_time - (timer.first or timer.end_time)
        out.append({"ttft_s": ttft, "decode_tps": (len(new) - 1) / decode if len(new) > 1 and decode > 0 else 0.0,
                    "peak_mb": peak_memory_mb(options.device), "prompt_tokens": prompt_len,
                    "prefilled_tokens": prompt_len, "tokens": new, "chosen": chosen})
        logits.append(turn_logits)
        # The history is mmchat's answers (the same as its own while the tokens agree), so after a
        # near-tie flip both engines still see the same prompt next turn.
        own = tokenizer.decode(new, skip_special_tokens=True).strip()
        messages.append(Message("assistant", job["history"][i] if job.get("history") else own))
    torch.save(logits, job["logits"])
    return out


# ------------------------------------------------------------------ orchestration


def _worker(job_file: Path) -> None:
    import torch

    job = json.loads(job_file.read_text())
    torch.set_num_threads(job["threads"])
    result = (run_mmchat if job["engine"] == "mmchat" else run_reference)(job)
    job_file.with_suffix(".out.json").write_text(json.dumps(result))


def _run_job(job: dict, workdir: Path) -> list[dict]:
    path = workdir / f"{job['engine']}-{job['precision']}.json"
    return run_worker("benchmarks.chat", job, path, f"{job['engine']} {job['precision']}")


def build(cfg: ChatBenchConfig, work: Path) -> list[str]:
    """The random weights as llava-hf (or NeXT) in work/llava-hf, converted to work/mmchat, and the picture
    (480 × 360, or the AnyRes grid's size) in work/image.png; returns the word list."""
    from benchmarks.image_strategy import build_llava_next_hf, derive_checkpoint, draw_picture
    from benchmarks.random_llava import build_llava_hf
    from mmchat.convert import to_mmchat

    strategy = cfg.image_tokens
    builder = build_llava_next_hf if strategy.strategy == "anyres" else build_llava_hf
    lexicon = builder(work / "llava-hf", cfg.shape, cfg.seed)
    if strategy.strategy == "resampler":
        to_mmchat(str(work / "llava-hf"), work / "converted")
        derive_checkpoint(work / "converted", work / "mmchat", strategy, cfg.seed)
    else:
        to_mmchat(str(work / "llava-hf"), work / "mmchat")
    size = strategy.picture_size(cfg.shape.image_size) if strategy.strategy == "anyres" else (360, 480)
    draw_picture(work / "image.png", size)
    return lexicon


def run(cfg: ChatBenchConfig) -> dict:
    import torch

    from benchmarks.agreement import compare_engines

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmchat-bench-chat-") as folder:
        work = Path(folder)
        print(f"building random weights: {cfg.shape.describe()}; images: {cfg.image_tokens.label}", file=sys.stderr)
        lexicon = build(cfg, work)
        rng = random.Random(cfg.seed)
        questions = [" ".join(rng.choice(lexicon) for _ in range(rng.randint(8, 14))) + "?" for _ in range(cfg.turns)]
        results, agreement = {}, {}
        for precision in cfg.precisions:
            runs, logits = {}, {}
            for engine in cfg.engines:  # the reference takes mmchat's answers as the history
                print(f"running {engine} {precision}", file=sys.stderr)
                job = {"engine": engine, "precision": precision, "device": cfg.device, "folder": str(work / "llava-hf"),
                       "checkpoint": str(work / "mmchat"), "image": str(work / "image.png"), "questions": questions,
                       "new_tokens": cfg.new_tokens, "threads": cfg.threads,
                       "logits": str(work / f"{engine}-{precision}.logits.pt"),
                       "history": [t["answer"] for t in runs.get("mmchat", [])]}
                runs[engine] = _run_job(job, work)
                logits[engine] = torch.load(job["logits"])
            results.update({f"{e}/{precision}": runs[e] for e in cfg.engines})
            if "reference" in runs:
                agreement[precision] = compare_engines(runs["reference"], runs["mmchat"], logits["reference"],
                                                       logits["mmchat"], precision)
    return {"config": {**asdict(cfg), "image_tokens": cfg.image_tokens.to_dict(), "name": cfg.name, "out": str(cfg.out)},
            "shape": cfg.shape.describe(), "machine": machine(), "seconds": time.perf_counter() - started,
            "turns": results, "agreement": agreement}


def report(data: dict, out: Path) -> int:
    name, first = data["config"]["name"], data["turns"][f"mmchat/{data['config']['precisions'][0]}"][0]
    images = f"{data['config']['image_tokens']['label']}, {first['image_tokens']} image tokens"
    print(f"machine: {data['machine']}\nmodel: {data['shape']}\nimages: {images}\n")
    if not data["agreement"]:
        return _report_alone(data, out, images)
    rows = []
    for precision in data["config"]["precisions"]:
        ref, mm = data["turns"][f"reference/{precision}"], data["turns"][f"mmchat/{precision}"]
        for i, (r, m) in enumerate(zip(ref, mm), start=1):
            rows.append([precision, i, r["prompt_tokens"], m["prefilled_tokens"], r["ttft_s"], m["ttft_s"],
                         r["ttft_s"] / m["ttft_s"], r["decode_tps"], m["decode_tps"], r["peak_mb"], m["peak_mb"]])
    print(table(["precision", "turn", "prompt tok", "mmchat prefill", "ref TTFT s", "mmchat TTFT s", "TTFT ×",
                 "ref tok/s", "mmchat tok/s", "ref peak MB", "mmchat peak MB"], rows))
    summary = {}
    for precision in data["config"]["precisions"]:
        ref, mm = data["turns"][f"reference/{precision}"], data["turns"][f"mmchat/{precision}"]
        late = range(1, len(mm))
        summary[precision] = {
            "turn_last_ttft_ratio": ref[-1]["ttft_s"] / mm[-1]["ttft_s"],
            "mmchat_ttft_turn2_to_last": [mm[1]["ttft_s"], mm[-1]["ttft_s"]],
            "decode_tps_ratio": sum(m["decode_tps"] for m in mm) / max(1e-9, sum(r["decode_tps"] for r in ref)),
            "session_overhead_ms_per_token": 1000 * sum(m["session_overhead_s_per_token"] for m in mm) / len(mm),
            "session_overhead_share": sum(m["session_overhead_share"] for m in mm) / len(mm),
            "peak_memory_ratio": max(m["peak_mb"] for m in mm) / max(r["peak_mb"] for r in ref),
            "mean_prefilled_after_turn1": sum(mm[i]["prefilled_tokens"] for i in late) / len(late),
        }
    data["summary"] = summary
    write_json(out / f"{name}.json", data)
    _plot(data, out / f"{name}.png")
    print()
    for precision, s in summary.items():
        print(f"{precision}: decode tok/s mmchat/reference {s['decode_tps_ratio']:.2f}×, peak memory mmchat/reference "
              f"{s['peak_memory_ratio']:.2f}×, mmchat TTFT turn 2 → {len(data['turns']['mmchat/' + precision])}: "
              f"{s['mmchat_ttft_turn2_to_last'][0]:.3f} s → {s['mmchat_ttft_turn2_to_last'][1]:.3f} s; the session's "
              f"own work per decoded token {s['session_overhead_ms_per_token']:.2f} ms "
              f"({s['session_overhead_share']:.2%} of decode time, the rest is the LLM's forward)")
    failures = []
    for precision, ag in data["agreement"].items():
        flips = [f"turn {i} token {t['diverged_at'] + 1} (margins {t['margins'][0]:.2g} / {t['margins'][1]:.2g})"
                 for i, t in enumerate(ag["turns"], start=1) if t["diverged_at"] is not None]
        failures += [f"{precision} turn {i}" for i in ag["failures"]]
        print(f"{precision}: {ag['tokens_compared']} greedy tokens compared, max |logit difference| at identical "
              f"prefixes {ag['max_logit_diff']:.2g}, near-ties (top-2 gap ≤ {ag['tolerance']:g}) "
              f"{ag['near_ties_per_1000']:.1f} per 1000 tokens; first differing tokens: {', '.join(flips) or 'none'}")
    print(f"results: {out / f'{name}.json'}, chart: {out / f'{name}.png'}")
    if failures:
        print(f"FAIL: the engines' greedy tokens differ by more than a near-tie (a margin above the tolerance) at "
              f"{', '.join(failures)}")
        return 1
    last = len(data["turns"][f"mmchat/{data['config']['precisions'][0]}"])
    heads = ", ".join(f"{p} {s['turn_last_ttft_ratio']:.1f}×" for p, s in summary.items())
    print(f"headline: turn-{last} time to first token, reference ÷ mmchat: {heads}")
    return 0


def _report_alone(data: dict, out: Path, images: str) -> int:
    """mmchat's turns when transformers has nothing to compare with (a resampler)."""
    name, summary, rows = data["config"]["name"], {}, []
    for precision in data["config"]["precisions"]:
        mm = data["turns"][f"mmchat/{precision}"]
        rows += [[precision, i, m["prompt_tokens"], m["prefilled_tokens"], m["ttft_s"], m["decode_tps"], m["peak_mb"]]
                 for i, m in enumerate(mm, start=1)]
        summary[precision] = {"ttft_turn_1_s": mm[0]["ttft_s"], "ttft_last_s": mm[-1]["ttft_s"],
                              "decode_tps": sum(m["decode_tps"] for m in mm) / len(mm)}
    print(table(["precision", "turn", "prompt tok", "mmchat prefill", "mmchat TTFT s", "mmchat tok/s", "mmchat peak MB"],
                rows))
    data["summary"] = summary
    write_json(out / f"{name}.json", data)
    _plot(data, out / f"{name}.png")
    print(f"results: {out / f'{name}.json'}, chart: {out / f'{name}.png'}")
    last = len(data["turns"][f"mmchat/{data['config']['precisions'][0]}"])
    heads = ", ".join(f"{p} {s['ttft_turn_1_s']:.3f} s → {s['ttft_last_s']:.3f} s" for p, s in summary.items())
    print(f"headline: mmchat alone ({images}; transformers has no resampler), time to first token turn 1 → {last}: "
          f"{heads}")
    return 0


def _plot(data: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, turns in data["turns"].items():
        engine, precision = key.split("/")
        style = "-o" if engine == "mmchat" else "--s"
        ax1.plot(range(1, len(turns) + 1), [t["ttft_s"] for t in turns], style, label=f"{engine} {precision}")
        ax2.bar(key.replace("/", "\n"), sum(t["decode_tps"] for t in turns) / len(turns))
    ax1.set(xlabel="turn", ylabel="time to first token (s)", title="Time to first token per turn", yscale="log")
    ax1.legend()
    ax2.set(ylabel="decode tokens/s (mean over turns)", title="Decode speed")
    fig.suptitle(f"{data['shape']}; images: {data['config']['image_tokens']['label']}\n{data['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="6-layer LLM, 12 tokens a turn (≤ 2 min on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--precision", action="append", choices=["4bit", "8bit", "16bit", "32bit"],
                   help="repeat for several (default: 4bit and 32bit)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine process (default: %(default)s)")
    add_flags(p)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return 0
    try:
        cfg = ChatBenchConfig(quick=a.quick, out=a.out, turns=a.turns, new_tokens=a.new_tokens,
                              precisions=a.precision or ["4bit", "32bit"], device=a.device, threads=a.threads,
                              image_tokens=from_flags(a))
    except ValueError as e:
        p.error(str(e))
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(main())
