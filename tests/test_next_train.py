"""Stage 2 (4-bit QLoRA) on a LLaVA-NeXT (AnyRes) checkpoint: each image its own tiles and slots.

The tiny NeXT folder of tests/test_next.py, converted, its lm_head widened so LoRA can teach it (see
`build_trainable_checkpoint`), on solid-colour images of five shapes that pick four different grids
and five different slot counts. Properties: the lengths the batch sampler groups by are the real
rendered lengths; a batch's slots equal the features the model packs from its tiles, which equal the
chat path's; labels sit on answers only; the loss falls on real 4-bit layers; resume equals a
straight run; the output chats and merges. Stage 1 from parts on a NeXT tower, and a OneVision
checkpoint, train too.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.batching import collate
from finetune.build import read_projector
from finetune.data.dataset import LlavaDataset, RenderSettings, read_records
from finetune.objective import AnswerLoss
from finetune.train import prepare, train
from finetune.train_config import ConfigError
from mmchat.anyres import grid_shape
from mmchat.conversation import IGNORE_INDEX, messages_from_llava, render
from mmchat.convert.cli import main as convert
from mmchat.image import image_size, load_image
from mmchat.model import IMAGE_NEWLINE, LoadOptions, load_model
from mmchat.templates import get_template
from test_next import build_next_folder
from tiny_models import COLOURS, one_torch_thread, tiny_train_config

SHAPES = {"wide": (40, 30), "tall": (20, 60), "flat": (60, 20), "square": (80, 80), "thin": (30, 150)}
"""(width, height): grids 1x2, 2x1, 1x2, 2x2 and 3x1 of 56-px tiles, 64 + 88 to 64 + 272 slots."""
STEPS = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("next-train")
    assert convert([str(build_next_folder(root / "folder")), str(root / "next")]) == 0
    llm = AutoModelForCausalLM.from_pretrained(root / "next" / "llm")
    with torch.no_grad():
        llm.lm_head.weight.copy_(torch.randn(llm.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    llm.save_pretrained(root / "next" / "llm")
    return root / "next"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 records: each colour in each shape, "What colour is it?" -> the colour's name."""
    folder = tmp_path_factory.mktemp("shapes")
    (folder / "images").mkdir()
    records = []
    for shape, size in SHAPES.items():
        for colour, rgb in COLOURS.items():
            Image.new("RGB", size, rgb).save(folder / "images" / f"{colour}-{shape}.png")
            records.append({"id": f"{colour}-{shape}", "image": f"images/{colour}-{shape}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, LoadOptions("32bit", "cpu"))


def config(checkpoint, data, out, **extra):
    return tiny_train_config("instruct", model=str(checkpoint), data=str(data), image_root=str(data.parent),
                             output_dir=str(out), max_steps=STEPS, max_length=512, batch_size=2, grad_accum=2,
                             lora_dropout=0.1, num_workers=1, **extra)


@pytest.fixture(scope="module")
def straight(checkpoint, data, tmp_path_factory):
    return train(config(checkpoint, data, tmp_path_factory.mktemp("run") / "a"))


def real_lengths(model, data) -> list[int]:
    """Each record rendered with `image_token_counts` of its loaded image, as chat renders it."""
    template = get_template("llava_v1")
    return [len(render(messages_from_llava(r["conversations"]), template, model.tokenizer,
                       model.image_token_counts([load_image(data.parent / r["image"])]),
                       image_token_id=model.config.image_token_id).input_ids)
            for r in json.loads(data.read_text())]


def test_the_sampler_groups_by_each_images_real_tokens(checkpoint, data, model, tmp_path):
    expected = real_lengths(model, data)
    grids = {grid_shape(size[::-1], model.anyres) for size in SHAPES.values()}
    assert len(grids) == 4
    run = prepare(config(checkpoint, data, tmp_path / "p"))
    try:
        assert run.sampler.lengths.tolist() == expected
        assert max(expected) - min(expected) > 150  # a one-tile count would put them all within a few tokens
        assert run.sampler.lengths[run.sampler.batches[0]].max() == max(expected)  # the longest batch first
    finally:
        run.log.close()
    # The index takes sizes from file headers; an EXIF-turned JPEG is counted as load_image turns it.
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (90, 30), "red").save(turned, exif=exif)
    assert image_size(turned) == (90, 30) == (load_image(turned).height, load_image(turned).width)


def test_slots_equal_the_packed_features_and_labels_sit_on_answers(model, data):
    settings = RenderSettings(model.tokenizer, get_template("llava_v1"), model.image_tokens,
                              model.config.image_token_id, 512, model.anyres)
    dataset = LlavaDataset(read_records(data), settings, model.config.vision, data.parent)
    records = json.loads(data.read_text())
    picked = [len(COLOURS) * s + s % len(COLOURS) for s in range(len(SHAPES))]  # each shape, colours mixed
    batch = collate([dataset[i] for i in picked], pad_id=model.tokenizer.eos_token_id)
    images = [load_image(data.parent / records[i]["image"]) for i in picked]
    counts = [model.image_token_counts([image])[0] for image in images]
    assert batch["image_mask"].sum(1).tolist() == counts and len(set(counts)) == len(picked)
    assert batch["image_tiles"].tolist() == [1 + r * c for r, c in (grid_shape((im.height, im.width), model.anyres)
                                                                    for im in images)]
    with torch.no_grad():
        packed = model.pack_tiles(model.encode_images(batch["pixel_values"]), batch["image_sizes"], batch["image_tiles"])
        assert [f.shape[0] for f in packed] == counts
        for features, image in zip(packed, images):  # one batch of tiles = the chat path, image by image
            torch.testing.assert_close(features, model.encode_each([image])[0], atol=1e-5, rtol=0)
        loss = AnswerLoss(model)(batch["input_ids"], batch["image_mask"], batch["attention_mask"], batch["labels"],
                                 batch["pixel_values"], batch["image_sizes"], batch["image_tiles"])
    assert torch.isfinite(loss)
    for row, i in enumerate(picked):  # labelled: exactly the answer and its stop token
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        answer = labels != IGNORE_INDEX
        assert torch.equal(labels[answer], ids[answer]) and not (answer & batch["image_mask"][row]).any()
        spelt = model.tokenizer.decode(model.tokenizer.encode(records[i]["conversations"][1]["value"],
                                                              add_special_tokens=False))  # no "g": <unk>reen
        assert model.tokenizer.decode(ids[answer]).replace(" ", "") == spelt.replace(" ", "") + "</s>"
    with pytest.raises(ValueError, match="tiles, but image_tiles"):
        model(batch["input_ids"], batch["image_mask"], pixel_values=batch["pixel_values"],
              image_sizes=batch["image_sizes"], image_tiles=batch["image_tiles"] + 1)
    # A cut through an image drops it whole: no slots, no tiles.
    first = int(batch["image_mask"][0].int().argmax())
    cut = LlavaDataset(read_records(data), RenderSettings(**{**vars(settings), "max_length": first + 10}),
                       model.config.vision, data.parent)[0]
    assert cut["pixel_values"] is None and not cut["image_mask"].any() and "image_size" not in cut


def test_stage2_qlora_trains_a_next_model_in_4bit(straight, checkpoint):
    import bitsandbytes as bnb

    losses = [r["loss"] for r in straight.history]
    assert len(losses) == STEPS and np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3]), losses
    model = straight.built.model
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules()) == 14
    original = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    assert all(torch.equal(original.vision.state_dict()[k], v) for k, v in model.vision.state_dict().items())
    # image_newline trains with the projector and is saved beside it; the output is an AnyRes model.
    start, saved = read_projector(checkpoint), load_file(str(straight.output / "projector.safetensors"))
    assert saved.keys() == start.keys() and IMAGE_NEWLINE in saved
    assert not torch.equal(saved[IMAGE_NEWLINE], start[IMAGE_NEWLINE])
    assert torch.equal(saved[IMAGE_NEWLINE], getattr(model.projector, IMAGE_NEWLINE).detach().cpu())
    config = json.loads((straight.output / "mmchat.json").read_text())
    assert config["vision"]["anyres"] == json.loads((checkpoint / "mmchat.json").read_text())["vision"]["anyres"]
    assert config["adapter"] == "adapter" and config["template"] == "llava_v1"


