"""Conversion between mmchat checkpoints and LLaVA's formats.

    python -m mmchat.convert SRC DST                  # LLaVA folder or hub id -> mmchat checkpoint
    python -m mmchat.convert --to llava-hf SRC DST    # mmchat checkpoint -> LlavaForConditionalGeneration

`from_llava` reads llava-hf and original LLaVA folders (`original_next`: LLaVA-NeXT's own format),
`to_llava_hf` writes llava-hf folders (Llava, LlavaNext, LlavaOnevision),
`clip_weights` maps CLIP tensors between transformers and open_clip, `cache` converts a folder
passed as `--model` once, and `cli` is the command line.
"""
from mmchat.convert.cache import resolve_checkpoint
from mmchat.convert.common import ConvertError
from mmchat.convert.from_llava import to_mmchat
from mmchat.convert.to_llava_hf import to_llava_hf

__all__ = ["ConvertError", "resolve_checkpoint", "to_llava_hf", "to_mmchat"]
