"""Image reading (every mode users upload, bad files) and LLaVA-1.5 preprocessing parity."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmchat.config import VisionConfig
from mmchat.image import ImageError, expand_to_square, load_image, preprocess


def _png(image, **kw):
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_pad_to_square_uses_clip_mean_colour():
    cfg = VisionConfig()
    colour = tuple(int(m * 255) for m in cfg.mean)
    assert colour == (122, 116, 104)
    out = expand_to_square(Image.new("RGB", (40, 20), (255, 0, 0)), colour)
    assert out.size == (40, 40)
    assert out.getpixel((0, 0)) == colour and out.getpixel((20, 20)) == (255, 0, 0) and out.getpixel((20, 35)) == colour


def test_preprocess_matches_llava_clip_image_processor():
    """LLaVA: expand2square(mean colour) then CLIPImageProcessor (resize 336 bicubic, crop, normalise).

    LLaVA ran transformers' PIL image processor; its PIL backend today gives the same pixels."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = VisionConfig(image_size=56)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 71, 3), dtype=np.uint8))
    ref = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                image_mean=list(cfg.mean), image_std=list(cfg.std))
    squared = expand_to_square(image, tuple(int(m * 255) for m in cfg.mean))
    expected = ref(images=squared, return_tensors="pt")["pixel_values"][0]
    got = preprocess(image, cfg)
    assert got.shape == (3, 56, 56)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_old_checkpoint_configs_keep_llava_preprocessing():
    """mmchat.json files written before the preprocessing fields existed load with LLaVA-1.5's settings."""
    from mmchat.config import ModelConfig

    vision = ModelConfig.from_dict({"vision": {"image_size": 32, "pad_to_square": True}}).vision
    assert (vision.resize, vision.shortest_edge, vision.resample, vision.rescale, vision.normalize) == ("shortest_edge", None, 3, True, True)
    assert ModelConfig.from_dict({}).stop_token_ids is None


def test_preprocessing_fields_are_checked():
    for bad in ({"resize": "squash"}, {"resample": 7}, {"image_size": 32, "shortest_edge": 16}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            VisionConfig(**bad)
    from mmchat.config import ModelConfig

    with pytest.raises(ValueError, match="stop_token_ids"):
        ModelConfig(stop_token_ids=[])


def test_plain_resize_rescale_and_normalise_switches():
    image = Image.new("RGB", (40, 10), (255, 0, 0))
    pixels = preprocess(image, VisionConfig(image_size=8, resize="exact", pad_to_square=False, normalize=False))
    assert pixels.shape == (3, 8, 8) and torch.equal(pixels[0], torch.ones(8, 8))  # squashed, not cropped or padded
    raw = preprocess(image, VisionConfig(image_size=8, pad_to_square=False, rescale=False, normalize=False))
    assert raw.dtype == torch.float32 and raw.max() == 255.0


def test_convert_rgb_off_refuses_other_modes():
    grey = Image.new("L", (8, 8), 128)
    assert preprocess(grey, VisionConfig(image_size=8)).shape == (3, 8, 8)
    with pytest.raises(ImageError, match="convert_rgb"):
        preprocess(grey, VisionConfig(image_size=8, convert_rgb=False))


def test_preprocess_without_padding_crops_the_centre():
    cfg = VisionConfig(image_size=8, pad_to_square=False)
    image = Image.new("RGB", (32, 8), (0, 0, 255))
    image.paste((255, 0, 0), (12, 0, 20, 8))  # red centre band
    pixels = preprocess(image, cfg)
    red = (1.0 - cfg.mean[0]) / cfg.std[0]
    assert torch.allclose(pixels[0], torch.full((8, 8), red), atol=0.05)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = Image.new("RGB", (10, 6), (200, 100, 50))
    if mode == "I;16":
        image = Image.fromarray(np.full((6, 10), 65535, dtype=np.uint16))
        assert image.mode.startswith("I;16")
    elif mode == "I":
        image = Image.fromarray(np.full((6, 10), 40000, dtype=np.int32))
    elif mode == "F":
        image = Image.fromarray(np.full((6, 10), 0.5, dtype=np.float32))
    else:
        image = base.convert(mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    out = load_image(_png(image, format=fmt))
    assert out.mode == "RGB" and out.size == (10, 6)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (255, 255, 255)  # full-scale 16-bit stays white, not clipped garbage
    if mode == "F":
        assert out.getpixel((0, 0)) == (128, 128, 128)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_png(image)).getpixel((1, 1)) == (255, 255, 255)


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    assert out.getpixel((4, 4))[0] > 200 and out.getpixel((4, 4))[2] < 50


def test_one_pixel_image_preprocesses():
    out = preprocess(load_image(_png(Image.new("RGB", (1, 1), "white"))), VisionConfig(image_size=16))
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()


def test_bad_files_raise_one_clear_error(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(fake)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="truncated or corrupt|not a readable image"):
        load_image(data[: len(data) // 2])


def test_huge_png_is_refused_and_huge_jpeg_is_downscaled():
    big = Image.new("L", (8000, 7000), 255)  # 56 MP, compresses to a few KB
    with pytest.raises(ImageError, match="megapixels"):
        load_image(_png(big))
    out = load_image(_png(big, format="JPEG", quality=50))
    assert out.width * out.height <= 50_000_000 and out.mode == "RGB"
