"""Visual questions about a synthetic scene or clip, each with ten annotator answers in the manner of VQAv2.

:func:`scene_questions` asks about a still :class:`~vlgen.data.synthetic.shapes.Scene` and :func:`clip_questions`
about a :class:`~vlgen.data.synthetic.motion.Clip`: the colour of an object whose shape is unique, the shape of an
object whose colour is unique, counts (absent shapes included), existence, spatial relations (stills; read with
the :func:`~vlgen.data.synthetic.shapes.relation` the captions state), sizes, and for clips the direction of a
mover, whether an object moves or stays still, and whether it comes into view or disappears. A question names an
object only by what makes it unique in the picture, and every yes/no question is asked either way with equal
chance. Each :class:`Question` carries its canonical answer, always true of the picture, and ten simulated
annotator answers (:func:`annotator_answers`): five to ten give the canonical answer, the others an acceptable
variant (a synonym, a plural, a number word, a stray full stop or capital) or a wrong answer, so both the official
``min(1, matches / 3)`` score and its punctuation stripping are exercised. Everything follows from the generator
passed in; :func:`vqa_records` turns questions into LAVIS's converted VQA records with VQAv2's type fields.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlgen.data.synthetic.shapes import _ARTICLE, COLORS, INVERSE, PHRASES, SHAPES, SceneObject, relation

if TYPE_CHECKING:  # types only: motion.py imports this module, and so does shapes.py's world (when writing)
    from vlgen.data.synthetic.motion import Clip, MovingObject
    from vlgen.data.synthetic.shapes import Scene

    Thing = SceneObject | MovingObject  # what a question may name: anything with a shape, colour and size

YES_NO, NUMBER, OTHER = "yes/no", "number", "other"  # VQAv2's answer types
ANNOTATORS = 10
AGREEMENT = (5, 6, 7, 7, 8, 8, 9, 9, 10, 10)  # annotators giving the canonical answer: one drawn per question
VARIANT_SHARE = 0.6  # of the other annotators, this share give an acceptable variant and the rest a wrong answer
SYNONYM_SHARE = 0.6  # of the variants of an answer with synonyms, this share are synonyms; the rest stray marks
SYNONYMS = {
    "purple": ("violet",),
    "circle": ("ball", "round", "circles"),
    "square": ("box", "squares"),
    "triangle": ("triangles", "triangular"),
    "left": ("on left", "left side", "to left"),
    "right": ("on right", "right side", "to right"),
    "up": ("upward", "upwards"),
    "down": ("downward", "downwards"),
    "large": ("big",),
    "small": ("little",),
    "0": ("none", "zero"),
    "1": ("one",),
    "2": ("two",),
    "3": ("three",),
}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}  # the motion kinds of a mover, reversed
SWITCHES = {"appears": "come into view", "disappears": "disappear"}  # how questions ask for these motion kinds


@dataclass(frozen=True)
class Question:
    """One visual question with its canonical answer, ten annotator answers and VQAv2's two type labels.

    ``question_type`` is the question's opening words as VQAv2 labels them ("what color is the", "how many",
    "is there a", ...); kinds VQAv2 lacks are named the same way ("what shape is the", "which direction does the").
    """

    question: str
    answer: str
    answers: tuple[str, ...]
    answer_type: str
    question_type: str


@dataclass(frozen=True)
class _Draft:
    """A question before its annotators: ``wrong`` lists the answers an erring annotator may give."""

    question: str
    answer: str
    answer_type: str
    question_type: str
    wrong: tuple[str, ...]


Kind = Callable[[np.random.Generator], "_Draft | None"]  # one question kind bound to its picture; None: not askable


def _pick(options: Sequence[Any], rng: np.random.Generator) -> Any:
    return options[int(rng.integers(len(options)))]


def _yes_no(question: str, question_type: str, yes: bool) -> _Draft:
    answer, other = ("yes", "no") if yes else ("no", "yes")
    return _Draft(_ARTICLE.sub("an ", question), answer, YES_NO, question_type, (other,))


def _number(question: str, n: int) -> _Draft:
    return _Draft(question, str(n), NUMBER, "how many", tuple(str(k) for k in (n - 1, n + 1) if k >= 0))


def _color(objs: Sequence[Thing], rng: np.random.Generator) -> _Draft | None:
    """The colour of an object whose shape is unique: "what color is the circle?"."""
    unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    if not unique:
        return None
    o, opening = _pick(unique, rng), _pick(("what color is the", "what is the color of the"), rng)
    return _Draft(f"{opening} {o.shape}?", o.color, OTHER, opening, tuple(c for c in COLORS if c != o.color))


def _shape(objs: Sequence[Thing], rng: np.random.Generator) -> _Draft | None:
    """The shape of an object whose colour is unique: "what shape is the red object?"."""
    unique = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    if not unique:
        return None
    o, noun = _pick(unique, rng), _pick(("object", "thing", "shape"), rng)
    question = f"what shape is the {o.color} {noun}?"
    return _Draft(question, o.shape, OTHER, "what shape is the", tuple(s for s in SHAPES if s != o.shape))


def _count(objs: Sequence[Thing], rng: np.random.Generator) -> _Draft:
    """All objects, those of one shape (often absent: 0) or those of a colour present in the picture."""
    form = int(rng.integers(3))
    if form == 0:
        return _number(f"how many {_pick(('shapes', 'objects'), rng)} are there?", len(objs))
    if form == 1:
        shape = _pick(SHAPES, rng)
        return _number(f"how many {shape}s are there?", sum(o.shape == shape for o in objs))
    color = _pick(sorted({o.color for o in objs}), rng)
    return _number(f"how many {color} shapes are there?", sum(o.color == color for o in objs))


def _exists(objs: Sequence[Thing], rng: np.random.Generator) -> _Draft:
    """Existence, "is there a green triangle?": yes of an object, no of a near miss sharing its colour or shape."""
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        color, shape = _pick(sorted(present), rng)
        return _yes_no(f"is there a {color} {shape}?", "is there a", True)
    misses = sorted({(c, s) for c in COLORS for s in SHAPES if any(c == p or s == q for p, q in present)} - present)
    color, shape = _pick(misses, rng)
    return _yes_no(f"is there a {color} {shape}?", "is there a", False)


def _size(objs: Sequence[Thing], rng: np.random.Generator) -> _Draft:
    """Size: "what size is the red circle?" ("small" / "large"), or "is the red circle large?" either way."""
    o = _pick(objs, rng)
    name = f"{o.color} {o.shape}"
    if rng.random() < 0.5:
        other = "large" if o.size == "small" else "small"
        return _Draft(f"what size is the {name}?", o.size, OTHER, "what size is the", (other,))
    asked = _pick(("small", "large"), rng)
    return _yes_no(f"is the {name} {asked}?", "is the", asked == o.size)


def _relation(objs: Sequence[SceneObject], rng: np.random.Generator) -> _Draft | None:
    """Relation, "is the red circle left of the blue square?": the relation the captions state, or its inverse."""
    if len(objs) < 2:
        return None
    i, j = rng.choice(len(objs), 2, replace=False).tolist()
    a, b = objs[i], objs[j]
    yes = rng.random() < 0.5
    asked = relation(a, b) if yes else INVERSE[relation(a, b)]
    question = f"is the {a.name(False)} {_pick(PHRASES[asked], rng)} the {b.name(False)}?"
    return _yes_no(question, "is the", yes)


def _direction(objs: Sequence[MovingObject], rng: np.random.Generator) -> _Draft | None:
    """Direction, "which direction does the red circle move?", of a mover: "left", "right", "up" or "down"."""
    movers = [m for m in objs if m.motion in OPPOSITE]
    if not movers:
        return None
    m, opening = _pick(movers, rng), _pick(("which direction does the", "which way does the"), rng)
    wrong = (OPPOSITE[m.motion], *(d for d in OPPOSITE if d != m.motion))  # the opposite twice as often
    return _Draft(f"{opening} {m.color} {m.shape} move?", m.motion, OTHER, opening, wrong)


def _moves(objs: Sequence[MovingObject], rng: np.random.Generator) -> _Draft | None:
    """Stillness, "does the blue square move?" or "does it stay still?", of a mover or a still object."""
    candidates = [m for m in objs if m.motion in OPPOSITE or m.motion == "still"]
    if not candidates:
        return None
    m, ask_moves = _pick(candidates, rng), rng.random() < 0.5
    verb = "move" if ask_moves else "stay still"
    return _yes_no(f"does the {m.color} {m.shape} {verb}?", "does the", ask_moves == (m.motion in OPPOSITE))


def _switch(objs: Sequence[MovingObject], rng: np.random.Generator) -> _Draft | None:
    """Switching, "does the red circle disappear?": only of clips where an object comes into view or disappears."""
    switching = [m for m in objs if m.motion in SWITCHES]
    if not switching:
        return None
    if rng.random() < 0.5:
        m = _pick(switching, rng)
        return _yes_no(f"does the {m.color} {m.shape} {SWITCHES[m.motion]}?", "does the", True)
    m = _pick(objs, rng)
    event = _pick([e for e in SWITCHES if e != m.motion], rng)
    return _yes_no(f"does the {m.color} {m.shape} {SWITCHES[event]}?", "does the", False)


def _movers(objs: Sequence[MovingObject], rng: np.random.Generator) -> _Draft:
    """Movers, "how many shapes move?": the objects that move (0 when none does)."""
    return _number(f"how many {_pick(('shapes', 'objects'), rng)} move?", sum(m.motion in OPPOSITE for m in objs))


def _variant(answer: str, rng: np.random.Generator) -> str:
    """An acceptable but differently written answer: a synonym, or the answer with a stray mark or capital."""
    synonyms = SYNONYMS.get(answer, ())
    if synonyms and rng.random() < SYNONYM_SHARE:
        return _pick(synonyms, rng)
    return _pick((f"{answer}.",) if answer.isdigit() else (f"{answer}.", f"{answer}!", answer.capitalize()), rng)


def annotator_answers(answer: str, wrong: Sequence[str], rng: np.random.Generator) -> tuple[str, ...]:
    """Ten annotator answers in random order, the canonical ``answer`` strictly the most frequent string.

    Args:
        answer: the canonical answer.
        wrong: the answers an erring annotator may give (the opposite yes/no, a neighbouring count, ...).
        rng: the source of every choice.

    Returns:
        Five to ten copies of ``answer`` (drawn from :data:`AGREEMENT`); each other annotator gives a variant
        (:data:`VARIANT_SHARE` of them) or one of ``wrong``.
    """
    while True:
        agree = int(_pick(AGREEMENT, rng))
        others = [
            _variant(answer, rng) if not wrong or rng.random() < VARIANT_SHARE else _pick(wrong, rng)
            for _ in range(ANNOTATORS - agree)
        ]
        if all(n < agree for n in collections.Counter(others).values()):  # ties only when all five others agree
            answers = [answer] * agree + others
            return tuple(answers[i] for i in rng.permutation(ANNOTATORS).tolist())


def _ask(kinds: Sequence[Kind], rng: np.random.Generator, count: int) -> list[Question]:
    """Up to ``count`` distinct questions, taking the kinds in a fresh random order round after round."""
    out: list[Question] = []
    for attempt in range(50 * (count + 1)):
        if len(out) == count:
            break
        if attempt % len(kinds) == 0:
            order = rng.permutation(len(kinds)).tolist()
        draft = kinds[order[attempt % len(kinds)]](rng)
        if draft is None or any(q.question == draft.question for q in out):
            continue
        answers = annotator_answers(draft.answer, draft.wrong, rng)
        out.append(Question(draft.question, draft.answer, answers, draft.answer_type, draft.question_type))
    return out


def scene_questions(scene: Scene, rng: np.random.Generator, count: int = 3) -> list[Question]:
    """``count`` distinct questions about a still scene (fewer only when it allows no more; not with count <= 10).

    Kinds: colour, shape, count, existence, relation (two or more objects) and size.
    """
    objs = scene.objects
    kinds = (_color, _shape, _count, _exists, _relation, _size)
    return _ask([functools.partial(kind, objs) for kind in kinds], rng, count)


def clip_questions(clip: Clip, rng: np.random.Generator, count: int = 3) -> list[Question]:
    """``count`` distinct questions about a clip (fewer only when it allows no more; not with count <= 10).

    Kinds: colour, shape, count, existence, size, direction, moves-or-stays-still and comes-into-view-or-disappears.
    A clip's objects are all those shown on any of its frames, as the captions count them: "how many shapes are
    there?" counts an object that appears late or disappears early, and "is there a ...?" is yes for it.
    """
    objs = clip.objects
    kinds = (_color, _shape, _count, _movers, _exists, _size, _direction, _moves, _switch)
    return _ask([functools.partial(kind, objs) for kind in kinds], rng, count)


def question_id(split_code: int, index: int, k: int) -> int:
    """The id of question ``k`` (0-9) of image or video ``index`` (below a million) of the split coded
    ``split_code`` (the world's ``SPLITS``): ``split_code * 10**7 + index * 10 + k``, unique within a world."""
    return split_code * 10**7 + index * 10 + k


def vqa_records(
    questions: Sequence[Question], split_code: int, index: int, media: str, key: str = "image"
) -> list[dict[str, Any]]:
    """LAVIS's converted VQA records (plus VQAv2's type fields) of one image or video's questions.

    Args:
        questions: the questions, in order (``k`` of :func:`question_id`).
        split_code: the split's code in the world's ``SPLITS``.
        index: the image or video within its split.
        media: its path relative to the world root, e.g. ``"images/test_000003.png"``.
        key: ``"image"`` or ``"video"``; also names the id field (``image_id`` / ``video_id``).
    """
    media_id = media.rpartition("/")[2].rpartition(".")[0]  # "images/test_000003.png" -> "test_000003"
    return [
        {
            "question_id": question_id(split_code, index, k),
            "question": q.question,
            key: media,
            f"{key}_id": media_id,
            "answer": list(q.answers),
            "multiple_choice_answer": q.answer,
            "answer_type": q.answer_type,
            "question_type": q.question_type,
        }
        for k, q in enumerate(questions)
    ]
