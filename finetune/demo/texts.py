"""What is said about a synthetic scene: questions and answers, conversations, captions.

Every answer is computed from the scene's ground truth. Questions come in many wordings per
type; references to a shape are unambiguous in their scene ("the circle", or "the circle at the
top left" when there are two) and never give the answer away. Follow-up turns are elliptic
("And the square?", "What about a green circle?") or use a pronoun ("What colour is it?"), so
only the earlier turns say what they ask.

Answer types: colours and shapes are one word, counts are digits, positions are a cell name
("top left", "center"), yes/no questions answer "yes" or "no", and descriptions are one
sentence listing the shapes in reading order.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from finetune.data.instructions import SHORT_ANSWER_SUFFIX
from finetune.demo.world import COLOURS, KINDS, Scene, Shape

QUESTION_TYPES = ("colour", "shape", "count", "position", "yes/no", "description")
FOLLOW_UP = "follow-up"
NUMBERS = {1: "one", 2: "two", 3: "three"}

COLOUR_QUESTIONS = (
    "What colour is the {ref}?", "What color is the {ref}?", "Which colour is the {ref}?",
    "What is the colour of the {ref}?", "What is the color of the {ref}?", "Tell me the colour of the {ref}.",
    "What colour does the {ref} have?", "Name the colour of the {ref}.",
)
SHAPE_QUESTIONS = (
    "What shape is the {ref}?", "Which shape is the {ref}?", "What kind of shape is the {ref}?",
    "What is the shape of the {ref}?", "Name the shape of the {ref}.", "What is the {ref}?",
)
POSITION_QUESTIONS = (
    "Where is the {ref}?", "Where is the {ref} located?", "In which part of the image is the {ref}?",
    "Where can you see the {ref}?", "Which cell is the {ref} in?", "Where in the picture is the {ref}?",
)
COUNT_QUESTIONS = (
    "How many {what} are there?", "How many {what} are in the image?", "How many {what} can you see?",
    "Count the {what}.", "What is the number of {what}?", "How many {what} does the picture show?",
)
PRESENCE_QUESTIONS = (
    "Is there {thing}?", "Is there {thing} in the image?", "Do you see {thing}?",
    "Can you find {thing}?", "Does the image contain {thing}?", "Is there {thing} in the picture?",
)
DESCRIBE_QUESTIONS = (
    "Describe the image.", "Describe the image briefly.", "What is in the picture?", "What do you see?",
    "Give a short caption.", "Describe what you see in one sentence.", "What does the image show?",
    "Caption this image.",
)
ELLIPTIC = ("And the {ref}?", "What about the {ref}?", "How about the {ref}?")
ELLIPTIC_PLAIN = ("And {ref}?", "What about {ref}?", "How about {ref}?")
SUFFIX_RATE = 0.2
"""Share of short-answer questions that carry LLaVA-1.5's "Answer ... single word or phrase." line."""


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    type: str
    """One of QUESTION_TYPES, or FOLLOW_UP for a turn that needs the earlier ones."""


@dataclass(frozen=True)
class Intent:
    """What a turn asked, so a follow-up can ask the same of something else."""

    ask: str  # colour | shape | position | count | presence
    shape: int | None = None
    """Index of the shape asked about (colour, shape, position)."""
    kind: str | None = None
    """Count / presence filter."""
    colour: str | None = None
    named: frozenset[str] = frozenset()
    """Attributes of the shape its reference named (kind, colour, position): asking them back is no follow-up."""


@dataclass(frozen=True)
class TextConfig:
    """Which questions a conversation may hold (the quick build asks only about colours)."""

    types: tuple[str, ...] = QUESTION_TYPES
    max_turns: int = 4
    follow_up_rate: float = 0.6
    """Chance that a later turn is a follow-up when one is possible."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.types) - set(QUESTION_TYPES))
        if unknown or not self.types:
            raise ValueError(f"unknown or no question types {unknown}; choose from {QUESTION_TYPES}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns={self.max_turns}: must be at least 1")


# ---------------------------------------------------------------- references and phrases


def named_attributes(scene: Scene, i: int, ref: str) -> frozenset[str]:
    """Which of shape `i`'s attributes a reference to it names."""
    shape, words = scene.shapes[i], ref.split()
    return frozenset(a for a, said in (("shape", shape.kind in words), ("colour", shape.colour in words),
                                       ("position", " at the " in f" {ref} " or " in the center" in ref)) if said)


