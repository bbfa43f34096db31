"""VQAv2 answer normalisation and accuracy, and POPE's yes/no metrics.

Normalisation follows the rules of the official VQAv2 evaluation: punctuation is removed (or
turned into a space, as the official script decides), a full stop is dropped unless a digit
follows, commas between digits go, text is lower-cased, number words up to ten become digits
("none" too: "0"), and the articles a, an, the are dropped. Unlike the official script, the
apostrophes of contractions ("dont" -> "don't") are not restored; answers of the synthetic world
and most VQAv2 answers have none.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit (a decimal point stays)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
YES, NO = "yes", "no"


def normalise_answer(text: str) -> str:
    """An answer as VQAv2 compares it: "Two." -> "2", "the Red" -> "red", "yes, it is" -> "yes it is"."""
    text = " ".join(text.split())
    # The official rule: a mark beside a space, or any text with a digit-comma-digit, loses its
    # marks; otherwise a mark becomes a space ("black/white" -> "black white").
    original = text
    glue = _DIGIT_COMMA_DIGIT.search(original) is not None
    for mark in PUNCTUATION:
        text = text.replace(mark, "" if glue or f"{mark} " in original or f" {mark}" in original else " ")
    text = _PERIOD.sub("", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(w for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2 accuracy of one answer.

    With VQAv2's ten human answers: min(#humans who gave it / 3, 1), averaged over the ten
    leave-one-out subsets of nine (the official formula). With one reference: exact match after
    normalisation.
    """
    if not references:
        raise ValueError("a question needs at least one reference answer")
    pred = normalise_answer(prediction)
    refs = [normalise_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for left_out in range(len(refs)):
        matches = sum(r == pred for i, r in enumerate(refs) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def yes_no(answer: str) -> str:
    """POPE's reading of a free answer: "no" when it says no or not, else "yes"."""
    words = normalise_answer(answer).split()
    return NO if NO in words or "not" in words else YES


def is_yes_no(references: list[str]) -> bool:
    return bool(references) and all(normalise_answer(r) in (YES, NO) for r in references)


def answer_type(references: list[str]) -> str:
    """VQAv2's answer types: yes/no, number, other (by the most common reference)."""
    top = Counter(normalise_answer(r) for r in references).most_common(1)[0][0]
    if top in (YES, NO):
        return "yes/no"
    return "number" if top.isdigit() else "other"


def question_type(question: str, words: int = 2) -> str:
    """A question's type from its first words ("what color", "how many", "is there"), the way
    VQAv2's `question_type` groups questions, for data that carries no type of its own."""
    return " ".join(normalise_answer(question.split("\n")[0]).split()[:words]) or "(empty)"


@dataclass
class Pope:
    """POPE's metrics over yes/no questions, "yes" being the positive class."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, prediction: str, reference: str) -> None:
        said_yes, truly_yes = yes_no(prediction) == YES, normalise_answer(reference) == YES
        if said_yes:
            self.tp, self.fp = self.tp + truly_yes, self.fp + (not truly_yes)
        else:
            self.fn, self.tn = self.fn + truly_yes, self.tn + (not truly_yes)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict[str, float]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total = max(self.total, 1)
        return {"questions": self.total, "accuracy": (self.tp + self.tn) / total, "precision": precision,
                "recall": recall, "f1": f1, "yes_ratio": (self.tp + self.fp) / total}
