"""`python -m finetune.qlora` on tiny models (CPU, no network).

Label masks token by token; stage 2 on real 4-bit `Linear4bit` layers (the loss drops, only
LoRA and projector tensors change); stage 1 from parts (only the projector changes); resume
equals a straight run bit for bit; the output chats in `mmchat.cli`; two DDP ranks stay equal.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.batching import RankBatchSampler, collate, global_batches, padding_fraction
from finetune.build import read_projector
from finetune.data.dataset import LlavaDataset, RenderSettings, read_records
from finetune.objective import AnswerLoss
from finetune.qlora import main as qlora_main
from finetune.train import train
from finetune.train_config import ConfigError, TrainConfig, flag, load_yaml, parse_args
from mmchat.chat import ChatSession
from mmchat.config import VisionConfig
from mmchat.conversation import IGNORE_INDEX
from mmchat.generate import GenerationConfig
from mmchat.model import LoadOptions, load_llm, load_model
from mmchat.templates import get_template
from tiny_models import COLOURS, build_colour_data, one_torch_thread, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "finetune" / "configs"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def run_module(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # see one_torch_thread
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def lora_free(state: dict) -> dict:
    """A PEFT-wrapped LLM's base tensors under the names of the plain model."""
    out = {}
    for name, tensor in state.items():
        if "lora_" not in name:
            out[name.removeprefix("base_model.model.").replace(".base_layer", "")] = tensor
    return out


# ---------------------------------------------------------------- labels and batches


def test_label_mask_of_a_multi_turn_image_example_token_by_token(tiny_tokenizer, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), COLOURS["red"]).save(image)
    answers = ["red", "yes it is", "two"]
    record = {"id": "m1", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": answers[0]},
        {"from": "human", "value": "Is it a square?"}, {"from": "gpt", "value": answers[1]},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": answers[2]}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    settings = RenderSettings(tiny_tokenizer, get_template("llava_v1"), 16, None, 512)
    vision = VisionConfig(pretrained=None, image_size=32)
    example = LlavaDataset(read_records(tmp_path / "data.jsonl"), settings, vision, tmp_path)[0]
    ids, labels, slots = example["input_ids"].tolist(), example["labels"].tolist(), example["image_mask"].tolist()
    assert example["pixel_values"].shape == (1, 3, 32, 32)

    # Every token is either labelled with itself or IGNORE_INDEX.
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))
    # BOS, then the system prompt and "USER:", all unlabelled; then exactly 16 unlabelled image slots.
    first_slot = slots.index(True)
    assert ids[0] == tiny_tokenizer.bos_token_id and slots[first_slot:first_slot + 16] == [True] * 16 and sum(slots) == 16
    assert tiny_tokenizer.decode(ids[1:first_slot]).strip() == get_template("llava_v1").system + " USER:"
    assert all(labels[i] == IGNORE_INDEX for i in range(first_slot + 16))
    # The labelled tokens form one run per answer, each exactly " answer</s>", right after "ASSISTANT:".
    runs, i = [], 0
    while i < len(ids):
        if labels[i] == IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < len(ids) and labels[j] != IGNORE_INDEX:
            j += 1
        runs.append((i, j))
        i = j
    assert [tiny_tokenizer.decode(ids[a:b]).strip() for a, b in runs] == [f"{a}</s>" for a in answers]
    assert all(tiny_tokenizer.decode(ids[:a]).endswith("ASSISTANT:") for a, _ in runs)
    # Between answers: the next user turn only, unlabelled ("USER: Is it a square? ASSISTANT:").
    between = [tiny_tokenizer.decode(ids[b:a]).strip() for (_, b), (a, _) in zip(runs, runs[1:])]
    assert between == ["USER: Is it a square? ASSISTANT:", "USER: How many? ASSISTANT:"]
    assert runs[-1][1] == len(ids)

    # Collated with a shorter text-only example: padding is unlabelled and unattended.
    short = {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, -100, 6]),
             "image_mask": torch.zeros(3, dtype=torch.bool), "pixel_values": None}
    batch = collate([example, short], pad_id=3)
    assert batch["input_ids"].shape == (2, len(ids)) and batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["labels"][1, 3:].eq(IGNORE_INDEX).all() and batch["attention_mask"][1].tolist() == [1] * 3 + [0] * (len(ids) - 3)
    assert batch["input_ids"][1, 3:].eq(3).all() and not batch["image_mask"][1].any()


