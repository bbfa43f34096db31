"""`python -m finetune.eval`: greedy answers to LLaVA-format questions, scored as VQAv2 and POPE.

    python -m finetune.eval --model assets/demo-model --data data/shapes-heldout/data.json \\
        --image-root data/shapes-heldout --load-in 4bit
    python -m finetune.eval --model ckpt/llava-1.5-7b --data vqav2_val.json --image-root /data/coco --json

Every human turn of every record is a question; the next gpt turn is its reference answer (a gpt
turn may also carry `"answers": [...]`, e.g. VQAv2's ten human answers, for the official soft
score). Turns are asked in order in one `ChatSession`, so a follow-up sees the conversation before
it; with `--history reference` (the default) the earlier answers the model sees are the
references, so one wrong answer does not spoil the turns after it. Answers are normalised as
VQAv2 does (case, punctuation, articles, number words). Accuracy is reported overall, per
question type (a human turn's `"type"` when the data has one, else its first two words, as
VQAv2 groups them) and per answer type (yes/no, number, other); yes/no questions also get
POPE's precision, recall, F1 and yes-ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from finetune.vqa_metrics import Pope, answer_type, is_yes_no, question_type, vqa_accuracy
from mmchat.config import LOAD_IN
from mmchat.templates import IMAGE_TOKEN

HISTORIES = ("reference", "model")


@dataclass
class EvalConfig:
    model: str
    """An mmchat checkpoint folder (or a LLaVA folder / hub id, converted once)."""
    data: Path
    """LLaVA-format JSON or JSONL (e.g. written by `python -m finetune.data build`)."""
    image_root: Path | None = None
    load_in: str | None = None
    device: str | None = None
    max_new_tokens: int = 64
    limit: int | None = None
    """Evaluate only the first N records."""
    history: str = "reference"
    """What earlier turns show as answers: the references, or the model's own answers."""
    json: bool = False
    predictions: Path | None = None
    """Write every question, reference and answer as JSON lines here."""
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        if self.load_in is not None and self.load_in not in LOAD_IN:
            raise ValueError(f"--load-in {self.load_in!r}: choose one of {', '.join(LOAD_IN)}")
        if self.history not in HISTORIES:
            raise ValueError(f"--history {self.history!r}: choose one of {', '.join(HISTORIES)}")
        if self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("--max-new-tokens and --limit must be at least 1")


@dataclass
class Question:
    record: str
    turn: int
    type: str
    question: str
    references: list[str]
    answer: str = ""
    score: float = 0.0


