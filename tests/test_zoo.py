"""The llava-hf zoo: each LLM family users bring, converted, answers exactly as transformers does on the folder.

One tiny random `LlavaForConditionalGeneration` per family (LLaMA/Vicuna as llava-1.5, Mistral as
bakLlava, Qwen2 with ChatML as llava-interleave, Llama-3 as xtuner's llava-llama-3, Phi-3, Gemma),
saved as the hub's folders are: a `LlavaProcessor` with the family's chat template, the tokenizer
with `<image>`, a generation config with the family's stop ids. The reference is transformers on
that folder: `processor.apply_chat_template(..., tokenize=True)` (the ids; it adds no second BOS
when the template writes one), the image processor `AutoProcessor` loads by default (the torchvision
backend; the converted checkpoint keeps that processor) and `generate(do_sample=False)`.

The second turn's history is the first answer as a transformers user gets it back:
`decode(new_tokens, skip_special_tokens=True)`, stripped, sent as the assistant's text part. mmchat
keeps its answer the same way (`ChatSession` stores the decoded, stripped text), so both engines
render the same string; the test asserts that they give the same ids for it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from matplotlib import cbook

from benchmarks.agreement import TOLERANCE, compare_turn
from benchmarks.random_llava import LLAVA_15_CHAT_TEMPLATE
from mmchat.checkpoint import read_config
from mmchat.convert.cli import main
from mmchat.image import load_image
from mmchat.templates import IMAGE_TOKEN, resolve_template
from test_chat_templates import GEMMA, LLAMA_3, LLAVA_INTERLEAVE_QWEN, PHI_3
from tiny_models import build_chat_tokenizer, build_llava_family

# llava-hf/llava-1.5-7b-hf's chat_template.json (bakLlava-v1-hf has the same).
LLAVA_15 = LLAVA_15_CHAT_TEMPLATE
QUESTIONS = ("What is shown in this photo?", "Describe it in a few words.")
CORPUS = [" ".join(QUESTIONS) + " USER: ASSISTANT: system user assistant model a the photo of is it person",
          "<>|_:;,.!?'-\"[]{}0123456789\n\n"] * 4
NEW_TOKENS = 20
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class Family:
    config_class: str
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    byte_level: bool
    adds_bos: bool
    stops: tuple[str, ...]
    """generation_config.json's eos_token_id, as the hub's folder has it."""
    end: str
    """The token an answer ends with: the template's end of turn (EOS when the template writes none)."""
    template_file: str = "chat_template.jinja"
    answer_parts: bool = False
    """The template reads an answer as content parts (llava-hf's own templates); else as a string."""
    word_level: bool = False
    """A whole-word tokenizer (`build_chat_tokenizer(word_level=True)`), not the LLM type's kind: loading
    it as the LLM type's default class (Qwen2Tokenizer, LlamaTokenizer) would tokenize another way."""
    tokenizer_class: str | None = None
    """tokenizer_config.json's `tokenizer_class`, when not what transformers writes (`TokenizersBackend`)."""


FAMILIES = {
    "llava-1.5": Family("LlamaConfig", LLAVA_15, LLAMA_SPECIALS, "<s>", "</s>", False, True, ("</s>",), "</s>",
                        "chat_template.json", answer_parts=True),
    "bakllava": Family("MistralConfig", LLAVA_15, LLAMA_SPECIALS, "<s>", "</s>", False, True, ("</s>",), "</s>",
                       "processor_config.json", answer_parts=True),
    "qwen2-chatml": Family("Qwen2Config", LLAVA_INTERLEAVE_QWEN, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
                           "<|im_end|>", True, False, ("<|im_end|>", "<|endoftext|>"), "<|im_end|>", answer_parts=True),
    "llama-3": Family("LlamaConfig", LLAMA_3, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                               "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>",
                      "<|end_of_text|>", True, True, ("<|end_of_text|>", "<|eot_id|>"), "<|eot_id|>"),
    "phi-3": Family("Phi3Config", PHI_3, ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                                          "<|assistant|>", "<|end|>"), "<s>", "<|endoftext|>", False, True,
                    ("<|endoftext|>", "<|end|>"), "<|end|>"),
    "gemma": Family("GemmaConfig", GEMMA, ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
                    "<bos>", "<eos>", False, True, ("<eos>", "<end_of_turn>"), "<end_of_turn>"),
    # The folder's tokenizer class is not the LLM type's: mmchat must load the class the folder names.
    "qwen2-wordlevel": Family("Qwen2Config", LLAVA_INTERLEAVE_QWEN, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
                              "<|im_end|>", False, False, ("<|im_end|>", "<|endoftext|>"), "<|im_end|>",
                              answer_parts=True, word_level=True),
    "llama-fast": Family("LlamaConfig", LLAVA_15, LLAMA_SPECIALS, "<s>", "</s>", False, True, ("</s>",), "</s>",
                         answer_parts=True, word_level=True, tokenizer_class="PreTrainedTokenizerFast"),
}


