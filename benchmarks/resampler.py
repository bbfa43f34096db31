"""What the resampler projector buys at LLaVA-1.5's grid: time to first token with 576 image tokens
(mlp2x_gelu) vs a 64-query resampler, on one random checkpoint of the chat benchmark's shape.

    python -m benchmarks.resampler --quick     # 4-layer LLM, 4 turns: well under a minute
    python -m benchmarks.resampler             # SmolLM-135M-shaped LLM, 10 turns, median of 3

The same random weights (`benchmarks.random_llava.build_mmchat`) with the projector swapped for a
64-query resampler; greedy, float32, one torch thread, the image on turn 1. Writes resampler.json.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, table, write_json
from benchmarks.random_llava import LlavaShape


def run(quick: bool, queries: int = 64) -> dict:
    import torch
    from PIL import Image

    from benchmarks.random_llava import build_mmchat, train_tokenizer
    from finetune.demo.compare import conversation_ttft
    from mmchat.checkpoint import PROJECTOR_FILE, read_config, save_projector, write_config
    from mmchat.config import ProjectorConfig
    from mmchat.model import LoadOptions, load_model
    from mmchat.projector import build_projector

    shape = LlavaShape(layers=4) if quick else LlavaShape()
    turns, repeats = (4, 1) if quick else (10, 3)
    work = Path(tempfile.mkdtemp(prefix="mmchat-bench-resampler-"))
    try:
        _, lexicon = train_tokenizer(work / "tok", shape.vocab)
        mlp = build_mmchat(work / "mlp", shape, work / "tok")
        resampler = work / "resampler"
        shutil.copytree(mlp, resampler)
        config = read_config(resampler)
        config.projector = ProjectorConfig("resampler", shape.vision_width, shape.hidden, queries=queries)
        torch.manual_seed(0)
        save_projector(build_projector(config.projector), resampler / PROJECTOR_FILE)
        write_config(config, resampler)
        torch.set_num_threads(1)
        rng = random.Random(0)
        questions = [" ".join(rng.choice(lexicon) for _ in range(rng.randint(8, 14))) + "?" for _ in range(turns)]
        image = Image.fromarray((torch.rand(400, 500, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
        models = {name: load_model(path, LoadOptions("32bit", "cpu")) for name, path in
                  (("mlp2x_gelu", mlp), ("resampler", resampler))}
        for model in models.values():  # warm-up: first-call costs stay out of the timings
            conversation_ttft(model, image, questions[:2])
        runs = {name: [] for name in models}
        for _ in range(repeats):  # taking turns: a slow spell of a shared machine hits both
            for name, model in models.items():
                runs[name].append(conversation_ttft(model, image, questions))
        rows = {name: {"image_tokens": model.image_tokens,
                       "projector_params": sum(p.numel() for p in model.projector.parameters()),
                       "ttft_turn_1_s": statistics.median(r[0] for r in runs[name]),
                       f"ttft_turn_{turns}_s": statistics.median(r[-1] for r in runs[name])}
                for name, model in models.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"quick": quick, "shape": shape.describe(), "machine": machine(), "turns": turns, "repeats": repeats,
            "projectors": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resampler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4-layer LLM, 4 turns, one run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    data = run(a.quick)
    turns, rows = data["turns"], data["projectors"]
    print(f"machine: {data['machine']}\nmodel: {data['shape']}")
    print(table(["projector", "image tokens", "projector params", "TTFT turn 1 s", f"TTFT turn {turns} s"],
                [[name, r["image_tokens"], r["projector_params"], r["ttft_turn_1_s"], r[f"ttft_turn_{turns}_s"]]
                 for name, r in rows.items()]))
    write_json(a.out / "resampler.json", data)
    mlp, res = rows["mlp2x_gelu"], rows["resampler"]
    print(f"headline: turn-1 time to first token, {mlp['image_tokens']} image tokens ÷ {res['image_tokens']}: "
          f"{mlp['ttft_turn_1_s'] / res['ttft_turn_1_s']:.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
