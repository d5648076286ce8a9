"""VQA cases that stress every rule of the official evaluation, and the official evaluator run on them.

Shared by ``tests/metrics/test_vqa.py`` and ``bench/vqa_parity.py``. The official code is the GT-Vision-Lab
``vqaEval.py`` / ``vqa.py`` that the ``salesforce-lavis`` wheel ships; both files are loaded by path, so the heavy
``lavis`` package itself is never imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import json
import random
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, TypedDict

LAVIS = "salesforce-lavis"
MANY_PERIODS = "x." * 40  # more than the 32 periods the official removes


class Case(TypedDict):
    pred: str
    answers: list[str]
    answer_type: str
    question_type: str


# Texts that exercise capitals, periods (trailing, inner, decimals, > 32), "1,000", punctuation with and without
# neighbouring spaces, slashes, hyphens, number words, articles, contractions, "none"/"zero" and whitespace.
POOL = [
    "yes", "Yes", "YES", "no", "No.", "2", "two", "Two.", "2.", "2.0", ".5", "3.5", "3.5.", "1,000", "1000",
    "1,000 dogs!", "3,5", "10", "ten", "Ten", "0", "none", "zero", "None", "dog", "Dog", "a dog", "the dog", "an apple",
    "the", "a", "dog.", "dog. cat", "dog.cat", "U.S.A.", "hot dog", "hot-dog", "hot - dog", "hot -dog", "t-shirt",
    "T-Shirt", "left/right", "left / right", "left/ right", "(dog)", "dog (white)", '"dog"', "dog!", "dog?", "dog ?",
    "@home", "dog_cat", "1+1", "a=b", "c:\\path", "`tick`", "<3", "a > b", "[red]", "{x}", "red;blue", "red; blue",
    "don't", "dont", "Dont", "isnt", "whats", "whats up", "Im", "im", "Ive", "somebody'd", "somebodyd", "let's",
    "yall", "oclock", "o'clock", "cant", "can't", "wont", "it's", "its", "one dog", "two dogs", "the two dogs",
    "dog\tcat", "dog\ncat", " dog ", "dog  cat", "", " ", "...", "?!", MANY_PERIODS, MANY_PERIODS + "5",
    "red, white and blue", "hot-dog\t-bun", "left/right\n/up", "red ,white", "1, 2", "1 ,2", "$5", "50%", "#1",
    "a&b", "10:30", "red and white",
]  # fmt: skip
ANSWER_TYPES = ["yes/no", "number", "other"]
QUESTION_TYPES = ["what color is the", "how many", "is the", "what is", "none of the above"]


def _variant(rng: random.Random, text: str) -> str:
    """``text`` as a model might produce it: case, a trailing period, an article, whitespace around it."""
    choice = rng.randrange(8)
    if choice == 0:
        return text.upper()
    if choice == 1:
        return text.capitalize() + "."
    if choice == 2:
        return "the " + text
    if choice == 3:
        return rng.choice(["\n", "\t", " ", ""]) + text + rng.choice(["\n", "\t", "  ", ""])
    return text


def random_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` seeded questions: mostly ten answers from one to four distinct pool texts (some all identical), a
    prediction that is one of them (often varied) or any pool text, so it matches from none to all annotators."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for _ in range(n):
        distinct = rng.sample(POOL, rng.choice([1, 1, 2, 2, 3, 4]))
        n_answers = rng.choice([10] * 8 + [1, 3, 5])
        weights = [rng.random() for _ in distinct]
        answers = rng.choices(distinct, weights=weights, k=n_answers)
        pred = rng.choice(answers) if rng.random() < 0.6 else rng.choice(POOL)
        cases.append(
            Case(
                pred=_variant(rng, pred),
                answers=answers,
                answer_type=rng.choice(ANSWER_TYPES),
                question_type=rng.choice(QUESTION_TYPES),
            )
        )
    return cases


def _case(pred: str, answers: list[str], answer_type: str = "other", question_type: str = "what is") -> Case:
    return Case(pred=pred, answers=answers, answer_type=answer_type, question_type=question_type)


# (case, expected score in [0, 1]) worked out by hand.
HAND_CASES: list[tuple[Case, float]] = [
    # 3 of 10 match: the 7 subsets without a match keep 3 matches (1 each), the 3 with one keep 2 (2/3 each):
    # (7 * 1 + 3 * 2/3) / 10 = 0.9
    (_case("red", ["red"] * 3 + ["blue"] * 7), 0.9),
    # 1 of 10: 9 subsets keep 1 match (1/3), the one without it keeps 0: 9 * (1/3) / 10 = 0.3
    (_case("red", ["red"] + ["blue"] * 9), 0.3),
    # 2 of 10: 8 * (2/3) + 2 * (1/3) = 6, / 10 = 0.6
    (_case("red", ["red"] * 2 + ["blue"] * 8), 0.6),
    # 4 of 10: every subset keeps at least 3 matches
    (_case("red", ["red"] * 4 + ["blue"] * 6), 1.0),
    # "Two." -> "two" (period dropped, lower-cased) -> "2"; ten identical "2"
    (_case("Two.", ["2"] * 10, "number", "how many"), 1.0),
    # the article goes: "a dog" -> "dog"
    (_case("a dog", ["dog"] * 10), 1.0),
    # the answers are not lower-cased: "Dog" never equals the normalised "dog"
    (_case("dog", ["Dog"] * 10), 0.0),
    # identical answers are not punctuation-processed, so "dog." stays and "dog" cannot match it ...
    (_case("dog.", ["dog."] * 10), 0.0),
    # ... but mixed ones are: nine "dog." become "dog"
    (_case("dog", ["dog."] * 9 + ["cat"]), 1.0),
    # "dont" -> "don't" on the prediction only; the answers keep "dont" (not all identical, punctuation only)
    (_case("dont", ["don't"] * 3 + ["dont"] * 7), 0.9),
    # a single answer: its only leave-one-out subset is empty, so even an exact match scores 0
    (_case("yes", ["yes"], "yes/no", "is the"), 0.0),
    # "1,000" deletes every listed punctuation character: "1,000 dogs!" -> "1000 dogs"
    (_case("1,000 dogs!", ["1000 dogs"] * 10, "number", "how many"), 1.0),
    # "hot-dog" has no space by the hyphen, so it becomes "hot dog"
    (_case("hot-dog", ["hot dog"] * 10), 1.0),
    # the tab becomes a space first, so " -" is in the text and every "-" is deleted: "hotdog bun"
    (_case("hot-dog\t-bun", ["hotdog bun"] * 10), 1.0),
]
# "yes" against m "yes" and 10 - m "no", m = 0..10: every number of matching annotators.
MATCH_COUNT_CASES = [_case("yes", ["yes"] * m + ["no"] * (10 - m), "yes/no", "is the") for m in range(11)]
# (prediction, reference, expected) for the exact (GQA) mode.
EXACT_CASES: list[tuple[str, str, float]] = [
    ("The left.", "left", 1.0),  # period removed, lower-cased, article dropped
    ("left", "left", 1.0),
    ("Right", "left", 0.0),
    ("t-shirt", "t-shirt", 0.0),  # the prediction becomes "t shirt"; the raw reference never matches
    ("T-Shirt", "t shirt", 1.0),
    ("two", "2", 1.0),
    ("yes", "Yes", 0.0),  # the reference is not lower-cased
    # LAVIS does not turn the tab into a space, so there is no " -" and each "-" becomes a space
    ("T-Shirt\t-red", "t shirt red", 1.0),
]


@functools.cache
def official_modules() -> tuple[ModuleType, ModuleType]:
    """The official ``vqa.py`` and ``vqa_eval.py`` from the installed salesforce-lavis wheel, loaded by path."""
    try:
        dist = importlib.metadata.distribution(LAVIS)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{LAVIS} is not installed; `make install` installs it (or: pip install --no-deps {LAVIS}==1.0.2)"
        ) from None
    modules = []
    for name in ("vqa", "vqa_eval"):
        path = Path(str(dist.locate_file(f"lavis/common/vqa_tools/{name}.py")))
        spec = importlib.util.spec_from_file_location(f"official_{name}", path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():  # the official regex is written without a raw string
            warnings.simplefilter("ignore")
            spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def official_evaluation(cases: list[Case]) -> tuple[dict[str, Any], dict[int, float]]:
    """Run the official ``VQAEval`` (12 decimals) on ``cases`` (question ids 0..n-1) through official-format files.

    Returns its ``accuracy`` (``overall``, ``perAnswerType``, ``perQuestionType``, percentages) and its per-question
    ``evalQA`` (percentages).
    """
    vqa_module, eval_module = official_modules()
    header = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": {},
    }
    annotations = {
        **header,
        "annotations": [
            {
                "question_id": qid,
                "image_id": qid,
                "question_type": c["question_type"],
                "answer_type": c["answer_type"],
                "multiple_choice_answer": c["answers"][0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(c["answers"])
                ],
            }
            for qid, c in enumerate(cases)
        ],
    }
    questions = {
        **header,
        "questions": [{"question_id": qid, "image_id": qid, "question": "?"} for qid in range(len(cases))],
    }
    results = [{"question_id": qid, "answer": c["pred"]} for qid, c in enumerate(cases)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, content in (("annotations", annotations), ("questions", questions), ("results", results)):
            paths[name] = Path(tmp) / f"{name}.json"
            paths[name].write_text(json.dumps(content))
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it prints progress
            warnings.simplefilter("ignore")  # datetime.utcnow() is deprecated on newer Pythons
            vqa = vqa_module.VQA(str(paths["annotations"]), str(paths["questions"]))
            res = vqa.loadRes(str(paths["results"]), str(paths["questions"]))
            evaluator = eval_module.VQAEval(vqa, res, n=12)
            evaluator.evaluate()
    return evaluator.accuracy, evaluator.evalQA


def official_exact(pred: str, answer: str) -> float:
    """LAVIS's GQA score for a generated answer (``GQATask._report_metrics``), with the official processing."""
    _, eval_module = official_modules()
    tool = eval_module.VQAEval()
    pred = tool.processDigitArticle(tool.processPunctuation(pred))
    return 1.0 if pred == answer else 0.0


