"""A tiny LLaMA pretrained on the synthetic world's text, since no pretrained LLM is that small.

It reads the records of `finetune.demo.lookups` — conversations and captions rendered as mmchat
renders them, the scene in the image slot as nine "cell words" — so it knows the vocabulary, the
chat format and which answers fit which questions before it ever sees an image.

Finding one shape by its kind or colour among several ("What colour is the circle?") does not
form in the mix; after it, batches of single lookup questions take turns with the mix's, in
phases (`LmConfig.turns`).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.demo.lookups import Lookups, Sample, lookup_samples, samples
from finetune.demo.pretrain import seeded, train_loop, warmup_cosine
from finetune.demo.world import WorldConfig
from finetune.demo.texts import TextConfig
from mmchat.conversation import IGNORE_INDEX


@dataclass(frozen=True)
class Turns:
    """A phase of `steps` steps in which batches take turns: one of each of `lookups`, then one of
    the mix (list one twice to give it two turns a round). The learning rate warms up and decays
    again over the phase."""

    lookups: tuple[Lookups, ...]
    steps: int

    def __post_init__(self) -> None:
        if not self.lookups or self.steps < 1:
            raise ValueError(f"bad turns {self}: give at least one Lookups and steps >= 1")


@dataclass
class LmConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 512
    conversations: int = 20000
    caption_rate: float = 0.2
    """Share of training records that are stage 1's captions (`plain` template) instead of conversations."""
    cell_places: bool = True
    """Sum each cell's place token (`CELL_TOKENS`) into its vector: which cell a shape is in, which
    rotary positions do not say."""
    answers_only: bool = True
    """Loss on answer tokens (and captions) only, as stage 2 does. Training on every token spends
    most of the gradient on the system prompt and the questions' wording; reading the grid, the
    hard part, is learnt only from answers, and slowly when they are diluted."""
    turns: tuple[Turns, ...] = ()
    """Phases after `steps` of the mix, one after the other, in which lookup batches take turns
    with the mix's: finding one shape among several does not form in the mix alone."""
    steps: int = 1500
    """Steps of the mix alone."""
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    micro_tokens: int = 1536
    """Each batch is computed in length-sorted parts of at most this many padded tokens (rows ×
    the part's longest record), their gradients summed: the whole batch's gradient with less
    padding, so a step takes less time."""
    eval_every: int = 200
    """Steps between held-out scores."""
    template: str = "llava_v1"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")

    @property
    def total_steps(self) -> int:
        return self.steps + sum(phase.steps for phase in self.turns)


@dataclass
class LmResult:
    model: torch.nn.Module
    history: list[dict]
    seconds: float


