"""Visual questions of the synthetic worlds: answers true of the picture, unambiguous names, balanced yes/no,
annotator answers with VQA-like variation, determinism, and the ``vqa_{split}.json`` files the worlds write."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from vlgen.data.synthetic import (
    MovingShapesWorld,
    Question,
    ShapesWorld,
    annotator_answers,
    clip_questions,
    question_id,
    sample_scene,
    scene_questions,
)
from vlgen.data.synthetic.motion import sample_clip
from vlgen.data.synthetic.shapes import COLORS, SHAPES, holds
from vlgen.errors import ConfigError

SHAPE = "|".join(SHAPES)
COLOR = "|".join(COLORS)
NAMED = rf"(?P<color>{COLOR}) (?P<shape>{SHAPE})"
RELATIONS = {"to the left of": "left", "left of": "left", "on the left of": "left", "to the right of": "right",
             "right of": "right", "on the right of": "right", "above": "above", "below": "below",
             "under": "below"}  # fmt: skip
TYPES = {"what color is the", "what is the color of the", "what shape is the", "how many", "is there a", "is the",
         "what size is the", "which direction does the", "which way does the", "does the"}  # fmt: skip


def one(objs, **attrs):
    """The single object with these attributes; fails unless there is exactly one (the question is unambiguous)."""
    found = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
    assert len(found) == 1, (attrs, objs)
    return found[0]


def dominant(a, b) -> str:
    """Where a lies relative to b, read from the positions alone."""
    dx, dy = a.x - b.x, a.y - b.y
    return ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")


def common_truth(q: Question, objs) -> tuple[str, str] | None:
    """(kind, the true answer) of a question any picture can have, from its objects; None for other questions."""
    text = q.question
    if m := re.fullmatch(rf"(?:what color is|what is the color of) the (?P<shape>{SHAPE})\?", text):
        return "color", one(objs, shape=m["shape"]).color
    if m := re.fullmatch(rf"what shape is the (?P<color>{COLOR}) (?:object|thing|shape)\?", text):
        return "shape", one(objs, color=m["color"]).shape
    if re.fullmatch(r"how many (?:shapes|objects) are there\?", text):
        return "count", str(len({(o.color, o.shape) for o in objs}))
    if m := re.fullmatch(rf"how many (?P<shape>{SHAPE})s are there\?", text):
        return "count", str(sum(o.shape == m["shape"] for o in objs))
    if m := re.fullmatch(rf"how many (?P<color>{COLOR}) shapes are there\?", text):
        return "count", str(sum(o.color == m["color"] for o in objs))
    if m := re.fullmatch(rf"is there an? {NAMED}\?", text):
        return "exists", "yes" if any((o.color, o.shape) == (m["color"], m["shape"]) for o in objs) else "no"
    if m := re.fullmatch(rf"what size is the {NAMED}\?", text):
        return "size", one(objs, color=m["color"], shape=m["shape"]).size
    if m := re.fullmatch(rf"is the {NAMED} (?P<size>small|large)\?", text):
        return "size", "yes" if one(objs, color=m["color"], shape=m["shape"]).size == m["size"] else "no"
    return None


def scene_truth(q: Question, scene) -> tuple[str, str]:
    objs = scene.objects
    if found := common_truth(q, objs):
        return found
    phrase = "|".join(RELATIONS)
    m = re.fullmatch(
        rf"is the (?P<a>(?:{COLOR}) (?:{SHAPE})) (?P<rel>{phrase}) the (?P<b>(?:{COLOR}) (?:{SHAPE}))\?", q.question
    )
    assert m, q
    a, b = (one(objs, color=m[k].split()[0], shape=m[k].split()[1]) for k in ("a", "b"))
    rel = RELATIONS[m["rel"]]
    assert holds(a, b, rel) == (rel == dominant(a, b))  # a yes is a clear one, a no clearly false
    return "relation", "yes" if rel == dominant(a, b) else "no"


def clip_truth(q: Question, clip) -> tuple[str, str]:
    last = clip.num_frames - 1
    if found := common_truth(q, clip.objects):  # counted over every frame: an object shown on any of them counts
        shown = {(o.color, o.shape) for t in range(clip.num_frames) for o in clip.scene(t).objects}
        assert shown == {(m.color, m.shape) for m in clip.objects}
        return found
    text = q.question
    if m := re.fullmatch(rf"which (?:direction|way) does the {NAMED} move\?", text):
        o = one(clip.objects, color=m["color"], shape=m["shape"])
        (x0, y0), (x1, y1) = o.start, o.end
        assert abs(x1 - x0) + abs(y1 - y0) > 0.1  # asked only of movers
        return "direction", ("left" if x1 < x0 else "right") if abs(x1 - x0) > abs(y1 - y0) else (
            "up" if y1 < y0 else "down"
        )
    if m := re.fullmatch(rf"does the {NAMED} (?P<verb>move|stay still|come into view|disappear)\?", text):
        o = one(clip.objects, color=m["color"], shape=m["shape"])
        moved = o.start != o.end
        if m["verb"] in ("move", "stay still"):
            assert o.at(0, clip.num_frames) is not None and o.at(last, clip.num_frames) is not None  # always shown
            return "moves", "yes" if moved == (m["verb"] == "move") else "no"
        gone = (
            o.at(0, clip.num_frames) is None if m["verb"] == "come into view" else o.at(last, clip.num_frames) is None
        )
        return "switch", "yes" if gone else "no"
    assert re.fullmatch(r"how many (?:shapes|objects) move\?", text), q
    return "movers", str(sum(o.start != o.end for o in clip.objects))


def sample(kind: str, n: int, seed: int = 0, count: int = 3):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        if kind == "scene":
            picture = sample_scene(rng)
            yield picture, scene_questions(picture, rng, count)
        else:
            picture = sample_clip(rng, num_frames=12, max_objects=3)
            yield picture, clip_questions(picture, rng, count)


@pytest.mark.parametrize("kind", ["scene", "clip"])
def test_every_answer_is_true_unambiguous_and_every_kind_occurs(kind):
    truth = scene_truth if kind == "scene" else clip_truth
    kinds, yes_no, types = collections.Counter(), collections.Counter(), set()
    for picture, questions in sample(kind, 600):
        assert len(questions) == 3 and len({q.question for q in questions}) == 3
        for q in questions:
            found, answer = truth(q, picture)
            assert q.answer == answer, (q, picture)
            kinds[found] += 1
            types.add(q.question_type)
            assert q.question.startswith(q.question_type) and q.question == q.question.lower()
            want = "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"
            assert q.answer_type == want, q
            if want == "yes/no":
                yes_no[(found, answer)] += 1
    common = {"color", "shape", "count", "exists", "size"}
    assert set(kinds) == common | ({"relation"} if kind == "scene" else {"direction", "moves", "switch", "movers"})
    assert types <= TYPES
    yes = sum(n for (_, a), n in yes_no.items() if a == "yes")
    assert 0.45 < yes / sum(yes_no.values()) < 0.55, yes_no
    for found in {f for f, _ in yes_no}:  # every yes/no kind is asked either way
        share = yes_no[(found, "yes")] / (yes_no[(found, "yes")] + yes_no[(found, "no")])
        assert 0.35 < share < 0.65, (found, yes_no)


def test_counts_include_absent_shapes_and_up_to_ten_distinct_questions():
    zeros = 0
    for _, questions in sample("scene", 200, seed=1, count=10):
        assert len(questions) == 10 and len({q.question for q in questions}) == 10
        zeros += sum(q.answer == "0" for q in questions)
    for _, questions in sample("clip", 200, seed=1, count=10):
        assert len(questions) == 10 and len({q.question for q in questions}) == 10
    assert zeros > 0


def vqa_accuracy(pred: str, refs: tuple[str, ...]) -> float:
    """VQAv2's score: min(1, matches / 3) averaged over the ten sets of nine references, punctuation stripped
    from the references when they disagree."""
    if len(set(refs)) > 1:
        refs = tuple(re.sub(r"[.!?,]", "", r) for r in refs)
    return float(np.mean([min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(10)]))


def test_annotator_answers_vary_like_released_annotations():
    agreement, kinds, scores = collections.Counter(), collections.Counter(), []
    for _, questions in sample("scene", 300, seed=2):
        for q in questions:
            assert len(q.answers) == 10
            counts = collections.Counter(q.answers)
            top = counts.pop(q.answer)
            assert 5 <= top and all(n < top for n in counts.values()), q  # the canonical one is the most frequent
            agreement[top] += 1
            for other in counts.elements():
                if other.rstrip(".!").lower() == q.answer:
                    kinds["mark" if other[-1] in ".!" else "capital"] += 1
                elif other in {"violet", "ball", "round", "box", "big", "little", "two", "none", "circles"}:
                    kinds["synonym"] += 1
            scores.append(vqa_accuracy(q.answer, q.answers))
    assert set(agreement) == set(range(5, 11)), agreement  # the share of canonical answers varies per question
    assert set(kinds) == {"mark", "capital", "synonym"} and min(kinds.values()) > 10, kinds
    assert min(scores) == 1.0  # the canonical answer always gets full marks
    answers = annotator_answers("yes", ("no",), np.random.default_rng(0))
    assert answers == annotator_answers("yes", ("no",), np.random.default_rng(0))
    wrong = [vqa_accuracy("no", annotator_answers("yes", ("no",), np.random.default_rng(s))) for s in range(50)]
    assert max(wrong) < 1 and 0 < sum(wrong)  # a wrong answer some annotators gave scores partly


def test_same_generator_same_questions():
    a = [qs for _, qs in sample("scene", 30, seed=5)] + [qs for _, qs in sample("clip", 30, seed=5)]
    b = [qs for _, qs in sample("scene", 30, seed=5)] + [qs for _, qs in sample("clip", 30, seed=5)]
    c = [qs for _, qs in sample("scene", 30, seed=6)]
    assert a == b and a[:30] != c


SMALL = {"num_train": 6, "num_val": 3, "num_test": 3, "num_text": 20}


def check_vqa_files(root, world, key: str, splits: dict[str, int], per: int) -> None:
    ids = set()
    for split, code in splits.items():
        records = json.loads((root / f"vqa_{split}.json").read_text())
        assert len(records) == SMALL[f"num_{split}"] * per
        for r in records:
            index, k = (r["question_id"] - code * 10**7) // 10, r["question_id"] % 10
            assert r["question_id"] == question_id(code, index, k)
            media_id = f"{split}_{index:06d}"
            suffix = "png" if key == "image" else "mp4"
            assert set(r) == {"question_id", "question", key, f"{key}_id", "answer", "multiple_choice_answer",
                              "answer_type", "question_type"}  # fmt: skip
            assert r[f"{key}_id"] == media_id and r[key] == f"{key}s/{media_id}.{suffix}" and (root / r[key]).is_file()
            q = world.questions(split, index)[k]
            assert (r["question"], r["multiple_choice_answer"], tuple(r["answer"])) == (q.question, q.answer, q.answers)
            assert (r["answer_type"], r["question_type"]) == (q.answer_type, q.question_type)
            ids.add(r["question_id"])
    assert len(ids) == sum(SMALL[f"num_{s}"] for s in splits) * per  # unique across the world


def test_the_shapes_world_writes_questions_and_leaves_everything_else_as_it_was(tmp_path):
    world = ShapesWorld(seed=3, image_size=32, **SMALL)
    with_q = world.write(tmp_path / "q")
    without = ShapesWorld(seed=3, image_size=32, questions_per_image=0, **SMALL).write(tmp_path / "none")
    check_vqa_files(with_q, world, "image", {"train": 0, "val": 1, "test": 2}, 3)
    assert not list(without.glob("vqa_*"))
    for name in ("train.json", "val.json", "test.json", "corpus.txt"):
        assert (with_q / name).read_bytes() == (without / name).read_bytes(), name
    images = sorted(p.name for p in (with_q / "images").iterdir())
    assert all((with_q / "images" / n).read_bytes() == (without / "images" / n).read_bytes() for n in images)
    marker = json.loads((with_q / "world.json").read_text())
    assert marker["questions_per_image"] == 3 and marker["version"] == 3
    for index in range(3):  # the questions are about the image written
        scene, _ = world.scene("test", index)
        assert all(scene_truth(q, scene)[1] == q.answer for q in world.questions("test", index))
    with pytest.raises(ConfigError, match="questions_per_image"):
        ShapesWorld(questions_per_image=11)


def test_the_video_world_writes_questions_and_leaves_everything_else_as_it_was(tmp_path):
    args = {**SMALL, "image_size": 32, "num_frames": 8}
    world = MovingShapesWorld(seed=3, questions_per_video=2, **args)
    with_q = world.write(tmp_path / "q")
    without = MovingShapesWorld(seed=3, questions_per_video=0, **args).write(tmp_path / "none")
    check_vqa_files(with_q, world, "video", {"train": 10, "val": 11, "test": 12}, 2)
    assert not list(without.glob("vqa_*"))
    for name in ("train.json", "val.json", "test.json", "corpus.txt"):
        assert (with_q / name).read_bytes() == (without / name).read_bytes(), name
    assert json.loads((with_q / "world.json").read_text())["version"] == 2
    for index in range(3):
        clip, _ = world.clip("val", index)
        assert all(clip_truth(q, clip)[1] == q.answer for q in world.questions("val", index))
