"""Synthetic LLaVA-format records whose lengths spread like LLaVA-1.5's 665K instruction mix.

The categories and their shares are the mix's sources (LLaVA-1.5 paper, table 7): short-answer
VQA packed as multi-turn records (VQAv2, GQA, OKVQA, OCR-VQA, A-OKVQA, RefCOCO, VG: 444K),
captions (TextCaps 22K), LLaVA-Instruct conversations (58K), detailed descriptions and complex
reasoning (100K), and text-only ShareGPT conversations (40K). Turn counts and answer lengths are
approximations, given in tokens and converted to words with the tokenizer's tokens per word. Words
are made up (the random models' tokenizer knows only those); images are drawn by code.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Category:
    name: str
    share: float
    turns: tuple[int, int]
    """Question-answer pairs per record (inclusive range; short VQA draws a geometric count)."""
    question: tuple[int, int]
    """LLaMA tokens per question."""
    answer: tuple[int, int]
    """LLaMA tokens per answer."""
    image: bool = True


MIX = (
    Category("short VQA", 444 / 665, (1, 15), (8, 30), (1, 4)),
    Category("caption", 22 / 665, (1, 1), (10, 14), (10, 28)),
    Category("conversation", 58 / 665, (2, 6), (8, 26), (25, 130)),
    Category("detail / reasoning", 100 / 665, (1, 1), (10, 32), (60, 260)),
    Category("text only", 40 / 665, (1, 6), (12, 160), (80, 460), image=False),
)


def _count(rng: random.Random, span: tuple[int, int], geometric: bool = False) -> int:
    low, high = span
    if geometric:  # most VQA records hold a few questions, some many (GQA, VG)
        n = low
        while n < high and rng.random() < 0.78:
            n += 1
        return n
    return rng.randint(low, high)


def _text(rng: random.Random, lexicon: list[str], llama_tokens: int, scale: float, tokens_per_word: float) -> str:
    n = max(1, round(llama_tokens * scale / tokens_per_word))
    return " ".join(rng.choice(lexicon) for _ in range(n))


def make_records(n: int, lexicon: list[str], images: list[str], tokens_per_word: float, scale: float = 1.0,
                 seed: int = 0) -> list[dict]:
    """`n` LLaVA records (`{id, image?, conversations}`) drawn from MIX, in random order.

    `scale` shrinks every text length (image slots are the model's: a smaller tower shrinks those);
    `tokens_per_word`: the tokenizer's tokens per lexicon word, so lengths come out in tokens.
    """
    rng = random.Random(seed)
    weights = [c.share for c in MIX]
    out = []
    for i in range(n):
        cat = rng.choices(MIX, weights)[0]
        turns = []
        for t in range(_count(rng, cat.turns, geometric=cat.name == "short VQA")):
            question = _text(rng, lexicon, _count(rng, cat.question), scale, tokens_per_word) + "?"
            answer = _text(rng, lexicon, _count(rng, cat.answer), scale, tokens_per_word) + "."
            prefix = "<image>\n" if cat.image and t == 0 else ""
            turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        record = {"id": f"{cat.name.split()[0]}-{i}", "conversations": turns}
        if cat.image:
            record["image"] = rng.choice(images)
        out.append(record)
    return out


def tokens_per_word(tokenizer, lexicon: list[str], seed: int = 0) -> float:
    rng = random.Random(seed)
    sample = [" ".join(rng.choice(lexicon) for _ in range(50)) for _ in range(40)]
    return sum(len(tokenizer(s, add_special_tokens=False).input_ids) for s in sample) / 2000


def draw_images(folder: Path, count: int = 6, seed: int = 0) -> list[str]:
    """`count` PNG scenes of coloured shapes (photo-sized, so preprocessing does real work)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        image = Image.new("RGB", (640, 480), tuple(rng.randint(150, 255) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, size = rng.randint(0, 560), rng.randint(0, 400), rng.randint(30, 160)
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + size, y + size), fill=colour)
        names.append(f"scene{i}.png")
        image.save(folder / names[-1])
    return names
