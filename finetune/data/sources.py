"""The inputs of `python -m finetune.data build`, each turned into LLaVA-format records.

COCO captions become brief-description instructions; VQAv2 and generic QA become short-answer
conversations with every question about an image merged into multi-turn records, as in
LLaVA-1.5's mix; LLaVA JSON is validated, normalised and passed through. Each random choice
for a record comes from `record_rng(seed, key)`, so a record stays the same when other records,
their order or other sources change. Nothing is dropped silently: each skip goes to the
source's `SourceLog` with its reason.
"""
from __future__ import annotations

import bisect
import math
import os
import posixpath
import random
import string
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from finetune.data.check import INVALID, conversation_problems
from finetune.data.io import (
    BadLine, DataError, Tally, example, first_json_value, iter_json_array, iter_jsonl, iter_records, plural,
)
from finetune.data.instructions import BRIEF_CAPTION_INSTRUCTIONS, SHORT_ANSWER_SUFFIX
from mmchat.conversation import LLAVA_ROLES
from mmchat.templates import IMAGE_TOKEN

VQAV2_PATTERN_FIELDS = ("image_id", "subtype")
ROLE_ALIASES = {ours: theirs for theirs, ours in LLAVA_ROLES.items()}  # other exports' names for LLaVA's roles
OUTSIDE_ROOT = "image outside --image-root"


@dataclass
class SourceLog:
    """What one input file contributed: a note on what was read, and each skip by reason."""

    label: str  # the flag and file, e.g. "--coco-captions captions_train2017.json"
    read: str = ""
    skips: dict[str, Tally] = field(default_factory=dict)

    def skip(self, reason: str, item_id: str, detail: str = "") -> None:
        self.skips.setdefault(reason, Tally()).add(example(item_id, detail))


def record_rng(seed: int, key: str) -> random.Random:
    """The random source for one record (or caption, or image): `random.Random(f"{seed}:{key}")`."""
    return random.Random(f"{seed}:{key}")


