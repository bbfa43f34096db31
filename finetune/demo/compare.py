"""`python -m finetune.demo.compare`: demo builds side by side — image tokens, time to first token
on turn 1 and on the last turn of one conversation about an image, training speed, held-out accuracy.

    python -m finetune.demo --out /tmp/demo-mlp --quick
    python -m finetune.demo --out /tmp/demo-rs --work /tmp/demo-mlp-work --quick --reuse-pretraining \\
        --projector resampler
    python -m finetune.demo --out /tmp/demo-ar --work /tmp/demo-mlp-work --quick --reuse-pretraining --anyres
    python -m finetune.demo.compare /tmp/demo-mlp /tmp/demo-rs /tmp/demo-ar

Training speed and accuracy are what each build recorded in its `build.json`; the times to first token
are measured here, the models taking turns (one torch thread), each turn's median over the repeats.
Each model is timed on the first image of its own held-out set (the same scene; an AnyRes build draws it
at twice the size), and its image tokens are that image's: an AnyRes model's count depends on the size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mmchat.config import LOAD_IN


def conversation_ttft(model, image, questions: list[str]) -> list[float]:
    """Seconds to the first answer token of each turn of one greedy conversation (the image on turn 1)."""
    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig

    session, gen, out = ChatSession(model), GenerationConfig(max_new_tokens=8, temperature=0.0), []
    for turn, question in enumerate(questions):
        "".join(session.ask(question, image if turn == 0 else None, gen))
        out.append(session.last_stats.time_to_first_token)
    return out


def first_heldout_question(build: dict):
    """(image, question) of the first record of the held-out set a build was scored on."""
    from PIL import Image

    heldout = Path(build["eval"]["data"])
    record = json.loads(heldout.read_text())[0]
    image = Image.open(heldout.parent / record["image"]).convert("RGB")
    return image, record["conversations"][0]["value"].replace("<image>", "").strip()


def strategy(model, image) -> str:
    """How the model turns `image` into tokens, in a few words."""
    from mmchat.anyres import grid_shape

    projector = model.config.projector
    if projector.type == "resampler":
        return f"resampler ({projector.queries} queries)"
    if model.anyres is not None:
        rows, cols = grid_shape((image.height, image.width), model.anyres)
        return f"AnyRes ({projector.type}, base + {rows}×{cols} tiles)"
    return projector.type


def compare(folders: list[Path], turns: int, repeats: int, load_in: str | None) -> list[dict]:
    import torch

    from mmchat.model import LoadOptions, load_model

    torch.set_num_threads(1)
    builds = [json.loads((folder / "build.json").read_text()) for folder in folders]
    asked = [first_heldout_question(build) for build in builds]
    models = [load_model(folder, LoadOptions(load_in, "cpu")) for folder in folders]
    for model, (image, question) in zip(models, asked):  # warm-up
        conversation_ttft(model, image, [question] * 2)
    times: list[list[list[float]]] = [[] for _ in models]
    for _ in range(repeats):
        for model, (image, question), runs in zip(models, asked, times):
            runs.append(conversation_ttft(model, image, [question] * turns))
    rows = []
    for folder, build, model, (image, _), runs in zip(folders, builds, models, asked, times):
        training = build.get("training", {})
        rows.append({
            "model": str(folder), "projector": strategy(model, image), "load_in": LoadOptions(load_in, "cpu").load_in,
            "image_tokens": model.image_token_counts([image])[0],
            "ttft_turn_1_s": statistics.median(run[0] for run in runs),
            f"ttft_turn_{turns}_s": statistics.median(run[-1] for run in runs),
            **{f"{stage}_tokens_per_s": training[stage]["mean_tokens_per_s"] for stage in ("align", "instruct")
               if stage in training},
            "heldout_accuracy": build["eval"]["accuracy"], "heldout_questions": build["eval"]["questions"],
        })
    return rows


def table(rows: list[dict], turns: int) -> str:
    def speed(row, stage):
        value = row.get(f"{stage}_tokens_per_s")
        return f"{value:,.0f}" if value else "–"

    lines = [f"| projector | image tokens | TTFT turn 1 | TTFT turn {turns} | stage 1 tok/s | stage 2 tok/s | held-out accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['projector']} | {row['image_tokens']} | {row['ttft_turn_1_s'] * 1000:.1f} ms | "
                     f"{row[f'ttft_turn_{turns}_s'] * 1000:.1f} ms | {speed(row, 'align')} | {speed(row, 'instruct')} | "
                     f"{row['heldout_accuracy']:.1%} ({row['heldout_questions']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.demo.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="demo model folders written by python -m finetune.demo")
    p.add_argument("--turns", type=int, default=10, help="turns of the timed conversation (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="conversations per model; medians (default: %(default)s)")
    p.add_argument("--load-in", choices=LOAD_IN, default=None, help="LLM weights (default: 32bit, as the app on a CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    missing = [str(m) for m in a.models if not (m / "build.json").is_file()]
    if missing:
        p.error(f"no build.json in {', '.join(missing)}: pass folders written by python -m finetune.demo")
    if a.turns < 2 or a.repeats < 1:
        p.error("--turns must be at least 2 and --repeats at least 1")
    rows = compare(a.models, a.turns, a.repeats, a.load_in)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows, a.turns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
