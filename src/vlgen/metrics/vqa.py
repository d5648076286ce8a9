"""VQA accuracy as the VQA challenge scores it (GT-Vision-Lab's ``vqaEval.py``, the copy LAVIS ships), and GQA's
exact-match accuracy as LAVIS scores it.

A prediction is normalised (whitespace, punctuation, number words, articles, contractions) and compared with each
ground-truth answer; with ``N`` annotators (ten in VQA v2) each leave-one-out subset of ``N - 1`` answers gives
``min(1, matches / 3)`` and the question scores the mean over the ``N`` subsets. The official code's quirks are kept
on purpose, each noted where it happens, so the numbers equal the official ones (checked against it in
``tests/metrics/test_vqa.py`` and ``bench/vqa_parity.py``); the only difference is that nothing is rounded here.
Rows from every rank are gathered before scoring and a repeated id is scored once, as in :class:`CaptionMetrics`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torchmetrics import Metric

from vlgen.dist import gather_objects

# The official punctuation list, in its order (the order does not change the result: no replacement creates or
# removes another listed character). "." is handled separately, and ":", "'", "*", "#", "$", "%", "&", "|", "~", "^"
# are not in the list, so they stay.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official period pattern is "(?!<=\d)(\.)(?!\d)": its first group, meant as a look-behind, is a negative
# look-ahead for the text "<=" plus a digit, which always passes where a "." stands. So it removes any period not
# followed by a digit ("3.5" and ".5" keep theirs, "2." and "dog." lose it), whatever precedes it.
_PERIOD = re.compile(r"\.(?!\d)")
# The official passes re.UNICODE (== 32) positionally to Pattern.sub, where it lands on ``count``: only the first 32
# such periods of a text are removed.
_MAX_PERIODS_REMOVED = int(re.UNICODE)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})


def _pairs(text: str) -> dict[str, str]:
    """``"key=value key=value"`` -> ``{key: value}`` (no key or value holds a space or "=")."""
    return dict(pair.split("=") for pair in text.split())


# The official contractions table (every entry, nothing added), grouped by the ending it restores. It is applied
# word by word after lower-casing, so its four capitalised keys ("Im", "Ive", "Id've", "I'dve") can never match.
# Its oddities are kept: "somebody'd" maps *back* to "somebodyd", "let's" and "she's" map to themselves, and
# words that are also contractions without their apostrophe ("shed", "wed", "well", "its", "ill") are not entries.
CONTRACTIONS = {
    **_pairs(  # n't
        "aint=ain't arent=aren't cant=can't couldnt=couldn't didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't "
        "hasnt=hasn't havent=haven't isnt=isn't mightnt=mightn't mustnt=mustn't neednt=needn't oughtnt=oughtn't "
        "shant=shan't shouldnt=shouldn't wasnt=wasn't werent=weren't wont=won't wouldnt=wouldn't"
    ),
    **_pairs(  # n't've, with either apostrophe missing
        "couldn'tve=couldn't've couldnt've=couldn't've hadnt've=hadn't've hadn'tve=hadn't've "
        "mightnt've=mightn't've mightn'tve=mightn't've shouldnt've=shouldn't've shouldn'tve=shouldn't've "
        "wouldnt've=wouldn't've wouldn'tve=wouldn't've"
    ),
    **_pairs(  # 've
        "couldve=could've mightve=might've mustve=must've notve=not've shouldve=should've theyve=they've weve=we've "
        "whatve=what've whereve=where've whove=who've wouldve=would've youve=you've Ive=I've"
    ),
    **_pairs(  # 'd've, with either apostrophe missing
        "hed've=he'd've he'dve=he'd've Id've=I'd've I'dve=I'd've itd've=it'd've it'dve=it'd've shed've=she'd've "
        "she'dve=she'd've somebodyd've=somebody'd've somebody'dve=somebody'd've someoned've=someone'd've "
        "someone'dve=someone'd've somethingd've=something'd've something'dve=something'd've thered've=there'd've "
        "there'dve=there'd've theyd've=they'd've they'dve=they'd've wed've=we'd've we'dve=we'd've whod've=who'd've "
        "who'dve=who'd've youd've=you'd've you'dve=you'd've yall'd've=y'all'd've y'alld've=y'all'd've "
        "y'all'dve=y'all'd've"
    ),
    **_pairs(  # 'd (and the reversed "somebody'd" entry)
        "hed=he'd howd=how'd itd=it'd someoned=someone'd somethingd=something'd thered=there'd theyd=they'd "
        "whered=where'd whod=who'd youd=you'd somebody'd=somebodyd"
    ),
    **_pairs(  # 's (and the two identity entries)
        "hes=he's hows=how's somebodys=somebody's someones=someone's thats=that's theres=there's whats=what's "
        "whens=when's wheres=where's whos=who's whys=why's let's=let's she's=she's"
    ),
    **_pairs(  # 'll
        "howll=how'll itll=it'll somebodyll=somebody'll someonell=someone'll somethingll=something'll "
        "theyll=they'll whatll=what'll wholl=who'll whyll=why'll youll=you'll yall'll=y'all'll y'allll=y'all'll"
    ),
    **_pairs(  # 're, 'm
        "therere=there're theyre=they're whatre=what're whyre=why're youre=you're Im=I'm"
    ),
    **_pairs(  # the rest
        "maam=ma'am oclock=o'clock twas='twas yall=y'all ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at"
    ),
}


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: listed punctuation deleted or spaced out, then periods removed.

    Each listed character is deleted when the *original* text has it next to a space (``"p "`` or ``" p"``), or
    when the original text holds a digit-comma-digit anywhere (then every listed character is deleted); otherwise it
    becomes a space. Then up to 32 periods not followed by a digit are removed. Case is kept.
    """
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # The test reads the input text, the replacement accumulates on the output.
        if has_digit_comma or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, articles dropped, contractions.

    Words are split on any whitespace and joined by single spaces. Number words are mapped before articles are
    dropped, contractions after, each word at most once.
    """
    # (The official looks words up with manualMap.setdefault, which adds each unknown word as an identity entry:
    # harmless, so a plain get here.)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A prediction as the official evaluation compares it: tabs/newlines to spaces, stripped, then
    :func:`process_punctuation`, then :func:`process_digits_articles`."""
    # Only "\n" and "\t" become spaces before the punctuation step reads the text ("\r" stays, as in the official).
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def vqa_score(pred: str, answers: Sequence[str]) -> float:
    """One question's VQA accuracy in [0, 1]: the mean over leave-one-out subsets of ``min(1, matches / 3)``.

    Args:
        pred: the predicted answer, normalised here with :func:`normalize_answer`.
        answers: every annotator's answer (ten in VQA v2), raw.

    Raises:
        ValueError: when ``answers`` is empty.
    """
    if not answers:
        raise ValueError("vqa_score needs at least one ground-truth answer")
    pred = normalize_answer(pred)
    # The official processes the answers only when they are not all identical, and only for punctuation: they are
    # not lower-cased, stripped or number/article-normalised (VQA's answers already are).
    refs = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    equal = [r == pred for r in refs]
    total = sum(equal)
    # Leave-one-out by position (the official compares answer records, which differ by answer_id). With a single
    # answer the only subset is empty, so the score is always 0, as in the official.
    per_subset = [min(1.0, (total - e) / 3) for e in equal]
    return float(sum(per_subset)) / len(per_subset)


