"""What both directions of conversion share: the error users see, the destination rule, and the
one fact of naming that differs between mmchat and llava-hf (how image features are selected)."""
from __future__ import annotations

import sys
from pathlib import Path

# mmchat's `VisionConfig.select_feature` -> llava-hf's `vision_feature_select_strategy`
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}
MERGE_HINT = "merge the adapter first with `python -m finetune.merge`"


class ConvertError(ValueError):
    """A checkpoint or flag that cannot be converted; the message says which and what to do."""


def log(message: str) -> None:
    print(f"[convert] {message}", file=sys.stderr, flush=True)


def check_destination(dst: Path, overwrite: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"DST {dst} already exists; choose a new folder or pass --force to replace it")
    return dst
