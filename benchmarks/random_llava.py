"""A random-weight LLaVA in llava-hf format, shaped like a small real model, built offline.

The tokenizer is a byte-less BPE trained here on made-up words, so every id the random model
can emit decodes to text (the vocabulary is the tokenizer's size).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mmchat.templates import IMAGE_TOKEN

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass
class LlavaShape:
    """LLM and CLIP tower sizes (the defaults: SmolLM-135M's LLM shape, an 8k vocabulary,
    and a 4-block CLIP at 336 px / patch 14 = LLaVA-1.5's 576 image tokens)."""

    hidden: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    intermediate: int = 1536
    vocab: int = 8192
    vision_width: int = 256
    vision_layers: int = 4
    image_size: int = 336
    patch: int = 14

    def describe(self) -> str:
        return (f"LLaMA {self.layers} layers × {self.hidden} hidden ({self.heads} heads, {self.kv_heads} KV heads, "
                f"MLP {self.intermediate}, vocab {self.vocab}); CLIP ViT {self.vision_layers} blocks × "
                f"{self.vision_width} at {self.image_size} px / patch {self.patch} = "
                f"{(self.image_size // self.patch) ** 2} image tokens")


def words(rng: random.Random, n: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def train_tokenizer(out: Path, vocab: int, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lexicon = words(rng, 20000)
    corpus = [" ".join(rng.choice(lexicon) for _ in range(12)) + rng.choice([".", "?", "!", ","]) for _ in range(30000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab - 1, special_tokens=SPECIALS, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=4096)
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    fast.save_pretrained(out)
    return fast, lexicon


def build_llava_hf(out: Path, shape: LlavaShape, seed: int = 0) -> list[str]:
    """Save a random `LlavaForConditionalGeneration` + tokenizer to `out`; returns the word list."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer, lexicon = train_tokenizer(out, shape.vocab, seed)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_width, intermediate_size=4 * shape.vision_width, num_hidden_layers=shape.vision_layers,
        num_attention_heads=max(1, shape.vision_width // 64), image_size=shape.image_size, patch_size=shape.patch,
        hidden_act="quick_gelu", projection_dim=shape.vision_width,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(shape.image_size // shape.patch) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    return lexicon


def build_mmchat(out: Path, shape: LlavaShape, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random mmchat checkpoint (open_clip tower + mlp2x_gelu projector + LLaMA) to `out`.

    The LLM's vocabulary is `shape.vocab`, which may exceed the tokenizer's (for memory runs
    that feed random ids); `tokenizer_dir` is a tokenizer saved by `train_tokenizer`.
    """
    import open_clip
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mmchat.checkpoint import save_checkpoint
    from mmchat.config import ModelConfig, ProjectorConfig, VisionConfig
    from mmchat.projector import build_projector

    torch.manual_seed(seed)
    clip_cfg = {"embed_dim": shape.vision_width, "quick_gelu": True,
                "vision_cfg": {"image_size": shape.image_size, "layers": shape.vision_layers, "width": shape.vision_width,
                               "patch_size": shape.patch, "head_width": 64, "mlp_ratio": 4.0},
                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}}
    visual = open_clip.CLIP(**clip_cfg).visual
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False))
    config = ModelConfig(vision=VisionConfig(open_clip_model="random-vit", pretrained=None, image_size=shape.image_size),
                         projector=ProjectorConfig("mlp2x_gelu", shape.vision_width, shape.hidden))
    return save_checkpoint(out, config, build_projector(config.projector), AutoTokenizer.from_pretrained(tokenizer_dir),
                           llm=llm, vision=visual, vision_model_cfg=clip_cfg)