def test_length_grouped_batches_cover_every_record_pad_less_and_resume():
    lengths = np.random.default_rng(0).integers(20, 2000, size=1001)
    for world in (1, 2, 4):
        batches = global_batches(lengths, 4, world, seed=1, epoch=0, group_by_length=True)
        seen = np.concatenate(batches)
        assert set(seen.tolist()) == set(range(len(lengths))) and len(seen) - len(lengths) < world
        assert all(len(b) % world == 0 for b in batches)  # every rank gets a share of every batch
        assert lengths[batches[0]].max() == lengths.max()  # the longest batch first: OOM shows at step 1
    grouped = padding_fraction(global_batches(lengths, 8, 1, 0, 0, True), lengths)
    shuffled = padding_fraction(global_batches(lengths, 8, 1, 0, 0, False), lengths)
    assert grouped < 0.05 < 0.3 < shuffled
    # Deterministic per (seed, epoch); a new order each epoch.
    again = global_batches(lengths, 8, 1, 0, 0, True)
    assert all((a == b).all() for a, b in zip(again, global_batches(lengths, 8, 1, 0, 0, True)))
    assert not (np.concatenate(again) == np.concatenate(global_batches(lengths, 8, 1, 0, 1, True))).all()
    # Ranks split each global batch; a sampler started at position k yields the rest.
    ranks = [list(RankBatchSampler(lengths, 4, 2, r, seed=3)) for r in (0, 1)]
    assert sorted(i for r in ranks for b in r for i in b) == sorted(np.concatenate(global_batches(lengths, 4, 2, 3, 0, True)).tolist())
    sampler = RankBatchSampler(lengths, 4, 1, 0, seed=3)
    full = list(sampler)
    sampler.set_epoch(0, start=7)
    assert list(sampler) == full[7:] and len(sampler) == len(full) - 7


# ---------------------------------------------------------------- training


def test_stage2_qlora_loss_drops_and_only_lora_and_projector_change(qlora_run, tiny_train_checkpoint):
    import bitsandbytes as bnb

    losses = [r["loss"] for r in qlora_run.history]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3]), losses
    model = qlora_run.built.model
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules()) == 14  # 7 per layer, real 4-bit
    trained = model.llm.state_dict()
    # The quantised base: byte for byte what a fresh 4-bit load of the base gives.
    fresh = load_llm(str(tiny_train_checkpoint / "llm"), LoadOptions("4bit", "cpu")).state_dict()
    base = lora_free(trained)
    assert base.keys() == fresh.keys()
    assert all(torch.equal(base[k], fresh[k]) for k in fresh)
    assert any(v.dtype == torch.uint8 for v in base.values())  # packed NF4 weights were compared
    # LoRA B starts at zero; all 28 of them moved. The projector moved; the vision tower did not.
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)
    start = read_projector(tiny_train_checkpoint)
    assert all(not torch.equal(start[k], v.cpu()) for k, v in model.projector.state_dict().items())
    original = load_model(tiny_train_checkpoint, LoadOptions("32bit", "cpu")).vision.state_dict()
    assert all(torch.equal(original[k], v) for k, v in model.vision.state_dict().items())
    # The output: base by reference + adapter + projector + tokenizer, and the run's logs.
    out = qlora_run.output
    config = json.loads((out / "mmchat.json").read_text())
    assert config["llm"] == str((tiny_train_checkpoint / "llm").resolve()) and config["adapter"] == "adapter"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "tokenizer").is_dir()
    assert (out / "loss.png").stat().st_size > 1000
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    assert {"loss", "lr", "lr_projector", "tokens_per_s", "padding", "peak_mem_gb"} <= set(log[0])
    assert log[0]["lr_projector"] == log[0]["lr"] and log[-1]["lr"] < log[0]["lr"]  # cosine towards 0


