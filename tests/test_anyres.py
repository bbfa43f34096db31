"""mmchat.anyres = transformers' LLaVA-NeXT / OneVision AnyRes: grid choice, pixels, token counts,
packed features; on tiny processors and random tiny models built here (CPU, no network)."""
from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from PIL import Image

from mmchat.anyres import (AnyresSettings, grid_shape, num_image_tokens, pack_image_features, preprocess_anyres,
                           select_best_resolution, select_tile_features, settings_from_transformers)

# Tiny stand-ins for the checkpoints' settings. NeXT: CLIP, 56 px tiles, patch 7 (8x8 tokens), the
# hub's five pinpoints scaled from 336 to 56. OneVision: SigLIP, 60 px tiles, patch 7 (8x8 tokens:
# like SigLIP-384 / patch 14, the tile is not a multiple of the patch), pinpoints 1..6 tiles a side
# as the hub's 384..2304, anyres_max_9.
NEXT_PINS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
OV_PINS = [[60 * i, 60 * j] for i in range(1, 7) for j in range(1, 7)]
HUB_NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
HUB_OV_PINS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
# Awkward sizes (1 px, just off a tile edge, odd) crossed with themselves, plus random ones.
EDGE_SIZES = [1, 2, 7, 37, 55, 56, 57, 60, 61, 99, 150, 223, 333, 336, 337, 383, 385, 500, 600, 671, 673,
              1000, 1009, 2304, 4000]
SIZES = [(h, w) for h in EDGE_SIZES for w in EDGE_SIZES]
# Sizes where the scaled side comes out a hair under an integer (49 * (8 / 49) = 7.999...), which
# unpad_image's round(..., 7) saves from truncating one short.
SIZES += [(49, 49), (47, 47), (44, 55), (99, 55), (47, 376), (47, 423), (98, 98)]
SIZES += [(random.Random(i).randint(1, 3000), random.Random(-i - 1).randint(1, 3000)) for i in range(300)]


