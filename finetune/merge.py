"""`python -m finetune.merge`: fold a LoRA adapter into its base LLM; write a standalone checkpoint.

    python -m finetune.merge --model runs/instruct --out runs/instruct-merged             # bf16
    python -m finetune.merge --model runs/instruct --out merged --dtype fp32 --device cpu
    python -m mmchat.convert runs/instruct-merged runs/instruct-hf --to llava-hf           # then export

The base model is loaded again un-quantised (16- or 32-bit) for the merge: folding the update
into 4-bit weights would round most of it away, and PEFT cannot merge into them reliably.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.build import vision_model_cfg
from mmchat.checkpoint import LLM_DIR, read_config, read_projector_state, resolve_path, save_checkpoint
from mmchat.model import LoadOptions, add_image_newline, checkpoint_tokenizer, load_llm
from mmchat.projector import build_projector
from mmchat.vision import load_vision_tower

DTYPES = {"bf16": "16bit", "fp32": "32bit"}


class MergeError(ValueError):
    """A checkpoint or flag that cannot be merged; the message says which and what to do."""


@dataclass
class MergeArgs:
    model: Path
    """An mmchat checkpoint with a LoRA adapter (the output of `python -m finetune.qlora`)."""
    out: Path
    """The standalone checkpoint to write; it must not exist unless --force."""
    dtype: str = "bf16"
    """Weights of the merged LLM: bf16, or fp32 (exact, twice the size; handy on CPU)."""
    device: str = "cpu"
    """Where to merge: cpu, or cuda (faster; needs room for the 16-bit model)."""
    force: bool = False
    """Replace an existing --out (swapped out only once the new folder is complete)."""

    def __post_init__(self) -> None:
        self.model, self.out = Path(self.model), Path(self.out)
        if self.dtype not in DTYPES:
            raise MergeError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.out.exists() and not self.force:
            raise MergeError(f"--out {self.out} exists; choose another folder or pass --force to replace it")
        if self.out.resolve() == self.model.resolve():
            raise MergeError("--out must differ from --model")


def merge(args: MergeArgs) -> Path:
    """Base LLM (un-quantised) + adapter -> merged LLM, saved with the projector, tokenizer and vision."""
    src = args.model
    config = read_config(src)
    if not config.adapter:
        raise MergeError(f"{src} has no LoRA adapter to merge (its mmchat.json names none); it is standalone already")
    llm = load_llm(resolve_path(src, config.llm), LoadOptions(DTYPES[args.dtype], args.device),
                   adapter=resolve_path(src, config.adapter))
    llm = llm.merge_and_unload()
    projector = build_projector(config.projector)
    if config.vision.anyres is not None:  # an AnyRes model's image_newline is saved with the projector
        add_image_newline(projector, config.projector.out_dim)
    projector.load_state_dict(read_projector_state(src))
    own_vision = config.vision.pretrained is None
    merged = copy.deepcopy(config)
    merged.llm, merged.tokenizer, merged.adapter = LLM_DIR, LLM_DIR, None
    tokenizer, processor = checkpoint_tokenizer(src, config)
    return save_checkpoint(
        args.out, merged, projector, tokenizer, llm=llm, processor=processor,
        vision=load_vision_tower(config.vision, src) if own_vision else None,
        vision_model_cfg=vision_model_cfg(src) if own_vision else None,
    )


def parse_args(argv: list[str] | None = None) -> MergeArgs:
    p = argparse.ArgumentParser(prog="python -m finetune.merge", description="Merge a LoRA adapter into its base LLM.")
    p.add_argument("--model", required=True, help="mmchat checkpoint with an adapter (a finetune.qlora output)")
    p.add_argument("--out", required=True, help="the standalone checkpoint folder to write")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="merged weights (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    return MergeArgs(a.model, a.out, a.dtype, a.device, a.force)


def main(argv: list[str] | None = None) -> int:
    try:
        out = merge(parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[merge] wrote {out} (python -m mmchat.cli --model {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
