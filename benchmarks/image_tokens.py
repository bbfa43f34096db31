"""What each image-token strategy costs and buys, in one run on one random LLaVA: LLaVA-1.5's
mlp2x_gelu (one token per patch), a 64-query resampler, and AnyRes 2x2 (llava-v1.6's tiling).

    python -m benchmarks.image_tokens --quick   # 4 layers, 224-px tiles, 4 turns, one timed step (≤ 1 minute)
    python -m benchmarks.image_tokens           # SmolLM-135M's LLM shape, 336 px / patch 14, 10 turns (~10 minutes)

One random checkpoint of the chat benchmark's shape (`benchmarks.random_llava.build_mmchat`) and two
copies of it (`benchmarks.image_strategy.derive_checkpoint`): the projector swapped for a random
resampler, and llava-v1.6's pinpoints with a random `image_newline`. One picture, drawn the AnyRes grid's
size (672 x 672), so AnyRes takes the whole grid. Per strategy:

- image tokens, as the model counts them (`MultimodalModel.image_token_counts`);
- time to first token on turn 1 (the image included) and on the last turn of a greedy conversation,
  float32, one torch thread, the models taking turns, each the median over the repeats;
- stage-2 training speed (`benchmarks.stage2_step`: 4-bit NF4, LoRA r 128 on every linear layer plus
  the projector, gradient checkpointing, AdamW): one sequence of the image's tokens and `text_tokens`
  of text (the last half answers), the median of the timed steps after a warm-up. AnyRes's step runs its
  tiles through tower and projector and packs them (`MultimodalModel.forward`); where mmchat refuses to
  train AnyRes, the same-length sequence on the mlp checkpoint with the same tiles stands in for it;
- held-out accuracy, as `python -m finetune.demo.compare --json` recorded it for the demo's quick builds
  (`--accuracy`); there is no AnyRes demo build.

Writes image_tokens.json, image_tokens.png and image_tokens.md (the table, with its footnotes).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import machine, table, write_json
from benchmarks.image_strategy import STRATEGIES, ImageTokens, parse_grid
from benchmarks.random_llava import LlavaShape

DEMO_COMPARE = Path(__file__).resolve().parent / "results" / "demo_compare.json"
"""`python -m finetune.demo.compare --json` of the quick demo builds (mlp, 9- and 4-query resamplers)."""


@dataclass
class ImageTokensBenchConfig:
    quick: bool = False
    """4 layers, 224-px tiles, 4 turns, one repeat, one timed step: ≤ 1 minute on 2 CPU cores."""
    out: Path = Path("benchmarks/results")
    turns: int = 10
    repeats: int = 3
    """Conversations per model for the times to first token (medians)."""
    train_steps: int = 3
    """Timed training steps per strategy, after one warm-up step (median)."""
    text_tokens: int = 256
    """Text in a training sequence beside the image; the last half are answer tokens."""
    lora_r: int = 128
    queries: int = 64
    grid: tuple[int, int] = (2, 2)
    accuracy: Path | None = DEMO_COMPARE
    """Held-out accuracy of the demo builds (`finetune.demo.compare --json`); None or a missing file: none."""
    threads: int = 1
    seed: int = 0
    shape: LlavaShape = field(default_factory=LlavaShape)

    def __post_init__(self) -> None:
        if self.quick:
            self.shape = LlavaShape(layers=4, image_size=224)
            self.turns, self.repeats, self.train_steps, self.text_tokens = 4, 1, 1, 64
        if self.turns < 2 or self.repeats < 1 or self.train_steps < 1 or self.text_tokens < 2:
            raise ValueError(f"--turns {self.turns} (≥ 2), --repeats {self.repeats}, --train-steps {self.train_steps} "
                             f"(≥ 1) and --text-tokens {self.text_tokens} (≥ 2) are too small")

    @property
    def strategies(self) -> list[ImageTokens]:
        return [ImageTokens(name, self.queries, self.grid) for name in STRATEGIES]


# ------------------------------------------------------------------ measuring


def time_to_first_token(cfg: ImageTokensBenchConfig, checkpoints: dict, image, lexicon: list[str]) -> dict:
    """{strategy: (image tokens, TTFT turn 1, TTFT last turn)}: the models take turns, medians of the repeats."""
    from finetune.demo.compare import conversation_ttft
    from mmchat.model import LoadOptions, load_model

    rng = random.Random(cfg.seed)
    questions = [" ".join(rng.choice(lexicon) for _ in range(rng.randint(8, 14))) + "?" for _ in range(cfg.turns)]
    models = {name: load_model(path, LoadOptions("32bit", "cpu")) for name, path in checkpoints.items()}
    for model in models.values():  # warm-up: first-call costs stay out of the timings
        conversation_ttft(model, image, questions[:2])
    runs = {name: [] for name in models}
    for _ in range(cfg.repeats):  # taking turns: a slow spell of a shared machine hits every model
        for name, model in models.items():
            print(f"conversation: {name}", file=sys.stderr)
            runs[name].append(conversation_ttft(model, image, questions))
    return {name: (model.image_token_counts([image])[0], statistics.median(r[0] for r in runs[name]),
                   statistics.median(r[-1] for r in runs[name])) for name, model in models.items()}


def training_speed(cfg: ImageTokensBenchConfig, strategy: ImageTokens, checkpoint: Path, image_tokens: int) -> dict:
    """Seconds per stage-2 step (median after a warm-up) on one sequence of the image and the text."""
    import torch

    from benchmarks.stage2_step import load_stage2, train_step

    torch.manual_seed(cfg.seed)
    st = load_stage2(str(checkpoint), cfg.lora_r, "cpu")
    seq = 1 + image_tokens + cfg.text_tokens  # BOS, the image, the text
    answers = (cfg.text_tokens // 2) / seq
    picture = strategy.picture_size(cfg.shape.image_size)
    seconds = []
    for _ in range(1 + cfg.train_steps):  # a warm-up first: allocations, the optimizer's states
        tick = time.perf_counter()
        train_step(st, 1, seq, answers, strategy.tiles, picture)
        seconds.append(time.perf_counter() - tick)
    seconds = seconds[1:]
    step = statistics.median(seconds)
    return {"sequence": seq, "tiles": strategy.tiles, "step_s": step, "steps_s": seconds, "tokens_per_s": seq / step,
            "trainable": sum(p.numel() for p in st.params)}


def demo_accuracy(path: Path | None) -> dict:
    """{strategy: the demo build's row} from `finetune.demo.compare --json` (the first row of each kind)."""
    if path is None or not path.is_file():
        return {}
    out = {}
    for row in json.loads(path.read_text()):
        kind = row["projector"].split()[0].lower()
        strategy = {"mlp2x_gelu": "mlp", "resampler": "resampler", "anyres": "anyres"}.get(kind)
        if strategy and strategy not in out:
            out[strategy] = {"projector": row["projector"], "image_tokens": row["image_tokens"],
                             "accuracy": row["heldout_accuracy"], "questions": row["heldout_questions"]}
    return out


def _relative(path: Path) -> str:
    """`path` from the checkout's root when it is inside it (results files name no machine's folders)."""
    root = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def run(cfg: ImageTokensBenchConfig) -> dict:
    import torch
    from PIL import Image

    from benchmarks.image_strategy import derive_checkpoint, draw_picture
    from benchmarks.random_llava import build_mmchat, train_tokenizer

    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mmchat-bench-image-tokens-"))
    try:
        print(f"building random weights: {cfg.shape.describe()}", file=sys.stderr)
        _, lexicon = train_tokenizer(work / "tok", cfg.shape.vocab)
        mlp = build_mmchat(work / "mlp", cfg.shape, work / "tok", cfg.seed)
        checkpoints = {s.strategy: derive_checkpoint(mlp, work / s.strategy, s, cfg.seed) if s.strategy != "mlp" else mlp
                       for s in cfg.strategies}
        anyres = next(s for s in cfg.strategies if s.strategy == "anyres")
        draw_picture(work / "picture.png", anyres.picture_size(cfg.shape.image_size))
        image = Image.open(work / "picture.png").convert("RGB")
        ttft = time_to_first_token(cfg, checkpoints, image, lexicon)
        rows, refusal = {}, None
        for strategy in cfg.strategies:
            name = strategy.strategy
            tokens, turn_1, last = ttft[name]
            print(f"training: {name}", file=sys.stderr)
            try:
                training = {**training_speed(cfg, strategy, checkpoints[name], tokens), "equivalent": False}
            except ValueError as e:  # mmchat without AnyRes training refuses it in finetune.build or forward
                if "anyres" not in str(e).lower():
                    raise
                refusal = str(e)
                training = {**training_speed(cfg, strategy, mlp, tokens), "equivalent": True}
            rows[name] = {**strategy.to_dict(), "image_tokens": tokens, "expected_tokens": strategy.count(
                cfg.shape.image_size, cfg.shape.patch), "ttft_turn_1_s": turn_1, "ttft_last_s": last,
                "training": training}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": {**asdict(cfg), "out": str(cfg.out), "accuracy": cfg.accuracy and _relative(cfg.accuracy)},
            "shape": cfg.shape.describe(), "machine": machine(), "seconds": time.perf_counter() - started,
            "anyres_training_refused": refusal, "accuracy": demo_accuracy(cfg.accuracy), "strategies": rows}


