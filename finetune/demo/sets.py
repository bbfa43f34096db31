"""The synthetic world as LLaVA-format files: PNG images plus a JSON list of records.

    python -m finetune.demo.sets --out data/shapes-heldout --seed 1000 --records 600

Records are what `finetune.data` writes for users' data — `{"id", "image", "conversations"}`,
`<image>\\n` opening the first human turn, `image` relative to the folder — so the demo model
trains and is evaluated through the same code paths as any other data. Each human turn also
carries its question `type` (colour, shape, count, position, yes/no, description, follow-up),
which `python -m finetune.eval` reports accuracy by.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.instructions import BRIEF_CAPTION_INSTRUCTIONS
from finetune.demo.world import WorldConfig, draw, sample_scene, scene_rng
from finetune.demo.texts import TextConfig, Turn, conversation, description

DATA_FILE = "data.json"
IMAGES = "images"
KINDS = ("conversations", "captions")


@dataclass
class SyntheticSet:
    """One folder of synthetic records."""

    out: Path
    seed: int
    """Scene `i` of the set is `sample_scene(Random(f"{seed}:{i}"))`: a new seed is a new world."""
    records: int
    image_size: int = 72
    """Pixels per side of the PNGs (the demo CLIP's input size: no resampling at training time)."""
    kind: str = "conversations"
    """conversations (questions and answers) or captions (one description request per image)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; choose one of {KINDS}")
        if self.records < 1 or self.image_size < 8:
            raise ValueError(f"records ({self.records}) must be >= 1 and image_size ({self.image_size}) >= 8")


def record(record_id: str, image: str, turns: list[Turn]) -> dict:
    conversations = []
    for i, turn in enumerate(turns):
        question = f"<image>\n{turn.question}" if i == 0 else turn.question
        conversations += [{"from": "human", "value": question, "type": turn.type},
                          {"from": "gpt", "value": turn.answer}]
    return {"id": record_id, "image": image, "conversations": conversations}


def write_set(spec: SyntheticSet) -> Path:
    """Draw the images and write `out/data.json`; returns its path."""
    (spec.out / IMAGES).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(spec.records):
        scene = sample_scene(scene_rng(spec.seed, i), spec.world)
        rng = random.Random(f"{spec.seed}:text:{i}")
        if spec.kind == "captions":
            turns = [Turn(rng.choice(BRIEF_CAPTION_INSTRUCTIONS), description(scene), "description")]
        else:
            turns = conversation(scene, rng, spec.text)
        image = f"{IMAGES}/{spec.seed}-{i:06d}.png"
        draw(scene, spec.image_size).save(spec.out / image)
        records.append(record(f"shapes-{spec.seed}-{i}", image, turns))
    path = spec.out / DATA_FILE
    path.write_text(json.dumps(records, indent=0) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> SyntheticSet:
    p = argparse.ArgumentParser(prog="python -m finetune.demo.sets",
                                description="Write synthetic shape images and LLaVA-format records about them.")
    p.add_argument("--out", required=True, type=Path, help="folder for data.json and images/")
    p.add_argument("--seed", type=int, default=1000, help="world seed; the demo model trained on seeds 1-3 (default: %(default)s)")
    p.add_argument("--records", type=int, default=600, help="images, one record each (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=72, help="PNG side in pixels (default: %(default)s)")
    p.add_argument("--kind", choices=KINDS, default="conversations", help="(default: %(default)s)")
    p.add_argument("--max-shapes", type=int, default=3, help="shapes per image, 1 to this (default: %(default)s)")
    p.add_argument("--types", nargs="+", default=None, metavar="TYPE",
                   help="question types to ask (default: all of colour shape count position yes/no description)")
    p.add_argument("--max-turns", type=int, default=4, help="turns per conversation (default: %(default)s)")
    a = p.parse_args(argv)
    text = TextConfig(max_turns=a.max_turns) if a.types is None else TextConfig(tuple(a.types), a.max_turns)
    return SyntheticSet(a.out, a.seed, a.records, a.image_size, a.kind, WorldConfig(max_shapes=a.max_shapes), text)


def main(argv: list[str] | None = None) -> int:
    try:
        path = write_set(parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
