"""The LLM's text pretraining: after the mix, batches of lookups (one shape among several) take turns with it."""
from __future__ import annotations

import pytest

from finetune.demo import full_config, make_tokenizer
from finetune.pretrain_lm import LmConfig, Lookups, lookup_samples, pretrain_lm, turn_of
from finetune.synthetic import COLOURS, KINDS, POSITIONS
from mmchat.conversation import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return make_tokenizer(full_config(root / "out", root / "work"))


def answers(sample, tokenizer) -> list[str]:
    spans, current = [], []
    for label in sample.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(tokenizer.decode(current).replace("</s>", "").strip())
            current = []
    return spans


def test_lookup_records_ask_one_shape_among_several(tokenizer):
    records = lookup_samples(LmConfig(), Lookups(), tokenizer, 7, 90)
    seen = set()
    for sample in records:
        (answer,) = answers(sample, tokenizer)
        shapes = [cell for cell in sample.cell_words if cell[0] != tokenizer.unk_token_id]
        assert 2 <= len(shapes) <= 3, "a lookup needs a shape to tell apart from others"
        kind = "colour" if answer in COLOURS else "shape" if answer in KINDS else "position" if answer in POSITIONS else None
        assert kind is not None, answer
        seen.add(kind)
    assert seen == {"colour", "shape", "position"}
    only = lookup_samples(LmConfig(), Lookups(("colour",), 2, 2), tokenizer, 7, 30)
    assert all(answers(s, tokenizer)[0] in COLOURS for s in only)
    assert all(sum(c[0] != tokenizer.unk_token_id for c in s.cell_words) == 2 for s in only)


def test_a_lookup_phase_rejects_nonsense():
    for bad in ({"types": ()}, {"types": ("count",)}, {"min_shapes": 1}, {"min_shapes": 3, "max_shapes": 2}):
        with pytest.raises(ValueError, match="bad lookups"):
            Lookups(**bad)
    for bad in ({"lookups": (Lookups(),)}, {"lookup_steps": 5}):
        with pytest.raises(ValueError, match="give both or neither"):
            LmConfig(**bad)


def test_pretraining_runs_the_mix_then_lookups_taking_turns_with_it(tokenizer, tmp_path):
    cfg = LmConfig(hidden=32, layers=1, heads=2, intermediate=64, conversations=40, steps=2, batch_size=4, warmup=1,
                   lookup_steps=3, lookups=(Lookups(("colour",), 2, 2), Lookups(("shape",))))
    lines = []
    result = pretrain_lm(cfg, tokenizer, tmp_path / "lm", log=lines.append)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5]
    assert [turn_of(cfg, step) for step in range(1, 9)] == [None, None, 0, 1, None, 0, 1, None]
    assert ("lm: steps 3-5: batches take turns: colour questions about 2-2 shapes, shape questions about 2-3 shapes, "
            "the mix") in lines
    assert (tmp_path / "lm" / "model.safetensors").is_file()
