"""finetune.eval: VQAv2 normalisation, accuracy and POPE metrics, and the CLI on a tiny model."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from finetune.eval import Question, main, report
from finetune.vqa_metrics import Pope, answer_type, normalise_answer, question_type, vqa_accuracy, yes_no


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),
    ("the Red", "red"),
    ("  A  Red   Circle. ", "red circle"),
    ("yes, it is", "yes it is"),
    ("black/white", "black white"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("None", "0"),
    ("ten", "10"),
    ("top-left", "top left"),
    ("An orange!", "orange"),
    ("What?!", "what"),
])
def test_normalisation_matches_vqav2_rules(raw, expected):
    assert normalise_answer(raw) == expected


def test_single_reference_accuracy_is_exact_match_after_normalisation():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("the Red", ["red"]) == 1.0
    assert vqa_accuracy("red circle", ["red"]) == 0.0


def test_ten_human_answers_use_the_official_leave_one_out_formula():
    # 2 of 10 humans said "cat": every subset of 9 holds 1 or 2 of them -> (8 * 2/3 + 2 * 1/3) / 10
    refs = ["cat", "cat"] + ["dog"] * 8
    assert vqa_accuracy("cat", refs) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("Dog.", refs) == 1.0
    assert vqa_accuracy("bird", refs) == 0.0
    with pytest.raises(ValueError, match="reference"):
        vqa_accuracy("x", [])


def test_pope_metrics_on_crafted_predictions():
    pope = Pope()
    for prediction, reference in [("Yes.", "yes"), ("yes", "yes"), ("no", "yes"), ("yes", "no"), ("No, there is not.", "no"),
                                  ("no", "no")]:
        pope.add(prediction, reference)
    m = pope.metrics()
    assert (pope.tp, pope.fn, pope.fp, pope.tn) == (2, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.5
    assert yes_no("There is not one") == "no" and yes_no("I see it") == "yes"


def test_types_of_questions_and_answers():
    assert question_type("What colour is the circle?\nAnswer the question using a single word or phrase.") == "what colour"
    assert question_type("How many shapes are there?") == "how many"
    assert answer_type(["Yes"]) == "yes/no" and answer_type(["two"]) == "number" and answer_type(["red"]) == "other"


def test_report_groups_scores_by_type():
    questions = [Question("a", 0, "colour", "q", ["red"], "red", 1.0), Question("a", 1, "follow-up", "q", ["blue"], "red", 0.0),
                 Question("b", 0, "yes/no", "q", ["yes"], "yes", 1.0), Question("b", 1, "yes/no", "q", ["no"], "yes", 0.0)]
    r = report(questions, {})
    assert r["accuracy"] == 0.5 and r["questions"] == 4
    assert r["per_question_type"]["colour"] == {"questions": 1, "accuracy": 1.0}
    assert r["per_question_type"]["yes/no"] == {"questions": 2, "accuracy": 0.5}
    assert r["per_answer_type"]["other"] == {"questions": 2, "accuracy": 0.5}
    assert r["pope"]["yes_ratio"] == 1.0 and r["pope"]["precision"] == 0.5 and r["pope"]["recall"] == 1.0


# -- the CLI end to end ---------------------------------------------------------------------
def human(text: str, **extra) -> dict:
    return {"from": "human", "value": text, **extra}


def gpt(text: str, **extra) -> dict:
    return {"from": "gpt", "value": text, **extra}


@pytest.fixture
def crafted_data(tmp_path):
    """Two records whose every question has a scripted answer (SCRIPT) with a hand-computed score."""
    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (20, 20, 220)).save(tmp_path / "b.png")
    records = [
        {"id": "a", "image": "a.png", "conversations": [
            human("<image>\nWhat colour is the circle?", type="colour"),
            gpt("red", answers=["red", "red"] + ["dark red"] * 8),
            human("Is there a square?"), gpt("no"),
            human("How many circles are there?"), gpt("2")]},
        {"id": "b", "image": "b.png", "conversations": [
            human("<image>\nIs there a circle?"), gpt("yes"),
            human("Is it red?"), gpt("yes"),
            human("Is it blue?"), gpt("no"),
            human("Is it round?"), gpt("yes")]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json"


SCRIPT = {  # question -> (the answer given, its score against the references above)
    "What colour is the circle?": ("Red.", 0.6),  # 2 of 10 humans: (8 * 2/3 + 2 * 1/3) / 10
    "Is there a square?": ("No, there is not.", 0.0),  # not an exact "no", but POPE reads a true negative
    "How many circles are there?": ("two", 1.0),
    "Is there a circle?": ("no", 0.0),  # false negative
    "Is it red?": ("Yes", 1.0),  # true positive
    "Is it blue?": ("yes", 0.0),  # false positive
    "Is it round?": ("yes it is", 0.0),  # POPE: true positive
}


def recording_sessions(monkeypatch, scripted: bool) -> list[list[list[tuple[str, str]]]]:
    """Patch `ChatSession` so each session logs the history every question was asked after;
    `scripted` sessions answer from SCRIPT instead of running the model."""
    import mmchat.chat
    from mmchat.conversation import ASSISTANT, USER, Message

    seen: list[list[list[tuple[str, str]]]] = []  # per session, per question: (role, text) before it

    class Recorded(mmchat.chat.ChatSession):
        def __post_init__(self):
            super().__post_init__()
            seen.append([])

        def ask(self, text, image=None, gen=None):
            seen[-1].append([(m.role, m.text) for m in self.messages])
            if not scripted:
                return super().ask(text, image, gen)
            self.messages += [Message(USER, text, int(image is not None)), Message(ASSISTANT, SCRIPT[text][0])]
            return iter([SCRIPT[text][0]])

    monkeypatch.setattr(mmchat.chat, "ChatSession", Recorded)
    return seen


def run_eval(capsys, *args) -> dict:
    assert main([*args, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("history", ["reference", "model"])
def test_cli_scores_scripted_answers_exactly(tiny_checkpoint, crafted_data, tmp_path, capsys, monkeypatch, history):
    seen = recording_sessions(monkeypatch, scripted=True)
    predictions = tmp_path / "predictions.jsonl"
    r = run_eval(capsys, "--model", str(tiny_checkpoint), "--data", str(crafted_data), "--image-root", str(tmp_path),
                 "--device", "cpu", "--history", history, "--predictions", str(predictions))
    assert (r["questions"], r["records"], r["history"], r["load_in"]) == (7, 2, history, "32bit")  # CPU: 32-bit
    assert r["accuracy"] == pytest.approx(2.6 / 7)
    assert r["per_question_type"] == {
        "colour": {"questions": 1, "accuracy": pytest.approx(0.6)},  # the data's "type" wins over the wording
        "how many": {"questions": 1, "accuracy": 1.0},
        "is it": {"questions": 3, "accuracy": pytest.approx(1 / 3)},
        "is there": {"questions": 2, "accuracy": 0.0},
    }
    assert r["per_answer_type"] == {"number": {"questions": 1, "accuracy": 1.0},
                                    "other": {"questions": 1, "accuracy": pytest.approx(0.6)},
                                    "yes/no": {"questions": 5, "accuracy": pytest.approx(1 / 5)}}
    # tp 2, fn 1, fp 1, tn 1
    assert r["pope"] == pytest.approx({"questions": 5, "accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3,
                                       "f1": 2 / 3, "yes_ratio": 3 / 5})
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [(q["record"], q["turn"], q["answer"], q["score"]) for q in lines] == [
        (rid, turn, SCRIPT[question][0], pytest.approx(SCRIPT[question][1]))
        for rid, questions in [("a", list(SCRIPT)[:3]), ("b", list(SCRIPT)[3:])] for turn, question in enumerate(questions)]
    # One session per record; each question follows the earlier turns with the chosen answers.
    shown = {"reference": ["red", "no", "yes", "yes", "no"], "model": ["Red.", "No, there is not.", "no", "Yes", "yes"]}
    a, b = seen
    assert a[2] == [("user", "What colour is the circle?"), ("assistant", shown[history][0]),
                    ("user", "Is there a square?"), ("assistant", shown[history][1])]
    assert b[0] == [] and [m for _, m in b[3][1::2]] == shown[history][2:]


def test_cli_on_a_tiny_model_in_4bit_reports_its_own_predictions(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from finetune.demo.sets import SyntheticSet, write_set
    from finetune.vqa_metrics import is_yes_no

    seen = recording_sessions(monkeypatch, scripted=False)
    data = write_set(SyntheticSet(tmp_path / "set", seed=3, records=3, image_size=32))
    predictions = tmp_path / "predictions.jsonl"
    r = run_eval(capsys, "--model", str(tiny_checkpoint), "--data", str(data), "--image-root", str(tmp_path / "set"),
                 "--load-in", "4bit", "--device", "cpu", "--max-new-tokens", "4", "--history", "model",
                 "--predictions", str(predictions))
    records = json.loads(data.read_text())
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == r["questions"] == sum(len(rec["conversations"]) // 2 for rec in records)
    assert r["records"] == 3 and r["load_in"] == "4bit" and r["history"] == "model"
    # Every number in the report follows from the predictions file.
    for q in lines:
        assert q["score"] == vqa_accuracy(q["answer"], q["references"])
    assert r["accuracy"] == pytest.approx(sum(q["score"] for q in lines) / len(lines))
    for key, groups in [("per_question_type", lambda q: q["type"]), ("per_answer_type", lambda q: answer_type(q["references"]))]:
        expected = {}
        for q in lines:
            expected.setdefault(groups(q), []).append(q["score"])
        assert r[key] == {k: {"questions": len(v), "accuracy": pytest.approx(sum(v) / len(v))} for k, v in expected.items()}
    pope = Pope()
    for q in lines:
        if is_yes_no(q["references"]):
            pope.add(q["answer"], q["references"][0])
    assert r["pope"] == (pope.metrics() if pope.total else None)
    # --history model: a follow-up is asked after the model's own earlier answers, not the references.
    turns = [q for q in lines if q["record"] == "shapes-3-0"]
    before_last = seen[0][-1]
    assert [text for _, text in before_last[1::2]] == [q["answer"] for q in turns[:-1]]
    assert [text for _, text in before_last[1::2]] != [q["references"][0] for q in turns[:-1]]


def test_cli_names_the_flag_to_fix(tmp_path, capsys):
    rc = main(["--model", "nowhere", "--data", str(tmp_path / "missing.json")])
    assert rc == 2 and "--data" in capsys.readouterr().err
