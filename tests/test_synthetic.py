"""The synthetic world: scenes, drawings, questions and conversations follow their ground truth."""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from finetune.demo.world import (
    COLOURS, KINDS, POSITIONS, RGB, Scene, Shape, WorldConfig, draw, sample_scene, scene_rng,
)
from finetune.demo.sets import SyntheticSet, write_set
from finetune.demo.texts import (
    FOLLOW_UP, QUESTION_TYPES, TextConfig, conversation, description, ref_by_colour, ref_by_kind,
)

SCENES = [sample_scene(scene_rng(7, i)) for i in range(400)]


def conversations(count: int = 1500, seed: int = 3):
    for i in range(count):
        scene = sample_scene(scene_rng(seed, i))
        yield scene, conversation(scene, random.Random(i))


def test_scenes_keep_the_rules_of_the_world():
    counts = Counter(len(s.shapes) for s in SCENES)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 100
    for scene in SCENES:
        cells = [(s.row, s.column) for s in scene.shapes]
        assert len(set(cells)) == len(cells), "one shape per cell"
        assert cells == sorted(cells), "shapes are listed in reading order"
        for shape in scene.shapes:
            assert 0.15 <= shape.size <= 0.35
            x, y = shape.centre
            assert (int(x * 3), int(y * 3)) == (shape.column, shape.row), "the centre lies in the shape's cell"
            left, top, right, bottom = shape.box()
            assert 0 < left and right < 1 and 0 < top and bottom < 1, "shapes stay inside the image"
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1:]:
                al, at, ar, ab = a.box()
                bl, bt, br, bb = b.box()
                assert ar <= bl or br <= al or ab <= bt or bb <= at, f"{a} overlaps {b}"
    seen = Counter((s.kind, s.colour, s.position) for scene in SCENES for s in scene.shapes)
    assert {k for k, _, _ in seen} == set(KINDS) and {c for _, c, _ in seen} == set(COLOURS)
    assert {p for _, _, p in seen} == set(POSITIONS)


def test_scenes_are_determined_by_seed_and_index():
    assert sample_scene(scene_rng(7, 5)) == SCENES[5]
    assert sample_scene(scene_rng(8, 5)) != SCENES[5]
    assert np.array_equal(np.asarray(draw(SCENES[5], 48)), np.asarray(draw(sample_scene(scene_rng(7, 5)), 48)))


def test_a_drawn_shape_has_its_colour_at_its_centre_on_white():
    scene = Scene((Shape("square", "purple", 1, 1, (0.5, 0.5), 0.3),))
    image = np.asarray(draw(scene, 64)).astype(int)
    assert tuple(image[32, 32]) == RGB["purple"]
    assert tuple(image[2, 2]) == (255, 255, 255)
    wide = np.asarray(draw(scene, 200)).astype(int)
    assert (np.abs(wide - RGB["purple"]).sum(-1) < 30).mean() == pytest.approx(0.09, abs=0.01)  # 0.3² of the area


def test_the_world_config_selects_a_slice_and_rejects_nonsense():
    world = WorldConfig(max_shapes=1, colours=("red", "blue"))
    scenes = [sample_scene(scene_rng(1, i), world) for i in range(50)]
    assert all(len(s.shapes) == 1 and s.shapes[0].colour in ("red", "blue") for s in scenes)
    with pytest.raises(ValueError, match="unknown"):
        WorldConfig(colours=("teal",))
    with pytest.raises(ValueError, match="shapes per scene"):
        WorldConfig(min_shapes=2, max_shapes=1)


def test_answers_follow_the_ground_truth():
    for scene, turns in conversations(600):
        for turn in turns:
            if turn.type == "count":
                assert turn.answer in {"0", "1", "2", "3"}
                if "shapes" in turn.question and not any(c in turn.question for c in COLOURS):
                    assert turn.answer == str(len(scene.shapes))
            elif turn.type == "colour":
                assert turn.answer in COLOURS and turn.answer not in turn.question, "the question gives no colour away"
            elif turn.type == "shape":
                assert turn.answer in KINDS and turn.answer not in turn.question
                colour = next(c for c in COLOURS if c in turn.question)
                assert any(s.colour == colour and s.kind == turn.answer for s in scene.shapes)
            elif turn.type == "position":
                assert turn.answer in POSITIONS and turn.answer not in turn.question
            elif turn.type == "yes/no":
                thing = next(f"{c} {k}" for c in COLOURS for k in KINDS if f"{c} {k}" in turn.question)
                there = any(f"{s.colour} {s.kind}" == thing for s in scene.shapes)
                assert turn.answer == ("yes" if there else "no")
            elif turn.type == "description":
                assert turn.answer == description(scene)