def our_evaluation(cases: list[Case]) -> dict[str, float]:
    """``VQAAccuracy.compute()`` on ``cases`` (ids "0".."n-1"), in one update."""
    from vlgen.metrics import VQAAccuracy

    metric = VQAAccuracy()
    metric.update(
        [c["pred"] for c in cases],
        [c["answers"] for c in cases],
        ids=[str(i) for i in range(len(cases))],
        answer_types=[c["answer_type"] for c in cases],
        question_types=[c["question_type"] for c in cases],
    )
    return metric.compute()


def max_differences(cases: list[Case]) -> dict[str, float]:
    """The largest absolute differences (percentage points) between ours and the official on ``cases``: overall,
    per answer type, per question type and per question; also the number of keys each side reports."""
    from vlgen.metrics import vqa_score

    official, per_question = official_evaluation(cases)
    ours = our_evaluation(cases)
    expected = {"accuracy": official["overall"]}
    expected.update({f"answer_type={k}": v for k, v in official["perAnswerType"].items()})
    expected.update({f"question_type={k}": v for k, v in official["perQuestionType"].items()})
    if set(expected) != set(ours):
        raise AssertionError(f"keys differ: official {sorted(expected)}, ours {sorted(ours)}")

    def worst(prefix: str) -> float:
        return max(abs(ours[k] - v) for k, v in expected.items() if k.startswith(prefix))

    return {
        "overall": worst("accuracy"),
        "answer_type": worst("answer_type="),
        "question_type": worst("question_type="),
        "question": max(abs(100 * vqa_score(c["pred"], c["answers"]) - per_question[i]) for i, c in enumerate(cases)),
    }
