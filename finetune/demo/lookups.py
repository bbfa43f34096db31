"""What the demo LLM pretrains on: the synthetic world's conversations and captions, rendered
exactly as mmchat renders them for the model (`llava_v1`: system prompt, `USER:`, `ASSISTANT:`,
`</s>` after answers; captions in stage 1's `plain` format), with the scene in the image slot.

The image slot is not left empty: it holds the scene written as a 3×3 grid of "cell words", one
input vector per cell in reading order, the sum of the embeddings of the cell's colour and shape
words (`<unk>` twice for an empty cell). That is the scene in words, laid out the way the vision
tower sees it: the demo CLIP's patches are the 3×3 cells, one image token each. The LLM thus
learns to answer from a grid it reads — which cell holds what — as a real LLM can answer about
a scene described in its prompt, and stages 1-2 only have to teach the projector to turn each
patch into its cell word; a from-scratch LLM left to learn reading, binding and vision at once
in stage 2 does not. Each cell's vector also holds its place, the embedding of a special token
`<cell0>`..`<cell8>` (as a ViT adds a position embedding to each patch): rotary positions say
how far back a cell is, not which cell it is, and "the circle at the top left" or "where is the
circle" need which.

Besides the mix (`samples`), single lookup questions about scenes of several shapes
(`lookup_samples`), which the mix alone does not teach.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from typing import Protocol

from finetune.data.instructions import BRIEF_CAPTION_INSTRUCTIONS
from finetune.demo.world import Scene, WorldConfig, sample_scene, scene_rng
from finetune.demo.texts import TextConfig, ask, conversation, description
from mmchat.conversation import ASSISTANT, IGNORE_INDEX, USER, Message, render
from mmchat.templates import get_template

CELLS = 9
CELL_TOKENS = tuple(f"<cell{k}>" for k in range(CELLS))
"""Special tokens that only ever appear summed into the image slot: the cells' places."""

LOOKUPS = ("colour", "shape", "position", "yes/no")


class RecordSettings(Protocol):
    """The settings the records depend on (`finetune.demo.pretrain_lm.LmConfig` has them): named
    here so that this module, which the pretraining imports, needs nothing from it."""

    world: WorldConfig
    text: TextConfig
    template: str
    caption_rate: float
    answers_only: bool
    cell_places: bool


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


def samples(cfg: RecordSettings, tokenizer, seed: int, count: int) -> list[Sample]:
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


def lookup_samples(cfg: RecordSettings, lookups: Lookups, tokenizer, seed: int, count: int) -> list[Sample]:
    """`count` one-question records about scenes of `lookups.min_shapes` to `max_shapes` shapes: one
    shape to be found by its kind or colour ("What colour is the circle?", "What shape is the red
    one?", "Where is the circle?"), or whether one of a given colour and kind is there ("Is there a
    blue square?", half "no", half of those with a blue shape or a square there).

    Finding one shape by its content among several does not form in the conversation mix, however
    long it trains; batches of one lookup type taking turns with the mix's, after it, do
    (`finetune.demo.pretrain_lm.Turns`). Whether a shape of a colour and kind is there forms only
    once finding one has, hence a second phase with yes/no questions in the turns."""
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