def _tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def photo():
    """matplotlib's sample photo, 512 wide x 600 tall, RGB."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def images(photo):
    """The photo, a tall grayscale crop and a wide RGBA crop with a transparency ramp (composited on white)."""
    tall = photo.crop((200, 50, 300, 550)).convert("L")  # 100 x 500
    wide = photo.crop((0, 300, 500, 390)).convert("RGBA")  # 500 x 90
    wide.putalpha(Image.linear_gradient("L").resize(wide.size))
    return {"photo": photo, "tall": tall, "wide": wide}


@pytest.fixture(scope="module")
def next_family(tmp_path_factory):
    """(model, image processor as AutoImageProcessor loads it) for a tiny random LLaVA-NeXT."""
    from transformers import (AutoImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor)

    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=56, patch_size=7, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2),
        image_grid_pinpoints=NEXT_PINS, image_token_index=63, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    folder = tmp_path_factory.mktemp("next-processor")
    LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                            image_grid_pinpoints=NEXT_PINS).save_pretrained(folder)
    return LlavaNextForConditionalGeneration(config).eval(), AutoImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def ov_family(tmp_path_factory):
    """(model, image processor as AutoImageProcessor loads it) for a tiny random LLaVA-OneVision."""
    from transformers import (AutoImageProcessor, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, Qwen2Config, SiglipVisionConfig)

    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=60, patch_size=7, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2),
        text_config=Qwen2Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2),
        image_grid_pinpoints=OV_PINS, image_token_index=63, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    folder = tmp_path_factory.mktemp("ov-processor")
    LlavaOnevisionImageProcessor(size={"height": 60, "width": 60}, image_grid_pinpoints=OV_PINS,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return LlavaOnevisionForConditionalGeneration(config).eval(), AutoImageProcessor.from_pretrained(folder)


@pytest.fixture(params=["next", "ov"])
def family(request):
    return request.param, request.getfixturevalue(f"{request.param}_family")


def test_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as reference

    for pins in (NEXT_PINS, OV_PINS, HUB_NEXT_PINS, HUB_OV_PINS):
        for size in SIZES:
            assert select_best_resolution(size, pins) == reference(size, pins), (size, pins)
    # Tall and wide images get tall and wide grids.
    assert select_best_resolution((1000, 300), HUB_NEXT_PINS) == (1008, 336)
    assert select_best_resolution((300, 1000), HUB_NEXT_PINS) == (336, 1008)


def test_settings_from_transformers(family):
    from transformers.image_utils import SizeDict

    name, (model, processor) = family
    settings = settings_from_transformers(model.config, processor)
    assert settings.grid == 8 and settings.max_tiles == (9 if name == "ov" else None)
    assert [list(p) for p in settings.pinpoints] == (OV_PINS if name == "ov" else NEXT_PINS)
    assert settings.image_mean == tuple(processor.image_mean)
    wrong = copy.copy(processor)
    wrong.size = SizeDict(height=64, width=64)
    with pytest.raises(ValueError, match="does not match the tower's image_size"):
        settings_from_transformers(model.config, wrong)


def test_pixels_match_processor(family, images):
    """The processor AutoImageProcessor loads (torchvision backend) gives the same tiles, to the bit."""
    name, (model, processor) = family
    assert processor.backend == "torchvision"
    settings = settings_from_transformers(model.config, processor)
    grids = set()
    for image in images.values():
        expected = processor(image, return_tensors="pt")
        pixels, image_size = preprocess_anyres(image, settings)
        rows, cols = grid_shape(image_size, settings)
        assert pixels.shape == expected.pixel_values[0].shape == (1 + rows * cols, 3, settings.tile_size,
                                                                   settings.tile_size)
        assert (pixels - expected.pixel_values[0]).abs().max() <= 1e-6
        assert list(image_size) == expected.image_sizes[0].tolist() == [image.height, image.width]
        grids.add((rows, cols))
    assert len(grids) == 3, f"the three images should pick three different grids, got {grids}"


def _next_processor(image_processor, tokenizer, patch_size):
    from transformers import LlavaNextProcessor

    # llava-hf's NeXT processors: CLS counted, then dropped by the `default` strategy.
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _ov_processor(image_processor, tokenizer, grid):
    from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=grid * grid,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


def test_token_counts_match_processor_input_ids(family, images, tiny_tokenizer_dir):
    """As many `<image>` ids as the processor writes into the prompt."""
    name, (model, image_processor) = family
    settings = settings_from_transformers(model.config, image_processor)
    tokenizer = _tokenizer(tiny_tokenizer_dir)
    processor = (_ov_processor(image_processor, tokenizer, settings.grid) if name == "ov"
                 else _next_processor(image_processor, tokenizer, settings.patch_size))
    for image in images.values():
        ids = processor(images=image, text="<image>\nwhat is this?", return_tensors="pt").input_ids
        slots = int((ids == tokenizer.convert_tokens_to_ids("<image>")).sum())
        assert num_image_tokens((image.height, image.width), settings) == slots


def test_token_counts_match_processor_at_hub_sizes(tiny_tokenizer_dir):
    """Over hundreds of image sizes, at the real checkpoints' tile sizes and pinpoints."""
    from transformers import LlavaNextImageProcessor, LlavaOnevisionImageProcessor

    tokenizer = _tokenizer(tiny_tokenizer_dir)
    next_settings = AnyresSettings(336, 14, tuple(map(tuple, HUB_NEXT_PINS)))
    ov_settings = AnyresSettings(384, 14, tuple(map(tuple, HUB_OV_PINS)), max_tiles=9)
    assert (next_settings.grid, ov_settings.grid) == (24, 27)
    next_processor = _next_processor(LlavaNextImageProcessor(image_grid_pinpoints=HUB_NEXT_PINS,
                                                             size={"shortest_edge": 336},
                                                             crop_size={"height": 336, "width": 336}), tokenizer, 14)
    ov_processor = _ov_processor(LlavaOnevisionImageProcessor(), tokenizer, 27)
    for processor, settings in ((next_processor, next_settings), (ov_processor, ov_settings)):
        expected = processor._get_num_multimodal_tokens(image_sizes=SIZES)["num_image_tokens"]
        assert [num_image_tokens(size, settings) for size in SIZES] == expected
    # A square image on a 2x2 grid: 576 base + 48 x 48 map + 48 newlines.
    assert num_image_tokens((672, 672), next_settings) == 576 + 2304 + 48


def _tower_features(model, pixels, strategy):
    """Per-tile projected features [tiles, T, H], as the model's get_image_features computes them."""
    config = model.config
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    return model.model.multi_modal_projector(select_tile_features(hidden, strategy))


