"""The LLaVA-NeXT folders' own chat templates: llava-v1.6-mistral-7b-hf ([INST], no generation prompt, a
literal `<\\s>` after answers), llava-v1.6-34b-hf (Yi, ChatML) and llama3-llava-next-8b-hf (Llama-3
headers), each on a tiny random LlavaNext with its LLM family, answering as transformers does.

The templates are transformers' own for these checkpoints (`convert_llava_next_weights_to_hf.py` /
the hub's chat_template.json as published); the folder is tests/test_next.py's with another LLM and
tokenizer. Each family is asked two turns about the wide crop (one tiled image): the same ids, logits
within 1e-4 and the same 20 greedy tokens (tests/test_next.py `chat_as_transformers`).
"""
from __future__ import annotations

import pytest
import torch

from mmchat.convert.cli import main
from mmchat.templates import resolve_template
from test_chat_templates import LLAMA_3
from test_next import PINS, chat_as_transformers, images
from test_zoo import CORPUS, LLAMA_SPECIALS, QUESTIONS
from tiny_models import build_chat_tokenizer

MISTRAL = (  # llava-hf/llava-v1.6-mistral-7b-hf
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
YI = (  # llava-hf/llava-v1.6-34b-hf
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIALS = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# name: (LLM config class, template, specials, bos, eos, byte-level BPE, tokenizer adds BOS, stop tokens)
FAMILIES = {
    "mistral": ("MistralConfig", MISTRAL, LLAMA_SPECIALS, "<s>", "</s>", False, True, ["</s>"]),
    "yi-34b": ("LlamaConfig", YI, CHATML_SPECIALS, "<|startoftext|>", "<|im_end|>", False, False, ["<|im_end|>"]),
    "llama-3": ("LlamaConfig", LLAMA_3, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", True, False,
                ["<|end_of_text|>", "<|eot_id|>"]),
}


def build_family_folder(out, name: str, seed: int = 0):
    """tests/test_next.py's tiny LlavaNext folder with the family's LLM, tokenizer and chat template."""
    import transformers
    from transformers import (CLIPVisionConfig, GenerationConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    config_class, template, specials, bos, eos, byte_level, adds_bos, stops = FAMILIES[name]
    tokenizer = build_chat_tokenizer(list(specials), bos, eos, byte_level, adds_bos, CORPUS)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in stops]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.eos_token_id}
    text = getattr(transformers, config_class)(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, **ids)
    tower = CLIPVisionConfig(image_size=56, patch_size=7, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, projection_dim=16, hidden_act="quick_gelu")
    config = LlavaNextConfig(vision_config=tower, text_config=text, image_grid_pinpoints=PINS,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    llava = LlavaNextForConditionalGeneration(config).eval()
    llava.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.eos_token_id)
    llava.save_pretrained(out)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                              image_grid_pinpoints=PINS)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=template).save_pretrained(out)
    return out, llava


@pytest.mark.parametrize("name", list(FAMILIES))
def test_next_family_answers_as_transformers_with_its_own_template(name, tmp_path):
    from transformers import AutoProcessor

    from mmchat.model import LoadOptions, load_model

    folder, llava = build_family_folder(tmp_path / name, name)
    assert main([str(folder), str(tmp_path / "mmchat")]) == 0
    model = load_model(tmp_path / "mmchat", LoadOptions("32bit", "cpu"))
    assert model.config.template == "chat"
    template = resolve_template(model.config.template, model.tokenizer)
    answers = chat_as_transformers(model, llava, AutoProcessor.from_pretrained(folder),
                                   [(QUESTIONS[0], images()["wide"]), (QUESTIONS[1], None)])
    assert all(answers) and template is not None