def llama_config(cfg: LmConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def phases(cfg: LmConfig) -> list[tuple[int, int, Turns | None]]:
    """Each phase's first step (0-based), its steps and its Turns (None for the mix), in order."""
    out, start = [(0, cfg.steps, None)], cfg.steps
    for phase in cfg.turns:
        out.append((start, phase.steps, phase))
        start += phase.steps
    return out


def phase_of(cfg: LmConfig, step: int) -> tuple[int, int, Turns | None]:
    """The phase that 0-based step `step` belongs to (the last one past the end)."""
    found = phases(cfg)
    return next((p for p in found if step < p[0] + p[1]), found[-1])


def turn_of(cfg: LmConfig, step: int) -> Lookups | None:
    """The lookups whose batch 0-based step `step` takes; None for the mix's."""
    start, _, phase = phase_of(cfg, step)
    if phase is None:
        return None
    turn = (step - start) % (len(phase.lookups) + 1)
    return phase.lookups[turn] if turn < len(phase.lookups) else None


def lr_factor(cfg: LmConfig, step: int) -> float:
    """Each phase warms the learning rate up and decays it to 0 again."""
    start, length, _ = phase_of(cfg, step)
    return warmup_cosine(step - start, cfg.warmup, length)


def length_parts(batch: list[Sample], budget: int) -> list[list[Sample]]:
    """`batch` sorted by length, cut where a part's padded size (rows × its longest) would pass `budget`."""
    parts, part = [], []
    for s in sorted(batch, key=lambda s: len(s.input_ids)):
        if part and (len(part) + 1) * len(s.input_ids) > budget:
            parts.append(part)
            part = []
        part.append(s)
    return parts + [part]


def backward(model, batch: list[Sample], pad_id: int, budget: int) -> float:
    """The batch's mean answer-token loss and its gradient, computed in `length_parts`: each part's
    loss is summed over its tokens and divided by the whole batch's count, so the parts add up to it."""
    embed = model.get_input_embeddings()
    parts = [batch_of(part, embed, pad_id) for part in length_parts(batch, budget)]
    items = sum(int(p["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for p in parts)
    total = 0.0
    for p in parts:
        loss = model(**p, num_items_in_batch=items).loss
        loss.backward()
        total += loss.item()
    return total


def batch_of(batch: list[Sample], embed: torch.nn.Embedding, pad_id: int) -> dict:
    """Right-padded inputs_embeds (cell words in the image slots), attention mask and labels."""
    length = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
        mask[row, : len(s.input_ids)] = 1
    embeds = embed(ids)
    rows = torch.tensor([row for row, s in enumerate(batch) for _ in s.slots])
    cols = torch.tensor([k for s in batch for k in s.slots])
    words = torch.tensor([pair for s in batch for pair in s.cell_words])
    embeds = embeds.index_put((rows, cols), embed(words).sum(1))
    return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}


def pretrain_lm(cfg: LmConfig, tokenizer, out: Path, log=print, threads: Callable[[], int] | None = None) -> LmResult:
    """Train from scratch; save the model and tokenizer into `out` as a transformers folder.

    `threads`, asked every 100 steps, says how many torch threads to use from then on (the demo
    build hands over the second core when the CLIP beside it is done)."""
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    with seeded(cfg.seed):
        model = LlamaForCausalLM(llama_config(cfg, tokenizer))
        mix = samples(cfg, tokenizer, cfg.seed, cfg.conversations)
        held_out = samples(cfg, tokenizer, cfg.seed + 1, 256)
        # One pool per kind of lookups, seeded by its first appearance: a phase added after another
        # leaves the earlier phases' pools as they were.
        kinds = list(dict.fromkeys(k for phase in cfg.turns for k in phase.lookups))
        pools = {k: lookup_samples(cfg, k, tokenizer, cfg.seed * 100 + n, min(cfg.conversations, 12000))
                 for n, k in enumerate(kinds)}
        for start, length, phase in phases(cfg)[1:]:
            log(f"lm: steps {start + 1}-{start + length}: batches take turns: "
                + ", ".join(k.describe() for k in phase.lookups) + ", the mix")
        log(f"lm: {model.num_parameters():,} parameters; {len(mix)} records, "
            f"{sum(len(s.input_ids) for s in mix) / len(mix):.0f} tokens each on average")
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        rng = random.Random(cfg.seed)

        def step_loss(step: int) -> float:
            turn = turn_of(cfg, step - 1)
            pool = mix if turn is None else pools[turn]
            return backward(model, rng.sample(pool, cfg.batch_size), tokenizer.pad_token_id, cfg.micro_tokens)

        def set_threads(step: int) -> None:
            wanted = threads() if threads is not None and step % 100 == 0 else torch.get_num_threads()
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)
                log(f"lm: {wanted} threads from step {step}")

        def evaluate() -> tuple[dict, str]:
            loss, accuracy = held_out_scores(model, held_out, tokenizer.pad_token_id)
            return ({"held_out_loss": loss, "answer_accuracy": accuracy},
                    f"held-out {loss:.4f}, answers right {accuracy:.1%}")

        history = train_loop(model, optimizer, lambda s: lr_factor(cfg, s), cfg.total_steps, step_loss, evaluate,
                             every=cfg.eval_every, name="lm", log=log, after_step=set_threads, started=started)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return LmResult(model, history, time.perf_counter() - started)


@torch.no_grad()
def held_out_scores(model, held_out: list[Sample], pad_id: int) -> tuple[float, float]:
    """Held-out loss, and the share of answers whose every token is the model's top choice
    given the true grid and the earlier tokens (what greedy decoding would answer)."""
    model.eval()
    batch = batch_of(held_out, model.get_input_embeddings(), pad_id)
    out = model(**batch)
    labels = batch["labels"][:, 1:]
    hit = out.logits[:, :-1].argmax(-1).eq(labels) | labels.eq(IGNORE_INDEX)
    answers = right = 0
    for row in range(len(held_out)):
        answer = labels[row].ne(IGNORE_INDEX).tolist()
        start = None
        for k, inside in enumerate(answer + [False]):
            if inside and start is None:
                start = k
            elif not inside and start is not None:
                answers += 1
                right += bool(hit[row, start:k].all())
                start = None
    return float(out.loss), right / max(1, answers)
