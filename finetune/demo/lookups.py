"""What the demo LLM pretrains on: the synthetic world's conversations and captions, rendered
exactly as mmchat renders them for the model (`llava_v1`: system prompt, `USER:`, `ASSISTANT:`,
`</s>` after answers; captions in stage 1's `plain` format), with the scene in the image slot.

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

Besides the mix (`samples`), single lookup questions about scenes of several shapes
(`lookup_samples`, which holds what was measured about them).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from finetune.data.instructions import BRIEF_CAPTION_INSTRUCTIONS
from finetune.demo.world import Scene, sample_scene, scene_rng
from finetune.demo.texts import ask, conversation, description
from mmchat.conversation import ASSISTANT, IGNORE_INDEX, USER, Message, render
from mmchat.templates import get_template

if TYPE_CHECKING:
    from finetune.demo.pretrain_lm import LmConfig


CELLS = 9
CELL_TOKENS = tuple(f"<cell{k}>" for k in range(CELLS))
"""Special tokens that only ever appear summed into the image slot: the cells' places."""

LOOKUPS = ("colour", "shape", "position", "yes/no")


@dataclass(frozen=True)
class Lookups:
    """Batches of one-question records of `types` (of `LOOKUPS`) about scenes of `min_shapes` to
    `max_shapes` shapes: one shape to find by its kind or colour among others, or whether a shape of
    one colour and kind is there, half of them not, half of those with one of its attributes there
    (`lookup_samples`)."""

    types: tuple[str, ...] = LOOKUPS
    min_shapes: int = 2
    max_shapes: int = 3

    def __post_init__(self) -> None:
        if not self.types or set(self.types) - set(LOOKUPS) or not 2 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"bad lookups {self}: types from {LOOKUPS}, 2 <= min_shapes <= max_shapes")

    def describe(self) -> str:
        return f"{'/'.join(self.types)} questions about {self.min_shapes}-{self.max_shapes} shapes"


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    slots: list[int]
    """Positions of the CELLS image-slot tokens."""
    cell_words: list[tuple[int, ...]]
    """Per cell in reading order, the ids of the words its input vector sums (`cell_words`)."""


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
    """`count` one-question records about scenes of `lookups.min_shapes` to `max_shapes` shapes: one
    shape to be found by its kind or colour ("What colour is the circle?", "What shape is the red
    one?", "Where is the circle?"), or whether one of a given colour and kind is there ("Is there a
    blue square?", half "no", half of those with a blue shape or a square there).

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
    steps); whole model in 4-bit 84.4%, yes/no down to 71%. The demo build's first phase:
    4400 mix steps, then 1200 in turns with colour twice (colour, colour, position, shape, mix,
    among 2-3 shapes). Continuing the shipped 4400-step LLM so, measured on these questions (2 / 3
    shapes, fresh seed; before -> after): colour 77% / 74% -> 98% / 96%, shape 86% / 75% -> 100% / 100%,
    position 50% / 32% -> 98% / 93%, the mix's held-out answers 88% -> 96%. Colour alone for 300
    steps first, then 800 in turns without the second colour: colour 90% / 90%, position 84% / 72%.
    The demo build with it (whole model in 4-bit, 95.8%): position 99%, colour 97%, but yes/no 89%;
    its LLM alone answers "no" to an absent shape 71-82% of the time (98-100% after the mix alone):
    the turns train finding one attribute, not checking two ("Is there a blue square?" with a blue
    circle and a red square), so yes/no takes turns too. In the same phase as the others (1440
    steps: colour, colour, position, shape, yes/no, mix) it does not form: its batches' loss stayed
    at 0.19-0.22 while the others' fell to 0.002-0.07, and "no" ended at 71% / 67% (2 / 3 shapes;
    colour 90% / 89%, position 98% / 88%, shape 100%); whole model in 4-bit 94.8%, yes/no 82%.
    Continuing that LLM with a second phase of the same turns (800 steps, lr warmed up and decayed
    again): "no" 87% / 83% at step 400, 98% / 95% at 800, "yes" 100% / 98%, colour, position and
    shape 100%, the mix's held-out answers 94.9% -> 96.2%. Checking a shape's two attributes forms
    once finding the shape has, hence the demo build's two phases (`finetune.demo.full_config`: 1200
    steps without yes/no, then 800 with it). Its LLM alone (fresh scenes, 2 / 3 shapes): colour and
    shape 100% / 100%, position 100% / 99.5%, "no" and "yes" 100% / 100%, the mix's held-out answers
    98.4%; whole model in 4-bit 98.4%, yes/no 99.5%."""
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
