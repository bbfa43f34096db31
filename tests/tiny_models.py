"""Tiny random models and a locally trained tokenizer, built by the tests (no network)."""
from __future__ import annotations

from contextlib import contextmanager
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


# Tiny transformers CLIP tower matching TINY_CLIP_CFG's shape: 32 px, patch 8 -> 16 image tokens.
TINY_HF_CLIP_CFG = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu", "projection_dim": 16,
}
LLAVA_HF_VOCAB = 448  # the tokenizer's 400 + <image>, padded to a multiple of 64 as llava-hf's 32064


def build_llava_hf(out: Path, tokenizer_dir: Path, seed: int = 0):
    """A random tiny `LlavaForConditionalGeneration` saved with its processor, as llava-hf's folders are.

    Returns the model (eval mode) so tests can compare against it without reloading.
    """
    from transformers import (
        AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_HF_CLIP_CFG),
        text_config=llama_config(LLAVA_HF_VOCAB),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(out)
    return model


def build_original_llava(out: Path, llava, tokenizer_dir: Path, weights: str = "sharded") -> Path:
    """The same weights as a llava-hf model, in the original LLaVA layout (`LlavaLlamaForCausalLM`).

    LLaMA keys + `model.mm_projector.{0,2}.*`; the CLIP tower saved beside it as a transformers
    folder named by `mm_vision_tower`. `weights`: "sharded" (safetensors + index) or "bin".
    """
    import json

    from huggingface_hub import save_torch_state_dict
    from transformers import AutoTokenizer, CLIPImageProcessor

    out.mkdir(parents=True)
    clip_dir = out.parent / f"{out.name}-clip"
    llava.model.vision_tower.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    state = {f"model.{k}": v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    proj = llava.model.multi_modal_projector
    for i, layer in ((0, proj.linear_1), (2, proj.linear_2)):
        state[f"model.mm_projector.{i}.weight"] = layer.weight
        state[f"model.mm_projector.{i}.bias"] = layer.bias
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if weights == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_torch_state_dict(state, out, max_shard_size="200KB")
    config = llava.config.text_config.to_dict()
    config.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": str(clip_dir), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": llava.config.vision_config.hidden_size,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": 512,
    })
    (out / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (240, 220, 30)}


def build_colour_data(folder: Path, records: int = 32, text_only: int = 0, multi_turn: bool = False,
                      suffix: str = ".json") -> Path:
    """A learnable LLaVA-format set: solid-colour images, "What colour is it?" -> the colour's name.

    Writes `folder/images/*.png` and `folder/data{suffix}` (JSON list or JSONL); image paths are
    relative to `folder`. `text_only` records without an image are appended.
    """
    import json

    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 30), rgb).save(folder / "images" / f"{name}.png")
    names = list(COLOURS)
    out = []
    for i in range(records):
        colour = names[i % len(names)]
        turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]
        if multi_turn and i % 2:
            turns += [{"from": "human", "value": "Is it a square?"}, {"from": "gpt", "value": "yes"}]
        out.append({"id": f"c{i}", "image": f"images/{colour}.png", "conversations": turns})
    for i in range(text_only):
        out.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    path = folder / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in out))
    else:
        path.write_text(json.dumps(out, indent=1))
    return path


def build_trainable_checkpoint(out: Path, tokenizer_dir: Path, seed: int = 0, head_std: float = 0.2) -> Path:
    """A tiny checkpoint whose lm_head starts wide enough for LoRA training to drive the loss down.

    At the usual std 0.02, the frozen lm_head and norms cap every logit near 1, so any LoRA run
    plateaus near ln(vocab) - 1 whatever it learns.
    """
    from transformers import AutoModelForCausalLM

    build_checkpoint(out, tokenizer_dir, seed)
    llm = AutoModelForCausalLM.from_pretrained(out / "llm")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        llm.lm_head.weight.copy_(torch.randn(llm.lm_head.weight.shape, generator=generator) * head_std)
    llm.save_pretrained(out / "llm")
    return out


