"""Tiny random models and a locally trained tokenizer, built by the tests (no network)."""
from __future__ import annotations

from pathlib import Path

import torch

from mmchat.templates import TEMPLATES

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # LLaMA's ids: unk 0, bos 1, eos 2

# Tiny open_clip CLIP: 32 px, patch 8 -> a 4x4 grid = 16 image tokens, QuickGELU like OpenAI's.
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}

WORDS = (
    "the a an is are what which where how many colour color shape circle square triangle red green blue "
    "yellow purple orange white black left right top bottom middle center there image picture photo "
    "describe tell me about this that and or yes no one two three four five it in on of with "
    "answer question using single word phrase please short caption concisely detail object objects"
)


def corpus() -> list[str]:
    lines = [t.system for t in TEMPLATES.values()]
    lines += ["USER: ASSISTANT: [INST] <<SYS>>\n\n<</SYS>>\n\n [/INST]", WORDS, WORDS.upper(), WORDS.title()]
    words = WORDS.split()
    for i in range(400):
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + "?\n.,!'-0123456789:;")
    return lines


def build_tokenizer(out: Path, vocab_size: int = 400):
    """A LLaMA-like BPE tokenizer (Metaspace, dummy prefix) saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=512,
    )
    fast.save_pretrained(out)
    return fast


def llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, max_positions: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )


def bloom_config(vocab_size: int, hidden: int = 64, layers: int = 2):
    from transformers import BloomConfig

    return BloomConfig(vocab_size=vocab_size, hidden_size=hidden, n_layer=layers, n_head=4,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def build_checkpoint(out: Path, tokenizer_dir: Path, seed: int = 0, projector_type: str = "mlp2x_gelu",
                     arch: str = "llama") -> Path:
    """A random tiny mmchat checkpoint: tiny CLIP (own weights) + projector + tiny LLaMA (or BLOOM)."""
    import open_clip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmchat.checkpoint import save_checkpoint
    from mmchat.config import ModelConfig, ProjectorConfig, VisionConfig
    from mmchat.projector import build_projector

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    visual = open_clip.CLIP(**TINY_CLIP_CFG).visual
    llm_config = {"llama": llama_config, "bloom": bloom_config}[arch](len(tokenizer))
    llm = AutoModelForCausalLM.from_config(llm_config)
    config = ModelConfig(
        vision=VisionConfig(open_clip_model="tiny-vit", pretrained=None, image_size=32),
        projector=ProjectorConfig(projector_type, in_dim=32, out_dim=64),
    )
    projector = build_projector(config.projector)
    return save_checkpoint(out, config, projector, tokenizer, llm=llm, vision=visual, vision_model_cfg=TINY_CLIP_CFG)
