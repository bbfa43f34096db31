"""LLaVA-format training records -> examples (`input_ids`, `labels`, `image_mask`, pixels).

Records are checked and indexed once up front: each is rendered by `mmchat.conversation.render`
(the one renderer, so labels can't drift from the tokens) to learn its length, and each image
is checked to exist (stat, no decoding). Images are read and preprocessed lazily, in DataLoader
workers. Records longer than `--max-length` are truncated and counted, never dropped.

An AnyRes (LLaVA-NeXT) model gives each image its own number of slots, from its size: the index
reads each image's size from its file header, and an example is the image's tiles
[1 + rows*cols, 3, S, S] with its (height, width), which the model packs into that many features.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from finetune.data.check import conversation_problems
from finetune.data.io import RECORD_SUFFIXES, BadLine, DataError, iter_records
from finetune.train_log import bar_disabled
from mmchat.anyres import AnyresSettings, Size, num_image_tokens
from mmchat.checkpoint import atomic_file
from mmchat.config import VisionConfig
from mmchat.conversation import IGNORE_INDEX, Rendered, messages_from_llava, render
from mmchat.image import ImageError, image_pixels, image_size, load_image
from mmchat.templates import Template

SHOWN = 5
"""Broken records / missing images named in an error message."""


@dataclass
class RecordStore:
    """Records as one UTF-8 buffer plus offsets.

    Forked DataLoader workers share it as is; a list of dicts would be copied into every worker
    page by page as reference counts change.
    """

    blob: np.ndarray  # uint8 [total bytes]
    offsets: np.ndarray  # int64 [records + 1]
    images: list[tuple[str, str]]
    """(record id, image path) of each record with an image, for the up-front existence check."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        return json.loads(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())


@dataclass
class RenderSettings:
    """How records become token ids: the model's tokenizer, template and image slot counts."""

    tokenizer: Any
    template: Template
    image_tokens: int
    image_token_id: int | None
    max_length: int
    anyres: AnyresSettings | None = None
    """An AnyRes model's tiling (`MultimodalModel.anyres`): each image its own slots, from its size."""

    def image_slots(self, sizes: Sequence[Size]) -> int | list[int]:
        """What `render` and `truncate` take for a record whose images have `sizes` (height, width):
        `image_tokens` for every image, or an AnyRes model's count of each. A record holds at most one
        image, and every AnyRes model tiles an image alone in its prompt (NeXT always, OneVision when
        alone), so this is `MultimodalModel.image_token_counts([image])` as a function of the size."""
        if self.anyres is None:
            return self.image_tokens
        assert len(sizes) <= 1, "LLaVA records hold one image"
        return [num_image_tokens(size, self.anyres) for size in sizes]


@dataclass
class DataIndex:
    """Per record, from rendering every record once."""

    full_lengths: np.ndarray  # int32: rendered tokens, image slots included
    lengths: np.ndarray  # int32: as trained, at most max_length
    answer_tokens: np.ndarray  # int32: labelled tokens left after truncation


def record_id(record, position: int) -> str:
    return str(record["id"]) if isinstance(record, dict) and record.get("id") is not None else f"#{position}"


def read_records(path: Path, progress: bool | None = None) -> RecordStore:
    """Every record of a LLaVA JSON list or JSONL file; broken records are a DataError listing them."""
    if not path.is_file():
        raise DataError(f"--data {path}: file not found")
    if path.suffix not in RECORD_SUFFIXES:
        raise DataError(f"--data {path}: expected a .json (list of records) or .jsonl file")
    buf, offsets, images, bad = bytearray(), [0], [], []
    for position, record in iter_records(path, f"read {path.name}", progress):
        problems = [("invalid JSON", record.error)] if isinstance(record, BadLine) else conversation_problems(record)
        rid = record_id(record, position)
        if problems:
            bad.append(f"{rid}: " + "; ".join(f"{kind} ({detail})" for kind, detail in problems))
            continue
        buf += json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        offsets.append(len(buf))
        if record.get("image"):
            images.append((rid, record["image"]))
    if bad:
        raise DataError("\n  ".join([f"--data {path}: {len(bad)} broken record(s):", *_shown(bad),
                                     f"fix or remove them; `python -m finetune.data check {path}` reports all of them"]))
    if len(offsets) == 1:
        raise DataError(f"--data {path} holds no records; expected a JSON list (or JSONL) of LLaVA records")
    return RecordStore(np.frombuffer(bytes(buf), dtype=np.uint8), np.asarray(offsets, dtype=np.int64), images)