def text_config(family: Family, tokenizer):
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.eos_token_id}
    extra = {"head_dim": 16} if family.config_class == "GemmaConfig" else {}  # Gemma's default is 256
    return getattr(transformers, family.config_class)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False, **ids, **extra)


def photo():
    """A real photo, 512 wide × 600 high: not square, so the crop matters."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return load_image(f.read())


def build_folder(root, name: str):
    """The family's folder, with one lm_head change so that turn 1 really ends: the rows of the end
    token and of a token greedy decoding picks a few steps in are swapped, so the end token wins there
    (and nowhere before: the logits of every earlier pick are untouched). Seeds whose first picks
    already hold a stop id are skipped. Returns (folder, end id)."""
    family = FAMILIES[name]
    tokenizer = build_chat_tokenizer(list(family.specials), family.bos, family.eos, family.byte_level, family.adds_bos,
                                     CORPUS, word_level=family.word_level)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in family.stops]
    end = tokenizer.convert_tokens_to_ids(family.end)
    folder = root / name
    for seed in range(5):
        llava = build_llava_family(folder, text_config(family, tokenizer), tokenizer, family.template, stops,
                                   family.template_file, seed=seed)
        if family.tokenizer_class:
            saved = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(json.dumps({**saved, "tokenizer_class": family.tokenizer_class}))
        inputs = processor_inputs(reference_processor(folder), chat([], QUESTIONS[0], family.answer_parts))
        free = llava.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12)
        picks = free[0, inputs["input_ids"].shape[1]:].tolist()
        at = next((i for i in range(3, 12) if picks[i] not in picks[:i] and not {end, *stops} & set(picks[:i + 1])), None)
        if at is not None:
            break
    with torch.no_grad():
        head = llava.lm_head.weight
        head[[end, picks[at]]] = head[[picks[at], end]]
    llava.save_pretrained(folder)
    return folder, end


def reference_processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def chat(history: list[tuple[str, str]], question: str, answer_parts: bool) -> list[dict]:
    """transformers' multimodal messages; the image goes with the first question."""
    out = []
    for i, (q, a) in enumerate(history):
        answer = [{"type": "text", "text": a}] if answer_parts else a
        out += [user(q, i == 0), {"role": "assistant", "content": answer}]
    return out + [user(question, not history)]