def make_record(record_id: str, image: str | None, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA record from (question, answer) pairs; `<image>\\n` opens the first question."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        if i == 0 and image is not None:
            question = f"{IMAGE_TOKEN}\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record: dict[str, Any] = {"id": record_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = conversations
    return record


def clean_text(value: Any) -> str:
    """Whitespace collapsed to single spaces; "" for anything that is not a string or number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return " ".join(str(value).split())


def clean_caption(value: Any) -> str:
    """A COCO caption as an answer: one line, capitalised, ending in a full stop."""
    text = clean_text(value)
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def short_answer_prompt(question: str) -> str:
    """LLaVA-1.5's short-answer prompt: the question, then the suffix on its own line."""
    return question if question.endswith(SHORT_ANSWER_SUFFIX) else f"{question}\n{SHORT_ANSWER_SUFFIX}"


def majority_answer(answers: Any) -> str:
    """The most frequent of VQAv2's human answers (case and spacing normalised); "" if none.

    Ties go to the answer more of its annotators were sure of (`answer_confidence` "yes"),
    then to the alphabetically first, so the result does not depend on the answers' order.
    """
    votes: Counter[str] = Counter()
    sure: Counter[str] = Counter()
    for answer in answers if isinstance(answers, list) else ():
        text = clean_text(answer.get("answer")).lower() if isinstance(answer, dict) else ""
        if text:
            votes[text] += 1
            sure[text] += answer.get("answer_confidence") == "yes"
    return min(votes, key=lambda t: (-votes[t], -sure[t], t), default="")


def balanced_chunks(items: list, max_size: int) -> list[list]:
    """The fewest chunks of at most `max_size`, sizes differing by at most one (12 by 10 -> 6 + 6)."""
    count = math.ceil(len(items) / max_size)
    size, extra = divmod(len(items), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        chunks.append(items[start:end])
        start = end
    return chunks


def pattern_fields(pattern: str) -> set[str]:
    """The field names a str.format pattern uses ("{image_id:012d}" -> "image_id")."""
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}


def image_path(directory: str, name: str, image_root: Path | None) -> str | None:
    """`directory/name` as records hold it: absolute paths made relative to `image_root`.

    None when an absolute path lies outside `image_root`.
    """
    path = posixpath.normpath(posixpath.join(directory, name))
    if image_root is None or not posixpath.isabs(path):
        return path
    try:
        return PurePosixPath(path).relative_to(Path(os.path.abspath(image_root)).as_posix()).as_posix()
    except ValueError:
        return None


def coco_caption_records(path: Path, image_dir: str, captions_per_image: int, seed: int,
                         image_root: Path | None, log: SourceLog, progress: bool | None) -> Iterator[dict]:
    """One brief-description record per chosen caption: `coco-<image_id>-<caption id>`.

    Two streaming passes (images, then annotations); per image only the `captions_per_image`
    captions with the lowest `record_rng(seed, "caption-<id>")` draw are kept, so memory holds
    at most that many captions per image and the choice does not depend on file order.
    """
    files: dict[int, str] = {}
    for i, entry in enumerate(iter_json_array(path, "images.item", f"{path.name} images", progress)):
        try:
            files[int(entry["id"])] = str(entry["file_name"])
        except (KeyError, TypeError, ValueError):
            log.skip("image entry without id or file_name", f"images[{i}]")
    if not files:
        raise DataError(f"--coco-captions {path}: no 'images' list; expected a COCO captions annotation file")
    chosen: dict[int, list[tuple[float, int, str]]] = {}
    captions = 0
    for i, ann in enumerate(iter_json_array(path, "annotations.item", f"{path.name} captions", progress)):
        captions += 1
        try:
            ann_id, image_id, caption = int(ann["id"]), int(ann["image_id"]), clean_caption(ann["caption"])
        except (KeyError, TypeError, ValueError):
            log.skip("caption annotation without id, image_id or caption", f"annotations[{i}]")
            continue
        record_id = f"coco-{image_id}-{ann_id}"
        if image_id not in files:
            log.skip("caption of an image_id missing from 'images'", record_id)
        elif not caption:
            log.skip("empty caption", record_id)
        else:
            kept = chosen.setdefault(image_id, [])
            bisect.insort(kept, (record_rng(seed, f"caption-{ann_id}").random(), ann_id, caption))
            del kept[captions_per_image:]
    if not captions:
        raise DataError(f"--coco-captions {path}: no 'annotations' list; expected a COCO captions annotation file")
    log.read = (f"{plural(captions, 'caption')} of {plural(len(files), 'image')} "
                f"({len(files) - len(chosen)} without a caption), up to {captions_per_image} per image")
    for image_id, file_name in files.items():
        image = image_path(image_dir, file_name, image_root)
        for _, ann_id, caption in sorted(chosen.get(image_id, ()), key=lambda c: c[1]):
            record_id = f"coco-{image_id}-{ann_id}"
            if image is None:
                log.skip(OUTSIDE_ROOT, record_id, file_name)
                continue
            instruction = record_rng(seed, record_id).choice(BRIEF_CAPTION_INSTRUCTIONS)
            yield make_record(record_id, image, [(instruction, caption)])


def vqav2_records(questions: Path, annotations: Path, image_pattern: str, max_turns: int,
                  image_root: Path | None, log: SourceLog, progress: bool | None) -> Iterator[dict]:
    """Short-answer records, an image's questions merged: `vqav2-<image_id>-<n>` (n counts chunks).

    Annotations are read first into {question_id: majority answer} (answers interned: most are
    "yes", "no" or a number); questions are then joined to them and grouped by image.
    """
    answers: dict[int, str] = {}
    count = 0
    for i, ann in enumerate(iter_json_array(annotations, "annotations.item", f"{annotations.name}", progress)):
        count += 1
        try:
            answers[int(ann["question_id"])] = sys.intern(majority_answer(ann["answers"]))
        except (KeyError, TypeError, ValueError):
            log.skip("annotation without question_id or answers", f"annotations[{i}]")
    if not count:
        raise DataError(f"--vqav2-annotations {annotations}: no 'annotations' list; expected a VQAv2 annotation file")
    subtype = None
    if "subtype" in pattern_fields(image_pattern):
        subtype = first_json_value(questions, "data_subtype")
        if not isinstance(subtype, str):
            raise DataError(f"--vqav2-questions {questions} has no 'data_subtype' for the {{subtype}} of "
                            f"--vqav2-image-pattern {image_pattern!r}; give a pattern without it")

    by_image: dict[int, list[tuple[int, str, str]]] = {}
    count = joined = 0
    for i, q in enumerate(iter_json_array(questions, "questions.item", f"{questions.name}", progress)):
        count += 1
        try:
            qid, image_id, question = int(q["question_id"]), int(q["image_id"]), clean_text(q["question"])
        except (KeyError, TypeError, ValueError):
            log.skip("question without question_id, image_id or question", f"questions[{i}]")
            continue
        if qid not in answers:
            log.skip("question without an annotation", f"question {qid}")
            continue
        joined += 1
        answer = answers.pop(qid)
        if not answer:
            log.skip("annotation without a usable answer", f"question {qid}")
        elif not question:
            log.skip("empty question", f"question {qid}")
        else:
            by_image.setdefault(image_id, []).append((qid, question, answer))
    if not count:
        raise DataError(f"--vqav2-questions {questions}: no 'questions' list; expected a VQAv2 questions file")
    if not joined:
        raise DataError(f"no question of --vqav2-questions {questions} has an answer in --vqav2-annotations "
                        f"{annotations}; pass the two files of the same split, in the same order")
    for qid in answers:
        log.skip("annotation without a question", f"question {qid}")
    log.read = f"{plural(count, 'question')} of {plural(len(by_image), 'image')}, up to {max_turns} per record"
    for image_id, rows in by_image.items():
        image = image_path("", image_pattern.format(image_id=image_id, subtype=subtype), image_root)
        rows.sort()
        for n, chunk in enumerate(balanced_chunks(rows, max_turns)):
            yield make_record(f"vqav2-{image_id}-{n}", image, [(short_answer_prompt(q), a) for _, q, a in chunk])


def qa_records(path: Path, image_dir: str, short_answer: bool, max_turns: int,
               image_root: Path | None, log: SourceLog, progress: bool | None) -> Iterator[dict]:
    """Records from `{"image", "question", "answer"}` lines (GQA exports and the like).

    An image's questions are merged like VQAv2's, in line order; a record is named
    `<file stem>-<line>` after its first question's line.
    """
    by_image: dict[str, list[tuple[int, str, str]]] = {}
    count = 0
    for lineno, row in iter_jsonl(path, path.name, progress):
        count += 1
        line_id = f"{path.stem}-{lineno}"
        if isinstance(row, BadLine):
            log.skip("invalid JSON", line_id, row.error)
            continue
        if not isinstance(row, dict):
            log.skip("not a JSON object", line_id)
            continue
        missing = [key for key in ("image", "question", "answer") if key not in row]
        image = row.get("image")
        question, answer = clean_text(row.get("question")), clean_text(row.get("answer"))
        if missing:
            log.skip("missing field", line_id, ", ".join(missing))
        elif not (isinstance(image, str) and image.strip()):
            log.skip("'image' is not a path", line_id, repr(image))
        elif not question:
            log.skip("empty question", line_id)
        elif not answer:
            log.skip("empty answer", line_id)
        elif (image := image_path(image_dir, image, image_root)) is None:
            log.skip(OUTSIDE_ROOT, line_id, row["image"])
        else:
            by_image.setdefault(image, []).append((lineno, question, answer))
    if not count:
        raise DataError(f"--qa-jsonl {path} has no lines; expected one {{image, question, answer}} object per line")
    log.read = f"{plural(count, 'question')} of {plural(len(by_image), 'image')}, up to {max_turns} per record"
    for image, rows in by_image.items():
        for chunk in balanced_chunks(rows, max_turns):
            turns = [(short_answer_prompt(q) if short_answer else q, a) for _, q, a in chunk]
            yield make_record(f"{path.stem}-{chunk[0][0]}", image, turns)


def normalise_llava(record: dict, record_id: str, image: Any) -> dict:
    """The fields LLaVA reads, normalised: `record_id`, `image` (already a clean path), roles
    human/gpt, values without surrounding whitespace. Malformed parts stay for the validator to name."""
    out: dict[str, Any] = {"id": record_id}
    if image is not None:
        out["image"] = image
    turns = record.get("conversations")
    if isinstance(turns, list):
        turns = [{"from": ROLE_ALIASES.get(t["from"], t["from"]), "value": t["value"].strip()}
                 if isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) else t
                 for t in turns]
    out["conversations"] = turns
    return out


