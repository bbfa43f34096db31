"""A converted llava-hf folder preprocesses and stops exactly as transformers does on that folder.

A converted checkpoint keeps the folder's processor, so its pixels are those of the image processor
`AutoProcessor` loads by default (the torchvision backend). The folder's settings are also read into
`VisionConfig` as transformers' PIL backend reads them (LLaVA's original preprocessing, which
`mmchat.image.preprocess` reproduces): that is what `--to llava-hf` writes back; the two backends'
bicubic resizes differ by up to ~0.015.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from matplotlib import cbook
from PIL import Image

from mmchat.checkpoint import read_config
from mmchat.config import CLIP_MEAN, CLIP_STD, VisionConfig
from mmchat.convert.cli import main
from mmchat.convert.from_llava import image_settings
from mmchat.image import load_image, preprocess
from mmchat.model import LoadOptions, load_model
from tiny_models import llava_hf_variant, sample_photo

QUESTION = "what colour is the circle?"
PREPROCESSING = ("image_size", "pad_to_square", "resize", "shortest_edge", "resample", "rescale", "rescale_factor",
                 "normalize", "mean", "std", "convert_rgb")


def processor_config(kind: str, size: int) -> dict:
    """Image processor configs as the hub's folders write them, at `size` px.

    crop:   llava-hf/llava-1.5-7b-hf's (a CLIPImageProcessor: no do_pad, shortest edge + centre crop)
    pad:    a LlavaImageProcessor with do_pad (LLaVA-1.5's pad to square)
    siglip: SigLIP-style (llava-interleave's): a plain resize to size × size, mean/std 0.5
    """
    common = {"do_normalize": True, "do_rescale": True, "do_resize": True, "processor_class": "LlavaProcessor",
              "resample": 3, "rescale_factor": 0.00392156862745098}
    clip = {**common, "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "size": {"shortest_edge": size}}
    return {
        "crop": {**clip, "image_processor_type": "CLIPImageProcessor"},
        "pad": {**clip, "image_processor_type": "LlavaImageProcessor", "do_pad": True},
        "siglip": {**common, "do_convert_rgb": None, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                   "image_processor_type": "SiglipImageProcessor", "size": {"height": size, "width": size}},
    }[kind]


def photo() -> Image.Image:
    """A real photo, 512 wide × 600 high."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return load_image(f.read())


def images() -> dict[str, Image.Image]:
    tall = photo()
    return {"tall": tall, "wide": tall.crop((0, 150, 512, 390)),  # 512 × 240
            "cheetah": load_image(sample_photo("cheetah"))}  # gradio's, 502 × 343


def reference_pixels(folder, image: Image.Image) -> torch.Tensor:
    """[3, S, S] from transformers' PIL-backend image processor for `folder`."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert processor.backend == "pil"
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def default_pixels(folder, image: Image.Image) -> torch.Tensor:
    """[3, S, S] from the image processor `AutoProcessor.from_pretrained(folder)` loads (torchvision backend)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder).image_processor(images=image, return_tensors="pt")["pixel_values"][0]


EXPECTED = {  # what the converter makes of each processor
    "crop": {"pad_to_square": False, "resize": "shortest_edge", "mean": CLIP_MEAN},
    "pad": {"pad_to_square": True, "resize": "shortest_edge", "mean": CLIP_MEAN},
    "siglip": {"pad_to_square": False, "resize": "exact", "mean": (0.5, 0.5, 0.5), "convert_rgb": False},
}


@pytest.mark.parametrize("kind,size", [("crop", 336), ("pad", 336), ("siglip", 384)])
def test_preprocess_equals_transformers_pil_processor(tmp_path, kind, size):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor_config(kind, size)))
    vision = VisionConfig(**image_settings(tmp_path, size))
    assert {k: getattr(vision, k) for k in EXPECTED[kind]} == EXPECTED[kind]
    assert (vision.image_size, vision.resample) == (size, 3)
    for name, image in images().items():
        ours, theirs = preprocess(image, vision), reference_pixels(tmp_path, image)
        assert ours.shape == theirs.shape == (3, size, size), name
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=f"{kind}, {name} image")


def test_more_processor_settings_round_trip_through_the_processor(tmp_path):
    """Bilinear, a shortest edge above the crop (256 -> 224), no normalisation: still transformers' pixels."""
    config = {**processor_config("pad", 224), "resample": 2, "size": {"shortest_edge": 256}, "do_normalize": False}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    vision = VisionConfig(**image_settings(tmp_path, 224))
    assert (vision.shortest_edge, vision.resample, vision.normalize) == (256, 2, False)
    for image in images().values():
        torch.testing.assert_close(preprocess(image, vision), reference_pixels(tmp_path, image), atol=1e-6, rtol=0)