def check_images(store: RecordStore, image_root: Path | None, progress: bool | None = None) -> None:
    """Every record's image file exists (stat only); the error names records and --image-root."""
    if not store.images:
        return
    rid, first = store.images[0]
    if image_root is None and not Path(first).is_absolute():
        raise DataError(f"record {rid} has the image {first!r} but --image-root is not set; "
                        "pass the folder that image paths are relative to")
    if image_root is not None and not image_root.is_dir():
        raise DataError(f"--image-root {image_root} is not a folder")
    root = image_root or Path("/")
    missing = [f"record {rid}: {root / image}" for rid, image in
               tqdm(store.images, desc="check images", unit="img", disable=bar_disabled(progress), leave=False)
               if not os.path.isfile(root / image)]
    if len(missing) == len(store.images):
        raise DataError(f"none of the {len(store.images)} images exist under --image-root {image_root} "
                        f"(record {rid} wants {root / first}); check --image-root")
    if missing:
        raise DataError("\n  ".join([f"{len(missing)} of {len(store.images)} images are missing under "
                                     f"--image-root {image_root}:", *_shown(missing),
                                     "fix --image-root, or remove those records"]))


def _shown(lines: list[str]) -> list[str]:
    return lines[:SHOWN] + ([f"... and {len(lines) - SHOWN} more"] if len(lines) > SHOWN else [])


def render_record(record: dict, settings: RenderSettings, sizes: Sequence[Size] = ()) -> Rendered:
    """One record rendered by mmchat's renderer, before truncation; `sizes`: its image's (height,
    width), which an AnyRes model's slot count needs."""
    messages = messages_from_llava(record["conversations"])
    return render(messages, settings.template, settings.tokenizer, settings.image_slots(sizes),
                  image_token_id=settings.image_token_id)


def truncate(rendered: Rendered, max_length: int, image_tokens: int | Sequence[int]) -> Rendered:
    """The first `max_length` positions; an image whose slots would be cut goes whole.

    `image_tokens` is what `render` was given: one count for every image, or each image's in order.
    """
    if len(rendered) <= max_length:
        return rendered
    partial = sum(rendered.image_mask[:max_length])  # slots before the cut, less those of whole images
    if isinstance(image_tokens, Integral):
        partial %= int(image_tokens)
    else:
        for count in image_tokens:
            if partial < count:
                break
            partial -= count
    cut = max_length - partial  # a partial image span ends at the cut
    return Rendered(rendered.input_ids[:cut], rendered.labels[:cut], rendered.image_mask[:cut])


class _IndexEntries(Dataset):
    """(full length, trained length, answer tokens) of record i, for DataLoader workers to compute."""

    def __init__(self, store: RecordStore, settings: RenderSettings, image_root: Path | None):
        self.store, self.settings, self.image_root = store, settings, image_root

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        record = self.store[i]
        sizes = []
        if self.settings.anyres is not None and record.get("image"):
            try:
                sizes.append(image_size((self.image_root or Path("/")) / record["image"]))
            except ImageError as e:
                raise DataError(f"record {record_id(record, i + 1)}: {e} (--image-root {self.image_root})") from None
        rendered = render_record(record, self.settings, sizes)
        short = truncate(rendered, self.settings.max_length, self.settings.image_slots(sizes))
        return len(rendered), len(short), sum(label != IGNORE_INDEX for label in short.labels)