def llava_records(path: Path, image_dir: str, image_root: Path | None, log: SourceLog,
                  progress: bool | None) -> Iterator[dict]:
    """Records of a LLaVA-format file, validated by `conversation_problems` and normalised.

    Records without an "image" stay text-only conversations; a record without an id is named
    `<file stem>-<position>`.
    """
    count = 0
    for position, item in iter_records(path, path.name, progress):
        count += 1
        fallback_id = f"{path.stem}-{position}"
        if isinstance(item, BadLine):
            log.skip(INVALID, fallback_id, f"invalid JSON: {item.error}")
            continue
        if not isinstance(item, dict):
            log.skip(INVALID, fallback_id, "not a JSON object")
            continue
        record_id = fallback_id if item.get("id") is None else str(item["id"])
        image = item.get("image")
        if isinstance(image, str) and image.strip():
            image = image_path(image_dir, image.strip(), image_root)
            if image is None:
                log.skip(OUTSIDE_ROOT, record_id, item["image"])
                continue
        record = normalise_llava(item, record_id, image)
        problems = conversation_problems(record)
        if problems:
            # Counted under its first problem; the detail names all of them.
            reason = problems[0][0]
            log.skip(reason, record_id, "; ".join(d if k == reason else f"{k}: {d}" for k, d in problems))
            continue
        yield record
    if not count:
        raise DataError(f"--llava-json {path} holds no records; expected a JSON list (or JSONL) of LLaVA records")
    log.read = plural(count, "record")
