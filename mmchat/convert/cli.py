"""`python -m mmchat.convert` (or `mmchat-convert`): LLaVA -> mmchat, and mmchat -> llava-hf.

    python -m mmchat.convert SRC DST                  # LLaVA folder or hub id -> mmchat checkpoint
    python -m mmchat.convert --to llava-hf SRC DST    # mmchat checkpoint -> LlavaForConditionalGeneration
                                                      # (AnyRes: LlavaNext, or LlavaOnevision with anyres_max_N)

SRC's format is detected from its config.json:
  llava-hf   what `LlavaForConditionalGeneration.save_pretrained` writes (`model_type: llava`,
             `text_config`, `vision_config`); loaded through transformers, which renames its keys.
  original   LLaVA's own `LlavaLlamaForCausalLM` (`mm_vision_tower`, `mm_projector_type`, ...): LLaMA
             weights plus `model.mm_projector.*`; the CLIP tower is named, not included. LLaVA-NeXT's
             (`image_aspect_ratio: anyres`, also `LlavaMistralForCausalLM`) adds its pinpoints and
             `model.image_newline`, tiled as transformers' LlavaNext.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mmchat.convert.clip_weights import UnsupportedTower
from mmchat.convert.common import ConvertError, log
from mmchat.convert.from_llava import to_mmchat
from mmchat.convert.to_llava_hf import to_llava_hf
from mmchat.templates import TEMPLATE_NAMES

TARGETS = ("mmchat", "llava-hf")


@dataclass
class ConvertArgs:
    src: str
    """A LLaVA folder or hub id (llava-hf or original format); with `--to llava-hf`, an mmchat checkpoint."""
    dst: Path
    """The folder to write; it must not exist unless --force."""
    to: str = "mmchat"
    """`mmchat` (from LLaVA) or `llava-hf` (from mmchat, for transformers / vLLM / SGLang / TGI: Llava, or for an
    AnyRes checkpoint LlavaNext / LlavaOnevision)."""
    vision_tower: str | None = None
    """Original-format LLaVA only: use this CLIP instead of `mm_vision_tower`, as an open_clip
    `NAME/TAG` (e.g. `ViT-L-14-336/openai`) or a local transformers CLIP folder."""
    force: bool = False
    """Replace an existing DST (it is swapped out only once the new folder is complete)."""
    pad: bool | None = None
    """Pad images to square (LLaVA-1.5's `image_aspect_ratio: pad`) or not, whatever SRC says; None
    follows SRC: a llava-hf folder's image processor `do_pad`, original LLaVA's `image_aspect_ratio`."""
    template: str | None = None
    """The prompt template (`llava_v1`, `vicuna_v1`, `llama_2`, `plain`, `chat`); None: `chat` (the
    folder's own chat template, as transformers renders it) when SRC has one, else `llava_v1`."""
    image_backend: str | None = None
    """llava-hf folders: load their image processor with this backend, `torchvision` or `pil` (LLaVA's own
    pixels; what vLLM gives with `--mm-processor-kwargs '{"backend": "pil"}'`); None: transformers' default,
    as `AutoProcessor.from_pretrained(SRC)` (torchvision where it is installed)."""

    def __post_init__(self) -> None:
        self.dst = Path(self.dst)
        if self.to not in TARGETS:
            raise ConvertError(f"--to {self.to!r}: choose one of {', '.join(TARGETS)}")
        if self.to == "llava-hf" and self.vision_tower:
            raise ConvertError("Can't combine --vision-tower with --to llava-hf: the mmchat checkpoint already names its tower.")
        if self.to == "llava-hf" and self.pad is not None:
            raise ConvertError("Can't combine --pad/--no-pad with --to llava-hf: the mmchat checkpoint's vision.pad_to_square is exported as do_pad.")
        if self.to == "llava-hf" and self.template is not None:
            raise ConvertError("Can't combine --template with --to llava-hf: the mmchat checkpoint's template is exported as its chat template.")
        if self.to == "llava-hf" and self.image_backend is not None:
            raise ConvertError("Can't combine --image-backend with --to llava-hf: the export's processor loads with "
                               "whatever backend its user picks.")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise ConvertError(f"--template {self.template!r}: choose one of {', '.join(TEMPLATE_NAMES)}")


def parse_args(argv: list[str] | None = None) -> ConvertArgs:
    parser = argparse.ArgumentParser(prog="python -m mmchat.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a LLaVA folder or hub id (llava-hf or original); an mmchat checkpoint with --to llava-hf")
    parser.add_argument("dst", type=Path, help="the folder to write (must not exist unless --force)")
    parser.add_argument("--to", choices=TARGETS, default="mmchat", help="target format (default: mmchat)")
    parser.add_argument("--vision-tower", help="original LLaVA only: open_clip NAME/TAG or a local transformers CLIP folder, instead of mm_vision_tower")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--pad", action=argparse.BooleanOptionalAction, default=None,
                        help="pad images to square (or not) whatever SRC says; default: a llava-hf folder's do_pad, original LLaVA's image_aspect_ratio")
    parser.add_argument("--template", choices=TEMPLATE_NAMES,
                        help="prompt template; default: chat (SRC's own chat template) when SRC has one, else llava_v1")
    parser.add_argument("--image-backend", choices=("torchvision", "pil"),
                        help="llava-hf only: the image processor's backend; default: transformers' (torchvision when installed)")
    ns = parser.parse_args(argv)
    return ConvertArgs(src=ns.src, dst=ns.dst, to=ns.to, vision_tower=ns.vision_tower, force=ns.force, pad=ns.pad,
                       template=ns.template, image_backend=ns.image_backend)


def convert(args: ConvertArgs) -> Path:
    if args.to == "llava-hf":
        return to_llava_hf(Path(args.src), args.dst, overwrite=args.force)
    return to_mmchat(args.src, args.dst, vision_tower=args.vision_tower, overwrite=args.force, pad=args.pad,
                     template=args.template, image_backend=args.image_backend)


@contextmanager
def quiet_transformers():
    """transformers' load reports list the mm_* keys skipped on purpose (what matters is checked);
    its verbosity is put back afterwards, so a notebook calling `main` keeps its own."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> int:
    try:
        with quiet_transformers():
            out = convert(parse_args(argv))
    except (ConvertError, UnsupportedTower) as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    log(f"done: {out}")
    return 0