def questions_of(record: dict, position: int) -> list[Question]:
    """The record's (question, references) pairs in order; `type` from the data or the wording."""
    from finetune.data.dataset import record_id

    out = []
    turns = record["conversations"]
    for i in range(0, len(turns) - 1, 2):
        human, gpt = turns[i], turns[i + 1]
        text = human["value"].replace(IMAGE_TOKEN, "").strip()
        references = [str(a) for a in gpt.get("answers") or [gpt["value"]]]
        out.append(Question(record_id(record, position), i // 2, str(human.get("type") or question_type(text)),
                            text, references))
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Answer every question of `cfg.data` greedily; the report as a dict (what --json prints)."""
    from finetune.data.dataset import check_images, read_records
    from mmchat.chat import ChatSession
    from mmchat.convert import resolve_checkpoint
    from mmchat.conversation import ASSISTANT, Message, messages_from_llava
    from mmchat.generate import GenerationConfig
    from mmchat.model import LoadOptions, load_model

    store = read_records(cfg.data, cfg.progress)
    check_images(store, cfg.image_root, cfg.progress)
    count = min(len(store), cfg.limit or len(store))
    options = LoadOptions(cfg.load_in, cfg.device)
    model = load_model(resolve_checkpoint(cfg.model), options)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    root = cfg.image_root or Path("/")
    total = sum(len(store[i]["conversations"]) // 2 for i in range(count))
    done: list[Question] = []
    started = time.perf_counter()
    with tqdm(total=total, desc="eval", unit="q", disable=None if cfg.progress is None else not cfg.progress) as bar:
        for i in range(count):
            record = store[i]
            messages = messages_from_llava(record["conversations"])
            session = ChatSession(model)
            for question, message in zip(questions_of(record, i + 1), messages[0::2]):
                image = root / record["image"] if message.images else None
                question.answer = "".join(session.ask(message.text, image, gen)).strip()
                question.score = vqa_accuracy(question.answer, question.references)
                if cfg.history == "reference":
                    session.messages[-1] = Message(ASSISTANT, question.references[0])
                done.append(question)
                bar.update(1)
    seconds = time.perf_counter() - started
    if cfg.predictions:
        cfg.predictions.write_text("".join(json.dumps(q.__dict__) + "\n" for q in done))
    return report(done, {"model": str(cfg.model), "data": str(cfg.data), "load_in": options.load_in, "records": count,
                         "history": cfg.history, "seconds": round(seconds, 1)})


def report(questions: list[Question], meta: dict) -> dict:
    """Accuracy overall, per question type and per answer type; POPE on yes/no questions."""
    by_type: dict[str, list[float]] = defaultdict(list)
    by_answer: dict[str, list[float]] = defaultdict(list)
    pope = Pope()
    for q in questions:
        by_type[q.type].append(q.score)
        by_answer[answer_type(q.references)].append(q.score)
        if is_yes_no(q.references):
            pope.add(q.answer, q.references[0])

    def summary(scores: list[float]) -> dict:
        return {"questions": len(scores), "accuracy": sum(scores) / len(scores) if scores else 0.0}

    return {**meta, "questions": len(questions), "accuracy": summary([q.score for q in questions])["accuracy"],
            "per_question_type": {k: summary(v) for k, v in sorted(by_type.items())},
            "per_answer_type": {k: summary(v) for k, v in sorted(by_answer.items())},
            "pope": pope.metrics() if pope.total else None}


def format_report(result: dict) -> str:
    lines = [f"{result['model']} on {result['data']} ({result['load_in']}, history {result['history']}): "
             f"{result['questions']} questions in {result['records']} records, {result['seconds']:.0f} s",
             f"accuracy {result['accuracy']:.1%}", "", f"{'question type':<24}{'questions':>10}{'accuracy':>10}"]
    for name, row in result["per_question_type"].items():
        lines.append(f"{name:<24}{row['questions']:>10}{row['accuracy']:>10.1%}")
    lines += ["", f"{'answer type':<24}{'questions':>10}{'accuracy':>10}"]
    for name, row in result["per_answer_type"].items():
        lines.append(f"{name:<24}{row['questions']:>10}{row['accuracy']:>10.1%}")
    if result["pope"]:
        p = result["pope"]
        lines += ["", f"yes/no (POPE, {p['questions']} questions): accuracy {p['accuracy']:.1%}, precision "
                      f"{p['precision']:.1%}, recall {p['recall']:.1%}, F1 {p['f1']:.1%}, yes-ratio {p['yes_ratio']:.1%}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m finetune.eval",
                                description="Greedy answers to LLaVA-format questions, scored as VQAv2 and POPE.")
    p.add_argument("--model", required=True, help="mmchat checkpoint folder (or a LLaVA folder / hub id)")
    p.add_argument("--data", required=True, type=Path, help="LLaVA-format JSON or JSONL with reference answers")
    p.add_argument("--image-root", type=Path, default=None, help="folder that record image paths are relative to")
    p.add_argument("--load-in", choices=LOAD_IN, help="LLM weights (default: 4bit on a GPU, 32bit on a CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument("--history", choices=HISTORIES, default="reference",
                   help="answers earlier turns show: the references or the model's own (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--predictions", type=Path, default=None, help="write each question and answer as JSON lines")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")
    a = p.parse_args(argv)
    return EvalConfig(a.model, a.data, a.image_root, a.load_in, a.device, a.max_new_tokens, a.limit, a.history,
                      a.json, a.predictions, a.progress)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        result = evaluate(cfg)
    except (ValueError, OSError) as e:  # DataError is a ValueError: the user's input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if cfg.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