def converted(src, dst, *flags: str):
    assert main([*flags, str(src), str(dst)]) == 0
    return dst


@pytest.mark.parametrize("kind", ["crop", "pad", "siglip", "processor_config.json"])
def test_converted_folder_preprocesses_as_its_processor(tiny_llava_hf_dir, tmp_path, kind):
    """`python -m mmchat.convert` on a llava-hf folder: mmchat's pixels = transformers' for that folder."""
    if kind == "processor_config.json":  # the fixture as save_pretrained writes it: nested, CLIPImageProcessor
        folder, expected = tiny_llava_hf_dir, EXPECTED["crop"]
    else:
        folder = llava_hf_variant(tiny_llava_hf_dir, tmp_path / f"llava-{kind}", processor_config(kind, 32))
        expected = EXPECTED[kind]
    checkpoint = converted(folder, tmp_path / "mmchat")
    vision = read_config(checkpoint).vision
    assert {k: getattr(vision, k) for k in expected} == expected
    for image in images().values():  # the settings read as the PIL backend reads them (what --to llava-hf writes)
        torch.testing.assert_close(preprocess(image, vision), reference_pixels(folder, image), atol=1e-6, rtol=0)
    # ... while the model's pixels are the default processor's, to the bit (the checkpoint keeps it)
    model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
    for image in images().values():
        assert torch.equal(model.pixels([image], "square")[0], default_pixels(folder, image))


def test_pad_flags_override_the_folder(tiny_llava_hf_dir, tmp_path):
    from transformers import LlavaImageProcessor

    from mmchat.model import load_processor

    padded = llava_hf_variant(tiny_llava_hf_dir, tmp_path / "llava-pad", processor_config("pad", 32))
    assert read_config(converted(tiny_llava_hf_dir, tmp_path / "a", "--pad")).vision.pad_to_square is True
    assert read_config(converted(padded, tmp_path / "b", "--no-pad")).vision.pad_to_square is False
    assert read_config(converted(padded, tmp_path / "c")).vision.pad_to_square is True
    # the kept processor pads as the flag says: transformers' LlavaImageProcessor with do_pad
    tall = images()["tall"]
    for name, pads in (("a", True), ("b", False), ("c", True)):
        image_processor = load_processor(str(tmp_path / name / "processor")).image_processor
        assert isinstance(image_processor, LlavaImageProcessor) and image_processor.do_pad is pads
    theirs = default_pixels(padded, tall)
    assert torch.equal(load_processor(str(tmp_path / "c" / "processor")).image_processor(images=tall, return_tensors="pt")[
        "pixel_values"][0], theirs)


def test_folder_without_processor_config_uses_llava_defaults(tiny_llava_hf_dir, tmp_path, capsys):
    folder = tmp_path / "llava-no-processor"
    shutil.copytree(tiny_llava_hf_dir, folder)
    (folder / "processor_config.json").unlink()
    capsys.readouterr()
    vision = read_config(converted(folder, tmp_path / "mmchat")).vision
    notes = [line for line in capsys.readouterr().err.splitlines() if "no preprocessor_config.json" in line]
    assert len(notes) == 1 and "LlavaImageProcessor's defaults" in notes[0]
    defaults = {f: getattr(VisionConfig(), f) for f in PREPROCESSING}
    assert {f: getattr(vision, f) for f in PREPROCESSING} == {**defaults, "image_size": 32, "pad_to_square": False}


@pytest.mark.parametrize("resize", ["shortest_edge", "exact"])
def test_mmchat_to_llava_hf_to_mmchat_keeps_preprocessing_and_stop_ids(tiny_checkpoint, tmp_path, resize):
    ckpt = tmp_path / "mmchat"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "mmchat.json").read_text())
    config["vision"].update({"pad_to_square": resize == "exact", "resize": resize, "resample": 2, "mean": [0.5] * 3,
                             "std": [0.25] * 3, "shortest_edge": 40 if resize == "shortest_edge" else None})
    config["stop_token_ids"] = [2, 7]
    config.update(temperature=0.5, top_p=0.9, max_new_tokens=64)
    (ckpt / "mmchat.json").write_text(json.dumps(config))
    before = read_config(ckpt)

    hf = converted(ckpt, tmp_path / "llava-hf", "--to", "llava-hf")
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    for image in images().values():  # transformers reads the exported processor as mmchat preprocesses
        torch.testing.assert_close(preprocess(image, before.vision), reference_pixels(hf, image), atol=1e-6, rtol=0)

    after = read_config(converted(hf, tmp_path / "back"))
    assert {f: getattr(after.vision, f) for f in PREPROCESSING} == {f: getattr(before.vision, f) for f in PREPROCESSING}
    assert after.stop_token_ids == [2, 7]
    assert (after.temperature, after.top_p, after.max_new_tokens) == (0.5, 0.9, 64)  # generate samples so too