@torch.no_grad()
def test_packed_features_match_model(family, images):
    """Our pixels -> tower -> pack_image_features equals the model's get_image_features on the
    processor's pixels, exactly; and the length is num_image_tokens."""
    name, (model, processor) = family
    settings = settings_from_transformers(model.config, processor)
    strategy = model.config.vision_feature_select_strategy
    extra = {"vision_aspect_ratio": model.config.vision_aspect_ratio} if name == "ov" else {}
    for image in images.values():
        expected = processor(image, return_tensors="pt")
        reference = model.model.get_image_features(expected.pixel_values, expected.image_sizes, **extra)
        reference = reference.pooler_output[0]
        pixels, image_size = preprocess_anyres(image, settings)
        packed = pack_image_features(_tower_features(model, pixels, strategy), model.model.image_newline, image_size,
                                     settings)
        assert torch.equal(packed, reference)
        assert packed.shape[0] == num_image_tokens(image_size, settings)
    # The photo on OneVision's 6x6 grid is far more than 9 tiles: the bilinear shrink ran.
    photo_size = (images["photo"].height, images["photo"].width)
    unshrinking = dataclasses.replace(settings, max_tiles=None)
    assert (num_image_tokens(photo_size, settings) < num_image_tokens(photo_size, unshrinking)) == (name == "ov")


@torch.no_grad()
def test_packing_matches_model_over_many_sizes(family):
    """Random per-tile features: our packing equals transformers' pack_image_features for every
    size, including odd paddings (one padded row or column kept) and, for OneVision, shrunk maps."""
    name, (model, processor) = family
    settings = settings_from_transformers(model.config, processor)
    generator = torch.Generator().manual_seed(0)
    newline = torch.randn(4, generator=generator)  # a narrow width keeps hundreds of sizes fast
    unshrinking = dataclasses.replace(settings, max_tiles=None)
    shrunk = full = odd = 0
    for size in SIZES[::2]:
        rows, cols = grid_shape(size, settings)
        features = torch.randn(1 + rows * cols, settings.grid**2, 4, generator=generator)
        image_sizes = torch.tensor([size])
        if name == "ov":
            (reference,), _ = model.model.pack_image_features([features], image_sizes, newline,
                                                              vision_aspect_ratio="anyres_max_9")
        else:
            (reference,), _ = model.model.pack_image_features([features], image_sizes, "default", newline)
        packed = pack_image_features(features, newline, size, settings)
        assert torch.equal(packed, reference), size
        assert packed.shape[0] == num_image_tokens(size, settings), size
        shrunk += packed.shape[0] < num_image_tokens(size, unshrinking)
        full += packed.shape[0] == settings.grid**2 + rows * settings.grid * (cols * settings.grid + 1)
        # The image's own extent on the stitched map, along its padded side; an odd leftover keeps a padded line.
        map_h, map_w = rows * settings.grid, cols * settings.grid
        height, width = size
        padded_side, content = ((map_h, round(height * map_w / width)) if width / height > map_w / map_h
                                else (map_w, round(width * map_h / height)))
        odd += (padded_side - content) % 2
    assert full > 0, "some sizes fill their grid exactly"
    assert odd > 0, "some sizes leave an odd padding"
    assert (shrunk > 0) == (name == "ov"), "only OneVision shrinks large maps"


def test_lone_base_tile_and_bad_shapes():
    settings = AnyresSettings(56, 7, tuple(map(tuple, NEXT_PINS)))
    newline = torch.arange(4.0)
    base = torch.randn(1, 64, 4)
    packed = pack_image_features(base, newline, (600, 512), settings)
    assert torch.equal(packed, torch.cat((base[0], newline[None])))
    # `full` on a CLIP tower keeps CLS: 65 tokens per tile cannot form the 8x8 grid.
    with_cls = torch.randn(5, 65, 4)
    with pytest.raises(ValueError, match="needs 5 tiles of 8x8=64 tokens"):
        pack_image_features(with_cls, newline, (600, 512), settings)
    assert select_tile_features(with_cls, "default").shape == (5, 64, 4)
    with pytest.raises(ValueError, match="not one of"):
        select_tile_features(with_cls, "patch")
    with pytest.raises(ValueError, match="not a positive multiple of tile_size 56"):
        AnyresSettings(56, 7, ((56, 100),))
