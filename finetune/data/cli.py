"""Build and check LLaVA-format multimodal instruction data.

    python -m finetune.data build --coco-captions captions_train2017.json --coco-image-dir coco/train2017 \\
        --vqav2-questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --vqav2-annotations v2_mscoco_train2014_annotations.json \\
        --llava-json llava_instruct_150k.json --val-fraction 0.01 --out data/mix.json
    python -m finetune.data check data/mix.json --image-root /data/images --tokenizer /models/vicuna

`build` writes a list of {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}
records (JSON, or JSONL when --out ends in .jsonl), `<image>` opening the first human turn,
`image` relative to the image root. Inputs are streamed; images are never opened.
`check` reports broken records with their ids and exits 1 when it finds errors.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.check import CheckConfig, check
from finetune.data.io import RECORD_SUFFIXES, DataError, RecordWriter
from finetune.data.sources import (
    VQAV2_PATTERN_FIELDS, SourceLog, coco_caption_records, image_path, llava_records, pattern_fields, qa_records,
    record_rng, vqav2_records,
)

# The official VQAv2 layout: COCO 2014 images in train2014/ and val2014/, named by the questions
# file's data_subtype. LLaVA-1.5's layout is "coco/train2017/{image_id:012d}.jpg".
DEFAULT_VQAV2_PATTERN = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg"
# A COCO image under its 2014 or 2017 name; the split is decided per COCO image id, so a photo
# reached through both names (VQAv2's 2014 files, LLaVA-Instruct's 2017 ones) stays on one side.
COCO_FILE = re.compile(r"(?:^|/)(?:COCO_[a-z]+\d{4}_)?(\d{12})\.jpg$")


@dataclass
class BuildConfig:
    """Options of `python -m finetune.data build`; one list entry per input file."""

    out: Path
    coco_captions: list[Path] = field(default_factory=list)
    coco_image_dir: list[str] = field(default_factory=list)  # once for all caption files, or once per file
    captions_per_image: int = 1
    vqav2_questions: list[Path] = field(default_factory=list)
    vqav2_annotations: list[Path] = field(default_factory=list)  # paired in order with vqav2_questions
    vqav2_image_pattern: str = DEFAULT_VQAV2_PATTERN
    qa_jsonl: list[Path] = field(default_factory=list)
    qa_image_dir: list[str] = field(default_factory=list)  # like coco_image_dir
    qa_short_answer: bool = True  # add LLaVA-1.5's short-answer suffix to QA questions
    llava_json: list[Path] = field(default_factory=list)
    llava_image_dir: list[str] = field(default_factory=list)  # like coco_image_dir
    max_turns: int = 10  # questions per merged VQA record
    seed: int = 0
    val_fraction: float = 0.0
    val_out: Path | None = None  # default: <out stem>_val<suffix> beside --out
    image_root: Path | None = None  # absolute image paths are written relative to it
    progress: bool | None = None  # None: progress bars only on a terminal

    def __post_init__(self):
        if self.out.suffix not in RECORD_SUFFIXES:
            raise DataError(f"--out must end in .json or .jsonl, got {self.out}")
        if not (self.coco_captions or self.vqav2_questions or self.vqav2_annotations or self.qa_jsonl
                or self.llava_json):
            raise DataError("no input given; pass at least one of --coco-captions, --vqav2-questions with "
                            "--vqav2-annotations, --qa-jsonl, --llava-json")
        for flag, paths in (("--coco-captions", self.coco_captions), ("--vqav2-questions", self.vqav2_questions),
                            ("--vqav2-annotations", self.vqav2_annotations), ("--qa-jsonl", self.qa_jsonl),
                            ("--llava-json", self.llava_json)):
            for path in paths:
                if not path.is_file():
                    raise DataError(f"{flag} file not found: {path}")
        if len(self.vqav2_questions) != len(self.vqav2_annotations):
            raise DataError(f"{len(self.vqav2_questions)} --vqav2-questions files but "
                            f"{len(self.vqav2_annotations)} --vqav2-annotations files; pass them in pairs, in order")
        for dir_flag, dirs, files_flag, files in (
                ("--coco-image-dir", self.coco_image_dir, "--coco-captions", self.coco_captions),
                ("--qa-image-dir", self.qa_image_dir, "--qa-jsonl", self.qa_jsonl),
                ("--llava-image-dir", self.llava_image_dir, "--llava-json", self.llava_json)):
            if len(dirs) > 1 and len(dirs) != len(files):
                raise DataError(f"{dir_flag} given {len(dirs)} folders for {len(files)} {files_flag} files; "
                                f"give one for all files, or one per file in the same order")
        for flag, value in (("--captions-per-image", self.captions_per_image), ("--max-turns", self.max_turns)):
            if value < 1:
                raise DataError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        self._check_val_out()
        self._check_image_paths()

    def _check_val_out(self) -> None:
        if self.val_out is not None and self.val_fraction == 0:
            raise DataError("--val-out needs --val-fraction above 0")
        if self.val_fraction > 0 and self.val_out is None:
            self.val_out = self.out.with_name(f"{self.out.stem}_val{self.out.suffix}")
        if self.val_out is not None:
            if self.val_out.suffix not in RECORD_SUFFIXES:
                raise DataError(f"--val-out must end in .json or .jsonl, got {self.val_out}")
            if os.path.abspath(self.val_out) == os.path.abspath(self.out):
                raise DataError(f"--val-out and --out are the same file: {self.out}")

    def _check_image_paths(self) -> None:
        pattern = self.vqav2_image_pattern
        unknown = pattern_fields(pattern) - set(VQAV2_PATTERN_FIELDS)
        if unknown:
            raise DataError(f"--vqav2-image-pattern {pattern!r} uses {sorted(unknown)}; "
                            f"it may use only {{image_id}} and {{subtype}}")
        try:
            sample = pattern.format(image_id=1, subtype="train2014")
        except (ValueError, IndexError) as e:
            raise DataError(f"--vqav2-image-pattern {pattern!r} is not a str.format pattern: {e}") from None
        if self.image_root is not None and not self.image_root.is_dir():
            raise DataError(f"--image-root is not a folder: {self.image_root}")
        prefixes = [("--coco-image-dir", d) for d in self.coco_image_dir]
        prefixes += [("--qa-image-dir", d) for d in self.qa_image_dir]
        prefixes += [("--llava-image-dir", d) for d in self.llava_image_dir]
        for flag, prefix in prefixes + [("--vqav2-image-pattern", sample)]:
            if os.path.isabs(prefix):
                if self.image_root is None:
                    raise DataError(f"{flag} {prefix} is absolute; pass --image-root so records get paths "
                                    f"relative to it, or give {flag} relative to the image root")
                if image_path(prefix, "x.jpg", self.image_root) is None:
                    raise DataError(f"{flag} {prefix} is not inside --image-root {self.image_root}")


@dataclass
class BuildReport:
    """Records written per source and split, and every skip by reason (printed to stderr)."""

    out: Path
    val_out: Path | None
    sources: list[tuple[SourceLog, int, int]] = field(default_factory=list)  # (log, train records, val records)

    def format(self) -> str:
        train = sum(t for _, t, _ in self.sources)
        lines = [f"wrote {train} records to {self.out}"]
        if self.val_out is not None:
            lines.append(f"wrote {sum(v for _, _, v in self.sources)} validation records to {self.val_out}")
        for log, n_train, n_val in self.sources:
            split = f" + {n_val} validation" if self.val_out is not None else ""
            lines.append(f"  {log.label}: {n_train}{split} records from {log.read}")
            for reason, tally in log.skips.items():
                lines += [f"    skipped, {reason}: {tally.count}", *tally.lines("      ")]
        if train == 0:
            lines.append("warning: no training records were written")
        if self.val_out is not None and not any(v for _, _, v in self.sources):
            lines.append("warning: the validation split is empty; raise --val-fraction")
        return "\n".join(lines)


def build(cfg: BuildConfig) -> BuildReport:
    """Convert every input of `cfg` into LLaVA records, streaming them into --out (and --val-out)."""
    report = BuildReport(cfg.out, cfg.val_out)
    with ExitStack() as stack:
        train = stack.enter_context(RecordWriter(cfg.out))
        val = stack.enter_context(RecordWriter(cfg.val_out)) if cfg.val_out is not None else None
        for log, records in _sources(cfg):
            counts = [0, 0]
            for record in records:
                held_out = val is not None and in_validation(record, cfg.seed, cfg.val_fraction)
                (val if held_out else train).write(record)
                counts[held_out] += 1
            report.sources.append((log, *counts))
    return report


def split_key(record: dict) -> str:
    """What the train/validation split is decided on: the image (a COCO photo by its id), else the id."""
    image = record.get("image")
    if image is None:
        return f"text:{record['id']}"
    coco = COCO_FILE.search(image)
    return f"coco:{int(coco.group(1))}" if coco else f"image:{image}"


def in_validation(record: dict, seed: int, fraction: float) -> bool:
    """Whether the record is held out: a draw per split key, so an image is never on both sides."""
    return record_rng(seed, f"split-{split_key(record)}").random() < fraction


def _sources(cfg: BuildConfig) -> Iterator[tuple[SourceLog, Iterator[dict]]]:
    for i, path in enumerate(cfg.coco_captions):
        log = SourceLog(f"--coco-captions {path}")
        yield log, coco_caption_records(path, _folder(cfg.coco_image_dir, i), cfg.captions_per_image, cfg.seed,
                                        cfg.image_root, log, cfg.progress)
    for questions, answers_file in zip(cfg.vqav2_questions, cfg.vqav2_annotations):
        log = SourceLog(f"--vqav2-questions {questions}")
        yield log, vqav2_records(questions, answers_file, cfg.vqav2_image_pattern, cfg.max_turns, cfg.image_root,
                                 log, cfg.progress)
    for i, path in enumerate(cfg.qa_jsonl):
        log = SourceLog(f"--qa-jsonl {path}")
        yield log, qa_records(path, _folder(cfg.qa_image_dir, i), cfg.qa_short_answer, cfg.max_turns,
                              cfg.image_root, log, cfg.progress)
    for i, path in enumerate(cfg.llava_json):
        log = SourceLog(f"--llava-json {path}")
        yield log, llava_records(path, _folder(cfg.llava_image_dir, i), cfg.image_root, log, cfg.progress)


def _folder(folders: list[str], i: int) -> str:
    """The image folder of the i-th input file: one given for all files, or one per file."""
    if not folders:
        return ""
    return folders[i] if len(folders) > 1 else folders[0]


def parse_args(argv: list[str] | None = None) -> BuildConfig | CheckConfig:
    parser = argparse.ArgumentParser(prog="python -m finetune.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,check}")
    _add_build_flags(commands.add_parser(
        "build", help="convert datasets into one LLaVA-format file",
        description="Convert COCO captions, VQAv2, QA JSONL and LLaVA JSON into one LLaVA-format file. "
                    "Each input flag takes one or more files and may be repeated."))
    _add_check_flags(commands.add_parser(
        "check", help="report broken records, missing images and token lengths",
        description="Report missing or unreadable images, empty or non-alternating turns, unknown roles, "
                    "missing or duplicated <image>, and token lengths. Exits 1 when it finds errors."))
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    return BuildConfig(**args) if command == "build" else CheckConfig(**args)


def _add_build_flags(b: argparse.ArgumentParser) -> None:
    files = dict(type=Path, nargs="+", action="extend", default=[], metavar="FILE")
    folders = dict(nargs="+", action="extend", default=[], metavar="DIR")
    b.add_argument("--out", type=Path, required=True, metavar="FILE", help="output file: .json (a list) or .jsonl")
    b.add_argument("--coco-captions", **files, help="COCO captions annotation files (captions_*.json)")
    b.add_argument("--coco-image-dir", **folders,
                   help="folder of the COCO images relative to the image root (e.g. coco/train2017); "
                        "one for all --coco-captions files, or one per file")
    b.add_argument("--captions-per-image", type=int, default=1, metavar="N",
                   help="captions of an image (COCO has 5) that become separate records (default: %(default)s)")
    b.add_argument("--vqav2-questions", **files, help="VQAv2 questions files (v2_OpenEnded_mscoco_*_questions.json)")
    b.add_argument("--vqav2-annotations", **files,
                   help="VQAv2 annotation files (v2_mscoco_*_annotations.json), in the order of --vqav2-questions")
    b.add_argument("--vqav2-image-pattern", default=DEFAULT_VQAV2_PATTERN, metavar="PATTERN",
                   help="image path of a VQAv2 question, relative to the image root; {image_id} and {subtype} "
                        "(the questions file's data_subtype, e.g. train2014); for LLaVA-1.5's layout use "
                        "'coco/train2017/{image_id:012d}.jpg' (default: %(default)s)")
    b.add_argument("--qa-jsonl", **files, help='JSONL files of {"image", "question", "answer"} (GQA exports, ...)')
    b.add_argument("--qa-image-dir", **folders, help="folder the --qa-jsonl image paths are in, relative to the "
                                                     "image root; one for all files, or one per file")
    b.add_argument("--qa-short-answer", action=argparse.BooleanOptionalAction, default=True,
                   help="end --qa-jsonl questions with LLaVA-1.5's 'Answer the question using a single word or "
                        "phrase.' (default: on)")
    b.add_argument("--llava-json", **files, help="LLaVA-format .json/.jsonl files, validated and passed through")
    b.add_argument("--llava-image-dir", **folders,
                   help="folder the --llava-json image paths are in, relative to the image root (e.g. coco/train2017 "
                        "for LLaVA-Instruct-150K's bare file names); one for all files, or one per file")
    b.add_argument("--max-turns", type=int, default=10, metavar="N",
                   help="most questions about one image merged into one VQAv2/QA record; more are split "
                        "evenly over several records (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0,
                   help="seed of every random choice; same seed, same output (default: %(default)s)")
    b.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of images held out to --val-out; an image is never in both files "
                        "(default: 0, no validation file)")
    b.add_argument("--val-out", type=Path, default=None, metavar="FILE",
                   help="validation file (default: <out stem>_val<suffix> beside --out)")
    b.add_argument("--image-root", type=Path, default=None, metavar="DIR",
                   help="folder image paths are relative to; absolute image folders are rewritten relative to it")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: on a terminal only)")


def _add_check_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("file", type=Path, help="LLaVA-format .json or .jsonl file")
    c.add_argument("--image-root", type=Path, default=None, metavar="DIR",
                   help="folder the records' image paths are relative to")
    c.add_argument("--check-images", action=argparse.BooleanOptionalAction, default=True,
                   help="open every image with PIL (needs --image-root; default: on)")
    c.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="local tokenizer folder; token lengths are counted only with one")
    c.add_argument("--template", default="llava_v1",
                   help="mmchat template the lengths are counted with (default: %(default)s)")
    c.add_argument("--image-tokens", type=int, default=576, metavar="N",
                   help="tokens per image (default: %(default)s, CLIP ViT-L/14 at 336 px)")
    c.add_argument("--model", default=None, metavar="CKPT",
                   help="count lengths as this mmchat checkpoint (or LLaVA folder) sees them: its tokenizer, "
                        "template and image tokens, each image's own for AnyRes (instead of --tokenizer)")
    c.add_argument("--max-length", type=int, default=2048, metavar="N",
                   help="records with more tokens are listed (default: %(default)s, LLaVA-1.5's)")
    c.add_argument("--show", type=int, default=10, metavar="N",
                   help="record ids listed per kind of problem (default: %(default)s)")
    c.add_argument("--workers", type=int, default=8, metavar="N",
                   help="threads that open images (default: %(default)s)")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: on a terminal only)")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        if isinstance(cfg, BuildConfig):
            print(build(cfg).format(), file=sys.stderr)
            return 0
        report = check(cfg)
        print(report.format())
        return 1 if report.errors else 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