def tiny_train_config(name: str, **overrides):
    """`tests/configs/tiny-{name}.yaml` with `overrides`, as a TrainConfig."""
    from finetune.train_config import TrainConfig, load_yaml

    path = Path(__file__).resolve().parent / "configs" / f"tiny-{name}.yaml"
    return TrainConfig(**{**load_yaml(path), "progress": False, **overrides})


@contextmanager
def one_torch_thread():
    """Run tiny models on one thread: they gain nothing from more, and on a busy shared machine
    OpenMP's waiting threads make a tiny training run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def llava_hf_variant(folder: Path, out: Path, image_processor_config: dict | None = None,
                     eos_token_id: int | list[int] | None = None) -> Path:
    """A copy of a llava-hf folder with another image processor and/or generation stop ids.

    `image_processor_config` is written as the hub's flat `preprocessor_config.json` (the nested one
    in `processor_config.json` is dropped from the copy); `eos_token_id` goes into `generation_config.json`.
    """
    import json
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(folder, out)
    if image_processor_config is not None:
        processor = json.loads((out / "processor_config.json").read_text())
        del processor["image_processor"]
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
        (out / "preprocessor_config.json").write_text(json.dumps(image_processor_config, indent=2))
    if eos_token_id is not None:
        generation = GenerationConfig.from_pretrained(out)
        generation.eos_token_id = eos_token_id
        generation.save_pretrained(out)
    return out


def sample_photo(name: str = "grace_hopper"):
    """A real photo shipped inside an installed package: matplotlib's grace_hopper (512×600) or one of
    gradio's (cheetah 502×343, lion, tower 377×600): all larger than any test tower."""
    from matplotlib import cbook
    from PIL import Image

    if name == "grace_hopper":
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    import gradio

    with Image.open(Path(gradio.__file__).parent / "media_assets" / "images" / f"{name}.jpg") as image:
        return image.convert("RGB")


def assert_tiles_equal_the_processors(model, processor, picture) -> None:
    """A lone image's AnyRes tiles, from a converted checkpoint's processor and from mmchat.anyres (which
    AnyRes checkpoints mmchat trains use), equal `processor`'s (the default torchvision backend) to the bit."""
    from mmchat.anyres import preprocess_anyres

    theirs = processor.image_processor([picture], return_tensors="pt")["pixel_values"][0]
    assert model.processor is not None and torch.equal(model.pixels([picture], "tiles"), theirs)
    assert torch.equal(preprocess_anyres(picture, model.anyres)[0], theirs)


# -- the llava-hf zoo: one tiny folder per LLM family, written like the hub's -------------------