def test_resume_equals_a_straight_run(straight, checkpoint, data, tmp_path):
    first = train(config(checkpoint, data, tmp_path / "b", stop_after=STEPS // 2))
    assert not first.finished
    resumed = train(config(checkpoint, data, tmp_path / "b", resume=True))
    assert resumed.finished and resumed.state.step == STEPS
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(straight.output / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = [json.loads(line)["loss"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log == [r["loss"] for r in straight.history]


@torch.no_grad()
def logits(model, image: Image.Image) -> torch.Tensor:
    """Last-position logits [V] of "What colour is it?" about `image`, rendered and encoded as chat does."""
    rendered = render(messages_from_llava([{"from": "human", "value": "<image>\nWhat colour is it?"}]),
                      get_template("llava_v1"), model.tokenizer, model.image_token_counts([image]),
                      add_generation_prompt=True, image_token_id=model.config.image_token_id)
    embeds = model.embed(torch.tensor([rendered.input_ids]), torch.tensor([rendered.image_mask]),
                         model.encode_each([image]))
    return model.llm(inputs_embeds=embeds).logits[0, -1]


def test_the_trained_model_chats_and_merges(straight, data, tmp_path):
    from finetune.merge import MergeArgs, merge
    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig

    model = load_model(straight.output, LoadOptions("4bit", "cpu"))
    assert torch.equal(getattr(model.projector, IMAGE_NEWLINE),
                       getattr(straight.built.model.projector, IMAGE_NEWLINE).detach().cpu())
    merged = load_model(merge(MergeArgs(straight.output, tmp_path / "merged", "fp32", "cpu", False)),
                        LoadOptions("32bit", "cpu"))
    image = load_image(data.parent / "images" / "red-square.png")
    torch.testing.assert_close(logits(merged, image), logits(load_model(straight.output, LoadOptions("32bit", "cpu")),
                                                             image), atol=1e-4, rtol=0)
    greedy = GenerationConfig(max_new_tokens=4, temperature=0)
    for shape in SHAPES:  # the image decides the answer, whatever its grid (the tokenizer has no "g")
        answers = {c: "".join(ChatSession(model).ask("What colour is it?", data.parent / "images" / f"{c}-{shape}.png",
                                                      greedy)) for c in COLOURS}
        assert {c: answers[c][:1] for c in ("red", "blue", "yellow")} == {"red": "r", "blue": "b", "yellow": "y"}
        assert len(set(answers.values())) == len(COLOURS), (shape, answers)


def test_stage1_from_parts_on_a_next_tower_starts_a_newline(checkpoint, data, tmp_path):
    cfg = tiny_train_config("align", llm=str(checkpoint / "llm"), vision=str(checkpoint), data=str(data),
                            image_root=str(data.parent), output_dir=str(tmp_path / "align"), max_steps=2,
                            max_length=512)
    result = train(cfg)
    newline = load_file(str(tmp_path / "align" / "projector.safetensors"))[IMAGE_NEWLINE]
    assert newline.shape == (64,) and 0.5 < float(newline.norm()) < 2  # random at 1/sqrt(width) per entry
    assert load_model(tmp_path / "align", LoadOptions("32bit", "cpu")).anyres == result.built.model.anyres
    plain = {k: v for k, v in read_projector(checkpoint).items() if k != IMAGE_NEWLINE}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match=f"has no {IMAGE_NEWLINE}, which an AnyRes"):
        train(tiny_train_config("instruct", model=str(checkpoint), projector=str(tmp_path / "plain.safetensors"),
                                data=str(data), image_root=str(data.parent), output_dir=str(tmp_path / "no")))


def test_a_onevision_checkpoint_trains_with_its_own_counts(data, tmp_path):
    from test_onevision import build_onevision_folder

    assert convert([str(build_onevision_folder(tmp_path / "folder")), str(tmp_path / "ov")]) == 0
    result = train(tiny_train_config("instruct", model=str(tmp_path / "ov"), data=str(data), image_root=str(data.parent),
                                     output_dir=str(tmp_path / "out"), max_steps=2, max_length=1024))
    assert result.finished and result.built.model.anyres.max_tiles is not None  # anyres_max_N: maps may shrink
    with np.load(tmp_path / "out" / "data_index.npz") as index:  # what the sampler groups by
        assert index["lengths"].tolist() == real_lengths(result.built.model, data)


def test_the_data_check_counts_each_images_tokens_as_the_model_does(checkpoint, data, model, capsys):
    """`python -m finetune.data check --model CKPT`: the checkpoint's tokenizer, template and each image's
    own AnyRes count, so the lengths it reports are the chat session's (not one fixed count per image)."""
    from finetune.data.cli import main as data_cli
    from mmchat.templates import resolve_template

    template = resolve_template(model.config.template, model.tokenizer)
    expected = sorted(len(render(messages_from_llava(r["conversations"]), template, model.tokenizer,
                                 model.image_token_counts([load_image(data.parent / r["image"])]),
                                 image_token_id=model.config.image_token_id).input_ids)
                      for r in json.loads(data.read_text()))
    limit = expected[-6]
    assert data_cli(["check", str(data), "--image-root", str(data.parent), "--model", str(checkpoint),
                     "--max-length", str(limit)]) == 0
    out = capsys.readouterr().out
    assert "AnyRes: 64 tokens per tile, each image's own grid" in out
    assert f"min {expected[0]}," in out and f"max {expected[-1]}" in out
    assert f"longer than --max-length {limit}: {sum(n > limit for n in expected)}" in out
    # An AnyRes count needs the image's size: without --image-root, one line says so.
    assert data_cli(["check", str(data), "--no-check-images", "--model", str(checkpoint)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AnyRes" in err[0] and "--image-root" in err[0]