def where(shape: Shape) -> str:
    """"at the top left", "in the center"."""
    return "in the center" if shape.position == "center" else f"at the {shape.position}"


def _unique(scene: Scene, i: int, key) -> bool:
    return sum(key(s) == key(scene.shapes[i]) for s in scene.shapes) == 1


def ref_by_kind(scene: Scene, i: int) -> str:
    """A reference that names the kind, never the colour: "circle", "circle at the top left"."""
    shape = scene.shapes[i]
    return shape.kind if _unique(scene, i, lambda s: s.kind) else f"{shape.kind} {where(shape)}"


def ref_by_colour(scene: Scene, i: int, noun: str = "one") -> str:
    """A reference that names the colour, never the kind: "red one", "red one at the top left"."""
    shape = scene.shapes[i]
    noun = f"{shape.colour} {noun}"
    return noun if _unique(scene, i, lambda s: s.colour) else f"{noun} {where(shape)}"


def ref_for_position(scene: Scene, i: int) -> str | None:
    """A reference that does not name the position; None when two shapes look alike."""
    shape = scene.shapes[i]
    if _unique(scene, i, lambda s: s.kind):
        return shape.kind
    if _unique(scene, i, lambda s: s.colour):
        return f"{shape.colour} shape"
    if _unique(scene, i, lambda s: (s.colour, s.kind)):
        return f"{shape.colour} {shape.kind}"
    return None


def a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange square"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(kind: str) -> str:
    return kind + "s"


