"""One user's decode speed through the batching engine vs a chat session decoding on its own.

The issue's "one user alone decodes at least as fast as today's chat session": the same model
(the benchmark's folder, converted), the same conversation, in this process, with `--threads`
torch threads; `ChatSession` alone (what the API and the app ran before the engine, and what the
CLI runs) and `ChatSession(engine=Engine(...))` take turns, conversation by conversation, so slow
spells of a shared machine hit both.
"""
from __future__ import annotations

from pathlib import Path


def solo_vs_engine(folder: Path, work: Path, questions: tuple[str, ...], picture, new_tokens: int, threads: int,
                   rounds: int = 3) -> dict:
    import torch

    from mmchat.chat import ChatSession
    from mmchat.convert.from_llava import to_mmchat
    from mmchat.engine import Engine
    from mmchat.generate import GenerationConfig
    from mmchat.model import LoadOptions, load_model

    torch.set_num_threads(threads)
    checkpoint = to_mmchat(str(folder), work / "mmchat-solo")
    model = load_model(checkpoint, LoadOptions(load_in="32bit", device="cpu"))
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0)
    engine = Engine(model, max_batch=16)
    totals = {"alone": [0, 0.0, 0.0], "engine": [0, 0.0, 0.0]}  # decoded tokens, decode s, forward s
    try:
        for _ in range(rounds):
            for name in totals:
                session = ChatSession(model, engine=engine if name == "engine" else None)
                for turn, question in enumerate(questions):
                    for _ in session.ask(question, picture if turn == 0 else None, gen):
                        pass
                    stats = session.last_stats
                    totals[name][0] += max(stats.new_tokens - 1, 0)
                    totals[name][1] += stats.decode_seconds
                    totals[name][2] += stats.decode_model_seconds
    finally:
        engine.close()
    rates = {name: {"decode_tokens_per_s": t[0] / t[1], "forward_ms": 1000 * t[2] / t[0], "tokens": t[0]}
             for name, t in totals.items()}
    return {**rates, "ratio": rates["engine"]["decode_tokens_per_s"] / rates["alone"]["decode_tokens_per_s"],
            "rounds": rounds, "turns": len(questions)}
