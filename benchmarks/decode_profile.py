"""Where one engine decode step's time goes, and what an answer's text costs per token as it grows.

    python -m benchmarks.decode_profile                 # 1, 8 and 16 conversations, greedy and sampled
    python -m benchmarks.decode_profile --users 8 --torch-profile

Part 1 builds the serve benchmark's random model (`benchmarks.serve.SERVE_SHAPE`: an 8-layer 256-wide
LLaMA, 576 image tokens) in-process, runs `--users` conversations (each with a photo) through one
`mmchat.engine.Engine` on one torch thread, and splits each full-batch decode step into the LLM's
forward, choosing tokens, detokenising (`tokenizer.decode`) and the rest (Python: the engine's
bookkeeping, stop strings, events to the callers' threads).

Part 2 feeds one `Answer` 2,000 rows of random logits (so the tokens vary), greedy and sampled, and times
each `push` (choosing + detokenising + stop strings): the cost at tokens 1-100 against tokens 1901-2000.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import mmchat.answer
import mmchat.engine
import mmchat.generate
from mmchat.answer import Answer, TurnStats
from mmchat.chat import ChatSession
from mmchat.engine import Engine
from mmchat.generate import GenerationConfig
from mmchat.model import LoadOptions, load_model

SAMPLERS = ("next_token", "choose_tokens")
"""Names of the token-choosing functions `mmchat.answer` / `mmchat.engine` may call (timed as sampling)."""


class StepClock:
    """Accumulates seconds per part, only inside `Engine._decode_step`."""

    def __init__(self):
        self.inside = False
        self.parts: dict[str, float] = {}
        self.steps: list[tuple[int, dict[str, float]]] = []  # (batch size, parts)

    def timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            if not self.inside:
                return fn(*args, **kwargs)
            tick = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - tick
        return wrapper

    def step(self, engine: Engine, fn):
        def wrapper():
            size = len(engine._running)
            self.inside, self.parts = True, {}
            tick = time.perf_counter()
            try:
                return fn()
            finally:
                self.parts["step"] = time.perf_counter() - tick
                self.inside = False
                self.steps.append((size, self.parts))
        return wrapper


def instrument(model, engine: Engine) -> tuple[StepClock, list]:
    clock, undo = StepClock(), []
    model.llm.forward = clock.timed("forward", model.llm.forward)
    model.tokenizer.decode = clock.timed("detokenise", model.tokenizer.decode)
    engine._decode_step = clock.step(engine, engine._decode_step)
    for module in (mmchat.answer, mmchat.engine):
        for name in SAMPLERS:
            if hasattr(module, name):
                undo.append((module, name, getattr(module, name)))
                setattr(module, name, clock.timed("sampling", getattr(module, name)))
    undo += [(model.llm, "forward", None), (model.tokenizer, "decode", None)]
    return clock, undo


def restore(undo: list) -> None:
    for owner, name, old in undo:
        if old is None:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


def profile_users(model, users: int, gen: GenerationConfig, photo, torch_profile: bool) -> dict:
    engine = Engine(model, max_batch=max(users, 1))
    clock, undo = instrument(model, engine)
    sessions = [ChatSession(model, engine=engine) for _ in range(users)]
    errors: list[BaseException] = []

    def talk(session: ChatSession, i: int) -> None:
        try:
            "".join(session.ask(f"Describe picture {i} in many words.", photo, gen))
        except BaseException as e:  # reported below
            errors.append(e)

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if torch_profile else nullcontext()
    try:
        with profiler:
            threads = [threading.Thread(target=talk, args=(s, i)) for i, s in enumerate(sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        restore(undo)
        engine.close()
    if errors:
        raise errors[0]
    full = [parts for size, parts in clock.steps if size == users]
    if not full:
        raise RuntimeError(f"no decode step ran with all {users} conversations in the batch")
    median = {k: statistics.median(p.get(k, 0.0) for p in full) for k in ("step", "forward", "sampling", "detokenise")}
    median["python"] = max(0.0, median["step"] - median["forward"] - median["sampling"] - median["detokenise"])
    if torch_profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return {"users": users, "steps": len(full), **median}


def detok_curve(tokenizer, tokens: int, gen: GenerationConfig, seed: int = 0) -> dict:
    """Per-token seconds of `Answer.push` over `tokens` rows of random logits."""
    vocab = len(tokenizer)
    logits = torch.randn(tokens, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    answer = Answer(tokenizer, gen, frozenset(), ("</s>", "USER:"), tokens, TurnStats(), [], torch.device("cpu"))
    times = []
    for row in logits:
        tick = time.perf_counter()
        answer.push(row)
        times.append(time.perf_counter() - tick)
        if answer.done:
            break
    answer.close()
    assert answer.text == tokenizer.decode(answer.generated, skip_special_tokens=True) or answer.stats.finish_reason == "stop"
    return {"tokens": len(times), "first_100_us": statistics.median(times[:100]) * 1e6,
            "last_100_us": statistics.median(times[-100:]) * 1e6}


def build(work: Path) -> Path:
    from benchmarks.serve import SERVE_SHAPE, build_folder
    from mmchat.convert.cache import resolve_checkpoint

    folder = work / "serve-shape"
    if not (folder / "config.json").exists():
        build_folder(folder, SERVE_SHAPE, seed=0)
    return resolve_checkpoint(folder, work / "converted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per answer")
    parser.add_argument("--detok-tokens", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmchat-decode-profile",
                        help="where the random model is built (reused when there)")
    parser.add_argument("--torch-profile", action="store_true", help="print torch.profiler's top ops per run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(build(args.work), LoadOptions(load_in="32bit", device="cpu"))
    from PIL import Image
    photo = Image.effect_noise((512, 384), 64).convert("RGB")
    for label, gen in (("greedy", GenerationConfig(max_new_tokens=args.tokens, temperature=0)),
                       ("sampled", GenerationConfig(max_new_tokens=args.tokens, temperature=0.7, top_p=0.9, seed=1))):
        profile_users(model, 1, gen, photo, False)  # warm-up
        for users in args.users:
            r = profile_users(model, users, gen, photo, args.torch_profile)
            step = r["step"]
            shares = "  ".join(f"{k} {r[k] * 1e3:6.2f} ms ({100 * r[k] / step:4.1f}%)"
                               for k in ("forward", "sampling", "detokenise", "python"))
            print(f"{label:7s} users {users:2d}: step {step * 1e3:6.2f} ms over {r['steps']} steps | {shares}", flush=True)
    if args.detok_tokens:
        for label, gen in (("greedy", GenerationConfig(max_new_tokens=args.detok_tokens, temperature=0)),
                           ("sampled", GenerationConfig(max_new_tokens=args.detok_tokens, temperature=1.0, top_p=0.9, seed=0))):
            r = detok_curve(model.tokenizer, args.detok_tokens, gen)
            print(f"Answer.push ({label}) over {r['tokens']} tokens: tokens 1-100 {r['first_100_us']:.0f} us/token, "
                  f"last 100 {r['last_100_us']:.0f} us/token", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