@torch.no_grad()
def test_chat_stops_where_transformers_generate_stops(tiny_llava_hf_model, tmp_path):
    """generation_config `eos_token_id: [eos, X]`, X a token the random model emits early: mmchat's
    answer ends right before X, exactly where transformers' `generate` with that config stops."""
    from transformers import GenerationConfig as HFGenerationConfig

    from mmchat.chat import ChatSession
    from mmchat.generate import GenerationConfig

    folder, reference = tiny_llava_hf_model
    image = images()["wide"]
    model = load_model(converted(folder, tmp_path / "plain"), LoadOptions(load_in="32bit", device="cpu"))
    eos = model.tokenizer.eos_token_id
    chat = ChatSession(model)
    full = "".join(chat.ask(QUESTION, image, GenerationConfig(temperature=0, max_new_tokens=20)))
    tokens = chat.last_stats.answer_ids
    assert full and len(tokens) == 20, tokens  # no early EOS: room to pick a stop token
    # The prompt as mmchat fed it; llava-hf finds image slots by its own id.
    rendered = chat._render(chat.messages[:1])
    ids = torch.tensor([rendered.input_ids]).masked_fill(torch.tensor([rendered.image_mask]), reference.config.image_token_index)
    stop_at = next(i for i in range(2, 20) if tokens[i] not in tokens[:i] and tokens[i] != eos)
    stop = tokens[stop_at]

    folder = llava_hf_variant(folder, tmp_path / "llava-stop", eos_token_id=[eos, stop])
    checkpoint = converted(folder, tmp_path / "mmchat")
    assert read_config(checkpoint).stop_token_ids == [eos, stop]
    chat = ChatSession(load_model(checkpoint, LoadOptions(load_in="32bit", device="cpu")))
    "".join(chat.ask(QUESTION, image, GenerationConfig(temperature=0, max_new_tokens=20)))
    ours = chat.last_stats.answer_ids

    generation = HFGenerationConfig.from_pretrained(folder)
    pixels = default_pixels(folder, image)[None]
    theirs = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                generation_config=generation, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert theirs == tokens[:stop_at + 1]  # transformers stops at X, and keeps it
    assert ours == tokens[:stop_at]  # mmchat stops at X, and drops it (as it drops EOS)
    assert chat.messages[-1].text == model.tokenizer.decode(ours, skip_special_tokens=True).strip()


def test_the_pil_backend_is_followed_when_asked(tiny_llava_hf_dir, tmp_path):
    """`--image-backend pil`: the checkpoint's pixels are transformers' PIL backend's (LLaVA's own pipeline),
    to the bit, in chat and after --pad; the default stays the torchvision backend."""
    from mmchat.model import describe_preprocessing

    padded_folder = llava_hf_variant(tiny_llava_hf_dir, tmp_path / "llava-pad", processor_config("pad", 32))
    for folder, flags in ((tiny_llava_hf_dir, []), (padded_folder, []), (tiny_llava_hf_dir, ["--pad"])):
        name = f"pil-{folder.name}{''.join(flags)}"
        checkpoint = converted(folder, tmp_path / name, "--image-backend", "pil", *flags)
        assert read_config(checkpoint).image_backend == "pil"
        model = load_model(checkpoint, LoadOptions("32bit", "cpu"))
        assert type(model.processor.image_processor).__name__.endswith("Pil")
        assert "(pil backend)" in describe_preprocessing(model)
        reference = padded_folder if flags else folder  # --pad on the crop folder pads as the pad folder does
        for image in images().values():
            assert torch.equal(model.pixels([image], "square")[0], reference_pixels(reference, image)), name
    default = load_model(converted(tiny_llava_hf_dir, tmp_path / "default"), LoadOptions("32bit", "cpu"))
    assert "(torchvision backend)" in describe_preprocessing(default)
    differs = [not torch.equal(default.pixels([im], "square")[0], reference_pixels(tiny_llava_hf_dir, im))
               for im in images().values()]
    assert any(differs), "the two backends' bicubic resizes differ on real photos"


def test_image_backend_is_refused_for_original_llava_and_exports(tiny_checkpoint, tmp_path, capsys):
    assert main(["--to", "llava-hf", "--image-backend", "pil", str(tiny_checkpoint), str(tmp_path / "x")]) == 2
    assert "Can't combine --image-backend with --to llava-hf" in capsys.readouterr().err
