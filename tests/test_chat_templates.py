"""The `chat` template: the tokenizer's own Jinja chat template through mmchat's one renderer.

Golden strings and token-level masks for templates written like the real ones (Qwen2's ChatML,
Llama-3, Gemma, Phi-3), adapted to write `<image>` for image parts as llava-hf's templates do.
Tiny tokenizers are trained here; ids are compared with transformers' own tokenisation.
"""
import pytest

from mmchat.conversation import IGNORE_INDEX, Message, render
from mmchat.templates import IMAGE_TOKEN, check_template_name, chat_text, get_template, resolve_template

CONV = [
    Message("user", "What colour is the circle?", images=1),
    Message("assistant", "Red."),
    Message("user", "And the square?"),
    Message("assistant", "It is blue."),
]

# Each template reads a user message as parts (images first) or a string, as llava-hf's do.
_USER_PARTS = ("{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
               "{% endfor %}{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
               "{{ part['text'] }}{% endfor %}")

CHATML = (  # Qwen2-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + _USER_PARTS + "{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA_3 = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}" + _USER_PARTS + "{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (  # gemma-2-it; images without a newline after them (PaliGemma's layout)
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
PHI_3 = (  # Phi-3-mini-4k-instruct: it closes a finished conversation with EOS
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' }}" + _USER_PARTS + "{{ '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
LLAVA_INTERLEAVE_QWEN = (  # llava-hf/llava-interleave-qwen-0.5b-hf: answers are parts too
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# name: (Jinja, byte-level BPE?, special tokens, bos, eos, does the tokenizer add BOS?, end of turn)
STYLES = {
    "chatml": (CHATML, True, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", False, "<|im_end|>"),
    "llama_3": (LLAMA_3, True, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True, "<|eot_id|>"),
    "gemma": (GEMMA, False, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              True, "<end_of_turn>"),
    "phi_3": (PHI_3, False, ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                             "<|end|>"], "<s>", "<|endoftext|>", True, "<|end|>"),
}

GOLDEN = {
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\nIt is blue.<|im_end|>\n"
    ),
    "llama_3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is blue.<|eot_id|>"
    ),
    "gemma": (
        "<bos><start_of_turn>user\n<image>What colour is the circle?<end_of_turn>\n<start_of_turn>model\nRed.<end_of_turn>\n"
        "<start_of_turn>user\nAnd the square?<end_of_turn>\n<start_of_turn>model\nIt is blue.<end_of_turn>\n"
    ),
    "phi_3": (
        "<|user|>\n<image>\nWhat colour is the circle?<|end|>\n<|assistant|>\nRed.<|end|>\n"
        "<|user|>\nAnd the square?<|end|>\n<|assistant|>\nIt is blue.<|end|>\n<|endoftext|>"
    ),
}
GENERATION_PROMPT = {"chatml": "<|im_start|>assistant\n", "llama_3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "gemma": "<start_of_turn>model\n", "phi_3": "<|assistant|>\n"}

CORPUS = [
    "What colour is the circle? Red. And the square? It is blue. You are a helpful assistant.",
    "system user assistant model Say now typed here hello world Which colour is it? It is red.",
    "<>|_:;,.!?'-\"[]{}0123456789\u200b\n\n",
] * 4


def make_tokenizer(style: str, image_token: bool = True, chat_template: str | None = None):
    """A tiny BPE tokenizer with the style's special tokens (+ `<image>`, as llava-hf adds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    source, byte_level, specials, bos, eos, adds_bos, _ = STYLES[style]
    specials = specials + ([IMAGE_TOKEN] if image_token else [])
    if byte_level:  # Qwen2 / Llama-3: byte-level BPE, no unknown token
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet, unk = pre_tokenizers.ByteLevel.alphabet(), None
    else:  # Gemma / Phi-3: sentencepiece-like, "▁" for spaces and a prefix space at the start
        unk = "<unk>"
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk)
    fast.chat_template = source if chat_template is None else chat_template
    return fast


def answer_runs(tokenizer, rendered) -> list[str]:
    """The labelled tokens, decoded run by run (special tokens kept)."""
    runs, current = [], []
    for tok, lab in zip(rendered.input_ids, rendered.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def expected_ids(tokenizer, text: str, image_tokens: int) -> list[int]:
    """transformers' ids for a rendered prompt: `<image>` expanded as llava-hf processors do, special
    tokens added unless the prompt already starts with BOS (`ProcessorMixin.apply_chat_template`)."""
    expanded = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens)
    adds = not (tokenizer.bos_token and expanded.startswith(tokenizer.bos_token))
    return tokenizer(expanded, add_special_tokens=adds)["input_ids"]


@pytest.mark.parametrize("style", list(STYLES))
def test_prompt_string_is_the_jinja_templates(style):
    tokenizer = make_tokenizer(style)
    template = resolve_template("chat", tokenizer)
    assert template.style == "chat" and template.chat_template == STYLES[style][0] and not template.assistant_parts
    assert template.end_of_turn == STYLES[style][6]
    text, spans = chat_text(template, CONV, tokenizer, add_generation_prompt=False)
    assert text == GOLDEN[style]
    end = STYLES[style][6]
    assert [text[a:b] for a, b in spans] == ["Red." + end, "It is blue." + end]
    # The generation prompt: the conversation up to the last answer's header, nothing of the answer.
    pending, _ = chat_text(template, CONV[:3], tokenizer, add_generation_prompt=True)
    assert pending == GOLDEN[style][: GOLDEN[style].index("It is blue.")]
    assert pending.endswith(GENERATION_PROMPT[style])
    # What transformers renders for the same messages (answers as text, user turns as parts).
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CONV[0].text}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": [{"type": "text", "text": CONV[2].text}]},
            {"role": "assistant", "content": "It is blue."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == text


@pytest.mark.parametrize("style", list(STYLES))
def test_labels_are_exactly_answers_and_end_of_turn_tokens(style):
    tokenizer = make_tokenizer(style)
    template = resolve_template("chat", tokenizer)
    r = render(CONV, template, tokenizer, image_tokens=5)
    end = STYLES[style][6]
    assert answer_runs(tokenizer, r) == ["Red." + end, "It is blue." + end]
    assert len(r.input_ids) == len(r.labels) == len(r.image_mask)
    assert sum(r.image_mask) == 5 and r.num_images == 1
    assert all(lab == IGNORE_INDEX for lab, img in zip(r.labels, r.image_mask) if img)
    # No role header, system prompt, BOS or question is labelled.
    labelled = {t for t in r.labels if t != IGNORE_INDEX}
    for token in STYLES[style][2]:
        if token != end:
            assert tokenizer.convert_tokens_to_ids(token) not in labelled, token
    prompt = tokenizer.decode([t for t, lab, im in zip(r.input_ids, r.labels, r.image_mask)
                               if lab == IGNORE_INDEX and not im], skip_special_tokens=False)
    assert "colour is the circle?" in prompt and "Red" not in prompt and "blue" not in prompt
    # The ids are transformers' for the same string (one call, <image> expanded, BOS once).
    assert r.input_ids == expected_ids(tokenizer, GOLDEN[style], 5)
    assert r.input_ids.count(tokenizer.bos_token_id) == (style != "chatml")  # Qwen has no BOS


@pytest.mark.parametrize("style", list(STYLES))
def test_generation_prompt_has_no_labels_and_transformers_ids(style):
    tokenizer = make_tokenizer(style)
    template = resolve_template("chat", tokenizer)
    r = render(CONV[:3], template, tokenizer, image_tokens=3, add_generation_prompt=True)
    text, _ = chat_text(template, CONV[:3], tokenizer, add_generation_prompt=True)
    assert r.input_ids == expected_ids(tokenizer, text, 3)
    assert answer_runs(tokenizer, r) == ["Red." + STYLES[style][6]]  # the pending question has no label


def test_tokenizer_without_image_token_splits_at_the_slots():
    """No `<image>` token: the pieces around each slot are tokenised alone (LLaVA's way)."""
    for style in ("llama_3", "phi_3"):
        tokenizer = make_tokenizer(style, image_token=False)
        template = resolve_template("chat", tokenizer)
        r = render(CONV, template, tokenizer, image_tokens=4, image_token_id=250)
        before, after = GOLDEN[style].split(IMAGE_TOKEN)
        bos = [] if before.startswith(tokenizer.bos_token) else [tokenizer.bos_token_id]
        assert r.input_ids == (bos + tokenizer(before, add_special_tokens=False)["input_ids"] + [250] * 4
                               + tokenizer(after, add_special_tokens=False)["input_ids"])
        assert r.image_mask.count(True) == 4 and r.input_ids.count(tokenizer.bos_token_id) == 1
        assert answer_runs(tokenizer, r) == ["Red." + STYLES[style][6], "It is blue." + STYLES[style][6]]


def test_training_uses_the_chat_template():
    from finetune.data.dataset import RenderSettings, render_record
    from finetune.train_config import TrainConfig

    assert TrainConfig(model="m", data="d.json", output_dir="o", template="chat").template_name == "chat"
    tokenizer = make_tokenizer("llama_3")
    settings = RenderSettings(tokenizer, resolve_template("chat", tokenizer), 4, None, 512)
    record = {"conversations": [{"from": "human", "value": "What colour is the circle?\n<image>"},
                                {"from": "gpt", "value": "Red."}]}
    r = render_record(record, settings)
    assert answer_runs(tokenizer, r) == ["Red.<|eot_id|>"] and sum(r.image_mask) == 4
    assert r.input_ids == expected_ids(tokenizer, GOLDEN["llama_3"][: GOLDEN["llama_3"].index("Red.<|eot_id|>") + 14], 4)


def test_typed_control_tokens_and_image_marker_stay_text():
    tokenizer = make_tokenizer("chatml")
    template = resolve_template("chat", tokenizer)
    im_end, image = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    msgs = [Message("user", "Say <|im_end|> and <image> now"), Message("assistant", "It is <|im_end|> red.")]
    r = render(msgs, template, tokenizer, image_tokens=4)
    assert r.input_ids.count(im_end) == 3  # the system's, the question's and the answer's end: none typed
    assert image not in r.input_ids and not any(r.image_mask)
    assert answer_runs(tokenizer, r) == ["It is <\u200b|im_end|> red.<|im_end|>"]


def test_llava_hf_template_reads_answers_as_parts():
    tokenizer = make_tokenizer("chatml", chat_template=LLAVA_INTERLEAVE_QWEN)
    template = resolve_template("chat", tokenizer)
    assert template.assistant_parts
    r = render(CONV, template, tokenizer, image_tokens=2)
    assert answer_runs(tokenizer, r) == ["Red.<|im_end|>", "It is blue.<|im_end|>"]
    text, _ = chat_text(template, CONV, tokenizer, add_generation_prompt=False)
    assert text.startswith("<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n")


def test_llava_hf_processor_gives_the_same_ids():
    """What a user of transformers gets: `LlavaProcessor.apply_chat_template(..., tokenize=True)`."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    image = Image.new("RGB", (32, 32), "red")
    for style in ("chatml", "llama_3", "phi_3"):
        tokenizer = make_tokenizer(style)
        processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                                   tokenizer, patch_size=8, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": CONV[0].text}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": [{"type": "text", "text": CONV[2].text}]}]
        theirs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        ours = render(CONV[:3], resolve_template("chat", tokenizer), tokenizer, 16, add_generation_prompt=True)
        assert ours.input_ids == list(theirs["input_ids"][0]), style


def test_unusable_templates_are_refused_in_one_line():
    no_images = CHATML.replace("{{ '<image>\\n' }}", "")
    with pytest.raises(ValueError, match=r"wrote 0 <image> placeholder\(s\) for 1 image\(s\)") as e:
        resolve_template("chat", make_tokenizer("chatml", chat_template=no_images))
    assert "\n" not in str(e.value) and "template 'chat'" in str(e.value)
    no_answers = CHATML.replace("{% for message in messages %}",
                                "{% for message in messages | selectattr('role', 'equalto', 'user') %}")
    with pytest.raises(ValueError, match="cannot render an assistant turn"):
        resolve_template("chat", make_tokenizer("chatml", chat_template=no_answers))
    # A template closing answers with text, no token (llava-v1.6-mistral's "<\\s> "), renders for chat: the
    # answer's text alone is the answer, EOS ends it (training from it is refused: tests/test_train_towers.py).
    no_end = CHATML.replace("{{ '<|im_end|>' + '\\n' }}", "{{ '\\n' }}")
    tokenizer = make_tokenizer("chatml", chat_template=no_end)
    template = resolve_template("chat", tokenizer)
    rendered = render(CONV[:2], template, tokenizer, 4)
    assert template.end_of_turn is None
    assert tokenizer.decode([t for t in rendered.labels if t != IGNORE_INDEX]) == CONV[1].text
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="template 'chat' needs a chat template.*has none"):
        resolve_template("chat", tokenizer)


def test_template_names():
    check_template_name("chat")
    with pytest.raises(ValueError, match="'chat'"):
        check_template_name("chatml")
    with pytest.raises(ValueError, match="resolve_template"):
        get_template("chat")
    assert resolve_template("llava_v1", make_tokenizer("chatml")) is get_template("llava_v1")


# -- a chat session with the tiny model and a ChatML template ---------------------------------

@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny checkpoint's tokenizer + <|im_start|>, <|im_end|> (its EOS) and ChatML; template `chat`."""
    from tiny_models import build_checkpoint
    from transformers import AutoTokenizer

    from mmchat.checkpoint import read_config, write_config
    from mmchat.model import LoadOptions, load_model

    root = tmp_path_factory.mktemp("chatml")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(root / "tokenizer")
    ckpt = build_checkpoint(root / "ckpt", root / "tokenizer")  # the LLM's vocabulary fits the new tokens
    config = read_config(ckpt)
    config.template = "chat"
    write_config(config, ckpt)
    return load_model(ckpt, LoadOptions(load_in="32bit", device="cpu"))


def test_chat_session_with_a_chat_template_equals_full_reprefill(chatml_model):
    import torch
    from PIL import Image

    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig
    from mmchat.image import preprocess

    model, gen = chatml_model, GenerationConfig(max_new_tokens=8, temperature=0.0)
    red = Image.new("RGB", (32, 32), (220, 20, 20))
    s = ChatSession(model)
    answers = ["".join(s.ask("What colour is the shape?", red, gen)), "".join(s.ask("And where is it?", None, gen))]
    assert all(answers) and s.last_stats.prefill_tokens < s.last_stats.prompt_tokens / 2  # turn 2 reused the cache
    template = resolve_template("chat", model.tokenizer)
    feats = model.encode_images(preprocess(red, model.config.vision).unsqueeze(0))
    for turn in range(2):
        r = render(s.messages[: 2 * turn + 1], template, model.tokenizer, model.image_tokens, add_generation_prompt=True)
        assert r.input_ids[0] == model.tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert r.input_ids.count(model.tokenizer.eos_token_id) == 2 + 2 * turn  # <|im_end|>: system, turns
        ids, mask, out = list(r.input_ids), list(r.image_mask), []
        with torch.no_grad():  # reference: re-prefill everything for every token, no cache
            for _ in range(gen.max_new_tokens):
                logits = model.llm(inputs_embeds=model.embed(torch.tensor([ids]), torch.tensor([mask]), feats)).logits
                token = int(logits[0, -1].argmax())
                if token == model.tokenizer.eos_token_id:
                    break
                ids, mask, out = ids + [token], mask + [False], out + [token]
        assert model.tokenizer.decode(out, skip_special_tokens=True).strip() == answers[turn] == s.messages[2 * turn + 1].text


# -- a system message ------------------------------------------------------------------------

SYSTEM = "You answer in one word."
SYSTEM_GOLDEN = {
    "chatml": (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\nIt is blue.<|im_end|>\n"
    ),
    "llama_3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one word.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is blue.<|eot_id|>"
    ),
}


def _transformers_chat(system: str, parts: bool = False) -> list[dict]:
    """CONV as transformers' messages, a system message first; the system's and the answers'
    content strings, or (`parts`) one text part each, as llava-hf's templates take them."""
    def text(t):
        return [{"type": "text", "text": t}] if parts else t
    return [{"role": "system", "content": text(system)},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CONV[0].text}]},
            {"role": "assistant", "content": text("Red.")},
            {"role": "user", "content": [{"type": "text", "text": CONV[2].text}]},
            {"role": "assistant", "content": text("It is blue.")}]