def build_chat_tokenizer(specials: list[str], bos: str | None, eos: str, byte_level: bool, adds_bos: bool,
                         corpus: list[str], vocab_size: int = 320, image_token: bool = True, word_level: bool = False):
    """A tiny BPE tokenizer in a family's style, with `<image>` added as llava-hf's tokenizers have it
    (`image_token=False`: none, as a fresh LLM's tokenizer).

    `byte_level`: Qwen2 / Llama-3's byte-level BPE (no unknown token); else sentencepiece-like (LLaMA,
    Mistral, Phi-3, Gemma: "▁" for spaces, a prefix space at the start, `<unk>`). `word_level`: neither,
    a whole-word vocabulary split on whitespace and punctuation (`<unk>` for the rest), decoded with
    spaces between words: a tokenizer no LLM type's default class can read. `adds_bos`: the
    tokenizer puts `bos` before every text (LLaMA's `add_bos_token`; Qwen has none).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if word_level:
        unk, splitter = "<unk>", pre_tokenizers.Whitespace()
        words = sorted({w for line in corpus for w, _ in splitter.pre_tokenize_str(line)})
        vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, unk, *(["<image>"] if image_token else []), *words]))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
        tok.pre_tokenizer, tok.decoder = splitter, decoders.WordPiece(prefix="##")
        tok.add_special_tokens([t for t in [*specials, *(["<image>"] if image_token else [])]])
    elif byte_level:
        tok, unk = Tokenizer(models.BPE()), None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        unk = "<unk>"
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    if not word_level:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*specials, *(["<image>"] if image_token else [])],
                                      initial_alphabet=alphabet, show_progress=False)
        tok.train_from_iterator(corpus, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, model_max_length=1024)


def build_llava_family(out: Path, text_config, tokenizer, chat_template: str, eos_token_id: int | list[int],
                       template_file: str = "chat_template.jinja", seed: int = 0):
    """A random tiny `LlavaForConditionalGeneration` around `text_config` (any causal LM config), saved
    with a `LlavaProcessor` (the hub's CLIPImageProcessor: shortest edge + centre crop, no pad), the
    tokenizer, `chat_template` and a generation config stopping at `eos_token_id`.

    `template_file`: where the folder's processor keeps its chat template, as hub folders do:
    `chat_template.jinja` (transformers 5), `chat_template.json` (the legacy file, llava-1.5's) or a
    `chat_template` key in `processor_config.json` (older processors). Returns the model (eval mode).
    """
    import json

    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text_config.vocab_size = -(-len(tokenizer) // 64) * 64  # padded, as llava-hf's 32064
    config = LlavaConfig(vision_config=CLIPVisionConfig(**TINY_HF_CLIP_CFG), text_config=text_config,
                         image_token_index=image_id, image_seq_length=16, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_token_id,
                                               pad_token_id=text_config.pad_token_id)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template if template_file == "chat_template.jinja" else None)
    processor.save_pretrained(out)
    if template_file == "chat_template.json":
        (out / template_file).write_text(json.dumps({"chat_template": chat_template}))
    elif template_file == "processor_config.json":
        saved = json.loads((out / template_file).read_text())
        (out / template_file).write_text(json.dumps({**saved, "chat_template": chat_template}, indent=2))
    return model


# Tiny SigLIP tower shaped like llava-interleave's (no CLS, tanh GELU, eps 1e-6, no pooling head):
# 32 px, patch 8 -> 16 image tokens with the `full` strategy.
TINY_HF_SIGLIP_CFG = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "image_size": 32, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}


def qwen2_config(vocab_size: int, hidden: int = 64, layers: int = 2):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )


def build_llava_hf_tower(out: Path, tokenizer_dir: Path, vision: str = "siglip", seed: int = 0, llm: str = "qwen2",
                         vision_overrides: dict | None = None, **llava_kwargs):
    """A random tiny llava-hf folder with a SigLIP (or CLIP) tower and its processor: SigLIP gets
    llava-interleave's settings (layer -1, `full`, a plain resize with mean/std 0.5), CLIP LLaVA-1.5's;
    `llava_kwargs` override LlavaConfig fields (vision_feature_layer, multimodal_projector_bias, ...).

    Returns the model (eval mode) so tests can compare against it without reloading.
    """
    from transformers import (
        AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor, SiglipImageProcessor, SiglipVisionConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    siglip = vision == "siglip"
    vision_config = (SiglipVisionConfig if siglip else CLIPVisionConfig)(
        **{**(TINY_HF_SIGLIP_CFG if siglip else TINY_HF_CLIP_CFG), **(vision_overrides or {})})
    settings = {"vision_feature_layer": -1 if siglip else -2, "vision_feature_select_strategy": "full" if siglip else "default",
                **llava_kwargs}
    config = LlavaConfig(
        vision_config=vision_config,
        text_config={"llama": llama_config, "qwen2": qwen2_config}[llm](LLAVA_HF_VOCAB),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        **settings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    if siglip:
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy=settings["vision_feature_select_strategy"],
                               num_additional_image_tokens=0 if siglip else 1)
    processor.save_pretrained(out)
    return model


def add_tuned_tower(original: Path, tower) -> Path:
    """Store `tower` (a transformers CLIPVisionModel) in an original-format LLaVA folder as a tuned tower:
    `model.vision_tower.vision_tower.vision_model.*` in a shard of its own, listed in the index."""
    import json

    from safetensors.torch import save_file

    state = {f"model.vision_tower.vision_tower.{k}": v.detach().clone().contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(original / "tuned-vision-tower.safetensors"), metadata={"format": "pt"})
    index_path = original / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: "tuned-vision-tower.safetensors" for k in state})
    index_path.write_text(json.dumps(index, indent=2))
    return original


# -- a new LLaVA from parts: a fresh Qwen2-like LLM and open_clip towers registered at test time ----

QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_qwen2_llm(out: Path, chat_template: str, seed: int = 0, head_std: float = 0.2) -> Path:
    """A random tiny Qwen2 folder as a fresh hub LLM is: byte-level BPE with ChatML's special tokens,
    EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS and no `<image>` token, `chat_template` in its tokenizer.
    lm_head starts wide (`head_std`) so LoRA can drive the loss down (see `build_trainable_checkpoint`)."""
    from transformers import Qwen2ForCausalLM

    lines = corpus() + ["system user assistant You are a helpful assistant. What colour is it? " + " ".join(COLOURS)]
    tokenizer = build_chat_tokenizer(list(QWEN2_SPECIALS), None, "<|im_end|>", byte_level=True, adds_bos=False,
                                     corpus=lines, vocab_size=400, image_token=False)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    config = qwen2_config(len(tokenizer))
    config.bos_token_id = None
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(config)
    with torch.no_grad():
        llm.lm_head.weight.normal_(0, head_std)
    llm.save_pretrained(out)
    return out


TINY_TIMM_VIT = "mmchat_tiny_siglip_vit"
"""A timm ViT shaped like SigLIP's trunk (no class token, `map` pooling), 32 px, patch 8 -> 16 patches."""
# open_clip configs shaped like the real ones: ViT-B-16-SigLIP (CustomTextCLIP around a timm trunk) and
# RN50 (ModifiedResNet), with tiny widths.
TINY_TEXT_CFG = {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
TINY_SIGLIP_CFG = {
    "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": {"image_size": 32, "timm_model_name": TINY_TIMM_VIT, "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {**TINY_TEXT_CFG, "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
}
TINY_RN_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
               "text_cfg": TINY_TEXT_CFG}
# What open_clip's pretrained tags say about preprocessing (open_clip.pretrained._slpcfg / _pcfg).
SIGLIP_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "squash"}
CLIP_PREPROCESS = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
                   "interpolation": "bicubic", "resize_mode": "shortest"}


def register_tiny_timm_vit() -> None:
    """Register `TINY_TIMM_VIT` with timm (once per process: timm's registry has no removal)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if TINY_TIMM_VIT in timm.list_models(TINY_TIMM_VIT):
        return

    def mmchat_tiny_siglip_vit(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm passes them to every model
            kwargs.pop(key, None)
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0,
                                 class_token=False, **kwargs)

    register_model(mmchat_tiny_siglip_vit)


def register_open_clip_tower(monkeypatch, name: str, model_cfg: dict, folder: Path, preprocess: dict,
                             tag: str = "tiny", seed: int = 0) -> Path:
    """Make `open_clip.create_model(name, pretrained=tag)` work offline, as for a real named tower:
    the config under `name`, random weights saved to `folder`, the tag naming that file and the
    preprocessing a real tag carries. Undone by `monkeypatch`. Returns the weights file."""
    import copy

    import open_clip
    from safetensors.torch import save_file

    register_tiny_timm_vit()
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, copy.deepcopy(model_cfg))
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {tag: {"file": str(weights), **preprocess}})
    return weights