def _as_table(rows: list[tuple[int, int, int]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int32).reshape(-1, 3)


def build_index(store: RecordStore, settings: RenderSettings, progress: bool | None = None,
                workers: int = 0, image_root: Path | None = None) -> DataIndex:
    """Render every record once for its length (tokenisation only; no image is decoded: an AnyRes
    model's slot counts take each image's size from its file header, under `image_root`).

    LLaVA-665K takes minutes on one core, so `workers` processes share the work (the store is
    inherited, not copied) when there are enough records to pay for starting them.
    """
    from torch.utils.data import DataLoader

    entries = _IndexEntries(store, settings, image_root)
    loader = DataLoader(entries, batch_size=1024, num_workers=workers if len(store) > 20_000 else 0,
                        collate_fn=_as_table)
    bar = tqdm(total=len(store), desc="tokenise", unit="rec", disable=bar_disabled(progress), leave=False)
    with bar:
        rows = []
        for chunk in loader:
            rows.append(chunk)
            bar.update(len(chunk))
    table = np.concatenate(rows)
    return DataIndex(table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy())


def load_or_build_index(store: RecordStore, settings: RenderSettings, cache: Path, fingerprint: str,
                        progress: bool | None = None, workers: int = 0, image_root: Path | None = None) -> DataIndex:
    """The index from `cache` when it was built with the same `fingerprint`, else built and cached."""
    if cache.is_file():
        with np.load(cache) as saved:
            if str(saved["fingerprint"]) == fingerprint and len(saved["lengths"]) == len(store):
                return DataIndex(saved["full_lengths"], saved["lengths"], saved["answer_tokens"])
    index = build_index(store, settings, progress, workers, image_root)
    with atomic_file(cache) as tmp:
        np.savez(tmp, fingerprint=np.array(fingerprint), full_lengths=index.full_lengths, lengths=index.lengths,
                 answer_tokens=index.answer_tokens)
    return index


class LlavaDataset(Dataset):
    """Examples for training: input_ids, labels, image_mask [L] and pixel_values [1, 3, S, S] or None
    (an AnyRes model: the image's tiles [1 + rows*cols, 3, S, S] and its image_size [2], height and
    width); or {"error": message} for an unreadable image (raised by the training loop, so the user
    sees one line instead of a worker traceback)."""

    def __init__(self, store: RecordStore, settings: RenderSettings, vision: VisionConfig, image_root: Path | None,
                 image_processor=None):
        self.store = store
        self.settings = settings
        self.vision = vision
        self.image_root = image_root
        self.image_processor = image_processor
        """A converted folder's image processor (`MultimodalModel.processor`): pixels as in chat; None: mmchat's own."""

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        record, anyres = self.store[i], self.settings.anyres
        try:
            image = self._image(record) if anyres is not None and record.get("image") else None  # sized first
            sizes = [] if image is None else [(image.height, image.width)]
            rendered = truncate(render_record(record, self.settings, sizes), self.settings.max_length,
                                self.settings.image_slots(sizes))
            example = {"pixel_values": None}
            if sum(rendered.image_mask) and anyres is not None:
                pixels = image_pixels([image], "tiles", self.vision, anyres, self.image_processor)
                example = {"pixel_values": pixels, "image_size": torch.tensor(sizes[0])}  # [1 + rows*cols, 3, S, S], [2]
            elif sum(rendered.image_mask):
                # [1, 3, S, S]
                example["pixel_values"] = image_pixels([self._image(record)], "square", self.vision, None, self.image_processor)
        except ImageError as e:
            return {"error": f"record {record_id(record, i + 1)}: {e} (--image-root {self.image_root})"}
        return {
            "input_ids": torch.tensor(rendered.input_ids, dtype=torch.long),  # [L]
            "labels": torch.tensor(rendered.labels, dtype=torch.long),  # [L]
            "image_mask": torch.tensor(rendered.image_mask, dtype=torch.bool),  # [L]
            **example,
        }

    def _image(self, record: dict) -> Image.Image:
        return load_image((self.image_root or Path("/")) / record["image"])