def user(text: str, image: bool) -> dict:
    parts = [{"type": "image", "image": photo()}] if image else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def processor_inputs(processor, conversation: list[dict]) -> dict:
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@torch.no_grad()
def transformers_turn(llava, inputs: dict, stops: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (a final stop id included) and the logits [n, V] each was picked from."""
    out = llava.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.stack(out.logits)[:, 0].float()


@torch.no_grad()
def mmchat_logits(model, rendered, chosen: list[int]) -> torch.Tensor:
    """mmchat's logits [len(chosen), V] for each picked token, from one forward over prompt + picks."""
    feats = model.encode_images(model.pixels([photo()], "square"))
    ids = torch.tensor([rendered.input_ids + chosen[:-1]])
    mask = torch.tensor([rendered.image_mask + [False] * (len(chosen) - 1)])
    logits = model.llm(inputs_embeds=model.embed(ids, mask, feats)).logits[0]
    return logits[len(rendered.input_ids) - 1:].float()


def converted(src, dst, *flags: str):
    assert main([*flags, str(src), str(dst)]) == 0
    return dst


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_answers_as_transformers_does(name, tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LlavaForConditionalGeneration

    from mmchat.chat import ChatSession
    from mmchat.conversation import render
    from mmchat.generate import GenerationConfig
    from mmchat.model import LoadOptions, load_model

    family = FAMILIES[name]
    folder, end = build_folder(tmp_path, name)
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = reference_processor(folder)
    stops = HFGenerationConfig.from_pretrained(folder).eos_token_id
    stops = [stops] if isinstance(stops, int) else stops

    checkpoint = converted(folder, tmp_path / "mmchat")
    config = read_config(checkpoint)
    model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    assert type(model.tokenizer) is type(processor.tokenizer), "the folder's own tokenizer class"
    assert config.template == "chat" and model.tokenizer.chat_template == family.template
    assert config.image_token_id == model.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == llava.config.image_token_index
    assert set(config.stop_token_ids or [model.tokenizer.eos_token_id]) == set(stops)
    template = resolve_template(config.template, model.tokenizer)

    session = ChatSession(model)
    gen = GenerationConfig(temperature=0, max_new_tokens=NEW_TOKENS)
    history: list[tuple[str, str]] = []
    for turn, question in enumerate(QUESTIONS):
        inputs = processor_inputs(processor, chat(history, question, family.answer_parts))
        theirs_text = processor.apply_chat_template(chat(history, question, family.answer_parts), add_generation_prompt=True)
        theirs, theirs_logits = transformers_turn(llava, inputs, stops)

        answer = "".join(session.ask(question, photo() if turn == 0 else None, gen))
        rendered = render(session.messages[:-1], template, model.tokenizer, model.image_tokens,
                          add_generation_prompt=True, image_token_id=config.image_token_id)
        assert rendered.input_ids == inputs["input_ids"][0].tolist(), f"{name}, turn {turn + 1}: ids"
        # The two-step recipe (render, then processor(text=...)) adds a second BOS when the template writes one.
        two_step = processor(images=photo(), text=theirs_text, return_tensors="pt")["input_ids"][0].tolist()
        writes_bos = bool(family.bos) and theirs_text.startswith(family.bos) and family.adds_bos
        assert two_step == ([model.tokenizer.bos_token_id] if writes_bos else []) + rendered.input_ids

        ours = session.last_stats.answer_ids
        chosen = ours + [end] if len(ours) < NEW_TOKENS else ours  # mmchat drops the stop id it stopped at
        ours_logits = mmchat_logits(model, rendered, chosen)
        torch.testing.assert_close(ours_logits[0], theirs_logits[0], atol=1e-4, rtol=0)
        agreement = compare_turn(chosen, theirs, ours_logits, theirs_logits, TOLERANCE["32bit"])
        assert agreement["ok"] and agreement["max_logit_diff"] < 1e-4, (name, turn, agreement)
        assert chosen == theirs, (name, turn, agreement)  # float32: no near-tie flips expected
        if turn == 0:  # the folder was made to end turn 1 early, at the family's end token
            assert theirs[-1] == end and len(theirs) < NEW_TOKENS and end not in ours
        assert answer.strip() == session.messages[-1].text
        history.append((question, processor.decode(theirs, skip_special_tokens=True).strip()))
        assert session.messages[-1].text == history[-1][1]

    # --to llava-hf: transformers loads the export and reads the same conversation the same way
    exported = converted(checkpoint, tmp_path / "llava-hf", "--to", "llava-hf")
    again = LlavaForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()
    assert type(reference_processor(exported).tokenizer) is type(processor.tokenizer)
    inputs = processor_inputs(reference_processor(exported), chat(history[:1], QUESTIONS[1], family.answer_parts))
    original = processor_inputs(processor, chat(history[:1], QUESTIONS[1], family.answer_parts))
    assert inputs["input_ids"].tolist() == original["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], original["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits[0, -1], llava(**original).logits[0, -1], atol=1e-4, rtol=0)
    assert HFGenerationConfig.from_pretrained(exported).eos_token_id in (stops, *stops)  # a list, or one id as an int


def test_status_line_names_llm_family_tower_and_image_tokens(tmp_path, monkeypatch):
    """`--model FOLDER` in the app: converted once through the cache, then described on the page."""
    from mmchat.serving.config import ServeConfig
    from mmchat.serving.loaded_model import load_served_model

    folder, _ = build_folder(tmp_path, "qwen2-chatml")
    monkeypatch.setenv("MMCHAT_CACHE", str(tmp_path / "cache"))
    served = load_served_model(ServeConfig(model=str(folder), load_in="32bit", device="cpu"))
    assert served.ready, served.summary
    assert served.model.config.template == "chat"
    line = served.summary
    assert line.startswith("Serving qwen2-chatml · float32 weights · cpu · ") and "\n" not in line
    assert "qwen2 LLM" in line and "CLIP ViT tower at 32 px" in line and "16 tokens per image" in line


def test_cache_key_carries_the_conversion_format(tiny_llava_hf_dir, tmp_path, monkeypatch):
    """A folder converted by an older mmchat (another FORMAT_VERSION) is converted again, not reused."""
    from mmchat.convert import cache

    first = cache.resolve_checkpoint(tiny_llava_hf_dir, cache_dir=tmp_path)
    assert cache.resolve_checkpoint(tiny_llava_hf_dir, cache_dir=tmp_path) == first
    monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
    second = cache.resolve_checkpoint(tiny_llava_hf_dir, cache_dir=tmp_path)
    assert second != first and read_config(second).template == read_config(first).template


def with_template(folder, out, file: str, template: str):
    """A copy of `folder` (or `folder` itself) with `template` in `file`."""
    import shutil

    if out != folder:
        shutil.copytree(folder, out)
    if file == "chat_template.json":
        (out / file).write_text(json.dumps({"chat_template": template}))
    elif file == "chat_template.jinja":
        (out / file).write_text(template)
    else:  # tokenizer_config.json or processor_config.json: a `chat_template` key
        (out / file).write_text(json.dumps({**json.loads((out / file).read_text()), "chat_template": template}))
    return out


def test_folder_without_chat_template_keeps_llava_v1(tiny_llava_hf_dir, tmp_path, capsys):
    capsys.readouterr()
    config = read_config(converted(tiny_llava_hf_dir, tmp_path / "mmchat"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "no chat template" in line]
    assert config.template == "llava_v1" and len(notes) == 1 and "llava_v1" in notes[0]


@pytest.mark.parametrize("file", ["tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                                  "processor_config.json"])
def test_chat_template_is_found_where_transformers_finds_it(tiny_llava_hf_dir, tmp_path, file):
    from transformers import AutoTokenizer

    folder = with_template(tiny_llava_hf_dir, tmp_path / "llava", file, LLAVA_15)
    checkpoint = converted(folder, tmp_path / "mmchat")
    assert read_config(checkpoint).template == "chat"
    assert AutoTokenizer.from_pretrained(checkpoint / read_config(checkpoint).tokenizer).chat_template == LLAVA_15


def test_processor_template_wins_over_the_tokenizers(tmp_path):
    """transformers' order: processor_config.json's key, chat_template.json, chat_template.jinja, then the tokenizer."""
    from mmchat.convert.hf_folder import chat_template

    tokenizer = type("Tokenizer", (), {"chat_template": "tokenizer's"})()
    assert chat_template(tmp_path, tokenizer) == ("tokenizer's", "tokenizer_config.json")
    (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 14}))
    assert chat_template(tmp_path, tokenizer) == ("tokenizer's", "tokenizer_config.json")
    for file in ("chat_template.jinja", "chat_template.json", "processor_config.json"):
        with_template(tmp_path, tmp_path, file, file)
        assert chat_template(tmp_path, tokenizer) == (file, file)
    (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 14}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "d"}]}))
    assert chat_template(tmp_path, tokenizer) == ("d", "chat_template.json")  # several named: the default one