def test_stage1_from_parts_changes_only_the_projector(tiny_train_checkpoint, tmp_path):
    data = build_colour_data(tmp_path / "data", records=24, text_only=8, suffix=".jsonl")
    cfg = tiny_train_config("align", llm=str(tiny_train_checkpoint / "llm"), vision=str(tiny_train_checkpoint),
                            data=str(data), image_root=str(data.parent), output_dir=str(tmp_path / "out"), max_steps=8)
    result = train(cfg)
    model = result.built.model
    fresh = load_llm(str(tiny_train_checkpoint / "llm"), LoadOptions("4bit", "cpu")).state_dict()
    trained = model.llm.state_dict()
    assert trained.keys() == fresh.keys() and all(torch.equal(trained[k], fresh[k]) for k in fresh)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"projector"}
    losses = [r["loss"] for r in result.history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    config = json.loads((tmp_path / "out" / "mmchat.json").read_text())
    assert config["adapter"] is None and config["template"] == "plain" and config["projector"]["in_dim"] == 32
    # The projector of a new model (no --projector) differs from the checkpoint's.
    saved = load_file(str(tmp_path / "out" / "projector.safetensors"))
    assert not torch.equal(saved["0.weight"], read_projector(tiny_train_checkpoint)["0.weight"])


def test_text_only_batch_in_stage1_still_reaches_the_projector(tiny_train_checkpoint, tiny_tokenizer, tmp_path):
    # Stage 1 trains only the projector, which a batch without images never uses; DDP needs every
    # rank to reduce the same parameters, so the loss keeps the projector in the graph at zero weight.
    data = build_colour_data(tmp_path / "data", records=4)
    result = train(tiny_train_config("align", model=str(tiny_train_checkpoint), data=str(data),
                                     image_root=str(data.parent), output_dir=str(tmp_path / "out"), max_steps=1))
    model = result.built.model
    ids = torch.tensor([tiny_tokenizer("yes")["input_ids"] + [2]])
    loss = AnswerLoss(model)(ids, torch.zeros_like(ids, dtype=torch.bool), torch.ones_like(ids), ids.clone())
    loss.backward()
    assert loss > 0 and all(p.grad is not None and not p.grad.any() for p in model.projector.parameters())


def test_full_stage_trains_the_whole_llm_and_saves_it(tiny_train_checkpoint, colour_data, tmp_path):
    def cfg(**extra):
        return tiny_train_config("instruct", stage="full", load_in="auto", model=str(tiny_train_checkpoint),
                                 data=str(colour_data), image_root=str(colour_data.parent),
                                 output_dir=str(tmp_path / "out"), max_steps=3, lr=1e-3, **extra)

    assert not train(cfg(stop_after=2)).finished
    result = train(cfg(resume=True))  # restores every LLM weight from the step-2 checkpoint
    assert result.finished and result.built.model.llm.get_input_embeddings().weight.dtype == torch.float32
    config = json.loads((tmp_path / "out" / "mmchat.json").read_text())
    assert (config["llm"], config["adapter"]) == ("llm", None) and (tmp_path / "out" / "llm" / "config.json").is_file()
    trained = load_model(tmp_path / "out", LoadOptions("32bit", "cpu")).llm.state_dict()
    original = load_model(tiny_train_checkpoint, LoadOptions("32bit", "cpu")).llm.state_dict()
    assert all(not torch.equal(trained[k], original[k]) for k in trained if k.endswith("q_proj.weight"))


def test_resume_equals_a_straight_run(tiny_train_checkpoint, colour_data, tmp_path):
    def cfg(out, **extra):
        return tiny_train_config("instruct", model=str(tiny_train_checkpoint), data=str(colour_data),
                                 image_root=str(colour_data.parent), output_dir=str(out), max_steps=6, grad_accum=2,
                                 batch_size=2, lora_dropout=0.1, num_workers=1, **extra)

    straight = train(cfg(tmp_path / "a"))
    first = train(cfg(tmp_path / "b", stop_after=3))
    assert not first.finished and not (tmp_path / "b" / "mmchat.json").exists()
    resumed = train(cfg(tmp_path / "b", resume=True))
    assert resumed.finished and resumed.state.step == 6
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = [json.loads(line)["loss"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log == [r["loss"] for r in straight.history]
    # A resumed run must keep the options that shape the run.
    with pytest.raises(ConfigError, match="--batch-size 2 \\(now 4\\)"):
        train(TrainConfig(**{**cfg(tmp_path / "b", resume=True).to_dict(), "batch_size": 4}))


def test_output_chats_in_the_cli_and_answers_the_colour(qlora_run, tiny_train_checkpoint, colour_data):
    red = colour_data.parent / "images" / "red.png"
    args = ("-m", "mmchat.cli", "--image", str(red), "--prompt", "What colour is it?", "--temperature", "0",
            "--max-new-tokens", "4", "--json")
    trained = run_module(*args, "--model", str(qlora_run.output))
    untrained = run_module(*args, "--model", str(tiny_train_checkpoint))
    assert trained.returncode == 0 and untrained.returncode == 0, trained.stderr + untrained.stderr
    assert json.loads(trained.stdout)["answers"] == ["red"]
    assert json.loads(untrained.stdout)["answers"] != ["red"]
    model = load_model(qlora_run.output, LoadOptions("4bit", "cpu"))
    greedy = GenerationConfig(max_new_tokens=4, temperature=0)
    answers = {c: "".join(ChatSession(model).ask("What colour is it?", colour_data.parent / "images" / f"{c}.png", greedy))
               for c in COLOURS}
    assert answers == {c: c for c in COLOURS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_on_cpu_end_equal_and_match_one_process(tiny_train_checkpoint, colour_data, tmp_path):
    common = ["--config", str(ROOT / "tests" / "configs" / "tiny-instruct.yaml"), "--model", str(tiny_train_checkpoint),
              "--data", str(colour_data), "--image-root", str(colour_data.parent), "--max-steps", "3", "--no-progress",
              "--lora-dropout", "0"]  # dropout masks depend on how the batch is split
    # accelerate's `--cpu` launcher starts one process unless MPI is set up; `--multi_gpu` starts torchrun,
    # and with `cpu: true` (tiny configs) each rank trains on the CPU over gloo.
    out = run_module("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                     "-m", "finetune.qlora", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "ddp"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert len(summary["rank_digests"]) == 2 and summary["ranks_in_sync"]
    # Same global batches (2 ranks × 2 = 1 process × 4), same token-mean loss: the same weights.
    assert qlora_main([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]) == 0
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(tmp_path / "ddp" / name)), load_file(str(tmp_path / "one" / name))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name


# ---------------------------------------------------------------- options and errors


def test_every_option_is_a_flag_with_its_default_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.__dataclass_fields__:
        assert flag(name) in text, name
    assert "--batch-size BATCH_SIZE Examples per device per forward pass" in text and "(default: 4)" in text
    assert "--gradient-checkpointing, --no-gradient-checkpointing" in text


def test_yaml_then_flags_and_errors_naming_close_matches(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stage: align\nlr: 1e-3\nbatch_size: 8\ndata: d.json\noutput_dir: out\nllm: x\n")
    cfg = parse_args(["--config", str(config), "--batch-size", "2", "--lora-targets", "q_proj", "v_proj"])
    assert (cfg.stage, cfg.lr, cfg.batch_size, cfg.lora_targets) == ("align", 1e-3, 2, ["q_proj", "v_proj"])
    assert cfg.template_name == "plain" and cfg.llm_load_in == "4bit"
    config.write_text("stage: align\nbatch_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'; did you mean batch_size"):
        parse_args(["--config", str(config)])
    with pytest.raises(ConfigError, match="unknown flag '--gradient-acum'; did you mean --grad-accum"):
        parse_args(["--llm", "x", "--data", "d", "--output-dir", "o", "--gradient-acum", "2"])
    with pytest.raises(ConfigError, match="Can't provide both --model and --llm"):
        parse_args(["--llm", "x", "--model", "y", "--data", "d", "--output-dir", "o"])
    with pytest.raises(ConfigError, match="Can't provide both --model and --vision-select-layer"):
        parse_args(["--model", "y", "--data", "d", "--output-dir", "o", "--vision-select-layer", "-1"])
    with pytest.raises(ConfigError, match="--stage full .* --load-in 4bit"):
        parse_args(["--llm", "x", "--data", "d", "--output-dir", "o", "--stage", "full", "--load-in", "4bit"])


def test_shipped_configs_follow_the_llava_recipes():
    configs = {}
    for path in [*CONFIGS.glob("*.yaml"), *(ROOT / "tests" / "configs").glob("*.yaml")]:
        values = {"data": "d.json", "output_dir": "o", **load_yaml(path)}
        configs[path.stem] = TrainConfig(**({} if "llm" in values else {"model": "m"}), **values)
    assert {"llava-1.5-7b-align", "llava-1.5-7b-instruct", "tiny-align", "tiny-instruct"} <= set(configs)
    align, instruct = configs["llava-1.5-7b-align"], configs["llava-1.5-7b-instruct"]
    assert (align.stage, align.lr, align.batch_size * align.grad_accum, align.template_name) == ("align", 1e-3, 256, "plain")
    assert (instruct.stage, instruct.lora_r, instruct.lora_alpha, instruct.lr, instruct.projector_lr) == (
        "instruct", 128, 256, 2e-4, 2e-5)
    assert instruct.batch_size * instruct.grad_accum == 128 and instruct.llm_load_in == "4bit"
    for c in (align, instruct):
        assert (c.lr_scheduler, c.warmup_ratio, c.max_length, c.epochs) == ("cosine", 0.03, 2048, 1)
        assert c.gradient_checkpointing and c.optimizer == "paged_adamw_8bit" and c.precision == "bf16"
    for path in [*CONFIGS.glob("*.yaml"), *(ROOT / "tests" / "configs").glob("*.yaml")]:
        assert path.read_text().startswith("#") and "python -m finetune.qlora --config" in path.read_text()


def test_user_errors_are_one_line(tiny_train_checkpoint, colour_data, tmp_path, capsys, monkeypatch):
    base = ["--config", str(ROOT / "tests" / "configs" / "tiny-instruct.yaml"), "--model", str(tiny_train_checkpoint), "--no-progress"]

    def error(*args) -> str:
        """The one `error:` line (stderr also holds progress bars of model loading)."""
        assert qlora_main([*base, *args]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, lines
        return lines[0]

    assert error("--data", str(tmp_path / "nope.json"), "--output-dir", str(tmp_path / "a")) == (
        f"error: --data {tmp_path / 'nope.json'}: file not found")
    message = error("--data", str(colour_data), "--image-root", str(tmp_path), "--output-dir", str(tmp_path / "b"))
    assert message.startswith("error: none of the 32 images exist under --image-root") and "record c0" in message
    message = error("--data", str(colour_data), "--image-root", str(colour_data.parent), "--output-dir",
                    str(tmp_path / "b"), "--lora-targets", "q_prj")
    assert "--lora-targets q_prj: no such linear layer" in message and "q_proj" in message
    # Out of memory: one line naming the knobs (here with gradient checkpointing off, so it is named too).
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(AnswerLoss, "forward", oom)
    message = error("--data", str(colour_data), "--image-root", str(colour_data.parent), "--output-dir",
                    str(tmp_path / "c"), "--no-gradient-checkpointing", "--max-steps", "1")
    assert message.startswith("error: out of GPU memory at step 1")
    for knob in ("--batch-size", "--grad-accum", "--max-length", "--gradient-checkpointing"):
        assert knob in message
    # A previous run is never overwritten by accident.
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    assert "pass --resume to continue it, --overwrite to start again" in error(
        "--data", str(colour_data), "--output-dir", str(tmp_path / "c"))


def test_long_records_are_truncated_and_counted_never_dropped(tiny_train_checkpoint, tmp_path, capsys):
    data = build_colour_data(tmp_path / "data", records=8, text_only=4, multi_turn=True)
    cfg = tiny_train_config("instruct", model=str(tiny_train_checkpoint), data=str(data), image_root=str(data.parent),
                            output_dir=str(tmp_path / "out"), max_length=120, max_steps=2)
    result = train(cfg)
    out = capsys.readouterr().out
    assert "4 record(s) longer than --max-length 120 are truncated (longest 131 tokens)" in out
    assert "12 records (8 with an image, 4 text-only)" in out and result.finished
    with np.load(tmp_path / "out" / "data_index.npz") as index:
        assert len(index["lengths"]) == 12 and index["lengths"].max() == 120 and (index["answer_tokens"] > 0).all()
