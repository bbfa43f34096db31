"""LLaVA-1.5-7B-shaped random weights built on the device itself and quantized there: no 13 GB on disk.

A llava-hf `LlavaForConditionalGeneration` is initialised on the device in the compute dtype, then
each linear layer of its LLM becomes bitsandbytes' NF4 (double quant), layer by layer, as
`BitsAndBytesConfig(load_in_4bit, nf4, double quant)` loads LLaVA: the tower, the projector and
lm_head stay unquantized. mmchat's `MultimodalModel` is assembled around the very same LLM modules
(`causal_lm`), so transformers' `generate` and mmchat answer from the same weights. Only the
tokenizer (trained here in seconds) and the tower's open_clip copy exist twice.

(transformers' own loader cannot do this: a weight missing from the folder is initialised after
the quantizer ran and stays an unquantized float tensor inside `Linear4bit`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.random_llava import LlavaShape, llava_config, train_tokenizer

LLAVA_7B = LlavaShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
                      vision_width=1024, vision_layers=24, image_size=336, patch=14)
"""llava-1.5-7b: LLaMA-2-7B (32 × 4096, MLP 11008, 32K vocabulary) and CLIP ViT-L/14-336 (576 image tokens)."""

DRY_RUN_SHAPE = LlavaShape(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=176, vocab=600,
                           vision_width=64, vision_layers=2, image_size=56, patch=14)
"""`--dry-run`'s: the same code at a size a CPU runs in seconds (16 image tokens)."""


@dataclass
class RandomLlava:
    llava: nn.Module
    """`LlavaForConditionalGeneration`, its LLM's linear layers NF4."""
    tokenizer: object
    lexicon: list[str]
    """The made-up words the tokenizer was trained on (questions are drawn from them)."""
    options: object
    """mmchat's `LoadOptions` the model matches: 4bit on `device`, its compute dtype."""


def quantize_nf4(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Every `nn.Linear` under `module` -> bitsandbytes `Linear4bit` (NF4, double quant, `compute_dtype`),
    quantized where its weight lies, one at a time (the peak is one layer above the quantized model).
    Returns how many were replaced."""
    import bitsandbytes as bnb

    linears = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, linear in linears:
        parent = module.get_submodule(name.rpartition(".")[0])
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q)._quantize(linear.weight.device)
        q.bias = linear.bias
        setattr(parent, name.rpartition(".")[2], q)
    return len(linears)


def build_random_llava(shape: LlavaShape, work: Path, device: str, seed: int = 0) -> RandomLlava:
    """A random llava-hf model of `shape` on `device`, its LLM in NF4 (the tokenizer is saved to work/tokenizer)."""
    from transformers import LlavaForConditionalGeneration

    from mmchat.model import LoadOptions

    options = LoadOptions("4bit", device)
    tokenizer, lexicon = train_tokenizer(work / "tokenizer", shape.vocab, seed)
    torch.manual_seed(seed)
    with torch.device(options.device):
        llava = LlavaForConditionalGeneration._from_config(llava_config(shape, tokenizer), dtype=options.compute_dtype)
    quantize_nf4(llava.model.language_model, options.compute_dtype)
    return RandomLlava(llava.eval().requires_grad_(False), tokenizer, lexicon, options)


def as_mmchat(built: RandomLlava) -> nn.Module:
    """mmchat's `MultimodalModel` around `built`'s LLM modules (shared, not copied), with the tower as
    mmchat converts llava-hf's (open_clip, float32) and the projector in the compute dtype."""
    from mmchat.config import ModelConfig, ProjectorConfig, VisionConfig
    from mmchat.convert.from_llava import causal_lm
    from mmchat.convert.towers import tower_from_hf
    from mmchat.model import MultimodalModel
    from mmchat.projector import build_projector

    llava, options = built.llava, built.options
    library, visual, _ = tower_from_hf(llava.model.vision_tower)
    hf_proj = llava.model.multi_modal_projector
    proj_cfg = ProjectorConfig("mlp2x_gelu", hf_proj.linear_1.in_features, hf_proj.linear_2.out_features)
    projector = build_projector(proj_cfg)
    projector.load_state_dict({"0.weight": hf_proj.linear_1.weight, "0.bias": hf_proj.linear_1.bias,
                               "2.weight": hf_proj.linear_2.weight, "2.bias": hf_proj.linear_2.bias})
    vision = VisionConfig(open_clip_model="random/vision_tower", pretrained=None, library=library,
                          image_size=llava.config.vision_config.image_size)
    config = ModelConfig(vision=vision, projector=proj_cfg, image_token_id=llava.config.image_token_index, stop_token_ids=[built.tokenizer.eos_token_id])
    llm = causal_lm(llava.config.text_config, llava.model.language_model, llava.lm_head)
    llm.is_loaded_in_4bit = True  # as transformers' quantizer marks it: peft then wraps Linear4bit layers
    return MultimodalModel(config, visual.to(options.device).float().eval(),
                           projector.to(options.device, options.compute_dtype).eval().requires_grad_(False),
                           llm.eval(), built.tokenizer)
