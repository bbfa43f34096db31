"""finetune.eval: VQAv2 normalisation, accuracy and POPE metrics, and the CLI on a tiny model."""
from __future__ import annotations

import json

import pytest

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


def test_cli_json_on_a_tiny_model_in_4bit(tiny_checkpoint, tmp_path, capsys):
    from finetune.demo.sets import SyntheticSet, write_set

    data = write_set(SyntheticSet(tmp_path / "set", seed=3, records=3, image_size=32))
    predictions = tmp_path / "predictions.jsonl"
    rc = main(["--model", str(tiny_checkpoint), "--data", str(data), "--image-root", str(tmp_path / "set"),
               "--load-in", "4bit", "--device", "cpu", "--max-new-tokens", "4", "--json", "--no-progress",
               "--predictions", str(predictions)])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    records = json.loads(data.read_text())
    total = sum(len(r["conversations"]) // 2 for r in records)
    assert result["questions"] == total and result["records"] == 3 and result["load_in"] == "4bit"
    assert sum(row["questions"] for row in result["per_question_type"].values()) == total
    assert 0.0 <= result["accuracy"] <= 1.0
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == total and {"question", "references", "answer", "score", "type"} <= set(lines[0])


def test_cli_names_the_flag_to_fix(tmp_path, capsys):
    rc = main(["--model", "nowhere", "--data", str(tmp_path / "missing.json")])
    assert rc == 2 and "--data" in capsys.readouterr().err
