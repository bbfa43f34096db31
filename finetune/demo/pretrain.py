"""What the demo's two from-scratch pretrainings (the CLIP's and the LLM's) share: the training
loop (clipped optimizer steps under a warmup-cosine schedule, held-out scores every few steps),
its schedule and the seeding of model init."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from finetune.optim import lr_factor


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The pretrainings' schedule: the peak is reached on the `warmup`-th step and held for one more,
    then cosine decay to 0 at `total`, as the shipped model was trained (kept so builds reproduce it)."""
    return lr_factor(step, warmup - 1, total, hold=1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global RNG seeded with `seed` inside (model init draws from it), the caller's state back after."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        yield


def train_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, factor: Callable[[int], float], steps: int,
               step_loss: Callable[[int], float], evaluate: Callable[[], tuple[dict, str]], every: int, name: str,
               log=print, after_step: Callable[[int], None] | None = None, started: float | None = None) -> list[dict]:
    """`steps` optimizer steps; returns the history, {"step", "loss"} per step, plus `evaluate`'s
    scores every `every` steps and at the last. The model is left in eval mode.

    `step_loss(step)` (1-based) computes one batch's loss and its gradient and returns the loss;
    `factor(step)` (0-based) multiplies the optimizer's learning rates; `after_step(step)` runs
    after each update; `evaluate()` returns the scores and their text for the log line, which
    gives the seconds since `started` (a `time.perf_counter()`; default: the loop's start).
    """
    started = time.perf_counter() if started is None else started
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    history = []
    model.train()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        record = {"step": step, "loss": loss}
        if step % every == 0 or step == steps:
            scores, text = evaluate()
            record.update(scores)
            model.train()
            log(f"{name} step {step}/{steps} | loss {loss:.4f} | {text} | {time.perf_counter() - started:.0f} s")
        history.append(record)
    model.eval()
    return history
