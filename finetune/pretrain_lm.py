"""A tiny LLaMA pretrained on the synthetic world's text, since no pretrained LLM is that small.

It reads conversations rendered exactly as mmchat renders them for the model (`llava_v1`: system
prompt, `USER:`, `ASSISTANT:`, `</s>` after answers) and captions in stage 1's `plain` format,
with every token trained on, so it knows the vocabulary, the chat format and which answers fit
which questions before it ever sees an image.

The image slot is not left empty: it holds the scene written as a 3×3 grid of "cell words", one
input vector per cell in reading order, the sum of the embeddings of the cell's colour and shape
words (`<unk>` twice for an empty cell). That is the scene in words, laid out the way the vision
tower sees it: the demo CLIP's patches are the 3×3 cells, one image token each. The LLM thus
learns to answer from a grid it reads — which cell holds what — as a real LLM can answer about
a scene described in its prompt, and stages 1-2 only have to teach the projector to turn each
patch into its cell word. Each cell's vector also holds its place, the embedding of a special
token `<cell0>`..`<cell8>` (as a ViT adds a position embedding to each patch): rotary positions
say how far back a cell is, not which cell it is, and "the circle at the top left" or "where is
the circle" need which (measured at step 400 of 800, lr 1e-3: descriptions, which list every
shape's place, 71% right with place tokens, 41% without). Without the cell words, a from-scratch
LLM must learn reading, binding and vision at once in stage 2, and does not (measured: ~40% on
held-out questions).

Finding one shape by its kind or colour among several ("What colour is the circle?") does not
form in the mix; after it, batches of single lookup questions take turns with the mix's
(`LmConfig.lookups`, `lookup_samples` for what was measured).
"""
from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from finetune.instruction_templates import BRIEF_CAPTION_INSTRUCTIONS
from finetune.optim import warmup_cosine
from finetune.synthetic import Scene, WorldConfig, sample_scene, scene_rng
from finetune.synthetic_text import TextConfig, ask, conversation, description
from mmchat.conversation import ASSISTANT, IGNORE_INDEX, USER, Message, render
from mmchat.templates import get_template

CELLS = 9
CELL_TOKENS = tuple(f"<cell{k}>" for k in range(CELLS))
"""Special tokens that only ever appear summed into the image slot: the cells' places."""


LOOKUPS = ("colour", "shape", "position")


@dataclass(frozen=True)
class Lookups:
    """Batches of one-question records of `types` (of `LOOKUPS`) about scenes of `min_shapes` to
    `max_shapes` shapes: one shape to find by its kind or colour among others (`lookup_samples`)."""

    types: tuple[str, ...] = LOOKUPS
    min_shapes: int = 2
    max_shapes: int = 3

    def __post_init__(self) -> None:
        if not self.types or set(self.types) - set(LOOKUPS) or not 2 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"bad lookups {self}: types from {LOOKUPS}, 2 <= min_shapes <= max_shapes")


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
    """Sum each cell's place token (`CELL_TOKENS`) into its vector. (Its row and column words
    instead: stuck at lr 3e-3; at lr 1e-3 as good as place tokens after 800 steps, measured.)"""
    answers_only: bool = True
    """Loss on answer tokens (and captions) only, as stage 2 does. Training on every token spends
    most of the gradient on the system prompt and the questions' wording; reading the grid, the
    hard part, is learnt only from answers (measured: much slower when diluted)."""
    lookups: tuple[Lookups, ...] = ()
    """After `steps` of the mix, `lookup_steps` more in which batches take turns: one of each of
    these, then one of the mix (list one twice to give it two turns). See `lookup_samples` for why."""
    lookup_steps: int = 0
    """Steps of the turns after the mix; the learning rate warms up and decays again over them."""
    steps: int = 1500
    """Steps of the mix alone."""
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    micro_tokens: int = 1536
    """Each batch is computed in length-sorted parts of at most this many padded tokens (rows ×
    the part's longest record), their gradients summed: the whole batch's gradient (equal to
    2.5e-8) with less padding. Full build's LLM, one step on 2 threads: 0.66 s in one part, 0.38 s
    in parts of 1536 (0.41 s at 2048, 0.38 s at 1024); a batch of 64 pads 4386 tokens to 8143."""
    eval_every: int = 200
    """Steps between held-out scores (each ~1 s in the full build)."""
    template: str = "llava_v1"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")
        if bool(self.lookups) != bool(self.lookup_steps > 0):
            raise ValueError(f"lookups {self.lookups} and lookup_steps {self.lookup_steps}: give both or neither")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    slots: list[int]
    """Positions of the CELLS image-slot tokens."""
    cell_words: list[tuple[int, ...]]
    """Per cell in reading order, the ids of the words its input vector sums (`cell_words`)."""


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