def test_description_lists_the_shapes_in_reading_order_with_articles():
    scene = Scene((Shape("circle", "red", 0, 0, (0.15, 0.15), 0.2), Shape("square", "orange", 1, 1, (0.5, 0.5), 0.2),
                   Shape("triangle", "green", 2, 2, (0.8, 0.8), 0.2)))
    assert description(scene) == ("A red circle at the top left, an orange square in the center and "
                                  "a green triangle at the bottom right.")


def test_references_are_unambiguous():
    scene = Scene((Shape("circle", "red", 0, 0, (0.15, 0.15), 0.2), Shape("circle", "blue", 0, 2, (0.8, 0.15), 0.2),
                   Shape("square", "red", 2, 1, (0.5, 0.8), 0.2)))
    assert ref_by_kind(scene, 0) == "circle at the top left"
    assert ref_by_kind(scene, 2) == "square"
    assert ref_by_colour(scene, 1) == "blue one"
    assert ref_by_colour(scene, 2) == "red one at the bottom center"


def test_every_question_type_is_asked_and_yes_no_answers_are_balanced():
    types, answers = Counter(), Counter()
    for _, turns in conversations(4000):
        for turn in turns:
            types[turn.type] += 1
            if turn.answer in ("yes", "no"):
                answers[turn.type, turn.answer] += 1
    assert set(types) == set(QUESTION_TYPES) | {FOLLOW_UP}
    for kind in ("yes/no", FOLLOW_UP):
        yes, no = answers[kind, "yes"], answers[kind, "no"]
        assert yes + no > 400 and abs(yes - no) / (yes + no) < 0.1, (kind, yes, no)


def test_follow_ups_need_the_earlier_turns():
    """A follow-up names no question type ("And the square?") or no shape ("What colour is it?"):
    the same words ask different things, with different answers, after different turns."""
    asked_after = defaultdict(set)
    for _, turns in conversations():
        assert turns[0].type != FOLLOW_UP
        for before, turn in zip(turns, turns[1:]):
            if turn.type != FOLLOW_UP:
                continue
            words = turn.question.lower().rstrip("?").split()
            elliptic = words[0] == "and" or words[:2] in (["what", "about"], ["how", "about"])
            pronoun = "it" in words or "its" in words
            assert elliptic or pronoun, turn.question
            if not pronoun:  # no question word: only the turn before says what is asked
                assert not {"colour", "color", "where", "many", "there"} & set(words), turn.question
            if pronoun:
                assert not any(k in words for k in KINDS) and not any(c in words for c in COLOURS)
            asked_after[turn.question].add(before.type if before.type != FOLLOW_UP else "chain")
    assert any(len(kinds - {"chain"}) >= 2 for kinds in asked_after.values()), \
        "some follow-up words should follow questions of different types"
    assert asked_after["And the square?"] >= {"colour", "position"}


def test_a_text_config_limits_types_and_turns():
    cfg = TextConfig(types=("colour",), max_turns=1)
    for scene in SCENES[:100]:
        turns = conversation(scene, random.Random(0), cfg)
        assert len(turns) == 1 and turns[0].type == "colour"
    with pytest.raises(ValueError, match="question types"):
        TextConfig(types=("smell",))


def test_written_sets_are_llava_records_that_pass_the_data_check(tmp_path):
    from finetune.data.check import CheckConfig, check

    path = write_set(SyntheticSet(tmp_path / "set", seed=5, records=20, image_size=32))
    records = json.loads(path.read_text())
    assert len(records) == 20 and len(list((tmp_path / "set" / "images").iterdir())) == 20
    first = records[0]["conversations"]
    assert first[0]["value"].startswith("<image>\n") and first[0]["type"] in QUESTION_TYPES
    assert all(t["from"] == ("human" if i % 2 == 0 else "gpt") for r in records for i, t in enumerate(r["conversations"]))
    report = check(CheckConfig(path, image_root=tmp_path / "set", workers=1))
    assert not report.errors and not report.warnings, report.format()
    again = write_set(SyntheticSet(tmp_path / "again", seed=5, records=20, image_size=32))
    assert again.read_text() == path.read_text()
