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


# llava-hf/llava-1.5-7b-hf's chat_template.json: answers marked with {% generation %} and closed by
# nothing (the model ends them with </s>); images before the text.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


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
    from transformers import LlavaForConditionalGeneration

    tokenizer, lexicon = train_tokenizer(out, shape.vocab, seed)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(llava_config(shape, tokenizer)).save_pretrained(out)
    return lexicon


def llava_config(shape: LlavaShape, tokenizer):
    """The `LlavaConfig` of `shape` (a LLaMA with the tokenizer's vocabulary, a CLIP tower; cheap: no weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

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
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       image_seq_length=(shape.image_size // shape.patch) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


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


# ------------------------------------------------------------------ llava-interleave-qwen-0.5b's shape

# llava-hf/llava-interleave-qwen-0.5b-hf's chat template (chat_template.json): ChatML, `<image>\n` for
# each image part before the text, answers read as content parts.
INTERLEAVE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Qwen's special tokens, ids 151643-151645 in the real tokenizer; `<image>` follows at 151646."""


@dataclass
class InterleaveShape:
    """llava-hf/llava-interleave-qwen-0.5b-hf's shapes (the defaults). Its LLM is Qwen1.5-0.5B-Chat
    (a `qwen2` model: 24 layers × 1024, 16 heads and 16 KV heads, MLP 2816, q/k/v biases, rope theta
    1e6, tied embeddings) with the vocabulary llava-hf's conversion gives it (151936 + `<image>`,
    padded to a multiple of 64: 152000); the tower is SigLIP so400m/14 at 384 px with its 26 blocks
    (the last block's output, `full` strategy: 27 × 27 = 729 image tokens); projector 1152 → 1024 → 1024.

    `regular_tokens`: the tokenizer's ordinary tokens before the specials (Qwen's 151643), so the
    specials and `<image>` get the real ids. Only a few thousand are BPE tokens that text is encoded
    with; the rest are fillers that nothing encodes to but that decode to text."""

    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    kv_heads: int = 16
    intermediate: int = 2816
    vocab: int = 152000
    regular_tokens: int = 151643
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    vision_width: int = 1152
    vision_intermediate: int = 4304
    vision_layers: int = 26
    vision_heads: int = 16
    image_size: int = 384
    patch: int = 14
    bpe_tokens: int = 3000
    """How many of `regular_tokens` are learnt BPE tokens (trained here on English chat text)."""

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def describe(self) -> str:
        return (f"Qwen2-architecture LLM {self.layers} layers × {self.hidden} ({self.heads} heads, {self.kv_heads} KV heads, "
                f"MLP {self.intermediate}, vocab {self.vocab}, {'tied' if self.tie_word_embeddings else 'untied'} "
                f"embeddings); SigLIP {self.vision_layers} blocks × {self.vision_width} (MLP {self.vision_intermediate}) "
                f"at {self.image_size} px / patch {self.patch} = {self.image_tokens} image tokens")


def interleave_config(shape: InterleaveShape):
    """The `LlavaConfig` of `shape`, as llava-interleave-qwen-0.5b-hf's config.json has it (cheap: no weights)."""
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    regular = shape.regular_tokens
    text = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768, rope_theta=shape.rope_theta, rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie_word_embeddings, bos_token_id=regular, eos_token_id=regular + 2,
    )
    vision = SiglipVisionConfig(
        hidden_size=shape.vision_width, intermediate_size=shape.vision_intermediate, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=shape.image_size, patch_size=shape.patch,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=regular + len(QWEN_SPECIALS),
                       image_seq_length=shape.image_tokens, vision_feature_layer=-1,
                       vision_feature_select_strategy="full", projector_hidden_act="gelu",
                       tie_word_embeddings=shape.tie_word_embeddings)


def english_corpus(rng: random.Random, n: int = 4000) -> list[str]:
    """Made-up chat text in plain English, for the byte-level BPE's merges."""
    subjects = ["the picture", "the image", "a red circle", "a blue square", "the photo", "the scene", "this object",
                "a small dog", "the person", "the table", "a white background", "the colours", "the shapes"]
    verbs = ["shows", "has", "is next to", "looks like", "contains", "is above", "is left of", "is behind"]
    questions = ["What is in the picture?", "What colour is the circle?", "Where is the square?", "Describe the image.",
                 "How many shapes are there?", "Is there anything else?", "What is shown in this photo?"]
    lines = []
    for _ in range(n):
        sentence = f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(subjects)}."
        lines.append(f"<|im_start|>user\n{rng.choice(questions)}<|im_end|>\n<|im_start|>assistant\n{sentence} "
                     f"It is {rng.randint(1, 99)} pixels wide, isn't it?")
    return lines


def build_byte_level_tokenizer(out: Path | None, regular_tokens: int, bpe_tokens: int, seed: int = 0):
    """A Qwen-like byte-level BPE with the real special ids: `bpe_tokens` merges learnt on English chat
    text, filled up to `regular_tokens` with filler words (" " + capital letters the corpus lacks, so
    they decode to text and encode back to themselves), then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and `<image>` (llava-hf's)."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmchat.templates import IMAGE_TOKEN

    rng = random.Random(seed)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(english_corpus(rng), trainers.BpeTrainer(
        vocab_size=bpe_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    saved = json.loads(trained.to_str())["model"]
    vocab = dict(saved["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved["merges"]]
    # Fillers: " " + 1-4 capital letters the corpus never has, each reachable by its own merges (the
    # word one letter shorter + the last letter), so a filler the model emits re-encodes to itself, as
    # a real tokenizer's tokens do, and a decoded answer is read back as the same tokens.
    letters = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if not any(c in line for line in english_corpus(random.Random(seed)))]
    words_by_length, space = [""], "Ġ"
    while len(vocab) < regular_tokens:
        words_by_length = [w + c for w in words_by_length for c in letters]
        for word in words_by_length:
            if len(vocab) >= regular_tokens:
                break
            vocab[space + word] = len(vocab)
            merges.append((space + word[:-1], word[-1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    assert fast.convert_tokens_to_ids(IMAGE_TOKEN) == regular_tokens + len(QWEN_SPECIALS)
    if out is not None:
        fast.save_pretrained(out)
    return fast


def build_llava_interleave(out: Path, shape: InterleaveShape, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> int:
    """Save a random llava-hf `LlavaForConditionalGeneration` of `shape` to `out`, as the hub's
    llava-interleave-qwen-0.5b-hf folder is laid out: weights (in `dtype`, bf16 as the hub's), a
    `LlavaProcessor` (SigLIP-style plain resize to the tower's size, mean/std 0.5, bicubic; the ChatML
    chat template), the tokenizer and a generation config stopping at `<|im_end|>`.
    Returns the number of parameters."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessor

    tokenizer = build_byte_level_tokenizer(None, shape.regular_tokens, shape.bpe_tokens, seed)
    config = interleave_config(shape)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.text_config.bos_token_id,
                                               eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    image_processor = SiglipImageProcessor(size={"height": shape.image_size, "width": shape.image_size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch,
                   vision_feature_select_strategy="full", num_additional_image_tokens=0,
                   chat_template=INTERLEAVE_CHAT_TEMPLATE).save_pretrained(out)
    return params