def test_template_flag_overrides_the_folder(tiny_llava_hf_dir, tmp_path):
    folder = with_template(tiny_llava_hf_dir, tmp_path / "llava", "chat_template.jinja", LLAVA_15)
    checkpoint = converted(folder, tmp_path / "mmchat", "--template", "vicuna_v1")
    config = read_config(checkpoint)
    assert config.template == "vicuna_v1"
    from transformers import AutoTokenizer  # the folder's template still travels with the tokenizer

    assert AutoTokenizer.from_pretrained(checkpoint / config.tokenizer).chat_template == LLAVA_15
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["--template", "chatml", str(folder), str(tmp_path / "x")])


def one_line_error(capsys, argv: list[str], progress: bool = True) -> str:
    """Exit code 2 and one error line; `progress`: lines `[convert] ...` may come before it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and all(line.startswith("[convert] ") for line in err[:-1]), err
    assert progress or len(err) == 1, err
    return err[-1]


@pytest.mark.parametrize("broken,expected", [
    ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
     "{{ c['text'] }}{% endfor %}</s>{% endfor %}", r"wrote 0 <image> placeholder"),
    ("{% for m in messages | selectattr('role', 'equalto', 'user') %}{{ '<image>\n' }}{% endfor %}",
     "cannot render an assistant turn"),
])
def test_unusable_chat_template_fails_before_writing(tiny_llava_hf_dir, tmp_path, capsys, broken, expected):
    folder = with_template(tiny_llava_hf_dir, tmp_path / "llava", "chat_template.jinja", broken)
    line = one_line_error(capsys, [str(folder), str(tmp_path / "mmchat")])
    assert "chat_template.jinja" in line and "template 'chat'" in line and re.search(expected, line)
    assert not (tmp_path / "mmchat").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "llava"]  # no temporary folder left either


UNSUPPORTED = {
    "llava_next_video": ({"model_type": "llava_next_video", "architectures": ["LlavaNextVideoForConditionalGeneration"]},
                         "LLaVA-NeXT-Video"),
    "vipllava": ({"model_type": "vipllava", "architectures": ["VipLlavaForConditionalGeneration"]}, "VipLlava"),
    "mllama": ({"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"]}, "Llama 3.2 Vision"),
    "qwen2_vl": ({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}, "Qwen2-VL"),
    "pixtral": ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": {},
                 "vision_config": {"model_type": "pixtral"}}, "Pixtral"),
    "paligemma": ({"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"]}, "PaliGemma"),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_architectures_are_named_in_one_line(tmp_path, capsys, kind):
    config, name = UNSUPPORTED[kind]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, [str(tmp_path / "src"), str(tmp_path / "dst")], progress=False)
    assert name in line and "LlavaForConditionalGeneration" in line and "LlavaLlamaForCausalLM" in line
    assert ("not yet supported" in line) == kind.startswith("llava_")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("name", ["llava-1.5", "qwen2-chatml"])
def test_cli_answers_a_llava_hf_folder_as_transformers_by_default(name, tmp_path, monkeypatch, capsys):
    """`python -m mmchat.cli --model FOLDER` with no other flag: converted once into the cache, float32
    on a CPU, the folder's template, and its generation config's decoding (greedy: it does not sample)."""
    from transformers import LlavaForConditionalGeneration

    from mmchat.cli import main as cli

    folder, _ = build_folder(tmp_path, name)
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = reference_processor(folder)
    inputs = processor_inputs(processor, chat([], QUESTIONS[0], FAMILIES[name].answer_parts))
    tokens, _ = transformers_turn(llava, inputs, llava.generation_config.eos_token_id)
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    image = tmp_path / "photo.png"
    photo().save(image)
    monkeypatch.setenv("MMCHAT_CACHE", str(tmp_path / "cache"))
    assert cli(["--model", str(folder), "--image", str(image), "--prompt", QUESTIONS[0], "--device", "cpu",
                "--json"]) == 0
    config = read_config(next((tmp_path / "cache" / "converted").iterdir()))
    assert (config.template, config.temperature, config.top_p) == ("chat", 0.0, None)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"answers": [expected]}
