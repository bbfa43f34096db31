"""Streaming JSON / JSONL reading and writing for `finetune.data`, and the tallies its reports print.

Annotation files hold hundreds of thousands of records in one JSON object; they are read with
`ijson` item by item, never loaded whole, behind a byte-count progress bar on stderr.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson
from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

from mmchat.checkpoint import atomic_file

RECORD_SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """A problem with the user's input that stops the command; printed as one `error:` line."""


@dataclass
class Tally:
    """How often something happened, with the first few examples (record ids) of it."""

    limit: int = 5
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, item: str) -> None:
        self.count += 1
        if len(self.examples) < self.limit:
            self.examples.append(item)

    def lines(self, indent: str) -> list[str]:
        """The examples, one per line, then how many more there were."""
        out = [indent + item for item in self.examples]
        if self.count > len(self.examples):
            out.append(f"{indent}... and {self.count - len(self.examples)} more")
        return out


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def example(record_id: str, detail: str = "") -> str:
    """How a report names one record: its id, then what is wrong with it."""
    return f"{record_id}: {detail}" if detail else record_id


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that does not parse; yielded in place of the record so callers can report it."""

    error: str


def _byte_bar(path: Path, desc: str, progress: bool | None) -> tqdm:
    """A progress bar over the bytes of `path`; `progress` None leaves it to tqdm (terminal only)."""
    return tqdm(total=path.stat().st_size, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=None if progress is None else not progress, leave=False)


def iter_json_array(path: Path, prefix: str, desc: str, progress: bool | None) -> Iterator[Any]:
    """Stream the items of the JSON array at `prefix` (ijson syntax, e.g. "annotations.item")."""
    with open(path, "rb") as f, _byte_bar(path, desc, progress) as bar:
        try:
            yield from ijson.items(CallbackIOWrapper(bar.update, f, "read"), prefix, use_float=True)
        except ijson.JSONError as e:
            raise DataError(f"{path} is not valid JSON: {_first_line(e)}") from None


def first_json_value(path: Path, prefix: str) -> Any:
    """The first value at `prefix` (e.g. a top-level "data_subtype"), None if there is none."""
    with open(path, "rb") as f:
        try:
            return next(ijson.items(f, prefix, use_float=True), None)
        except ijson.JSONError as e:
            raise DataError(f"{path} is not valid JSON: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    # yajl's messages go on to draw an arrow under the bad byte, over several lines.
    return str(error).strip().splitlines()[0]


def iter_jsonl(path: Path, desc: str, progress: bool | None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or BadLine) for each non-blank line."""
    with open(path, "rb") as f, _byte_bar(path, desc, progress) as bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield lineno, BadLine(str(e))


def iter_records(path: Path, desc: str, progress: bool | None) -> Iterator[tuple[int, Any]]:
    """(position, record) of a LLaVA-format file: a JSON list, or JSONL (then position = line)."""
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, desc, progress)
    else:
        yield from enumerate(iter_json_array(path, "item", desc, progress), 1)


class RecordWriter:
    """Writes records to .json (one list, a record per line) or .jsonl, atomically.

    The output appears under its name only once complete, so a failed or interrupted build
    never leaves a truncated file that looks finished.
    """

    def __init__(self, path: Path):
        assert path.suffix in RECORD_SUFFIXES, path
        self.path = path
        self.count = 0
        self._target = atomic_file(path)
        self._file: IO[str] | None = None

    def __enter__(self) -> RecordWriter:
        self._file = open(self._target.__enter__(), "w", encoding="utf-8")
        if self.path.suffix == ".json":
            self._file.write("[")
        return self

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        if self.path.suffix == ".json":
            line = ("\n" if self.count == 0 else ",\n") + line
        else:
            line += "\n"
        self._file.write(line)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.suffix == ".json":
            self._file.write("\n]\n" if self.count else "]\n")
        self._file.close()
        self._target.__exit__(exc_type, exc, tb)  # renamed into place, or deleted on error