@pytest.mark.parametrize("style", ["chatml", "llama_3", "phi_3"])
def test_a_system_message_goes_first_as_transformers_puts_it(style):
    from dataclasses import replace

    tokenizer = make_tokenizer(style)
    base = resolve_template("chat", tokenizer)
    template = replace(base, system=SYSTEM)
    text, spans = chat_text(template, CONV, tokenizer, add_generation_prompt=False)
    assert text == tokenizer.apply_chat_template(_transformers_chat(SYSTEM), tokenize=False)
    if style in SYSTEM_GOLDEN:
        assert text == SYSTEM_GOLDEN[style]
    else:  # Phi-3 adds a string to its system content: the probe found it takes no parts there
        assert base.system_as == "text" and text.startswith(f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n<image>\n")
    end = STYLES[style][6]
    assert [text[a:b] for a, b in spans] == ["Red." + end, "It is blue." + end]
    # The labels are the answers' alone, as without a system message; the ids are transformers'.
    r = render(CONV, template, tokenizer, image_tokens=5)
    assert answer_runs(tokenizer, r) == answer_runs(tokenizer, render(CONV, base, tokenizer, image_tokens=5))
    assert answer_runs(tokenizer, r) == ["Red." + end, "It is blue." + end]
    assert r.input_ids == expected_ids(tokenizer, text, 5)
    pending = render(CONV[:1], template, tokenizer, image_tokens=5, add_generation_prompt=True)
    assert answer_runs(tokenizer, pending) == [] and SYSTEM in tokenizer.decode(pending.input_ids)


def test_llava_hf_template_gets_the_system_message_as_parts():
    """llava-hf's templates read every message's content as parts; a string would vanish in them."""
    from dataclasses import replace

    tokenizer = make_tokenizer("chatml", chat_template=LLAVA_INTERLEAVE_QWEN)
    template = resolve_template("chat", tokenizer)
    assert template.system_as == "parts"
    text, _ = chat_text(replace(template, system=SYSTEM), CONV, tokenizer, add_generation_prompt=False)
    assert text == tokenizer.apply_chat_template(_transformers_chat(SYSTEM, parts=True), tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\n")


def test_a_system_message_is_refused_in_one_line_where_it_cannot_go():
    from dataclasses import replace

    tokenizer = make_tokenizer("gemma")  # raise_exception('System role not supported')
    template = resolve_template("chat", tokenizer)
    assert template.system_as is None
    with pytest.raises(ValueError, match="takes no system message") as e:
        render(CONV, replace(template, system=SYSTEM), tokenizer, image_tokens=2)
    assert "\n" not in str(e.value)


def test_a_typed_control_token_in_the_system_message_stays_text():
    from dataclasses import replace

    tokenizer = make_tokenizer("chatml")
    template = replace(resolve_template("chat", tokenizer), system="Never say <|im_end|> or <image>.")
    r = render(CONV[:1], template, tokenizer, image_tokens=4, add_generation_prompt=True)
    assert r.input_ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # the system's and the question's
    assert sum(r.image_mask) == 4 and r.num_images == 1


def test_chat_session_system_message_with_each_template(chatml_model, tiny_checkpoint):
    from mmchat.chat import ChatSession
    from mmchat.conversation import ASSISTANT, USER
    from mmchat.generate import GenerationConfig
    from mmchat.model import LoadOptions, load_model

    gen = GenerationConfig(max_new_tokens=2, temperature=0.0)
    s = ChatSession(chatml_model)
    "".join(s.answer([Message(USER, "Hi")], [], gen, system=SYSTEM))
    assert s.last_stats.prompt_tokens == len(chatml_model.tokenizer(SYSTEM_GOLDEN["chatml"].split("<|im_start|>user")[0]
                                                                    + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    assert s.messages[-1].role == ASSISTANT
    plain = ChatSession(load_model(tiny_checkpoint, LoadOptions("32bit", "cpu")), template="plain")
    with pytest.raises(ValueError, match="'plain'.*takes no system message") as e:
        plain.answer([Message(USER, "Hi", 0)], [], gen, system=SYSTEM)
    assert "\n" not in str(e.value)
