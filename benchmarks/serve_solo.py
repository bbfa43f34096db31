"""One user's decode speed through the batching engine vs a chat session decoding on its own.

The issue's "one user alone decodes at least as fast as today's chat session": the same model
(the benchmark's folder, converted), the same conversation, in this process, with `--threads`
torch threads; `ChatSession` alone (what the API and the app ran before the engine, and what the
CLI runs) and `ChatSession(engine=Engine(...))` take turns, conversation by conversation; the
ratio is the median of the rounds' ratios, so a slow spell of a shared machine hits neither side.
"""
from __future__ import annotations

from pathlib import Path


def solo_vs_engine(folder: Path, work: Path, questions: tuple[str, ...], picture, new_tokens: int, threads: int,
                   rounds: int = 5) -> dict:
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
    rounds_seen = []  # per round: {name: (decoded tokens, decode s, forward s)}
    try:
        for _ in range(rounds):
            seen = {}
            for name in ("alone", "engine"):
                session = ChatSession(model, engine=engine if name == "engine" else None)
                tokens, seconds, forward = 0, 0.0, 0.0
                for turn, question in enumerate(questions):
                    for _ in session.ask(question, picture if turn == 0 else None, gen):
                        pass
                    stats = session.last_stats
                    tokens += max(stats.new_tokens - 1, 0)
                    seconds += stats.decode_seconds
                    forward += stats.decode_model_seconds
                seen[name] = (tokens, seconds, forward)
            rounds_seen.append(seen)
    finally:
        engine.close()
    # Each round's ratio compares two runs a few seconds apart; the median of them shrugs off a
    # busy spell of a shared machine that one of the two happened to meet.
    ratios = sorted((r["engine"][0] / r["engine"][1]) / (r["alone"][0] / r["alone"][1]) for r in rounds_seen)
    rates = {}
    for name in ("alone", "engine"):
        tokens = sum(r[name][0] for r in rounds_seen)
        seconds = sum(r[name][1] for r in rounds_seen)
        forward = sum(r[name][2] for r in rounds_seen)
        rates[name] = {"decode_tokens_per_s": tokens / seconds, "forward_ms": 1000 * forward / tokens, "tokens": tokens}
    return {**rates, "ratio": ratios[len(ratios) // 2], "round_ratios": ratios, "rounds": rounds,
            "turns": len(questions)}
