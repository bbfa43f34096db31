"""`python -m finetune.data check`: find what would break or silently spoil training on a LLaVA file.

Each record is checked for its structure (roles, alternation, empty turns, `<image>` markers),
its image (present, and openable by PIL) and, given a tokenizer, its length as the model sees
it: rendered by `mmchat.conversation.render` with image slots expanded.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.data.io import RECORD_SUFFIXES, BadLine, DataError, Tally, example, iter_records, plural
from mmchat.conversation import LLAVA_ROLES
from mmchat.templates import IMAGE_TOKEN

ROLES = tuple(LLAVA_ROLES)  # LLaVA's roles, in the order turns must alternate

# Error kinds, as reports print them.
INVALID = "invalid record"
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_TURN = "empty turn"
NOT_ALTERNATING = "turns do not alternate human, gpt"
UNKNOWN_ROLE = "unknown role"
NO_IMAGE_TOKEN = "missing <image>"
DUPLICATE_IMAGE_TOKEN = "duplicated <image>"
MISPLACED_IMAGE_TOKEN = "<image> not in the first human turn"
STRAY_IMAGE_TOKEN = "<image> in a record without an image"
RENDER_ERROR = "cannot be rendered"
# Warning kinds: suspicious, but training runs.
DUPLICATE_ID = "duplicate id"
MISSING_ID = "missing id"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
BATCH = 256  # records whose images are checked together by the thread pool


def conversation_problems(record: Any) -> list[tuple[str, str]]:
    """Structural problems of one LLaVA-format record as (kind, detail); [] when it is sound."""
    if not isinstance(record, dict):
        return [(INVALID, "not a JSON object")]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return [(INVALID, "no 'conversations' list")]
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        return [(INVALID, f"'image' is {image!r}, not a path")]
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return [(INVALID, f"turn {i} is not {{'from': str, 'value': str}}")]

    problems = []
    roles = [turn["from"] for turn in turns]
    unknown = [f"turn {i} is {role!r}" for i, role in enumerate(roles) if role not in ROLES]
    if unknown:
        problems.append((UNKNOWN_ROLE, "; ".join(unknown) + f"; expected {' or '.join(map(repr, ROLES))}"))
    else:
        wrong = [i for i, role in enumerate(roles) if role != ROLES[i % 2]]
        if wrong:
            i = wrong[0]
            problems.append((NOT_ALTERNATING, f"turn {i} is {roles[i]!r}, expected {ROLES[i % 2]!r}"))
        elif len(roles) % 2:
            problems.append((NOT_ALTERNATING, "ends with a human turn that has no answer"))
    empty = [str(i) for i, turn in enumerate(turns) if not turn["value"].strip()]
    if empty:
        problems.append((EMPTY_TURN, f"turn {', '.join(empty)}"))

    counts = [turn["value"].count(IMAGE_TOKEN) for turn in turns]
    marked = [str(i) for i, n in enumerate(counts) if n]
    where = f"turn{'s' if len(marked) > 1 else ''} {', '.join(marked)}"
    if image is None:
        if marked:
            problems.append((STRAY_IMAGE_TOKEN, f"in {where}"))
    elif not marked:
        problems.append((NO_IMAGE_TOKEN, "the first human turn has no <image>"))
    elif sum(counts) > 1:
        problems.append((DUPLICATE_IMAGE_TOKEN, f"{sum(counts)} markers, in {where}"))
    elif counts[0] != 1 or roles[0] != ROLES[0]:
        problems.append((MISPLACED_IMAGE_TOKEN, f"in {where}"))
    return problems


def image_problem(image_root: Path, image: str) -> tuple[str, str] | None:
    """(kind, detail) when `image_root / image` is missing or PIL cannot open and verify it."""
    path = image_root / image
    if not path.is_file():
        return MISSING_IMAGE, image
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types (OSError, SyntaxError, struct.error, ...)
        return UNREADABLE_IMAGE, f"{image}: {type(e).__name__}: {e}"
    return None


@dataclass
class CheckConfig:
    """Options of `python -m finetune.data check`."""

    file: Path
    image_root: Path | None = None
    check_images: bool = True
    tokenizer: Path | None = None  # a local tokenizer folder; no lengths without one
    template: str = "llava_v1"  # mmchat template the lengths are counted with
    image_tokens: int = 576  # slots per image: 576 for CLIP ViT-L/14 at 336 px
    model: str | None = None
    """An mmchat checkpoint (or a LLaVA folder `--model` takes elsewhere) whose tokenizer, template and
    image tokens count the lengths: each image's own for AnyRes, from its size (needs --image-root)."""
    max_length: int = 2048  # LLaVA-1.5's training length
    show: int = 10  # record ids listed per kind of problem
    workers: int = 8  # threads opening images (I/O bound)
    progress: bool | None = None  # None: a progress bar only on a terminal

    def __post_init__(self):
        if not self.file.is_file():
            raise DataError(f"check: file not found: {self.file}")
        if self.file.suffix not in RECORD_SUFFIXES:
            raise DataError(f"check: {self.file} must end in .json or .jsonl")
        if self.check_images and self.image_root is None:
            raise DataError("--image-root is required to check images; pass it, or --no-check-images to skip them")
        if self.image_root is not None and not self.image_root.is_dir():
            raise DataError(f"--image-root is not a folder: {self.image_root}")
        if self.tokenizer is not None and not self.tokenizer.is_dir():
            raise DataError(f"--tokenizer folder not found: {self.tokenizer}")
        if self.tokenizer is not None and not any((self.tokenizer / name).is_file() for name in TOKENIZER_FILES):
            raise DataError(f"--tokenizer {self.tokenizer} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        if self.model is not None and self.tokenizer is not None:
            raise DataError("pass --model (its tokenizer, template and image tokens) or --tokenizer, not both")
        if self.tokenizer is not None:
            from mmchat.templates import check_template_name

            try:
                check_template_name(self.template)
            except ValueError as e:
                raise DataError(str(e)) from None
        for flag, value in (("--image-tokens", self.image_tokens), ("--max-length", self.max_length),
                            ("--show", self.show), ("--workers", self.workers)):
            if value < 1:
                raise DataError(f"{flag} must be at least 1, got {value}")


@dataclass
class CheckReport:
    """What `check` found: errors and warnings by kind with record ids, and token lengths."""

    path: Path
    show: int
    records: int = 0
    with_image: int = 0
    error_records: int = 0
    errors: dict[str, Tally] = field(default_factory=dict)
    warnings: dict[str, Tally] = field(default_factory=dict)
    images_checked: bool = True
    length_setup: str = ""  # how lengths were counted; empty when they were not
    lengths: list[int] = field(default_factory=list)
    too_long: Tally = field(default_factory=Tally)
    max_length: int = 0

    def add(self, table: dict[str, Tally], kind: str, record_id: str, detail: str = "") -> None:
        table.setdefault(kind, Tally(self.show)).add(example(record_id, detail))

    def format(self) -> str:
        lines = [f"{self.path}: {plural(self.records, 'record')} "
                 f"({self.with_image} with an image, {self.records - self.with_image} text-only)"]
        if not self.images_checked:
            lines.append("images not checked (--no-check-images)")
        errors = f"errors in {plural(self.error_records, 'record')}"
        for title, table in ((errors, self.errors), ("warnings", self.warnings)):
            if table:
                lines.append(f"{title}:")
                for kind, tally in table.items():
                    lines += [f"  {kind}: {tally.count}", *tally.lines("    ")]
        lines += self._length_lines()
        lines.append(f"FAILED: {plural(self.error_records, 'record')} with errors" if self.errors else "OK: no errors")
        return "\n".join(lines)

    def _length_lines(self) -> list[str]:
        if not self.length_setup:
            return ["token lengths: not counted (pass --tokenizer)"]
        lines = [f"token lengths ({self.length_setup}):"]
        if not self.lengths:
            return lines + ["  no record could be rendered"]
        s = sorted(self.lengths)
        p95 = s[math.ceil(0.95 * len(s)) - 1]  # nearest rank
        lines.append(f"  min {s[0]}, median {statistics.median(s):g}, p95 {p95}, max {s[-1]}")
        lines.append(f"  longer than --max-length {self.max_length}: {self.too_long.count}")
        return lines + self.too_long.lines("    ")


def check(cfg: CheckConfig) -> CheckReport:
    """Check every record of `cfg.file`, streaming; the report says what is wrong and where."""
    report = CheckReport(cfg.file, cfg.show, images_checked=cfg.check_images, max_length=cfg.max_length,
                         too_long=Tally(cfg.show))
    length_of = None
    if cfg.model is not None:
        length_of = _model_length_counter(cfg, report)
    elif cfg.tokenizer is not None:
        length_of = _length_counter(cfg, report)
    seen_ids: set[str] = set()
    image_status: dict[str, tuple[str, str] | None] = {}
    records = iter_records(cfg.file, f"check {cfg.file.name}", cfg.progress)
    with ThreadPoolExecutor(cfg.workers) as pool:
        for batch in _batched(records, BATCH):
            if cfg.check_images:
                _check_images(batch, cfg.image_root, pool, image_status)
            for position, record in batch:
                _check_record(report, position, record, seen_ids, image_status, length_of)
    if report.records == 0:
        raise DataError(f"{cfg.file} holds no records; expected a JSON list (or JSONL) of LLaVA records")
    return report


def _check_record(report: CheckReport, position: int, record: Any, seen_ids: set[str],
                  image_status: dict[str, tuple[str, str] | None], length_of: Callable[[dict], int] | None) -> None:
    report.records += 1
    if isinstance(record, BadLine):
        problems = [(INVALID, f"invalid JSON: {record.error}")]
    else:
        problems = conversation_problems(record)
    record_id = f"#{position}"
    if isinstance(record, dict):
        if record.get("id") is None:
            report.add(report.warnings, MISSING_ID, record_id, "named by its position")
        else:
            record_id = str(record["id"])
            if record_id in seen_ids:
                report.add(report.warnings, DUPLICATE_ID, record_id, f"again at #{position}")
            seen_ids.add(record_id)
    if not problems and length_of is not None:  # a missing image does not change the length
        try:
            length = length_of(record)
        except ValueError as e:
            problems.append((RENDER_ERROR, str(e)))
        else:
            report.lengths.append(length)
            if length > report.max_length:
                report.too_long.add(example(record_id, f"{length} tokens"))
    image = record.get("image") if isinstance(record, dict) else None
    if isinstance(image, str):
        report.with_image += 1
        if image_status.get(image):
            problems.append(image_status[image])
    for kind, detail in problems:
        report.add(report.errors, kind, record_id, detail)
    report.error_records += bool(problems)


def _check_images(batch: list[tuple[int, Any]], image_root: Path, pool: ThreadPoolExecutor,
                  image_status: dict[str, tuple[str, str] | None]) -> None:
    # An image shared by many records (a COCO photo with captions and questions) is opened once.
    new = list({record["image"]: None for _, record in batch
                if isinstance(record, dict) and isinstance(record.get("image"), str)
                and record["image"] not in image_status})
    for image, status in zip(new, pool.map(partial(image_problem, image_root), new)):
        image_status[image] = status


def _length_counter(cfg: CheckConfig, report: CheckReport) -> Callable[[dict], int]:
    """record -> its token count as the model sees it (template, BOS, image slots expanded)."""
    from transformers import AutoTokenizer

    from mmchat.conversation import messages_from_llava, render
    from mmchat.templates import resolve_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer {cfg.tokenizer}: cannot load the tokenizer: {' '.join(str(e).split())}") from None
    template = resolve_template(cfg.template, tokenizer)
    report.length_setup = f"template {cfg.template}, {cfg.image_tokens} tokens per image, tokenizer {cfg.tokenizer}"

    def length_of(record: dict) -> int:
        messages = messages_from_llava(record["conversations"])
        return len(render(messages, template, tokenizer, cfg.image_tokens).input_ids)

    return length_of


def _model_length_counter(cfg: CheckConfig, report: CheckReport) -> Callable[[dict], int]:
    """record -> its token count as `cfg.model` sees it: the checkpoint's tokenizer and template, and
    its tower's image tokens (a resampler's queries; AnyRes: each image's own, from its file's size)."""
    from mmchat.image import image_size
    from mmchat.anyres import num_image_tokens as anyres_tokens
    from mmchat.anyres import settings_from_config
    from mmchat.checkpoint import read_config, resolve_path
    from mmchat.conversation import messages_from_llava, render
    from mmchat.convert.cache import resolve_checkpoint
    from mmchat.model import load_tokenizer
    from mmchat.templates import resolve_template
    from mmchat.vision import load_vision_tower, num_image_tokens, patch_size

    try:
        folder = resolve_checkpoint(cfg.model)
        config = read_config(folder)
        tokenizer = load_tokenizer(resolve_path(folder, config.tokenizer))
        template = resolve_template(config.template, tokenizer)
        tower = load_vision_tower(config.vision, folder)  # its patch grid; the weights are not used
    except (OSError, ValueError) as e:
        raise DataError(f"--model {cfg.model}: {' '.join(str(e).split())}") from None
    anyres = None if config.vision.anyres is None else settings_from_config(config.vision, patch_size(tower))
    if anyres is not None and cfg.image_root is None:
        raise DataError(f"--model {cfg.model} is an AnyRes model: each image's tokens depend on its size; pass --image-root")
    fixed = config.projector.queries if config.projector.type == "resampler" else num_image_tokens(tower, config.vision)
    del tower
    per_image = f"{fixed} tokens per image" if anyres is None else f"AnyRes: {anyres.grid ** 2} tokens per tile, each image's own grid"
    report.length_setup = f"--model {cfg.model}: template {config.template}, {per_image}"

    def length_of(record: dict) -> int:
        counts: int | list[int] = fixed
        if anyres is not None and isinstance(record.get("image"), str):
            counts = [anyres_tokens(image_size(cfg.image_root / record["image"]), anyres)]
        messages = messages_from_llava(record["conversations"])
        return len(render(messages, template, tokenizer, counts, image_token_id=config.image_token_id).input_ids)

    return length_of


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
