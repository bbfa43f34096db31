"""A LLaMA-like BPE tokenizer trained on a small corpus, saved as a standard transformers tokenizer.

Byte-pair merges over `▁`-prefixed words (sentencepiece's Metaspace, dummy prefix on the first
word), with LLaMA's special tokens and ids: `<unk>` 0, `<s>` 1, `</s>` 2, plus `<pad>` 3. Every
printable ASCII character is in the alphabet, so any English text a user types tokenises
without `<unk>`; the merges follow the corpus, so its words are mostly single tokens.
"""
from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
ALPHABET = sorted(set(string.printable) - set(string.whitespace) | {"\n"})


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int, max_length: int = 512,
                    extra_specials: tuple[str, ...] = ()):
    """Train on `texts`, save into `out` (tokenizer.json + config) and return the transformers tokenizer.

    `extra_specials` get ids right after `<pad>` and are never split or merged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Punctuation is split off words: "square?" must be the token of "square", or the question's
    # word and the word the LLM reads for the image's cell are different embeddings to relate.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIALS, *extra_specials], initial_alphabet=ALPHABET,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=max_length,
                                   additional_special_tokens=list(extra_specials) or None)
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast
