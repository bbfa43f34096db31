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
from test_chat_templates import LLAMA_3
from test_next import build_next_folder, chat_as_transformers, images
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


@pytest.mark.parametrize("name", list(FAMILIES))
def test_next_family_answers_as_transformers_with_its_own_template(name, tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mmchat.model import LoadOptions, load_model

    config_class, template, specials, bos, eos, byte_level, adds_bos, stops = FAMILIES[name]
    tokenizer = build_chat_tokenizer(list(specials), bos, eos, byte_level, adds_bos, CORPUS)
    folder = build_next_folder(tmp_path / name, llm=config_class, tokenizer=tokenizer, template=template, stops=stops)
    llava = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    assert main([str(folder), str(tmp_path / "mmchat")]) == 0
    model = load_model(tmp_path / "mmchat", LoadOptions("32bit", "cpu"))
    assert model.config.template == "chat" and model.tokenizer.chat_template == template
    answers = chat_as_transformers(model, llava, AutoProcessor.from_pretrained(folder),
                                   [(QUESTIONS[0], images()["wide"]), (QUESTIONS[1], None)])
    assert all(answers)