def description(scene: Scene) -> str:
    """"A red circle at the top left, a blue square in the center and a green triangle at the bottom right."""
    parts = [f"{a(s.colour)} {s.kind} {where(s)}" for s in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def caption(scene: Scene, rng: random.Random) -> str:
    """A varied caption for CLIP pretraining: shapes in random order, one of several styles."""
    shapes = list(scene.shapes)
    rng.shuffle(shapes)
    style = rng.randrange(4)
    if style == 0:
        return description(Scene(tuple(shapes)))
    if style == 1:
        return " ".join(f"{s.position}: {s.colour} {s.kind}." for s in shapes)
    if style == 2:
        count = len(shapes)
        things = ", ".join(f"{a(s.colour)} {s.kind} {where(s)}" for s in shapes)
        return f"{NUMBERS[count].capitalize()} shape{'s' if count > 1 else ''}: {things}."
    return "A picture of " + " and ".join(f"{a(s.colour)} {s.kind} ({s.position})" for s in shapes) + "."


# ---------------------------------------------------------------- single questions


def _short(question: str, rng: random.Random) -> str:
    return f"{question}\n{SHORT_ANSWER_SUFFIX}" if rng.random() < SUFFIX_RATE else question


def ask_colour(scene: Scene, i: int, rng: random.Random) -> tuple[Turn, Intent]:
    ref = ref_by_kind(scene, i)
    q = rng.choice(COLOUR_QUESTIONS).format(ref=ref)
    return Turn(_short(q, rng), scene.shapes[i].colour, "colour"), Intent("colour", shape=i, named=named_attributes(scene, i, ref))


def ask_shape(scene: Scene, i: int, rng: random.Random) -> tuple[Turn, Intent]:
    ref = ref_by_colour(scene, i, rng.choice(("one", "one", "object")))
    q = rng.choice(SHAPE_QUESTIONS).format(ref=ref)
    return Turn(_short(q, rng), scene.shapes[i].kind, "shape"), Intent("shape", shape=i, named=named_attributes(scene, i, ref))


def ask_position(scene: Scene, i: int, rng: random.Random) -> tuple[Turn, Intent] | None:
    ref = ref_for_position(scene, i)
    if ref is None:
        return None
    q = rng.choice(POSITION_QUESTIONS).format(ref=ref)
    intent = Intent("position", shape=i, named=named_attributes(scene, i, ref))
    return Turn(_short(q, rng), scene.shapes[i].position, "position"), intent


def count(scene: Scene, kind: str | None = None, colour: str | None = None) -> int:
    return sum((kind is None or s.kind == kind) and (colour is None or s.colour == colour) for s in scene.shapes)


def ask_count(scene: Scene, rng: random.Random) -> tuple[Turn, Intent]:
    style = rng.randrange(3)
    kind = colour = None
    if style == 1:  # mostly kinds that are there, so the answers are not mostly "0"
        kind = rng.choice([s.kind for s in scene.shapes] + list(KINDS))
    elif style == 2:
        colour = rng.choice([s.colour for s in scene.shapes] * 2 + list(COLOURS))
    what = plural(kind) if kind else f"{colour} shapes" if colour else rng.choice(("shapes", "objects"))
    q = rng.choice(COUNT_QUESTIONS).format(what=what)
    return Turn(_short(q, rng), str(count(scene, kind, colour)), "count"), Intent("count", kind=kind, colour=colour)


def present(scene: Scene, kind: str | None, colour: str | None) -> bool:
    return count(scene, kind, colour) > 0


def presence_target(scene: Scene, rng: random.Random, answer: bool, colours=COLOURS, kinds=KINDS,
                    exclude: tuple[str, str] | None = None) -> tuple[str, str] | None:
    """A (colour, kind) whose presence is `answer`, other than `exclude`; None if there is none.

    Half of the absent ones differ from a present shape in one attribute only (the hard
    negatives of POPE's adversarial split).
    """
    if answer:
        there = sorted({(s.colour, s.kind) for s in scene.shapes} - {exclude})
        return rng.choice(there) if there else None
    absent = [(c, k) for c in colours for k in kinds if not present(scene, k, c) and (c, k) != exclude]
    near = [(c, k) for c, k in absent if any(s.colour == c or s.kind == k for s in scene.shapes)]
    return rng.choice(near if near and rng.random() < 0.5 else absent)


def ask_presence(scene: Scene, rng: random.Random, colours=COLOURS, kinds=KINDS) -> tuple[Turn, Intent]:
    answer = rng.random() < 0.5
    colour, kind = presence_target(scene, rng, answer, colours, kinds)  # a scene always has a "yes" and a "no"
    q = rng.choice(PRESENCE_QUESTIONS).format(thing=a(f"{colour} {kind}"))
    return Turn(_short(q, rng), "yes" if answer else "no", "yes/no"), Intent("presence", kind=kind, colour=colour)


def ask_description(scene: Scene, rng: random.Random) -> tuple[Turn, None]:
    return Turn(rng.choice(DESCRIBE_QUESTIONS), description(scene), "description"), None


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[Turn, Intent | None] | None:
    """A fresh question of `qtype` about a random shape; None when the scene cannot support it."""
    i = rng.randrange(len(scene.shapes))
    if qtype == "colour":
        return ask_colour(scene, i, rng)
    if qtype == "shape":
        return ask_shape(scene, i, rng)
    if qtype == "position":
        return ask_position(scene, i, rng)
    if qtype == "count":
        return ask_count(scene, rng)
    if qtype == "yes/no":
        return ask_presence(scene, rng)
    return ask_description(scene, rng)


# ---------------------------------------------------------------- follow-ups


def follow_up(scene: Scene, intent: Intent, rng: random.Random) -> tuple[Turn, Intent] | None:
    """A turn that asks `intent`'s question again about something else, or about "it"; None if
    the scene offers none."""
    options = []
    others = [j for j in range(len(scene.shapes)) if j != intent.shape]
    if intent.ask in ("colour", "position") and others:
        options.append("other")
    if intent.ask == "shape" and others:
        options.append("other")
    if intent.ask in ("colour", "shape", "position") and intent.shape is not None:
        options.append("it")
    if intent.ask in ("count", "presence") and (intent.kind or intent.colour):
        options.append("other")
    if not options:
        return None
    if rng.choice(options) == "it":
        return _about_it(scene, intent, rng)
    if intent.ask == "count":
        return _count_again(scene, intent, rng)
    if intent.ask == "presence":
        return _presence_again(scene, intent, rng)
    j = rng.choice(others)
    if intent.ask == "colour":
        ref, answer = ref_by_kind(scene, j), scene.shapes[j].colour
    elif intent.ask == "shape":
        ref, answer = ref_by_colour(scene, j), scene.shapes[j].kind
    else:
        ref, answer = ref_for_position(scene, j), scene.shapes[j].position
        if ref is None:
            return None
    question = rng.choice(ELLIPTIC).format(ref=ref)
    return Turn(question, answer, FOLLOW_UP), Intent(intent.ask, shape=j, named=named_attributes(scene, j, ref))


def _about_it(scene: Scene, intent: Intent, rng: random.Random) -> tuple[Turn, Intent] | None:
    """Ask another attribute of the shape the last turn was about, without naming the shape."""
    shape = scene.shapes[intent.shape]
    said = intent.named | {intent.ask}
    unasked = [a for a in ("colour", "shape", "position") if a not in said]
    if not unasked:
        return None
    what = rng.choice(unasked)
    question = rng.choice({
        "colour": ("What colour is it?", "What color is it?", "And its colour?", "Which colour does it have?"),
        "shape": ("What shape is it?", "And its shape?", "What kind of shape is it?"),
        "position": ("Where is it?", "Where is it located?", "And where is it?"),
    }[what])
    answer = {"colour": shape.colour, "shape": shape.kind, "position": shape.position}[what]
    return Turn(question, answer, FOLLOW_UP), Intent(what, shape=intent.shape, named=said)


def _count_again(scene: Scene, intent: Intent, rng: random.Random) -> tuple[Turn, Intent]:
    if intent.kind:
        kind = rng.choice([k for k in KINDS if k != intent.kind])
        what, answer, new = plural(kind), count(scene, kind=kind), Intent("count", kind=kind)
    else:
        colour = rng.choice([c for c in COLOURS if c != intent.colour])
        what = rng.choice((f"{colour} ones", f"{colour} shapes"))
        answer, new = count(scene, colour=colour), Intent("count", colour=colour)
    return Turn(rng.choice(ELLIPTIC_PLAIN).format(ref=what), str(answer), FOLLOW_UP), new


def _presence_again(scene: Scene, intent: Intent, rng: random.Random) -> tuple[Turn, Intent] | None:
    asked = (intent.colour, intent.kind)
    if presence_target(scene, random.Random(0), True, exclude=asked) is None:
        return None  # no other shape to say "yes" to: asking anyway would tilt follow-ups to "no"
    answer = rng.random() < 0.5
    colour, kind = presence_target(scene, rng, answer, exclude=asked)
    question = rng.choice(ELLIPTIC_PLAIN).format(ref=a(f"{colour} {kind}"))
    return Turn(question, "yes" if answer else "no", FOLLOW_UP), Intent("presence", kind=kind, colour=colour)


# ---------------------------------------------------------------- conversations


def conversation(scene: Scene, rng: random.Random, cfg: TextConfig = TextConfig()) -> list[Turn]:
    """1 to `cfg.max_turns` turns: a first question, then follow-ups and fresh questions."""
    turns: list[Turn] = []
    intent: Intent | None = None
    wanted = rng.randint(1, cfg.max_turns)
    for _ in range(4 * cfg.max_turns):  # a few draws fail (no such shape, a repeated question)
        if len(turns) == wanted:
            break
        made = None
        if turns and intent is not None and rng.random() < cfg.follow_up_rate:
            made = follow_up(scene, intent, rng)
        if made is None:
            made = ask(scene, rng.choice(cfg.types), rng)
        if made is None or any(t.question == made[0].question for t in turns):
            continue
        turn, intent = made
        turns.append(turn)
    return turns
