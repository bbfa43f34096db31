"""The benchmarks' own logic, fast: the memory model's accounting and fit, the LLaVA-like data,
and `benchmarks.train`'s two engines on a tiny model (in process, not timed)."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from benchmarks.memory_model import (
    CLIP_L_336, CPU, LLAMA, NF4_BYTES, Coefficients, LlmShape, Measurement, Workload, breakdown, cuda_precision, fit,
    max_batch, moment_bytes, peak_bytes, predicted_step, static_parts,
)
from tiny_models import WORDS, one_torch_thread

GPU = cuda_precision(0.7)
COEF = Coefficients(act_recompute=30.0, act_layer=35.0, logit_bytes=12.0, grad_factor=1.4, workspace=2e6)


def test_nf4_bytes_are_half_a_byte_plus_double_quant_constants():
    assert NF4_BYTES == pytest.approx(0.5 + 0.127 / 8)
    llm = LLAMA["7b"]
    assert llm.linear_params() == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert static_parts(llm, CLIP_L_336, Workload(2048), GPU)["NF4 weights"] == pytest.approx(llm.linear_params() * 0.51587,
                                                                                               rel=1e-4)


def test_parameter_counts_match_a_real_llama_with_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    shape = LlmShape("tiny", 3, 64, 160, 300, kv_hidden=32)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("_proj"))
    assert shape.linear_params() == linear
    assert shape.linear_params() + shape.other_params() == sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    assert shape.lora_params(8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_predictions_grow_with_the_model_and_the_workload(size):
    llm, work = LLAMA[size], Workload(1024, 2)
    peak = peak_bytes(llm, CLIP_L_336, work, GPU, COEF)
    assert peak_bytes(replace(llm, layers=llm.layers + 8), CLIP_L_336, work, GPU, COEF) > peak
    assert peak_bytes(llm, CLIP_L_336, replace(work, seq_len=2048), GPU, COEF) >= peak
    assert peak_bytes(llm, CLIP_L_336, replace(work, batch=8), GPU, COEF) > peak
    assert peak_bytes(llm, CLIP_L_336, replace(work, lora_r=256), GPU, COEF) > peak
    assert peak_bytes(llm, CLIP_L_336, replace(work, vision_bytes=2), GPU, COEF) < peak
    # gradient checkpointing keeps each layer's input and one layer's activations, not every layer's
    long = replace(work, batch=8)
    with_ckpt = breakdown(llm, CLIP_L_336, long, GPU, COEF)
    without = breakdown(llm, CLIP_L_336, replace(long, gradient_checkpointing=False), GPU, COEF)
    assert without["activations"] > 10 * with_ckpt["activations"] > 0
    assert sum(without.values()) > sum(with_ckpt.values())
    # the parts are the loaded model + one moment of the step + the CUDA context
    assert with_ckpt["CUDA context"] == GPU.constant
    assert (with_ckpt["gradients"] == 0) != (with_ckpt["activations"] + with_ckpt["logits"] == 0)


def test_bigger_cards_fit_bigger_batches():
    llm, work = LLAMA["7b"], Workload(2048)
    fits = [max_batch(llm, CLIP_L_336, work, GPU, COEF, gb * 2**30) for gb in (8, 12, 16, 24, 48)]
    assert fits == sorted(fits) and fits[0] == 0 and fits[-1] > 1
    assert max_batch(llm, CLIP_L_336, replace(work, gradient_checkpointing=False), GPU, COEF, 24 * 2**30) < fits[3]


def test_fit_recovers_the_coefficients_that_made_the_measurements():
    shapes = [(LlmShape("a", 2, 256, 688, 32000), 0.7e6), (LlmShape("b", 4, 512, 1376, 32000), 11e6)]
    points = [(1, 256, True, 0.5), (1, 512, True, 0.05), (1, 1024, True, 0.02), (1, 96, True, 0.01),
              (1, 256, False, 0.5), (1, 512, False, 0.1)]
    truth = Coefficients(act_recompute=38.0, act_layer=33.0, logit_bytes=12.5, grad_factor=1.5, workspace=3e6)
    ms = []
    for llm, trainable in shapes:
        for batch, seq, ckpt, answers in points:
            m = Measurement(llm, Workload(seq, batch, ckpt, answer_fraction=answers), int(trainable), 0.0)
            ms.append(replace(m, step_bytes=predicted_step(m, CPU, truth)))
    got = fit(ms, CPU)
    for name in ("act_recompute", "act_layer", "logit_bytes", "grad_factor", "workspace"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-3), name


def test_llava_mix_records_are_valid_and_spread_like_the_mix():
    import random

    from benchmarks.llava_mix import MIX, make_records
    from finetune.data.check import conversation_problems

    lexicon = WORDS.split()
    random.seed(1)
    state = random.getstate()
    records = make_records(600, lexicon, ["a.png"], tokens_per_word=1.5, seed=3)
    assert random.getstate() == state  # make_records leaves the global RNG alone...
    random.seed(2)
    assert records == make_records(600, lexicon, ["a.png"], tokens_per_word=1.5, seed=3)  # ...and ignores it
    assert records != make_records(600, lexicon, ["a.png"], tokens_per_word=1.5, seed=4)
    assert not [p for r in records if (p := conversation_problems(r))]
    text_only = sum("image" not in r for r in records) / len(records)
    assert text_only == pytest.approx(next(c.share for c in MIX if not c.image), abs=0.03)
    turns = np.array([len(r["conversations"]) // 2 for r in records])
    assert turns.min() == 1 and turns.max() >= 8 and np.median(turns) <= 4  # many short VQA, some long


def test_tensor_count_of_a_loaded_stage2_model_matches_the_memory_model(tiny_checkpoint):

    from benchmarks.memory import measure_shape
    from transformers import AutoConfig

    with one_torch_thread():
        out = measure_shape({"checkpoint": str(tiny_checkpoint), "lora_r": 8, "points": [(1, 40, True, 0.5)],
                             "device": "cpu", "threads": 1})
    c = AutoConfig.from_pretrained(tiny_checkpoint / "llm")
    llm = LlmShape("tiny", c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size,
                   c.num_key_value_heads * c.hidden_size // c.num_attention_heads)
    t = out["tensors"]
    assert t["nf4_params"] == llm.linear_params() and t["nf4_bytes"] / t["nf4_params"] >= NF4_BYTES
    vision = replace(CLIP_L_336, params=out["vision_params"], width=32)
    parts = static_parts(llm, vision, Workload(1, lora_r=8), CPU)
    assert out["trainable"] * 4 == parts["LoRA + projector"]
    expected = parts["embeddings, lm_head, norms"] + parts["vision tower"] + parts["LoRA + projector"]
    assert t["other_bytes"] == pytest.approx(expected, rel=1e-3)  # + rotary inv_freq buffers
    assert t["optimizer_bytes"] == parts["optimizer states"]
    assert out["points"][0]["step_bytes"] > 0


def test_train_benchmark_engines_see_the_same_tokens(tiny_llava_hf_dir, tmp_path, capsys):
    from benchmarks.random_llava import LlavaShape
    from benchmarks.train import TrainBenchConfig, measure, report, run_engine
    from mmchat.convert import to_mmchat

    shutil.copytree(tiny_llava_hf_dir, tmp_path / "llava-hf")
    to_mmchat(str(tmp_path / "llava-hf"), tmp_path / "mmchat")
    cfg = TrainBenchConfig(records=6, batch_size=2, lora_r=4, lora_alpha=8, text_scale=0.08, max_length=120,
                           sampler_records=60, shape=LlavaShape(image_size=32, patch=8), out=tmp_path / "out")
    with one_torch_thread():
        data = measure(cfg, tmp_path, WORDS.split(), runner=lambda job, work: run_engine(job))
    engines = data["engines"]
    assert set(engines) == {"plain", "mmchat", "mmchat-no-grouping"}
    assert len({r["tokens"] for r in engines.values()}) == 1
    assert len({r["trainable"] for r in engines.values()}) == 1  # same LoRA targets and projector
    assert all(r["steps"] == 3 for r in engines.values())
    assert engines["mmchat"]["positions"] <= engines["plain"]["positions"]  # sorted batches pad least
    capsys.readouterr()
    assert report(data, cfg.out) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("headline: training tokens/s, mmchat ÷ plain transformers + peft: ")
    assert (cfg.out / "train.json").is_file() and (cfg.out / "train.png").is_file()


def _logits(*rows):
    import torch

    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_engines_may_differ_only_at_a_near_tie():
    from benchmarks.agreement import compare_turn, is_near_tie, margins

    # step 0: both pick token 1; step 1: tokens 2 and 3 nearly tied, rounding tips them apart
    a = _logits([0.0, 3.0, 1.0, 0.0, -1.0], [0.5, 0.0, 2.0, 2.001, 0.0])
    b = _logits([0.0, 3.0, 1.0, 0.0, -1.0], [0.5, 0.0, 2.0015, 2.0005, 0.0])
    assert margins(a[1], b[1], 3, 2) == pytest.approx((0.001, 0.001), abs=1e-5)
    tie = compare_turn([1, 3], [1, 2], a, b, tol=0.01)
    assert tie["ok"] and tie["diverged_at"] == 1 and tie["compared"] == 2 and tie["tokens"] == [3, 2]
    assert tie["max_logit_diff"] == pytest.approx(0.0015, abs=1e-5)
    assert tie["near_tie_positions"] == 1  # step 1's top two are within the tolerance, step 0's are not
    # the same flip with a tolerance below the margins, and engines each sure of a different token, fail
    assert not compare_turn([1, 3], [1, 2], a, b, tol=1e-4)["ok"]
    sure = _logits([0.0, 3.0, 1.0, 0.0, -1.0], [0.5, 0.0, 4.0, 2.0, 0.0])
    far = compare_turn([1, 3], [1, 2], a, sure, tol=0.01)
    assert not far["ok"] and far["margins"] == pytest.approx([0.001, 2.0], abs=1e-5)
    assert is_near_tie(0.004, 0.01, 0.01) and not is_near_tie(0.0, 0.011, 0.01)
    # the same tokens pass whatever the logits; a sequence that ends sooner is compared as far as it goes
    same = compare_turn([1, 3], [1, 3, 4], a, _logits(*a.tolist(), [0.0] * 5), tol=0.01)
    assert same["ok"] and same["diverged_at"] is None and same["compared"] == 2


def test_chat_report_checks_agreement_and_keeps_its_headline(tmp_path, capsys):
    from benchmarks.agreement import compare_engines
    from benchmarks.chat import report

    logits = [_logits([0.0, 3.0, 1.0, 0.0, -1.0], [0.5, 0.0, 2.0, 2.001, 0.0])] * 2
    near = [_logits([0.0, 3.0, 1.0, 0.0, -1.0], [0.5, 0.0, 2.002, 2.0, 0.0])] * 2
    far = [logits[0], _logits([0.0, 3.0, 1.0, 0.0, -1.0], [0.5, 0.0, 3.0, 2.0, 0.0])]

    def turns(engine, second_turn):
        return [{"ttft_s": 1.0 if engine == "reference" else 0.1 * (i + 1), "decode_tps": 20.0, "peak_mb": 100.0,
                 "prompt_tokens": 50 * (i + 1), "prefilled_tokens": 50 if engine == "mmchat" else 50 * (i + 1),
                 "session_overhead_s_per_token": 1e-4, "session_overhead_share": 0.01, "image_tokens": 16,
                 "chosen": [1, 3] if i == 0 else second_turn} for i in range(2)]

    config = {"precisions": ["4bit"], "name": "chat", "image_tokens": {"label": "mlp2x_gelu"}}
    for other, second, code in ((near, [1, 2], 0), (far, [1, 3], 0), (far, [1, 2], 1)):
        ref, mm = turns("reference", [1, 3]), turns("mmchat", second)
        data = {"config": config, "shape": "tiny", "machine": "test",
                "turns": {"reference/4bit": ref, "mmchat/4bit": mm},
                "agreement": {"4bit": compare_engines(ref, mm, logits, other, "4bit")}}
        assert report(data, tmp_path) == code
        lines = capsys.readouterr().out.strip().splitlines()
        assert "images: mlp2x_gelu, 16 image tokens" in lines
        assert lines[-1].startswith("FAIL: " if code else "headline: turn-2 time to first token, reference ÷ mmchat: ")
    assert (tmp_path / "chat.json").is_file() and (tmp_path / "chat.png").is_file()
    # a resampler: mmchat alone, its own file
    alone = {"config": {**config, "name": "chat-resampler", "image_tokens": {"label": "resampler, 8 queries"}},
             "shape": "tiny", "machine": "test", "turns": {"mmchat/4bit": turns("mmchat", [1, 3])}, "agreement": {}}
    assert report(alone, tmp_path) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "headline: mmchat alone (resampler, 8 queries, 16 image tokens; transformers has no resampler), "
        "time to first token turn 1 → 2: 4bit 0.100 s → 0.200 s")
    assert (tmp_path / "chat-resampler.json").is_file() and (tmp_path / "chat-resampler.png").is_file()


def test_image_token_strategies_count_with_mmchats_code():
    import argparse

    from benchmarks.image_strategy import ImageTokens, add_flags, from_flags

    assert ImageTokens("mlp").count(336, 14) == 576
    assert ImageTokens("resampler", queries=64).count(336, 14) == 64
    # llava-v1.6 on a 672 x 672 picture: the base tile, the 2x2 grid's 48 x 48 map, a newline after each row
    assert ImageTokens("anyres").count(336, 14) == 576 + 48 * 48 + 48 == 2928
    assert ImageTokens("anyres", grid=(1, 3)).count(336, 14) == 576 + 24 * (72 + 1)
    assert [ImageTokens(n).tiles for n in ("mlp", "resampler", "anyres")] == [1, 1, 5]
    assert ImageTokens("anyres").pinpoints(56) == [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]

    p = argparse.ArgumentParser()
    add_flags(p)
    assert from_flags(p.parse_args([])) == ImageTokens("mlp")
    assert from_flags(p.parse_args(["--image-tokens", "anyres", "--grid", "1×2"])).grid == (1, 2)
    assert from_flags(p.parse_args(["--image-tokens", "resampler", "--queries", "16"])).count(336, 14) == 16
    for argv, message in ((["--grid", "2x2"], "Can't use --grid with --image-tokens mlp"),
                          (["--image-tokens", "anyres", "--queries", "8"], "Can't use --queries with --image-tokens anyres"),
                          (["--image-tokens", "anyres", "--grid", "3x3"], "--grid 3x3: llava-v1.6's pinpoints allow 1x2, "),
                          (["--image-tokens", "anyres", "--grid", "two"], "--grid 'two': write ROWSxCOLS")):
        with pytest.raises(ValueError, match=message):
            from_flags(p.parse_args(argv))


def test_memory_model_swaps_the_image_tokens_and_counts_the_projector():
    import torch

    from benchmarks.memory import projector_saved_bytes, saved_bytes
    from benchmarks.memory_report import strategy_case
    from mmchat.config import ProjectorConfig
    from mmchat.projector import build_projector

    for queries in (None, 64):
        cfg = ProjectorConfig("resampler" if queries else "mlp2x_gelu", 1024, 4096, queries=queries)
        with torch.device("meta"):
            params = sum(p.numel() for p in build_projector(cfg).parameters())
        assert replace(CLIP_L_336, queries=queries).projector_params(4096) == params
    # the extrapolation from 16 and 36 patches equals a count at 64 (small widths: fast)
    for cfg in (ProjectorConfig("mlp2x_gelu", 32, 64), ProjectorConfig("resampler", 32, 64, queries=4)):
        per_tile, per_step = projector_saved_bytes(cfg, 64)
        module = build_projector(cfg).requires_grad_(True)
        counted = [saved_bytes(module, lambda: module(torch.randn(n, 64, 32)), autocast=True) for n in (1, 3)]
        assert per_tile == pytest.approx((counted[1] - counted[0]) / 2) and per_step > 0
        assert counted[0] == pytest.approx(per_tile + per_step)

    cfg = {"seq_len": 2048, "batch": 1, "lora_r": 128, "answer_fraction": 0.5, "vision_dtype": "fp32"}
    saved = {"7b": {"per_sequence": 1e7, "per_step": 3e7}}
    sides = {"mlp": {"strategy": "mlp", "queries": 64, "image_tokens": 576, "saved": saved},
             "resampler": {"strategy": "resampler", "queries": 64, "image_tokens": 64, "saved": saved},
             "anyres": {"strategy": "anyres", "queries": 64, "image_tokens": 2928,
                        "saved": {"7b": {"per_sequence": 5e7, "per_step": 3e7}}}}
    cases = {name: strategy_case(cfg, side, "7b") for name, side in sides.items()}
    assert {name: work.seq_len for name, (_, work) in cases.items()} == {"mlp": 2048, "resampler": 1536, "anyres": 4400}
    assert {round(work.answer_fraction * work.seq_len) for _, work in cases.values()} == {1024}  # the same answers
    assert cases["resampler"][0].queries == 64 and cases["mlp"][0].queries is None
    peaks = {name: peak_bytes(LLAMA["7b"], vision, work, GPU, COEF) for name, (vision, work) in cases.items()}
    assert peaks["anyres"] > peaks["mlp"]
    # the projector's saved tensors are alive while the LLM's are (to the end of its backward), not after
    mlp = replace(cases["mlp"][1], batch=2)
    no_image = replace(mlp, image_bytes_per_sequence=0.0, image_bytes_per_step=0.0)
    with_image, without = (moment_bytes(LLAMA["7b"], w, GPU, COEF, 3e8) for w in (mlp, no_image))
    assert {k: with_image[k] - without[k] for k in without} == pytest.approx(
        {"logits": 2 * 1e7 + 3e7, "recompute": 2 * 1e7 + 3e7, "gradients": 0.0})


def test_small_model_benchmark_quick(tmp_path, capsys):
    """`python -m benchmarks.small_model --quick`: the real shape's config says 729 image tokens and ~0.86B
    parameters (counted on the meta device, nothing built); the quick run fills every field sanely."""
    import json

    import torch
    from transformers import LlavaForConditionalGeneration

    from benchmarks.random_llava import InterleaveShape, interleave_config
    from benchmarks.small_model import SmallModelConfig, report, run

    real = interleave_config(InterleaveShape())
    assert real.image_seq_length == 729 and real.image_token_index == 151646 and real.text_config.vocab_size == 152000
    with torch.device("meta"):
        params = sum(p.numel() for p in LlavaForConditionalGeneration(real).parameters())
    assert 0.85e9 < params < 0.88e9, params  # Qwen1.5-0.5B (tied) + SigLIP so400m + projector

    assert report(run(SmallModelConfig(quick=True, out=tmp_path)), tmp_path) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("headline: ")
    data = json.loads((tmp_path / "small_model.json").read_text())
    assert (tmp_path / "small_model.png").is_file() and data["image_tokens"] == 729
    assert set(data["runs"]) == {"mmchat/app", "transformers/32bit"} and data["runs"]["mmchat/app"]["load_in"] == "32bit"
    for key, r in data["runs"].items():
        assert r["image_tokens"] == 729 and r["load_s"] > 0 and len(r["turns"]) == 3, key
        assert 0 < r["rss_before_load_mb"] < r["rss_after_load_mb"] <= r["peak_chat_mb"] < 8192, key
        assert all(t["ttft_s"] > 0 and t["decode_tps"] > 0 and t["new_tokens"] >= 1 for t in r["turns"]), key
        assert r["turns"][0]["prefilled_tokens"] > 729, key
    mm, ref = data["runs"]["mmchat/app"]["turns"], data["runs"]["transformers/32bit"]["turns"]
    assert all(t["prefilled_tokens"] < 64 for t in mm[1:])  # follow-ups prefill only the new turn
    assert [t["prefilled_tokens"] for t in ref] == sorted(t["prefilled_tokens"] for t in ref)  # the whole conversation
    assert set(data["summary"]) == set(data["runs"]) and data["convert"]["convert_s"] > 0


def test_image_tokens_benchmark_quick(tmp_path, capsys):
    """`python -m benchmarks.image_tokens --quick`: one random LLaVA read three ways; the counts are the
    strategies' own, every time was measured, the accuracy column comes from the demo builds' file."""
    from benchmarks.image_tokens import main, markdown

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "headline: × mlp2x_gelu's (256 tokens) turn-1 time to first token / stage-2 step: resampler, 64 queries (64) ")
    data = json.loads((tmp_path / "image_tokens.json").read_text())
    rows = data["strategies"]
    assert {n: (r["image_tokens"], r["tiles"]) for n, r in rows.items()} == {
        "mlp": (256, 1), "resampler": (64, 1), "anyres": (256 + 32 * 33, 5)}  # 224-px tiles: a 16 x 16 grid
    for name, r in rows.items():
        assert r["ttft_turn_1_s"] > r["ttft_last_s"] > 0, name  # turn 1 encodes and prefills the image
        assert r["training"]["sequence"] == 1 + r["image_tokens"] + 64 and r["training"]["step_s"] > 0, name
    assert rows["anyres"]["ttft_turn_1_s"] > rows["mlp"]["ttft_turn_1_s"]
    accuracy = {name: row["accuracy"] for name, row in data["accuracy"].items()}
    assert accuracy == pytest.approx({"mlp": 1.0, "resampler": 0.842, "anyres": 0.95}, abs=1e-3)
    table = (tmp_path / "image_tokens.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| `mlp2x_gelu`", "| `resampler, 64 queries`", "| `AnyRes 2×2`"]
    assert table[2].endswith("| 100.0% (120)¹ |") and table[4].endswith("| 95.0% (120)¹ |")
    # Without a demo build of a strategy, its cell says so.
    table = markdown({**data, "accuracy": {}})
    assert table.count("| —² |") == 3 and "² No demo build reads images this way." in table
    assert (tmp_path / "image_tokens.png").is_file()


def test_chat_benchmark_reads_anyres_as_transformers_next_does(tmp_path):
    """`benchmarks.chat --image-tokens anyres` on a tiny shape, in process: both engines put the base
    tile + 2x2 grid's tokens in the prompt and answer alike (the near-tie rule)."""
    from benchmarks.agreement import compare_engines
    from benchmarks.chat import ChatBenchConfig, build, run_mmchat, run_reference
    from benchmarks.image_strategy import ImageTokens
    from benchmarks.random_llava import LlavaShape

    shape = LlavaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=600, vision_width=64,
                       vision_layers=2, image_size=56, patch=14)
    cfg = ChatBenchConfig(shape=shape, turns=2, new_tokens=6, image_tokens=ImageTokens("anyres"))
    lexicon = build(cfg, tmp_path)
    runs, logits = {}, {}
    with one_torch_thread():
        for engine in cfg.engines:
            job = {"engine": engine, "precision": "32bit", "device": "cpu", "folder": str(tmp_path / "llava-hf"),
                   "checkpoint": str(tmp_path / "mmchat"), "image": str(tmp_path / "image.png"),
                   "questions": [" ".join(lexicon[:6]) + "?", " ".join(lexicon[6:10]) + "?"], "new_tokens": 6,
                   "logits": str(tmp_path / f"{engine}.pt"), "history": [t["answer"] for t in runs.get("mmchat", [])]}
            runs[engine] = (run_mmchat if engine == "mmchat" else run_reference)(job)
            logits[engine] = torch_load(job["logits"])
    assert runs["mmchat"][0]["image_tokens"] == 16 + 8 * 9 == ImageTokens("anyres").count(56, 14)
    assert [t["prompt_tokens"] for t in runs["mmchat"]] == [t["prompt_tokens"] for t in runs["reference"]]
    second = runs["mmchat"][1]
    assert second["prefilled_tokens"] < second["prompt_tokens"] - 88  # turn 2 reuses the cached image
    agreement = compare_engines(runs["reference"], runs["mmchat"], logits["reference"], logits["mmchat"], "32bit")
    assert not agreement["failures"] and agreement["tokens_compared"] >= 2, agreement


def torch_load(path):
    import torch

    return torch.load(path)