def word_id(tokenizer, word: str) -> int:
    """The single token of a world word (the demo tokenizer's merges make each one token)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {word!r} into {len(ids)} tokens; train it on the world's text")
    return ids[0]


def cell_words(scene: Scene, tokenizer, places: bool = True) -> list[tuple[int, ...]]:
    """Per cell in reading order: its colour and shape words (`<unk>` twice for an empty cell),
    with `places` also its place token (`CELL_TOKENS`)."""
    where = [(k,) for k in place_ids(tokenizer)] if places else [()] * CELLS
    what = [(tokenizer.unk_token_id, tokenizer.unk_token_id)] * CELLS
    for s in scene.shapes:
        what[s.row * 3 + s.column] = (word_id(tokenizer, s.colour), word_id(tokenizer, s.kind))
    return [a + b for a, b in zip(what, where)]


def place_ids(tokenizer) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(CELL_TOKENS))
    if tokenizer.unk_token_id in ids:
        raise ValueError("the tokenizer lacks the cell place tokens; train it with extra_specials=CELL_TOKENS")
    return ids


def samples(cfg: LmConfig, tokenizer, seed: int, count: int) -> list[Sample]:
    """`count` records as the model will see them, image slot holding the cell words."""
    chat, plain = get_template(cfg.template), get_template("plain")
    out = []
    for i in range(count):
        scene = sample_scene(scene_rng(seed, i), cfg.world)
        rng = random.Random(f"{seed}:lm:{i}")
        if rng.random() < cfg.caption_rate:
            messages = [Message(USER, rng.choice(BRIEF_CAPTION_INSTRUCTIONS), 1), Message(ASSISTANT, description(scene))]
            template = plain
        else:
            messages = []
            for n, turn in enumerate(conversation(scene, rng, cfg.text)):
                messages += [Message(USER, turn.question, int(n == 0)), Message(ASSISTANT, turn.answer)]
            template = chat
        r = render(messages, template, tokenizer, image_tokens=CELLS)
        labels = r.labels if cfg.answers_only else [IGNORE_INDEX if m else t for t, m in zip(r.input_ids, r.image_mask)]
        out.append(Sample(r.input_ids, labels, [k for k, m in enumerate(r.image_mask) if m], cell_words(scene, tokenizer, cfg.cell_places)))
    return out


def lookup_samples(cfg: LmConfig, lookups: Lookups, tokenizer, seed: int, count: int) -> list[Sample]:
    """`count` one-question records, each about one shape to be found among two or three by its
    kind or colour ("What colour is the circle?", "What shape is the red one?", "Where is the circle?").

    In the mix alone this lookup does not form. In the 4400-step mix-trained LLM the answer position
    gives the question's kind word 0-4% of its attention, and the asked-about and the other shape's
    cells 0.42 and 0.39 of one head's: it reads every shape and names one (colour among two shapes
    right 53%, chance 50%). Gathering the asked word and matching it to a cell each pay off only once
    the other exists. Batches of one question type break that (LLM alone, true grid, measured):
    colour questions about two shapes, from scratch, 86-100% after 500-800 steps (94% with three
    shapes, never trained on); shape questions 90%, position 76% after 600. The three types mixed in
    each batch formed none in 1000 steps, and a lookup formed first wore down once the mix followed
    (colour 100% -> 75% in 400 steps). Batches taking turns after the mix work: continuing the
    mix-trained LLM for 800 steps with colour, position, shape and mix batches in turn took position
    to 99% / 83% (two / three shapes), shape to 100% / 100%, the mix's held-out answers from 92% to
    95%; colour stayed at chance in those 800 steps. A full build with 3600 mix steps, then 1200 in
    turns (colour among two shapes, position, colour, shape, mix): LLM alone shape 100% / 100%,
    position 56% / 51%, colour at chance, the mix's held-out answers 82% (92% after 4400 mix
    steps); whole model in 4-bit 84.4%, yes/no down to 71%. What the demo build does (`full_config`):
    4400 mix steps, then 1200 in turns with colour twice (colour, colour, position, shape, mix,
    among 2-3 shapes). Continuing the shipped 4400-step LLM so, measured on these questions (2 / 3
    shapes, fresh seed; before -> after): colour 77% / 74% -> 98% / 96%, shape 86% / 75% -> 100% / 100%,
    position 50% / 32% -> 98% / 93%, the mix's held-out answers 88% -> 96%. Colour alone for 300
    steps first, then 800 in turns without the second colour: colour 90% / 90%, position 84% / 72%.
    The demo build with it (whole model in 4-bit, 95.8%): position 99%, colour 97%, but yes/no 89%;
    its LLM alone answers "no" to an absent shape 71-82% of the time (98-100% after the mix alone):
    the turns train finding one attribute, not checking two, so yes/no should take a turn too."""
    world = replace(cfg.world, min_shapes=lookups.min_shapes, max_shapes=lookups.max_shapes)
    chat = get_template(cfg.template)
    out = []
    for i in itertools.count():
        if len(out) == count:
            break
        scene = sample_scene(scene_rng(seed, i), world)
        rng = random.Random(f"{seed}:lookup:{i}")
        made = ask(scene, rng.choice(lookups.types), rng)
        if made is None:  # no reference to that shape that does not give its place away
            continue
        turn = made[0]
        r = render([Message(USER, turn.question, 1), Message(ASSISTANT, turn.answer)], chat, tokenizer, image_tokens=CELLS)
        out.append(Sample(r.input_ids, r.labels, [k for k, m in enumerate(r.image_mask) if m],
                          cell_words(scene, tokenizer, cfg.cell_places)))
    return out


def turn_of(cfg: LmConfig, step: int) -> int | None:
    """Which of `cfg.lookups` gives step `step`'s batch (1-based steps); None for the mix."""
    if step <= cfg.steps:
        return None
    turn = (step - cfg.steps - 1) % (len(cfg.lookups) + 1)
    return turn if turn < len(cfg.lookups) else None


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
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    train = samples(cfg, tokenizer, cfg.seed, cfg.conversations)
    held_out = samples(cfg, tokenizer, cfg.seed + 1, 256)
    kinds = list(dict.fromkeys(cfg.lookups))
    pools = {k: lookup_samples(cfg, k, tokenizer, cfg.seed * 100 + n, min(cfg.conversations, 12000)) for n, k in enumerate(kinds)}
    if cfg.lookups:
        log(f"lm: steps {cfg.steps + 1}-{cfg.steps + cfg.lookup_steps}: batches take turns: "
            + ", ".join(f"{'/'.join(k.types)} questions about {k.min_shapes}-{k.max_shapes} shapes" for k in cfg.lookups)
            + ", the mix")
    log(f"lm: {model.num_parameters():,} parameters; {len(train)} records, "
        f"{sum(len(s.input_ids) for s in train) / len(train):.0f} tokens each on average")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps) if s < cfg.steps
                                                 else warmup_cosine(s - cfg.steps, cfg.warmup, cfg.lookup_steps))
    rng = random.Random(cfg.seed)
    history = []
    model.train()
    total = cfg.steps + cfg.lookup_steps
    for step in range(1, total + 1):
        turn = turn_of(cfg, step)
        pool = train if turn is None else pools[cfg.lookups[turn]]
        optimizer.zero_grad(set_to_none=True)
        loss = backward(model, rng.sample(pool, cfg.batch_size), tokenizer.pad_token_id, cfg.micro_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        record = {"step": step, "loss": loss}
        wanted = threads() if threads is not None and step % 100 == 0 else torch.get_num_threads()
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            log(f"lm: {wanted} threads from step {step}")
        if step % cfg.eval_every == 0 or step == total:
            record["held_out_loss"], record["answer_accuracy"] = held_out_scores(model, held_out, tokenizer.pad_token_id)
            model.train()
            log(f"lm step {step}/{total} | loss {loss:.4f} | held-out {record['held_out_loss']:.4f}, "
                f"answers right {record['answer_accuracy']:.1%} | {time.perf_counter() - started:.0f} s")
        history.append(record)
    model.eval()
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
