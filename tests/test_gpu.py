"""What mmchat claims on a GPU, on tiny models: 4-bit NF4 with bf16 compute, cached chat, the batching
engine, QLoRA with paged 8-bit AdamW, resume, merge and export.

Marked `gpu`: a CPU-only run deselects them (tests/conftest.py), so they neither run nor count as
skipped; `pytest -m gpu` runs them on CUDA. `MMCHAT_GPU_TESTS_ON_CPU=1` runs them on the CPU in
float32 with torch's AdamW (`python -m benchmarks.gpu --dry-run` does, to check the tests themselves).
Greedy tokens are compared with `benchmarks.agreement`'s rule: equal, or a flip at a near-tie.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks.agreement import TOLERANCE, compare_turn
from mmchat.answer import Answer
from mmchat.chat import ChatSession
from mmchat.conversation import render
from mmchat.generate import GenerationConfig
from mmchat.image import preprocess
from mmchat.model import LoadOptions, load_model
from mmchat.templates import get_template
from tiny_models import COLOURS, tiny_train_config

pytestmark = pytest.mark.gpu

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = TOLERANCE["4bit"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, LoadOptions("4bit", DEVICE))


@pytest.fixture
def logits_of_answers(monkeypatch):
    """Every answer's logits, one row per chosen token, in each answer's stats (`stats.logits`)."""
    push = Answer.push

    def recording(self, logits):
        self.stats.logits = [*getattr(self.stats, "logits", []), logits.detach().float().reshape(-1).cpu()]
        return push(self, logits)

    monkeypatch.setattr(Answer, "push", recording)


def picture(colour: str = "red") -> Image.Image:
    image = Image.new("RGB", (48, 30), "white")
    image.paste(COLOURS[colour], (10, 5, 30, 25))
    return image


def compare(a, b) -> dict:
    """Two answers' greedy tokens under the near-tie rule (`a`, `b`: stats with `logits`)."""
    chosen_a, chosen_b = a.answer_ids[:len(a.logits)], b.answer_ids[:len(b.logits)]
    n = min(len(chosen_a), len(chosen_b))
    return compare_turn(chosen_a[:n], chosen_b[:n], torch.stack(a.logits[:n]), torch.stack(b.logits[:n]), TOL)


def test_4bit_nf4_with_the_device_compute_dtype(model):
    import bitsandbytes as bnb

    layer = model.llm.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"
    assert layer.compute_dtype == (torch.bfloat16 if ON_GPU else torch.float32)
    assert model.device.type == DEVICE


def test_second_turn_from_the_cache_equals_a_reprefill(model, logits_of_answers):
    session = ChatSession(model)
    "".join(session.ask("What colour is the shape?", picture(), GREEDY))
    "".join(session.ask("And where is it?", None, GREEDY))
    cached = session.last_stats
    assert cached.prefill_tokens < cached.prompt_tokens / 2  # turn 2 prefilled only its own tokens
    # The whole conversation in one forward, the cached answer's tokens teacher-forced.
    r = render(session.messages[:3], get_template(model.config.template), model.tokenizer, model.image_tokens,
               add_generation_prompt=True)
    ids = torch.tensor([r.input_ids + cached.answer_ids], device=model.device)
    mask = torch.tensor([r.image_mask + [False] * len(cached.answer_ids)], device=model.device)
    with torch.no_grad():
        feats = model.encode_images(preprocess(picture(), model.config.vision)[None].to(model.device))
        logits = model.llm(inputs_embeds=model.embed(ids, mask, feats)).logits[0, len(r.input_ids) - 1:-1].float().cpu()
    n = len(cached.logits)
    result = compare_turn(cached.answer_ids[:n], logits[:n].argmax(-1).tolist(), torch.stack(cached.logits), logits[:n], TOL)
    assert result["ok"], result


