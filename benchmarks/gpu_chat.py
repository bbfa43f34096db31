"""The GPU check's chat step: 4-bit chat at LLaVA-1.5-7B's shape, mmchat vs transformers `generate`.

Both engines answer the same `turns`-turn conversation about one picture from the same NF4 weights
(`benchmarks.gpu_model`), as `benchmarks.chat` runs them (`mmchat_turns`, `reference_turns`); then
`users` conversations at once through mmchat's batching engine give the aggregate throughput.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import peak_memory_mb, reset_peak_memory


def engine_throughput(model, questions: list[str], image, users: int, new_tokens: int) -> dict:
    """`users` two-turn conversations (the picture, then a follow-up) through one `Engine` at once:
    all new tokens ÷ wall time, time to first token, and the peak memory of the phase."""
    from mmchat.chat import ChatSession
    from mmchat.engine import Engine
    from mmchat.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
    engine = Engine(model, max_batch=users)
    stats, errors = [], []

    def talk(i: int) -> None:
        session = ChatSession(model, engine=engine)
        try:
            for k, picture in ((i, image), (i + 1, None)):
                "".join(session.ask(questions[k % len(questions)], picture, gen))
                stats.append(session.last_stats)
        except Exception as e:  # reported below with the user's number
            errors.append(f"user {i}: {e!r}")

    reset_peak_memory(model.device.type)
    start = time.perf_counter()
    threads = [threading.Thread(target=talk, args=(i,)) for i in range(users)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.close()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError("; ".join(errors))
    tokens = sum(s.new_tokens for s in stats)
    ttfts = sorted(s.time_to_first_token for s in stats)
    return {"users": users, "answers": len(stats), "new_tokens": tokens, "wall_s": wall, "aggregate_tps": tokens / wall,
            "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_max_s": ttfts[-1], "largest_batch": engine.stats.largest_batch,
            "peak_mb": peak_memory_mb(model.device.type)}


def chat_check(shape, device: str, work: Path, turns: int, new_tokens: int, users: int, seed: int = 0) -> dict:
    """Build `shape` on `device` in NF4 and run both engines' `turns` turns, then `users` users at once."""
    from PIL import Image

    from benchmarks.agreement import compare_engines
    from benchmarks.chat import mmchat_turns, reference_turns
    from benchmarks.gpu_model import as_mmchat, build_random_llava
    from benchmarks.image_strategy import draw_picture

    tick = time.perf_counter()
    built = build_random_llava(shape, work, device, seed)
    model = as_mmchat(built)
    build_s = time.perf_counter() - tick
    draw_picture(work / "image.png", (360, 480))
    rng = random.Random(seed)
    questions = [" ".join(rng.choice(built.lexicon) for _ in range(rng.randint(8, 14))) + "?" for _ in range(turns)]
    job = {"questions": questions, "image": str(work / "image.png"), "new_tokens": new_tokens,
           "logits": str(work / "mmchat.logits.pt")}
    mm = mmchat_turns(model, job)
    ref_job = {**job, "logits": str(work / "reference.logits.pt"), "history": [t["answer"] for t in mm]}
    ref = reference_turns(built.llava, built.tokenizer, model.config.vision, built.options, ref_job)
    agreement = compare_engines(ref, mm, torch.load(ref_job["logits"]), torch.load(job["logits"]), "4bit")
    engine = engine_throughput(model, questions, Image.open(job["image"]).convert("RGB"), users, new_tokens)

    def mean_tps(rows: list[dict]) -> float:
        return sum(r["decode_tps"] for r in rows) / len(rows)

    summary = {
        "build_s": build_s, "image_tokens": mm[0]["image_tokens"],
        "mmchat_decode_tps": mean_tps(mm), "transformers_decode_tps": mean_tps(ref),
        "mmchat_ttft_turn1_s": mm[0]["ttft_s"], f"mmchat_ttft_turn{turns}_s": mm[-1]["ttft_s"],
        "transformers_ttft_turn1_s": ref[0]["ttft_s"], f"transformers_ttft_turn{turns}_s": ref[-1]["ttft_s"],
        "mmchat_peak_mb": max(r["peak_mb"] for r in mm), "transformers_peak_mb": max(r["peak_mb"] for r in ref),
        "engine_users": users, "engine_aggregate_tps": engine["aggregate_tps"],
        "greedy_agreement_failures": len(agreement["failures"]), "max_logit_diff": agreement["max_logit_diff"],
    }
    return {"shape": shape.describe(), "summary": summary, "engine": engine, "agreement": agreement,
            "turns": {"mmchat": mm, "transformers": ref}}
