"""LLaVA folders and hub ids passed where an mmchat checkpoint is expected (`--model`, `load_model`
users): converted once into `~/.cache/mmchat/converted` (`$MMCHAT_CACHE` overrides), then reused."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mmchat.checkpoint import is_checkpoint
from mmchat.convert.from_llava import to_mmchat

FORMAT_VERSION = 2
"""Part of every cache key: raise it when conversion changes what a checkpoint holds, so folders
converted before are converted again. 2: the folder's image processor, chat template and stop ids."""


def resolve_checkpoint(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """An mmchat checkpoint for `source`: itself, or a LLaVA folder / hub id converted once into a cache."""
    if is_checkpoint(source):
        return Path(source)
    cache = Path(cache_dir or os.environ.get("MMCHAT_CACHE", Path.home() / ".cache" / "mmchat")) / "converted"
    key = str(Path(source).resolve()) if Path(source).exists() else str(source)
    out = cache / (Path(key).name + "-" + hashlib.sha1(f"{key}@{FORMAT_VERSION}".encode()).hexdigest()[:10])
    if not is_checkpoint(out):
        to_mmchat(str(source), out)
    return out
