"""One learning-rate schedule for the training kit and the demo's pretraining (each keeping the
learning rates it had), the demo pretraining's shared loop, and seeding that leaves the caller's RNG alone."""
from __future__ import annotations

import math

import pytest
import torch

from finetune.demo.pretrain import seeded, train_loop, warmup_cosine
from finetune.optim import lr_factor, make_scheduler
from finetune.train_config import TrainConfig


def kit_before(step: int, warmup: int, total: int, decay: str) -> float:
    """`finetune.optim.make_scheduler`'s factor before the schedules were one."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if decay == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def demo_before(step: int, warmup: int, total: int) -> float:
    """The demo pretraining's `warmup_cosine` before the schedules were one."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_the_kit_keeps_its_learning_rates_exactly(decay):
    for warmup, total in ((0, 10), (2, 40), (3, 7), (30, 1000)):
        assert [lr_factor(s, warmup, total, decay) for s in range(total + 2)] == \
            [kit_before(s, warmup, total, decay) for s in range(total + 2)]
    cfg = TrainConfig(model="m", data="d.json", output_dir="out", lr=1e-3, lr_scheduler=decay, warmup_ratio=0.03)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = make_scheduler(optimizer, cfg, 40)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == [cfg.lr * kit_before(s, 2, 40, decay) for s in range(40)]  # warmup: ceil(0.03 * 40) = 2 steps


def test_the_demo_pretraining_keeps_its_learning_rates_exactly():
    for warmup, total in ((0, 10), (1, 5), (20, 100), (30, 300), (100, 4400)):
        assert [warmup_cosine(s, warmup, total) for s in range(total + 2)] == \
            [demo_before(s, warmup, total) for s in range(total + 2)]
    # the one difference from the kit: the peak is reached a step earlier and held for that step
    assert [warmup_cosine(s, 3, 10) for s in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert [lr_factor(s, 3, 10) for s in range(4)] == [1 / 4, 2 / 4, 3 / 4, 1.0]


def test_seeded_gives_the_seeds_numbers_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with seeded(7):
        inside = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    assert torch.equal(torch.nn.Linear(4, 4).weight, inside)


def test_the_loop_steps_with_the_schedule_and_scores_every_few_steps():
    with seeded(0):
        model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)), torch.ones(16, 1)
    lrs, after, lines = [], [], []

    def step_loss(step: int) -> float:
        assert model.training
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss.item()

    def evaluate() -> tuple[dict, str]:
        model.eval()
        return {"score": float(after[-1])}, "scored"

    history = train_loop(model, optimizer, lambda s: warmup_cosine(s, 2, 5), 5, step_loss, evaluate, every=2,
                         name="toy", log=lines.append, after_step=after.append)
    assert [r["step"] for r in history] == after == [1, 2, 3, 4, 5]
    assert [r.get("score") for r in history] == [None, 2.0, None, 4.0, 5.0]  # every 2 steps and the last
    assert lrs == [0.1 * warmup_cosine(s, 2, 5) for s in range(5)]
    assert history[-1]["loss"] < history[0]["loss"] and not model.training
    assert len(lines) == 3 and lines[0].startswith("toy step 2/5 | loss ") and "| scored |" in lines[0]
