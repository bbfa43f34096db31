"""An answer's text, decoded a few tokens at a time (`mmchat.answer.IncrementalText`), equals decoding all its
tokens at once after every token; the streamed text equals the final text; each token costs the same
work at the end of a long answer as at its start; the batch's sampling equals each row's own."""
from __future__ import annotations

import random

import pytest
import torch

from mmchat.answer import Answer, IncrementalText, TurnStats
from mmchat.generate import GenerationConfig, choose_tokens
from tiny_models import build_chat_tokenizer, corpus

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>"]
ODD_TEXT = ["naïve café — 東京 😀 ok", "Größe: 3½ €, ñandú!", "a\nb  c\t\"quoted\" it's", "🙂🙃 日本語のテキスト"]


def byte_fallback_tokenizer():
    """LLaMA-1/2's kind (llava-1.5's): sentencepiece pieces, and `<0xNN>` byte tokens for the rest."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), "▁", "▁the", "▁cat", "s", "a", "é", "▁東",
              "京", ".", ",", "▁▁"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["byte_level", "metaspace", "word_level", "byte_fallback"])
def tokenizer(request):
    lines = corpus() + ODD_TEXT * 3
    kind = request.param
    if kind == "byte_fallback":
        return byte_fallback_tokenizer()
    return build_chat_tokenizer(SPECIALS, "<s>", "</s>", byte_level=kind == "byte_level", adds_bos=False,
                                corpus=lines, vocab_size=400, word_level=kind == "word_level")


def random_ids(tokenizer, rng: random.Random, n: int) -> list[int]:
    """Random vocabulary ids (specials included) mixed with pieces of text that has multi-byte characters,
    byte-level tokens of one character sometimes cut apart by another token."""
    vocab = len(tokenizer)
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.5:
            ids.append(rng.randrange(vocab))
        else:
            piece = tokenizer.encode(rng.choice(ODD_TEXT), add_special_tokens=False)
            start = rng.randrange(len(piece))
            ids += piece[start:start + rng.randint(1, 6)]
    return ids[:n]


def test_incremental_text_equals_the_whole_decode_after_every_token(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        text = IncrementalText(tokenizer)
        for token in random_ids(tokenizer, rng, 60):
            stable = text.stable
            text.add(token)
            assert text.text == tokenizer.decode(text.ids, skip_special_tokens=True), text.ids
            assert text.stable.startswith(stable), "final text never changes"


def answer(tokenizer, stops: tuple[str, ...], budget: int) -> Answer:
    return Answer(tokenizer, GenerationConfig(temperature=0), frozenset(), stops, budget, TurnStats(), [], "cpu")


def feed(a: Answer, ids: list[int], vocab: int) -> str:
    streamed = ""
    for token in ids:
        a.chosen = token
        streamed += a.push(torch.zeros(vocab))
        if a.done:
            break
    return streamed + a.close()


def test_streamed_text_equals_the_text_cut_at_the_first_stop_string(tokenizer):
    rng = random.Random(1)
    for _ in range(20):
        ids = random_ids(tokenizer, rng, 50)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        # A stop string that spans tokens: a few characters from the middle of the text.
        at = rng.randrange(max(1, len(whole) - 4))
        stops = (whole[at:at + rng.randint(2, 4)], "never-said") if whole.strip() else ("never-said",)
        a = answer(tokenizer, stops, budget=len(ids))
        streamed = feed(a, ids, len(tokenizer))
        expected = tokenizer.decode(a.generated, skip_special_tokens=True)
        cuts = [expected.find(s) for s in stops if s in expected]
        assert a.text == (expected[:min(cuts)] if cuts else expected)
        assert streamed == a.text


def test_each_token_decodes_a_few_tokens_however_long_the_answer(tokenizer):
    """Constant work per token: the windows decoded stay short over 2,000 tokens (they re-decoded the
    whole answer before)."""
    rng = random.Random(2)
    text = IncrementalText(tokenizer)
    decode, sizes = tokenizer.decode, []

    def counting(ids, **kwargs):
        sizes.append(len(ids))
        return decode(ids, **kwargs)

    tokenizer.decode = counting
    try:
        for token in random_ids(tokenizer, rng, 2000):
            text.add(token)
    finally:
        del tokenizer.decode
    assert text.text == tokenizer.decode(text.ids, skip_special_tokens=True)
    # A window spans the tokens since the last final text (a byte-token run can be long), never the answer.
    first, last = sizes[:500], sizes[-500:]
    assert max(last) < 100 and sum(last) < 2 * sum(first) + 500, (max(last), sum(first), sum(last))


def test_the_batchs_choice_equals_each_rows_own():
    """Greedy, sampled, seeded, penalised, top-p wide and narrow, overflowed logits: a row chooses in a
    batch what it chooses alone (a seeded row draws the same tokens)."""
    rng = random.Random(3)
    vocab = 500
    logits = torch.randn(8, vocab) * 4
    logits[5, 7] = float("nan")
    gens = [GenerationConfig(temperature=0), GenerationConfig(temperature=0.7, top_p=0.9, seed=1),
            GenerationConfig(temperature=1.0, top_p=1.0, seed=2), GenerationConfig(temperature=5.0, top_p=0.999, seed=3),
            GenerationConfig(temperature=0.5, top_p=1e-300, seed=4), GenerationConfig(temperature=1.0, seed=5),
            GenerationConfig(temperature=0, repetition_penalty=1.5), GenerationConfig(temperature=0.8, repetition_penalty=1.3, seed=6)]
    seen = [None] * 6 + [torch.zeros(vocab, dtype=torch.bool).index_fill_(0, torch.tensor(rng.sample(range(vocab), 20)), True)
                         for _ in range(2)]
    logits[6:, seen[6].nonzero()[:, 0]] += 10  # the penalty matters

    def generators():
        return [torch.Generator().manual_seed(g.seed) if g.seed is not None else None for g in gens]

    for _ in range(3):
        batch, solo = generators(), generators()
        together = choose_tokens(logits, gens, batch, seen)
        alone = [choose_tokens(logits[i:i + 1], [g], [solo[i]], [seen[i]])[0] for i, g in enumerate(gens)]
        assert together == alone
    assert together[0] == int(logits[0].argmax()) and together[4] == int(logits[4].argmax())
    assert together[5] == int(torch.nan_to_num(logits[5], nan=-float("inf")).argmax())


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_tokens_follow_the_probabilities_of_the_nucleus(top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).log_softmax(0).repeat(40_000, 1)
    probs = logits[0].exp()
    kept = (probs.cumsum(0) - probs < top_p)  # the smallest prefix of the (already sorted) tokens reaching top_p
    expected = torch.where(kept, probs, 0.0) / probs[kept].sum()
    torch.manual_seed(0)
    tokens = choose_tokens(logits, [GenerationConfig(temperature=1.0, top_p=top_p)] * len(logits),
                           [None] * len(logits), [None] * len(logits))
    counts = torch.bincount(torch.tensor(tokens), minlength=5) / len(tokens)
    assert torch.allclose(counts, expected, atol=0.01), (counts, expected)