def test_eight_conversations_batched_answer_as_alone(model, logits_of_answers):
    from concurrent.futures import ThreadPoolExecutor

    from mmchat.engine import Engine

    questions = [("What is in this picture?", picture("red")), ("Describe the colour.", picture("blue")),
                 ("Tell me a long story about everything, with many details.", None), ("Hi.", None)]

    def ask(session, i):
        text, image = questions[i % 4]
        "".join(session.ask(f"{text} ({i})", image, GREEDY))
        return session.last_stats

    alone = [ask(ChatSession(model), i) for i in range(8)]
    engine = Engine(model, max_batch=8)
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda i: ask(ChatSession(model, engine=engine), i), range(8)))
    finally:
        engine.close()
    assert engine.stats.largest_batch > 1, "the answers were never decoded together"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert compare(a, b)["ok"], f"conversation {i}: {a.answer_ids} vs {b.answer_ids}"


def train_config(name: str, checkpoint, data, out, **extra):
    """tests/configs/tiny-NAME.yaml on this device: on a GPU bf16 autocast and paged 8-bit AdamW."""
    device = {"cpu": False, "precision": "bf16", "optimizer": "paged_adamw_8bit"} if ON_GPU else {}
    return tiny_train_config(name, model=str(checkpoint), data=str(data), image_root=str(data.parent),
                             output_dir=str(out), **device, **extra)


def test_stage1_step_trains_the_projector(tiny_train_checkpoint, colour_data, tmp_path):
    from finetune.train import train

    result = train(train_config("align", tiny_train_checkpoint, colour_data, tmp_path / "out", max_steps=2))
    assert result.finished and all(r["loss"] > 0 for r in result.history)
    assert (tmp_path / "out" / "projector.safetensors").is_file()


@pytest.fixture(scope="module")
def qlora_output(tiny_train_checkpoint, colour_data, tmp_path_factory):
    """Stage 2 (4-bit QLoRA) for 4 steps: straight, and stopped after 2 then resumed."""
    from finetune.train import train

    work = tmp_path_factory.mktemp("gpu-qlora")
    straight = train(train_config("instruct", tiny_train_checkpoint, colour_data, work / "a", max_steps=4))
    assert not train(train_config("instruct", tiny_train_checkpoint, colour_data, work / "b", max_steps=4,
                                  stop_after=2)).finished
    resumed = train(train_config("instruct", tiny_train_checkpoint, colour_data, work / "b", max_steps=4, resume=True))
    return straight, resumed


def test_stage2_qlora_with_paged_adamw_resumes_exactly(qlora_output):
    straight, resumed = qlora_output
    assert resumed.finished and resumed.state.step == 4
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(straight.output / name)), load_file(str(resumed.output / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    if ON_GPU:
        assert type(straight.built.model.llm.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_merge_then_export_to_llava_hf(qlora_output, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from finetune.merge import main as merge_main
    from mmchat.convert.cli import main as convert_main

    merged, exported = tmp_path / "merged", tmp_path / "llava-hf"
    assert merge_main(["--model", str(qlora_output[0].output), "--out", str(merged), "--device", DEVICE]) == 0
    assert json.loads((merged / "mmchat.json").read_text())["adapter"] is None
    assert convert_main(["--to", "llava-hf", str(merged), str(exported)]) == 0
    mm = load_model(merged, LoadOptions("16bit", DEVICE))
    hf = LlavaForConditionalGeneration.from_pretrained(exported, dtype=torch.bfloat16, device_map={"": DEVICE}).eval()
    ids = torch.tensor([mm.tokenizer("What colour is it?").input_ids], device=DEVICE)
    with torch.no_grad():
        a = mm.llm(input_ids=ids).logits[0, -1].float()
        b = hf(input_ids=ids).logits[0, -1, :a.shape[0]].float()  # the export pads the vocabulary (<image>)
    assert int(a.argmax()) == int(b.argmax()) and torch.allclose(a, b, atol=0.05), (a - b).abs().max()
