"""Reading user images safely and preprocessing them exactly as LLaVA-1.5 / transformers' image processors do."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mmchat.anyres import AnyresSettings, preprocess_anyres, preprocess_square
from mmchat.config import VisionConfig

MAX_PIXELS = 50_000_000
"""Larger images are refused (or, for JPEG, decoded at a reduced size) instead of risking memory."""


class ImageError(ValueError):
    """An image that cannot be used; the message says why and what to do."""


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open a path, bytes or PIL image as an 8-bit RGB image, or raise `ImageError`.

    Handles grayscale, 16-bit, palette, RGBA (composited on white), CMYK and animated images
    (first frame), truncated files, and decompression bombs.
    """
    name = str(source) if isinstance(source, (str, Path)) else "the image"
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with warnings.catch_warnings():
                # Pillow warns, then raises, on very large images; we check the size ourselves below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except FileNotFoundError:
            raise ImageError(f"image file not found: {name}") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{name} is too large to open safely; downscale it below {max_pixels // 10**6} megapixels") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{name} is not a readable image ({e.__class__.__name__}); upload a PNG, JPEG, WebP or GIF file") from None
    width, height = image.size
    if width * height > max_pixels:
        if image.format != "JPEG":
            raise ImageError(
                f"{name} is {width}×{height} ({width * height / 1e6:.0f} megapixels); "
                f"downscale it below {max_pixels // 10**6} megapixels"
            )
        # JPEG decodes at 1/2, 1/4 or 1/8 scale for free: the model sees at most 336 px anyway.
        factor = 2
        while width * height / factor**2 > max_pixels and factor < 8:
            factor *= 2
        image.draft("RGB", (width // factor, height // factor))
        if image.width * image.height > max_pixels:
            raise ImageError(f"{name} is {width}×{height}; downscale it below {max_pixels // 10**6} megapixels")
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        image.load()
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name} is truncated or corrupt ({e}); re-save or re-upload it") from None


TURNED = (5, 6, 7, 8)
"""EXIF orientations that `load_image` (`ImageOps.exif_transpose`) turns by 90 degrees."""


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image `load_image(path)` gives, from the file's header (no decoding)
    unless the image is big enough for `load_image` to shrink or refuse, or the header is unreadable."""
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = image.size
            turned = image.getexif().get(ExifTags.Base.Orientation) in TURNED
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        width = height = None  # load_image says what is wrong
    if width is None or width * height > MAX_PIXELS:
        image = load_image(path)
        return image.height, image.width
    return (width, height) if turned else (height, width)


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: scale to 8 bits by the range the mode can hold, not a plain cast. Row
        # blocks bound the float64 work to a few MB (a whole 7000×7000 image took 1.3 GB).
        array = np.asarray(image)
        top = float(array.max()) if array.size else 0.0
        peak = 65535.0 if image.mode.startswith("I;16") or top > 255 else 255.0
        if image.mode == "F" and top <= 1.0:
            peak = 1.0
        out = np.empty(array.shape, dtype=np.uint8)
        for start in range(0, array.shape[0], 256):
            block = array[start:start + 256].astype(np.float64)
            out[start:start + 256] = np.clip(block / peak * 255.0 + 0.5, 0, 255)
        image = Image.fromarray(out, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def expand_to_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """LLaVA's pad-to-square: the image centred on a square canvas of `colour`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess(image: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """Image -> pixels [3, S, S] (S = cfg.image_size), as transformers' PIL-backend image
    processors compute them (and LLaVA-1.5's own code, which pads then runs CLIPImageProcessor).

    Pad to square (mean colour) if asked; resize with `cfg.resample`: the short side to
    `shortest_edge` then a centre crop S×S, or straight to S×S; rescale; normalise.
    """
    if image.mode != "RGB":
        if not cfg.convert_rgb:
            raise ImageError(f"a {image.mode} image, and this checkpoint's vision.convert_rgb is false; pass an RGB image")
        image = _to_rgb(image)
    if cfg.pad_to_square:
        image = expand_to_square(image, tuple(int(m * 255) for m in cfg.mean))
    size, resample = cfg.image_size, Image.Resampling(cfg.resample)
    if cfg.resize == "exact":
        image = image.resize((size, size), resample)
    else:
        edge = cfg.shortest_edge or size
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(edge * long / short)
        image = image.resize((edge, new_long) if width <= height else (new_long, edge), resample)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image)  # [S, S, 3] uint8
    # float64 product, then float32: transformers' rescale, to the last bit.
    array = (array * np.float64(cfg.rescale_factor)).astype(np.float32) if cfg.rescale else array.astype(np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    if not cfg.normalize:
        return pixels
    mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
    return (pixels - mean) / std


def image_pixels(images: Sequence[Image.Image], layout: str, vision: VisionConfig, tiling: AnyresSettings | None,
                 image_processor=None) -> torch.Tensor:
    """Normalised pixels of `images`, all of one prompt: [N, 3, S, S] for `square` (one per image),
    [1 + rows*cols, 3, S, S] for `tiles` (one image: its base tile, then its grid's tiles, row by row).

    `image_processor` (a converted folder's, `ModelConfig.processor`) makes them exactly as transformers
    does on that folder; without one, mmchat's own preprocessing of `vision` (PIL-exact `preprocess`;
    `mmchat.anyres`, equal to the torchvision backend of LLaVA-NeXT's / OneVision's processors)."""
    if image_processor is not None:
        if layout == "tiles":  # one image, so no tile padding: [1, 1 + rows*cols, 3, S, S]
            return image_processor(images=[images[0]], return_tensors="pt")["pixel_values"][0]
        if tiling is not None:  # OneVision: the images of a prompt holding several are not tiled
            return image_processor(images=[list(images)], return_tensors="pt")["pixel_values"].flatten(0, 1)
        return image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    if layout == "tiles":
        return preprocess_anyres(images[0], tiling)[0]
    if tiling is not None:
        return torch.cat([preprocess_square(im, tiling) for im in images])
    return torch.stack([preprocess(im, vision) for im in images])