# ------------------------------------------------------------------ reporting


def markdown(data: dict) -> str:
    """The README's table: one row per strategy, footnotes on what was not measured as such."""
    rows, turns, accuracy = data["strategies"], data["config"]["turns"], data["accuracy"]
    mlp = rows["mlp"]
    lines = [f"| image tokens from | tokens per image | tower tiles | TTFT turn 1 | TTFT turn {turns} | "
             "stage-2 step (sequence) | training tokens/s | held-out accuracy (demo build) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        t = r["training"]
        acc = accuracy.get(name)
        acc_cell = f"{acc['accuracy']:.1%} ({acc['questions']})¹" if acc else "—²"
        step = f"{t['step_s']:.2f} s ({t['sequence']:,})" + ("³" if t["equivalent"] else "")
        lines.append(f"| `{r['label']}` | {r['image_tokens']:,} | {r['tiles']} | {r['ttft_turn_1_s']:.2f} s "
                     f"({r['ttft_turn_1_s'] / mlp['ttft_turn_1_s']:.2f}×) | {r['ttft_last_s']:.3f} s | {step} | "
                     f"{t['tokens_per_s']:,.0f} | {acc_cell} |")
    demo = ", ".join(f"{a['projector']} {a['image_tokens']} tokens" for a in accuracy.values())
    lines += ["", f"{data['machine']}; {data['shape'].split(';')[0]}, float32 times to first token (median of "
                  f"{data['config']['repeats']}), training 4-bit QLoRA r {data['config']['lora_r']}, batch 1, "
                  f"{data['config']['text_tokens']} text tokens beside the image (median of "
                  f"{data['config']['train_steps']} steps). Random weights: times only.",
              f"¹ Held-out colour questions of the demo's quick builds (`python -m finetune.demo.compare`; "
              f"{demo or 'no builds'}): its tower has nine patches, so the accuracy is what each projector learns at "
              "the quick build's budget, not at this benchmark's token counts."]
    if any(name not in accuracy for name in rows):
        lines.append("² No demo build reads images this way.")
    if data["anyres_training_refused"]:
        lines.append(f"³ mmchat refused to train the AnyRes checkpoint (\"{data['anyres_training_refused'].split(';')[0]}\"), "
                     "so this is the same-length sequence on the mlp checkpoint with the same tiles through the tower "
                     "and the projector (the packing and the row newlines aside).")
    return "\n".join(lines) + "\n"


def report(data: dict, out: Path) -> int:
    rows, turns = data["strategies"], data["config"]["turns"]
    print(f"machine: {data['machine']}\nmodel: {data['shape']}\n")
    print(table(["strategy", "image tokens", "tiles", "TTFT turn 1 s", f"TTFT turn {turns} s", "training sequence",
                 "step s", "training tok/s"],
                [[r["label"], r["image_tokens"], r["tiles"], r["ttft_turn_1_s"], r["ttft_last_s"],
                  r["training"]["sequence"], r["training"]["step_s"], f"{r['training']['tokens_per_s']:.0f}"]
                 for r in rows.values()]))
    wrong = [f"{r['label']}: {r['image_tokens']} tokens, expected {r['expected_tokens']}" for r in rows.values()
             if r["image_tokens"] != r["expected_tokens"]]
    mlp = rows["mlp"]
    data["summary"] = {name: {"ttft_turn_1_ratio": r["ttft_turn_1_s"] / mlp["ttft_turn_1_s"],
                              "ttft_last_ratio": r["ttft_last_s"] / mlp["ttft_last_s"],
                              "step_ratio": r["training"]["step_s"] / mlp["training"]["step_s"]}
                       for name, r in rows.items()}
    write_json(out / "image_tokens.json", data)
    (out / "image_tokens.md").write_text(markdown(data))
    _plot(data, out / "image_tokens.png")
    print(f"\n{markdown(data)}\nresults: {out / 'image_tokens.json'}, table: {out / 'image_tokens.md'}, "
          f"chart: {out / 'image_tokens.png'}")
    if wrong:
        print(f"FAIL: image tokens differ from the strategy's count: {'; '.join(wrong)}")
        return 1
    s = data["summary"]
    print(f"headline: × mlp2x_gelu's ({mlp['image_tokens']} tokens) turn-1 time to first token / stage-2 step: "
          + ", ".join(f"{rows[n]['label']} ({rows[n]['image_tokens']}) {s[n]['ttft_turn_1_ratio']:.2f}× / "
                      f"{s[n]['step_ratio']:.2f}×" for n in rows if n != "mlp"))
    return 0


def _plot(data: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    rows = data["strategies"]
    labels = [f"{r['label']}\n{r['image_tokens']:,} tokens" for r in rows.values()]
    fig = Figure(figsize=(13, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["ttft_turn_1_s"] for r in rows.values()], 0.4, label="turn 1 (with the image)")
    ax1.bar([i + 0.2 for i in x], [r["ttft_last_s"] for r in rows.values()], 0.4,
            label=f"turn {data['config']['turns']}")
    ax1.set(ylabel="time to first token (s)", title="Chat (float32)")
    ax1.legend(fontsize=8)
    ax2.bar(x, [r["training"]["step_s"] for r in rows.values()],
            color=["C2" if not r["training"]["equivalent"] else "C7" for r in rows.values()])
    stand_in = any(r["training"]["equivalent"] for r in rows.values())
    ax2.set(ylabel="seconds per stage-2 step (batch 1)",
            title="Training step" + (" (grey: an equivalent sequence)" if stand_in else ""))
    ax3.bar(x, [r["training"]["tokens_per_s"] for r in rows.values()], color="C4")
    ax3.set(ylabel="training tokens/s", title="Training throughput")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(list(x), labels, fontsize=8)
    fig.suptitle(f"{data['shape']}\n{data['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.image_tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 layers, 224-px tiles, 4 turns, one timed step")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--queries", type=int, default=64, help="the resampler's queries (default: %(default)s)")
    p.add_argument("--grid", default="2x2", help="AnyRes's grid, ROWSxCOLS (default: %(default)s)")
    p.add_argument("--accuracy", type=Path, default=DEMO_COMPARE,
                   help="held-out accuracy rows of python -m finetune.demo.compare --json "
                        "(default: benchmarks/results/demo_compare.json)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        ImageTokens("resampler", a.queries, parse_grid(a.grid))  # the flags' checks
        cfg = ImageTokensBenchConfig(quick=a.quick, out=a.out, queries=a.queries, grid=parse_grid(a.grid),
                                     accuracy=a.accuracy, threads=a.threads)
    except ValueError as e:
        p.error(str(e))
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(main())
