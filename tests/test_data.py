"""finetune.data: LLaVA records built from COCO / VQAv2 / QA JSONL / LLaVA JSON, and `check`.

Expected records are written out by hand. The only computed part is each record's instruction,
drawn as the module documents: `random.Random(f"{seed}:{record id}").choice(pool)`.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.data import check as dc
from finetune.data.cli import main
from finetune.data.check import CheckConfig, check
from finetune.data.sources import balanced_chunks, majority_answer
from finetune.data.instructions import BRIEF_CAPTION_INSTRUCTIONS, SHORT_ANSWER_SUFFIX

REPO = Path(__file__).resolve().parents[1]
SHORT = "\n" + SHORT_ANSWER_SUFFIX
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def instruction(seed: int, record_id: str) -> str:
    return random.Random(f"{seed}:{record_id}").choice(BRIEF_CAPTION_INSTRUCTIONS)


def held_out(seed: int, key: str, fraction: float) -> bool:
    return random.Random(f"{seed}:split-{key}").random() < fraction


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def answers(*votes: tuple[str, int, int]) -> list[dict]:
    """VQAv2 answers from (answer, how many said it, how many of those were sure)."""
    out = []
    for text, count, sure in votes:
        out += [{"answer": text, "answer_confidence": "yes" if k < sure else "maybe"} for k in range(count)]
    return [dict(a, answer_id=i + 1) for i, a in enumerate(out)]


def coco_file(path: Path, images: dict[int, str], captions: list[tuple[int, int, str]]) -> Path:
    return write_json(path, {
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": name, "height": 480, "width": 640} for i, name in images.items()],
        "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in captions],
    })


def vqav2_files(tmp: Path, questions: list[tuple[int, int, str]], annotations: dict[int, list[dict]]):
    q = write_json(tmp / "questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_subtype": "train2014",
        "questions": [{"image_id": image, "question": text, "question_id": qid} for qid, image, text in questions],
    })
    a = write_json(tmp / "annotations.json", {"info": {}, "data_subtype": "train2014", "annotations": [
        {"question_id": qid, "image_id": qid // 1000, "multiple_choice_answer": "", "answers": votes}
        for qid, votes in annotations.items()]})
    return q, a


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """One small file per input format, each with good items and one bad item per skip reason."""
    coco = coco_file(tmp_path / "captions.json", {i: f"{i:012d}.jpg" for i in (1, 2, 3)}, [
        (11, 1, "a dog on a  mat"),
        (12, 1, "A brown dog lying down!"),
        (21, 2, "two cats\non a sofa"),
        (22, 2, "   "),  # empty
        (99, 7, "a ghost"),  # image 7 is not in "images"
    ])
    questions, annotations = vqav2_files(tmp_path, [
        (1002, 1, "What animal is this?"),  # listed before 1001: records are in question_id order
        (1001, 1, "Is it  sleeping?"),
        (2001, 2, "How many cats?"),
        (2002, 2, "What color is the sofa?"),  # its annotation has no answer
        (3001, 3, "Anyone home?"),  # no annotation
    ], {
        1001: answers(("yes", 6, 0), ("no", 4, 4)),
        1002: answers(("Dog", 4, 0), ("dog ", 3, 0), ("puppy", 3, 3)),  # "dog" 7 times after normalising
        2001: answers(("2", 5, 2), ("two", 5, 4)),  # a tie: "two" has more sure annotators
        2002: [],
        9001: answers(("yes", 10, 10)),  # no question
    })
    qa = tmp_path / "gqa.jsonl"
    qa.write_text("\n".join([
        json.dumps({"image": "gqa/a.jpg", "question": "Is the cup left of the plate?", "answer": "yes"}),
        json.dumps({"image": "gqa/b.jpg", "question": "What is on the table?", "answer": "cup"}),
        "{broken",
        json.dumps({"image": "gqa/a.jpg", "question": "Which side is the plate on?", "answer": "right"}),
        json.dumps({"image": "gqa/b.jpg", "question": "  ", "answer": "x"}),
        json.dumps({"question": "Where?", "answer": "here"}),
    ]) + "\n")
    llava = write_json(tmp_path / "instruct.json", [
        {"id": "000000033471", "image": "000000000001.jpg",
         "conversations": [turn("human", "What is the dog doing?\n<image>"), turn("gpt", " It is lying on a mat. ")]},
        {"id": 5, "conversations": [turn("user", "Tell me a joke."), turn("assistant", "No.")]},
        {"id": "bad-role", "image": "x.jpg", "conversations": [turn("system", "<image>\nHi"), turn("gpt", "Hello")]},
        {"image": "y.jpg", "conversations": [turn("human", "<image>\nA"), turn("gpt", "B"), turn("human", "<image>\nC"),
                                             turn("gpt", "D")]},
    ])
    return {"coco": coco, "questions": questions, "annotations": annotations, "qa": qa, "llava": llava}


def build_argv(inputs: dict[str, Path], out: Path, *extra) -> list:
    return ["build", "--out", out, "--coco-captions", inputs["coco"], "--coco-image-dir", "coco/train2017",
            "--captions-per-image", 5, "--vqav2-questions", inputs["questions"],
            "--vqav2-annotations", inputs["annotations"], "--qa-jsonl", inputs["qa"],
            "--llava-json", inputs["llava"], "--llava-image-dir", "coco/train2017", *extra]


def test_build_writes_exact_records_and_reports_every_skip(inputs, tmp_path, capsys):
    out = tmp_path / "out" / "mix.json"
    rc, _, err = run(build_argv(inputs, out, "--seed", 0), capsys)
    assert rc == 0, err
    coco1, coco2 = "coco/train2017/000000000001.jpg", "coco/train2017/000000000002.jpg"
    assert read_records(out) == [
        {"id": "coco-1-11", "image": coco1, "conversations": [
            turn("human", "<image>\n" + instruction(0, "coco-1-11")), turn("gpt", "A dog on a mat.")]},
        {"id": "coco-1-12", "image": coco1, "conversations": [
            turn("human", "<image>\n" + instruction(0, "coco-1-12")), turn("gpt", "A brown dog lying down!")]},
        {"id": "coco-2-21", "image": coco2, "conversations": [
            turn("human", "<image>\n" + instruction(0, "coco-2-21")), turn("gpt", "Two cats on a sofa.")]},
        {"id": "vqav2-1-0", "image": "train2014/COCO_train2014_000000000001.jpg", "conversations": [
            turn("human", "<image>\nIs it sleeping?" + SHORT), turn("gpt", "yes"),
            turn("human", "What animal is this?" + SHORT), turn("gpt", "dog")]},
        {"id": "vqav2-2-0", "image": "train2014/COCO_train2014_000000000002.jpg", "conversations": [
            turn("human", "<image>\nHow many cats?" + SHORT), turn("gpt", "two")]},
        {"id": "gqa-1", "image": "gqa/a.jpg", "conversations": [
            turn("human", "<image>\nIs the cup left of the plate?" + SHORT), turn("gpt", "yes"),
            turn("human", "Which side is the plate on?" + SHORT), turn("gpt", "right")]},
        {"id": "gqa-2", "image": "gqa/b.jpg", "conversations": [
            turn("human", "<image>\nWhat is on the table?" + SHORT), turn("gpt", "cup")]},
        {"id": "000000033471", "image": coco1, "conversations": [
            turn("human", "What is the dog doing?\n<image>"), turn("gpt", "It is lying on a mat.")]},
        {"id": "5", "conversations": [turn("human", "Tell me a joke."), turn("gpt", "No.")]},
    ]
    expected_skips = [
        ("empty caption", "coco-2-22"),
        ("caption of an image_id missing from 'images'", "coco-7-99"),
        ("annotation without a usable answer", "question 2002"),
        ("question without an annotation", "question 3001"),
        ("annotation without a question", "question 9001"),
        ("invalid JSON", "gqa-3"),
        ("empty question", "gqa-5"),
        ("missing field", "gqa-6: image"),
        ("unknown role", "bad-role: turn 0 is 'system'"),
        ("duplicated <image>", "instruct-4: 2 markers, in turns 0, 2"),
    ]
    lines = err.splitlines()
    for reason, item in expected_skips:
        at = lines.index(f"    skipped, {reason}: 1")
        assert lines[at + 1].startswith(f"      {item}"), (reason, lines[at + 1])
    assert f"wrote 9 records to {out}" in lines
    assert "records from 5 captions of 3 images (1 without a caption), up to 5 per image" in err


def test_same_seed_same_bytes_other_seed_other_instructions(inputs, tmp_path, capsys):
    paths = [tmp_path / f"{name}.jsonl" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (7, 7, 8)):
        assert run(build_argv(inputs, path, "--seed", seed), capsys)[0] == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    first = read_records(paths[0])
    assert first[0]["conversations"][0]["value"] == "<image>\n" + instruction(7, "coco-1-11")
    assert [r["id"] for r in first] == [r["id"] for r in read_records(paths[2])]
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_instruction_pool_varies(tmp_path, capsys):
    assert len(set(BRIEF_CAPTION_INSTRUCTIONS)) == len(BRIEF_CAPTION_INSTRUCTIONS) >= 12
    assert all(text.strip() == text and "<image>" not in text for text in BRIEF_CAPTION_INSTRUCTIONS)
    coco = coco_file(tmp_path / "c.json", {i: f"{i:012d}.jpg" for i in range(1, 81)},
                     [(1000 + i, i, f"photo number {i}") for i in range(1, 81)])
    out = tmp_path / "o.json"
    assert run(["build", "--coco-captions", coco, "--out", out], capsys)[0] == 0
    used = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in read_records(out)]
    assert used == [instruction(0, f"coco-{i}-{1000 + i}") for i in range(1, 81)]
    assert len(set(used)) >= 12  # 80 draws from 16 wordings
    assert max(used.count(u) for u in used) <= 12


def test_captions_per_image_keeps_the_lowest_draws(tmp_path, capsys):
    captions = [(100 * i + k, i, f"caption {k} of image {i}") for i in range(1, 11) for k in range(5)]
    coco = coco_file(tmp_path / "c.json", {i: f"{i:012d}.jpg" for i in range(1, 11)}, captions)
    chosen = {}
    for seed in (0, 1):
        out = tmp_path / f"o{seed}.json"
        assert run(["build", "--coco-captions", coco, "--captions-per-image", 2, "--seed", seed, "--out", out],
                   capsys)[0] == 0
        chosen[seed] = [r["id"] for r in read_records(out)]
        expected = []
        for i in range(1, 11):
            ids = [100 * i + k for k in range(5)]
            best = sorted(sorted(ids, key=lambda a: random.Random(f"{seed}:caption-{a}").random())[:2])
            expected += [f"coco-{i}-{a}" for a in best]
        assert chosen[seed] == expected
    assert chosen[0] != chosen[1]


def test_majority_answer_and_tie_rule():
    assert majority_answer(answers(("yes", 6, 0), ("no", 4, 4))) == "yes"
    assert majority_answer(answers(("Yes", 2, 0), ("yes ", 2, 0), ("no", 3, 3))) == "yes"  # case, spacing
    assert majority_answer(answers(("2", 5, 2), ("two", 5, 4))) == "two"  # tie: more sure annotators
    assert majority_answer(answers(("red", 5, 3), ("blue", 5, 3))) == "blue"  # then alphabetical
    votes = answers(("cat", 3, 1), ("dog", 3, 1), ("fox", 3, 1), ("owl", 1, 0))
    assert majority_answer(votes) == majority_answer(votes[::-1]) == "cat"  # order does not matter
    assert majority_answer([]) == majority_answer([{"answer": " "}]) == majority_answer(None) == ""


def test_balanced_chunks():
    assert [len(c) for c in balanced_chunks(list(range(12)), 10)] == [6, 6]
    assert [len(c) for c in balanced_chunks(list(range(11)), 5)] == [4, 4, 3]
    assert balanced_chunks([1, 2, 3], 10) == [[1, 2, 3]]
    assert balanced_chunks(list(range(4)), 1) == [[0], [1], [2], [3]]


def test_questions_of_an_image_merge_into_multi_turn_records(tmp_path, capsys):
    questions = [(5000 + k, 5, f"Question {k}?") for k in (11, 3, 7, 0, 1, 2, 4, 5, 6, 8, 9, 10)]
    votes = {qid: answers((f"answer {qid - 5000}", 3, 0)) for qid, _, _ in questions}
    q, a = vqav2_files(tmp_path, questions, votes)
    out = tmp_path / "o.json"
    rc, _, err = run(["build", "--vqav2-questions", q, "--vqav2-annotations", a, "--max-turns", 5,
                      "--vqav2-image-pattern", "coco/train2017/{image_id:012d}.jpg", "--out", out], capsys)
    assert rc == 0, err
    expected = []
    for n, ks in enumerate([range(0, 4), range(4, 8), range(8, 12)]):  # 12 questions by 5 -> 4 + 4 + 4
        conversations = []
        for k in ks:
            prefix = "<image>\n" if k == ks[0] else ""
            conversations += [turn("human", f"{prefix}Question {k}?{SHORT}"), turn("gpt", f"answer {k}")]
        expected.append({"id": f"vqav2-5-{n}", "image": "coco/train2017/000000000005.jpg",
                         "conversations": conversations})
    assert read_records(out) == expected
    assert "from 12 questions of 1 image, up to 5 per record" in err


def test_validation_split_holds_out_whole_images(tmp_path, capsys):
    ids = range(1, 41)
    coco = coco_file(tmp_path / "c.json", {i: f"{i:012d}.jpg" for i in ids}, [(100 + i, i, "a photo") for i in ids])
    q, a = vqav2_files(tmp_path, [(1000 * i + k, i, f"q{k}?") for i in ids for k in range(3)],
                       {1000 * i + k: answers(("yes", 3, 0)) for i in ids for k in range(3)})
    llava = write_json(tmp_path / "l.json", [
        {"id": f"l{i}", "image": f"coco/train2017/{i:012d}.jpg",
         "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "A photo.")]} for i in ids
    ] + [{"id": f"text{k}", "conversations": [turn("human", "Hi"), turn("gpt", "Hello")]} for k in range(20)])
    out = tmp_path / "train.jsonl"
    rc, _, err = run(["build", "--coco-captions", coco, "--coco-image-dir", "coco/train2017",
                      "--vqav2-questions", q, "--vqav2-annotations", a, "--llava-json", llava,
                      "--val-fraction", 0.3, "--seed", 3, "--out", out], capsys)
    assert rc == 0, err
    train, val = read_records(out), read_records(tmp_path / "train_val.jsonl")
    assert len(train) + len(val) == 40 * 3 + 20

    def coco_id(record: dict) -> int | None:  # 2014 (VQAv2) and 2017 names of a photo share its id
        return int(record["image"][-16:-4]) if "image" in record else None

    train_images = {coco_id(r) for r in train} - {None}
    val_images = {coco_id(r) for r in val} - {None}
    assert not train_images & val_images
    assert train_images | val_images == set(ids)
    assert val_images == {i for i in ids if held_out(3, f"coco:{i}", 0.3)}
    assert 0 < len(val_images) < 40
    assert {r["id"] for r in val if "image" not in r} == {f"text{k}" for k in range(20)
                                                          if held_out(3, f"text:text{k}", 0.3)}
    assert f"wrote {len(val)} validation records to {tmp_path / 'train_val.jsonl'}" in err


def test_user_errors_are_one_line_with_exit_2(inputs, tmp_path, capsys):
    out = tmp_path / "o.json"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1,')
    cases = [
        (["build", "--out", out, "--coco-captions", tmp_path / "nope.json"],
         f"--coco-captions file not found: {tmp_path / 'nope.json'}"),
        (["build", "--out", out], "no input given"),
        (["build", "--out", tmp_path / "o.txt", "--llava-json", inputs["llava"]], "--out must end in .json or .jsonl"),
        (["build", "--out", out, "--vqav2-questions", inputs["questions"]], "pass them in pairs"),
        (["build", "--out", out, "--llava-json", inputs["llava"], "--val-fraction", 1], "--val-fraction must be in"),
        (["build", "--out", out, "--llava-json", inputs["llava"], "--vqav2-image-pattern", "{image}.jpg"],
         "--vqav2-image-pattern '{image}.jpg' uses ['image']"),
        (["build", "--out", out, "--coco-image-dir", "/abs/coco", "--coco-captions", inputs["coco"]],
         "--coco-image-dir /abs/coco is absolute; pass --image-root"),
        (["build", "--out", out, "--coco-captions", inputs["llava"]], "no 'images' list"),
        (["build", "--out", out, "--coco-captions", bad_json], f"{bad_json} is not valid JSON"),
        (["build", "--out", out, "--vqav2-questions", inputs["questions"], "--vqav2-annotations",
          write_json(tmp_path / "other.json", {"annotations": [{"question_id": 7, "answers": answers(("a", 3, 0))}]})],
         "no question of --vqav2-questions"),
        (["check", inputs["llava"]], "--image-root is required to check images"),
        (["check", inputs["llava"], "--no-check-images", "--tokenizer", tmp_path], "holds no tokenizer"),
    ]
    for argv, message in cases:
        rc, stdout, err = run(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (message, err)
    assert not out.exists() and not list(tmp_path.glob(".o.json*"))  # nothing half-written


def test_absolute_image_folders_become_relative_to_image_root(inputs, tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    out = tmp_path / "o.json"
    rc, _, err = run(["build", "--coco-captions", inputs["coco"], "--coco-image-dir", root / "coco" / "val2017",
                      "--image-root", root, "--out", out], capsys)
    assert rc == 0, err
    assert read_records(out)[0]["image"] == "coco/val2017/000000000001.jpg"


def test_qa_jsonl_without_short_answer_suffix(inputs, tmp_path, capsys):
    out = tmp_path / "o.json"
    assert run(["build", "--qa-jsonl", inputs["qa"], "--qa-image-dir", "gqa_images", "--no-qa-short-answer",
                "--max-turns", 1, "--out", out], capsys)[0] == 0
    assert read_records(out) == [
        {"id": "gqa-1", "image": "gqa_images/gqa/a.jpg", "conversations": chat(
            "<image>\nIs the cup left of the plate?", "yes")},
        {"id": "gqa-4", "image": "gqa_images/gqa/a.jpg", "conversations": chat(
            "<image>\nWhich side is the plate on?", "right")},
        {"id": "gqa-2", "image": "gqa_images/gqa/b.jpg", "conversations": chat(
            "<image>\nWhat is on the table?", "cup")},
    ]


# --- check -----------------------------------------------------------------------------------

def image_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)


def chat(*values: str) -> list[dict]:
    return [turn("human" if i % 2 == 0 else "gpt", v) for i, v in enumerate(values)]


@pytest.fixture
def bad_file(tmp_path: Path) -> tuple[Path, Path]:
    """A record for every error kind `check` knows, next to sound ones."""
    root = tmp_path / "images"
    image_file(root / "ok.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    records = [
        {"id": "ok", "image": "ok.jpg", "conversations": chat("<image>\nWhat is it?", "A red square.")},
        {"id": "text", "conversations": chat("Hi", "Hello", "Bye", "Bye.")},
        {"id": "missing", "image": "nope.jpg", "conversations": chat("<image>\nQ", "A")},
        {"id": "unreadable", "image": "broken.jpg", "conversations": chat("<image>\nQ", "A")},
        {"id": "empty", "image": "ok.jpg", "conversations": chat("<image>\nQ", "  ")},
        {"id": "two-humans", "conversations": [turn("human", "Q"), turn("human", "Q again")]},
        {"id": "unanswered", "conversations": chat("Q", "A", "Q2")},
        {"id": "role", "conversations": [turn("human", "Q"), turn("assistant", "A")]},
        {"id": "no-marker", "image": "ok.jpg", "conversations": chat("What is it?", "A")},
        {"id": "two-markers", "image": "ok.jpg", "conversations": chat("<image>\n<image>\nQ", "A")},
        {"id": "late-marker", "image": "ok.jpg", "conversations": chat("Q", "A", "<image>\nQ2", "A2")},
        {"id": "stray-marker", "conversations": chat("<image>\nQ", "A")},
        ["not", "a", "record"],
        {"id": "no-turns", "image": "ok.jpg"},
        {"id": "ok", "image": "ok.jpg", "conversations": chat("<image>\nAgain?", "Yes.")},
        {"image": "ok.jpg", "conversations": chat("<image>\nNo id?", "None.")},
    ]
    return write_json(tmp_path / "bad.json", records), root


def test_check_finds_every_error_kind(bad_file):
    path, root = bad_file
    report = check(CheckConfig(path, image_root=root))
    found = {kind: tally.examples for kind, tally in report.errors.items()}
    assert found == {
        dc.MISSING_IMAGE: ["missing: nope.jpg"],
        dc.UNREADABLE_IMAGE: [found[dc.UNREADABLE_IMAGE][0]],
        dc.EMPTY_TURN: ["empty: turn 1"],
        dc.NOT_ALTERNATING: ["two-humans: turn 1 is 'human', expected 'gpt'",
                             "unanswered: ends with a human turn that has no answer"],
        dc.UNKNOWN_ROLE: ["role: turn 1 is 'assistant'; expected 'human' or 'gpt'"],
        dc.NO_IMAGE_TOKEN: ["no-marker: the first human turn has no <image>"],
        dc.DUPLICATE_IMAGE_TOKEN: ["two-markers: 2 markers, in turn 0"],
        dc.MISPLACED_IMAGE_TOKEN: ["late-marker: in turn 2"],
        dc.STRAY_IMAGE_TOKEN: ["stray-marker: in turn 0"],
        dc.INVALID: ["#13: not a JSON object", "no-turns: no 'conversations' list"],
    }
    assert found[dc.UNREADABLE_IMAGE][0].startswith("unreadable: broken.jpg: ")
    assert {kind: t.examples for kind, t in report.warnings.items()} == {
        dc.DUPLICATE_ID: ["ok: again at #15"], dc.MISSING_ID: ["#16: named by its position"]}
    assert (report.records, report.with_image, report.error_records) == (16, 10, 12)


def test_check_cli_exit_codes_and_report(bad_file, tmp_path):
    path, root = bad_file
    proc = subprocess.run([sys.executable, "-m", "finetune.data", "check", str(path), "--image-root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "errors in 12 records:" in proc.stdout and "  missing image file: 1\n    missing: nope.jpg" in proc.stdout
    assert proc.stdout.rstrip().endswith("FAILED: 12 records with errors")
    good = write_json(tmp_path / "good.jsonl", {"id": "a", "image": "ok.jpg", "conversations": chat("<image>\nQ", "A")})
    proc = subprocess.run([sys.executable, "-m", "finetune.data", "check", str(good), "--image-root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK: no errors"), proc.stdout + proc.stderr


def test_check_reports_bad_jsonl_lines(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "conversations": chat("Q", "A")}) + "\n\n{oops\n")
    rc, out, _ = run(["check", path, "--no-check-images"], capsys)
    assert rc == 1
    assert "  invalid record: 1\n    #3: invalid JSON: " in out


def test_check_counts_tokens_as_the_model_sees_them(tiny_tokenizer_dir, tiny_checkpoint, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    # llava_v1: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>", one BOS, the image slot expanded to 16.
    text_only = 1 + count(f"{SYSTEM} USER: describe the image ASSISTANT: a red circle</s>")
    with_image = 1 + count(f"{SYSTEM} USER: ") + 16 + count("\nwhat colour is it? ASSISTANT: red</s>")
    path = write_json(tmp_path / "d.json", [
        {"id": "t", "conversations": chat("describe the image", "a red circle")},
        {"id": "i", "image": "x.jpg", "conversations": chat("<image>\nwhat colour is it?", "red")},
    ])
    limit = (text_only + with_image) // 2
    assert text_only != with_image
    rc, out, _ = run(["check", path, "--no-check-images", "--tokenizer", tiny_tokenizer_dir, "--image-tokens", 16,
                      "--max-length", limit], capsys)
    assert rc == 0, out
    lo, hi = sorted([text_only, with_image])
    longer = "t" if text_only > limit else "i"
    assert f"  min {lo}, median {(lo + hi) / 2:g}, p95 {hi}, max {hi}\n" in out
    assert f"  longer than --max-length {limit}: 1\n    {longer}: {hi} tokens\n" in out
    # --model: the checkpoint's own tokenizer, template (llava_v1) and tower (16 patches) give the same counts.
    rc, out, _ = run(["check", path, "--no-check-images", "--model", tiny_checkpoint, "--max-length", limit], capsys)
    assert rc == 0 and "template llava_v1, 16 tokens per image" in out, out
    assert f"  min {lo}, median {(lo + hi) / 2:g}, p95 {hi}, max {hi}\n" in out
    rc, _, err = run(["check", path, "--no-check-images", "--model", tiny_checkpoint, "--tokenizer", tiny_tokenizer_dir],
                     capsys)
    assert rc != 0 and "pass --model (its tokenizer, template and image tokens) or --tokenizer, not both" in err


def test_build_output_passes_check(inputs, tmp_path, capsys):
    out = tmp_path / "mix.jsonl"
    assert run(build_argv(inputs, out), capsys)[0] == 0
    report = check(CheckConfig(out, check_images=False))
    assert report.records == 9 and not report.errors and not report.warnings


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from Linux's /proc")
def test_build_streams_large_vqav2_files(tmp_path):
    """60k questions with 10 answers each (~50 MB): loading it whole would take several hundred MB."""
    n = 60_000
    with open(tmp_path / "q.json", "w") as fq, open(tmp_path / "a.json", "w") as fa:
        fq.write('{"data_subtype": "train2014", "questions": [')
        fa.write('{"annotations": [')
        votes = json.dumps(answers(("yes", 6, 3), ("no", 4, 2)))
        for i in range(n):
            image, qid = 1 + i % (n // 5), 1_000_000 + i
            sep = "," if i else ""
            fq.write(f'{sep}{{"image_id": {image}, "question": "Is there a thing number {i} here?", '
                     f'"question_id": {qid}}}')
            fa.write(f'{sep}{{"question_id": {qid}, "image_id": {image}, "answer_type": "yes/no", "answers": {votes}}}')
        fq.write("]}")
        fa.write("]}")
    # VmHWM (peak resident memory) starts afresh at exec; ru_maxrss would inherit pytest's.
    code = ("import re, sys; from pathlib import Path; from finetune.data.cli import main; rc = main(sys.argv[1:]); "
            "print(int(re.search(r'VmHWM:\\s*(\\d+)', Path('/proc/self/status').read_text())[1]) // 1024); "
            "sys.exit(rc)")
    out = tmp_path / "o.jsonl"
    proc = subprocess.run([sys.executable, "-c", code, "build", "--vqav2-questions", str(tmp_path / "q.json"),
                           "--vqav2-annotations", str(tmp_path / "a.json"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == n // 5
    peak_mb = int(proc.stdout.split()[-1])
    assert peak_mb < 100, f"peak RSS {peak_mb} MB"  # 37 MB streamed; json.load alone takes 265 MB
