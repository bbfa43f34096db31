"""The LLM's text pretraining: after the mix, batches of lookups (one shape among several) take turns with it;
each batch is computed in length-sorted parts with the whole batch's gradient."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from finetune.demo.build import full_config, make_tokenizer
from finetune.demo.lookups import Lookups, lookup_samples, samples
from finetune.demo.pretrain_lm import (LmConfig, Turns, backward, batch_of, length_parts, llama_config, lr_factor,
                                  pretrain_lm, turn_of)
from finetune.demo.world import COLOURS, KINDS, POSITIONS
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
    records = lookup_samples(LmConfig(), Lookups(), tokenizer, 7, 120)
    seen, noes, yeses = set(), 0, 0
    for sample in records:
        (answer,) = answers(sample, tokenizer)
        shapes = [cell for cell in sample.cell_words if cell[0] != tokenizer.unk_token_id]
        assert 2 <= len(shapes) <= 3, "a lookup needs a shape to tell apart from others"
        kind = ("colour" if answer in COLOURS else "shape" if answer in KINDS else "position" if answer in POSITIONS
                else "yes/no" if answer in ("yes", "no") else None)
        assert kind is not None, answer
        seen.add(kind)
        noes += answer == "no"
        yeses += answer == "yes"
    assert seen == {"colour", "shape", "position", "yes/no"}
    assert noes and yeses, "presence questions about shapes that are there and shapes that are not"
    only = lookup_samples(LmConfig(), Lookups(("colour",), 2, 2), tokenizer, 7, 30)
    assert all(answers(s, tokenizer)[0] in COLOURS for s in only)
    assert all(sum(c[0] != tokenizer.unk_token_id for c in s.cell_words) == 2 for s in only)


def test_a_lookup_phase_rejects_nonsense():
    for bad in ({"types": ()}, {"types": ("count",)}, {"min_shapes": 1}, {"min_shapes": 3, "max_shapes": 2}):
        with pytest.raises(ValueError, match="bad lookups"):
            Lookups(**bad)
    for bad in ({"lookups": (), "steps": 5}, {"lookups": (Lookups(),), "steps": 0}):
        with pytest.raises(ValueError, match="bad turns"):
            Turns(**bad)


def test_pretraining_runs_the_mix_then_phases_of_lookups_taking_turns_with_it(tokenizer, tmp_path):
    colour, shape, yes_no = Lookups(("colour",), 2, 2), Lookups(("shape",)), Lookups(("yes/no",))
    cfg = LmConfig(hidden=32, layers=1, heads=2, intermediate=64, conversations=40, steps=2, batch_size=4, warmup=1,
                   turns=(Turns((colour, shape), 3), Turns((yes_no,), 4)))
    lines = []
    rng_state = torch.get_rng_state()
    result = pretrain_lm(cfg, tokenizer, tmp_path / "lm", log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng_state), "pretraining seeds its own RNG, not the caller's"
    assert [r["step"] for r in result.history] == list(range(1, 10))
    assert [turn_of(cfg, step) for step in range(9)] == [None, None, colour, shape, None, yes_no, None, yes_no, None]
    assert ("lm: steps 3-5: batches take turns: colour questions about 2-2 shapes, shape questions about 2-3 shapes, "
            "the mix") in lines
    assert "lm: steps 6-9: batches take turns: yes/no questions about 2-3 shapes, the mix" in lines
    # each phase starts the learning rate again at its peak (warmup 1) and decays it over its own steps
    factors = [lr_factor(cfg, step) for step in range(9)]
    assert [factors[s] for s in (0, 2, 5)] == [1.0, 1.0, 1.0]
    assert factors[3] > factors[4] < factors[5] and factors[6] > factors[7] > factors[8] > 0
    assert (tmp_path / "lm" / "model.safetensors").is_file()


def test_a_batch_in_length_sorted_parts_gives_the_whole_batch_gradient(tokenizer):
    cfg = LmConfig(hidden=32, layers=1, heads=2, intermediate=64)
    batch = samples(cfg, tokenizer, 3, 24)
    parts = length_parts(batch, 300)
    assert len(parts) > 1 and sorted(map(id, sum(parts, []))) == sorted(map(id, batch))
    assert all(len(p) * max(len(s.input_ids) for s in p) <= 300 for p in parts if len(p) > 1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    whole = model(**batch_of(batch, model.get_input_embeddings(), tokenizer.pad_token_id)).loss
    whole.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss = backward(model, batch, tokenizer.pad_token_id, 300)
    assert abs(loss - whole.item()) < 1e-5
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