def exact_match(pred: str, answer: str) -> float:
    """GQA's accuracy as LAVIS scores generated answers: 1.0 when the processed prediction equals ``answer``.

    The prediction gets :func:`process_punctuation` and :func:`process_digits_articles` (no tab/newline step, as in
    LAVIS); the reference is compared raw, so one the processing could never produce (``"t-shirt"``, ``"Yes"``)
    never matches. LAVIS's behaviour, kept for parity.
    """
    return 1.0 if process_digits_articles(process_punctuation(pred)) == answer else 0.0


class VQAAccuracy(Metric):
    """VQA accuracy (``mode="vqa"``) or GQA exact-match accuracy (``mode="exact"``) over all updates and ranks.

    ``compute()`` returns percentages, unrounded: ``accuracy`` over all questions, and ``answer_type=<t>`` /
    ``question_type=<t>`` over the questions of each type when types were passed (sorted by type). When ``ids`` are
    passed, samples repeated by a distributed sampler's padding are scored once (the first occurrence of each id).

    Args:
        mode: ``"vqa"`` scores each prediction against its annotators' answers (:func:`vqa_score`); ``"exact"``
            against its single reference (:func:`exact_match`).
    """

    full_state_update = False

    def __init__(self, mode: Literal["vqa", "exact"] = "vqa", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("vqa", "exact"):
            raise ValueError(f"VQAAccuracy mode must be 'vqa' or 'exact', got {mode!r}")
        self.mode = mode
        self.add_state("preds", default=[], dist_reduce_fx=None)
        self.add_state("answers", default=[], dist_reduce_fx=None)
        self.add_state("ids", default=[], dist_reduce_fx=None)
        self.add_state("answer_types", default=[], dist_reduce_fx=None)
        self.add_state("question_types", default=[], dist_reduce_fx=None)

    def update(
        self,
        preds: list[str],
        answers: list[list[str]],
        ids: list[str] | None = None,
        answer_types: list[str] | None = None,
        question_types: list[str] | None = None,
    ) -> None:
        """Add a batch: one prediction, its ground-truth answers and optionally its id and types per question."""
        n = len(preds)
        optional = {"ids": ids, "answer_types": answer_types, "question_types": question_types}
        for name, values in {"answers": answers, **optional}.items():
            if values is not None and len(values) != n:
                raise ValueError(f"got {n} predictions but {len(values)} {name}")
        for i, refs in enumerate(answers):
            if isinstance(refs, str):
                raise ValueError(f"answers[{i}] is a string; pass a list of answers per question")
            if self.mode == "exact" and len(refs) != 1:
                raise ValueError(f"mode='exact' takes one reference per question, answers[{i}] has {len(refs)}")
            if not refs:
                raise ValueError(f"answers[{i}] is empty; every question needs at least one ground-truth answer")
        self.preds.extend(preds)
        self.answers.extend([list(r) for r in answers])
        for name, values in optional.items():
            getattr(self, name).extend(values if values is not None else [None] * n)

    def update_batch(self, preds: list[str], batch: Mapping[str, Any]) -> None:
        """:meth:`update` from a collated batch: ``references``, ``ids`` and, when present, the types."""
        self.update(
            preds,
            batch["references"],
            ids=batch["ids"],
            answer_types=batch.get("answer_types"),
            question_types=batch.get("question_types"),
        )

    def is_empty(self) -> bool:
        return not self.preds

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        # Strings cannot travel through torchmetrics' tensor all-gather; compute() gathers them itself.
        return None

    @property
    def sample_score_name(self) -> str:
        """What :meth:`sample_scores` gives, for a gallery's column."""
        return "VQA accuracy (%)" if self.mode == "vqa" else "exact match (%)"

    def sample_scores(self, preds: list[str], refs: list[list[str]]) -> list[float]:
        """Each question's own score in percent, in order (:class:`~vlgen.interfaces.ScoresSamples`): its VQA
        accuracy (:func:`vqa_score`) or exact match (:func:`exact_match`, against the first reference), so their
        mean over a test set is :meth:`compute`'s ``accuracy``."""
        if len(preds) != len(refs):
            raise ValueError(f"got {len(preds)} predictions but {len(refs)} answer lists")
        if self.mode == "vqa":
            return [100 * vqa_score(p, r) for p, r in zip(preds, refs, strict=True)]
        return [100 * exact_match(p, r[0]) for p, r in zip(preds, refs, strict=True)]

    def compute(self) -> dict[str, float]:
        # Every rank gathers the same rows and scores them identically, so no broadcast is needed.
        rows = gather_objects(
            list(zip(self.ids, self.preds, self.answers, self.answer_types, self.question_types, strict=True))
        )
        seen: set[Any] = set()
        scores: list[float] = []
        by_type: dict[str, list[float]] = defaultdict(list)
        for sample_id, pred, refs, answer_type, question_type in rows:
            if sample_id is not None:
                if sample_id in seen:
                    continue
                seen.add(sample_id)
            score = vqa_score(pred, refs) if self.mode == "vqa" else exact_match(pred, refs[0])
            scores.append(score)
            # Questions without a type count in "accuracy" only.
            if answer_type is not None:
                by_type[f"answer_type={answer_type}"].append(score)
            if question_type is not None:
                by_type[f"question_type={question_type}"].append(score)
        if not scores:
            raise ValueError("VQAAccuracy.compute() called before any update()")
        # Same arithmetic as the official (100 * sum / count), without its rounding.
        out = {"accuracy": 100 * float(sum(scores)) / len(scores)}
        for kind in ("answer_type=", "question_type="):
            for key in sorted(k for k in by_type if k.startswith(kind)):
                out[key] = 100 * float(sum(by_type[key])) / len(by_type[key])
        return out
