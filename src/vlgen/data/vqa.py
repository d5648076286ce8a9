"""Visual question answering on the caption data modules: the official files as they are, and the task's protocol.

A :class:`VQATask` given to :class:`~vlgen.data.ImageTextDataModule` (or the video module) as ``task`` switches its
splits from captions to questions, on the same loading path. It reads four layouts, told apart by their content:

* VQAv2 / OK-VQA: a ``*_questions.json`` (``{"data_subtype", "questions": [{"question_id", "image_id",
  "question"}]}``) plus, except for test-dev, its ``*_annotations.json`` (``{"annotations": [{"question_id",
  "answers": [{"answer", ...}] x 10, "multiple_choice_answer", "answer_type", "question_type"}]}``); images are
  found by :attr:`VQATask.image_pattern` (COCO's ``val2014/COCO_val2014_000000262148.jpg`` by default);
* GQA: ``*_balanced_questions.json`` (``{question_id: {"imageId", "question", "answer", "types"}}``), one answer;
* LAVIS's converted JSON (or JSONL): ``[{"question_id", "question", "image" (or "video"), "answer": [...] or "..."}]``,
  optionally with ``answer_type`` / ``question_type``, which the synthetic worlds write too.

Every question is one sample with id ``str(question_id)``: its text (cleaned as LAVIS's question processor does,
then put into :attr:`VQATask.prompt_template`) travels as the batch's ``prompts``; its answers, in order, as the
``references`` the metric reads. Training targets follow :attr:`VQATask.answers`: every distinct answer weighted by
its share of the annotators (BLIP / LAVIS) or the most common one. The task also carries the benchmark's decoding
settings (LAVIS's: beam 5, 1 to 10 new tokens, length penalty -1), its metric (:class:`~vlgen.metrics.VQAAccuracy`,
VQA accuracy or GQA's exact match) and its submission file (EvalAI's ``[{"question_id", "answer"}]``, GQA's
``[{"questionId", "prediction"}]``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlgen.data.common import BadRecords, read_records, require_file
from vlgen.errors import ConfigError
from vlgen.llms.decoding import Decoding

_QUESTION_PUNCT = re.compile(r'[.!"()*#:;~]')
Layout = Literal["vqav2", "gqa", "records"]


def clean_question(text: str, max_words: int = 50) -> str:
    """A question as LAVIS's ``blip_question`` processor gives it to the model: lower-cased, ``.!"()*#:;~``
    removed, trailing spaces dropped, at most ``max_words`` space-separated words."""
    text = _QUESTION_PUNCT.sub("", text.lower()).rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def _lavis_decoding() -> Decoding:
    return Decoding(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


@dataclass
class VQAQuestion:
    """One question before loading (what :class:`~vlgen.data.captions.CaptionItem` carries for a VQA sample)."""

    media: str
    question: str
    answers: tuple[str, ...]
    id: str
    answer_type: str | None = None
    question_type: str | None = None
    best: str | None = None  # the file's own most common answer (VQAv2's multiple_choice_answer), if it has one


@dataclass
class VQATask:
    """Visual question answering on a caption data module's splits: how its files are read and how it is scored.

    Args:
        metric: ``vqa`` (VQAv2 / OK-VQA accuracy over the ten annotators) or ``exact`` (GQA's exact match).
        prompt_template: the text the LLM reads after the visual prompts; ``{}`` is the question (BLIP-2's
            ``"Question: {} Short answer:"``). The model's own ``prompt_template`` should then stay ``"{}"``.
        clean_questions: lower-case questions and drop ``.!"()*#:;~`` as LAVIS does before prompting.
        answers: training targets: ``weighted`` (every distinct answer, weighted by its share of the annotators, as
            BLIP and LAVIS train) or ``most_common`` (one target, VQAv2's ``multiple_choice_answer`` when given).
        train_annotations: for VQAv2 / OK-VQA question files, the annotation file of the training split (relative
            to the data root); likewise ``val_annotations`` and ``test_annotations`` (null for test-dev, which has
            no answers: predictions and the submission file only).
        image_pattern: where the image of a VQAv2 / GQA question lies under the image root, with ``{image_id}``
            and ``{data_subtype}`` (VQAv2's; ``test-dev2015`` images are in ``test2015``). Default: COCO's layout
            for VQAv2 files, ``{image_id}.jpg`` for GQA. LAVIS-style records name their image themselves.
        decoding: generation settings for evaluation on these splits (null: the LLM's own).
    """

    metric: Literal["vqa", "exact"] = "vqa"
    prompt_template: str = "Question: {} Short answer:"
    clean_questions: bool = True
    answers: Literal["weighted", "most_common"] = "weighted"
    train_annotations: str | None = None
    val_annotations: str | None = None
    test_annotations: str | None = None
    image_pattern: str | None = None
    decoding: Decoding | None = field(default_factory=_lavis_decoding)

    def __post_init__(self) -> None:
        if self.prompt_template.count("{}") != 1:
            raise ConfigError(f"data.task.prompt_template must hold exactly one {{}}, got {self.prompt_template!r}")

    # --- reading ----------------------------------------------------------------------------------------------
    def questions(self, path: Path, root: Path, split: str, media_field: str, bad: BadRecords) -> list[VQAQuestion]:
        """The questions of the split file ``path`` (annotations, if any, relative to ``root``)."""
        layout, whole = _layout(path)
        if layout == "vqav2":
            annotations = getattr(self, f"{split}_annotations", None)
            ann = require_file(root / annotations, f"data.task.{split}_annotations") if annotations else None
            found = _vqav2(whole, path, ann, self.image_pattern, bad)
        elif layout == "gqa":
            found = _gqa(whole, self.image_pattern or "{image_id}.jpg", bad)
        else:
            found = _records(path, media_field, bad)
        ids = Counter(q.id for q in found)
        repeated = [i for i, n in ids.items() if n > 1]
        if repeated:
            raise ConfigError(f"{path}: {len(repeated)} question ids occur more than once, e.g. {repeated[0]}")
        return found

    def prompt(self, question: str) -> str:
        """The text the LLM reads for ``question``."""
        return self.prompt_template.format(clean_question(question) if self.clean_questions else question.strip())

    def targets(self, q: VQAQuestion) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
        """Training targets of ``q`` and their weights (``None``: one target, weight 1)."""
        if not q.answers:
            return (), None
        counts = Counter(q.answers)  # insertion order: the order in which annotators first gave each answer
        if self.answers == "most_common":
            return (q.best if q.best else counts.most_common(1)[0][0],), None
        return tuple(counts), tuple(n / len(q.answers) for n in counts.values())

    # --- evaluation ----------------------------------------------------------------------------------------------
    def make_metric(self) -> Any:
        """The metric of this task, a fresh :class:`~vlgen.metrics.VQAAccuracy`."""
        from vlgen.metrics import VQAAccuracy

        return VQAAccuracy(mode=self.metric)

    def submission(self, rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """The official results file for predictions ``rows`` (``{"id", "caption"}``): its name and content."""
        if self.metric == "exact":  # GQA's evaluation server reads string ids
            return "gqa_submission.json", [{"questionId": r["id"], "prediction": r["caption"]} for r in rows]
        return "vqa_submission.json", [{"question_id": _int_id(r["id"]), "answer": r["caption"]} for r in rows]


def _int_id(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _layout(path: Path) -> tuple[Layout, Any]:
    """Which of the three layouts ``path`` holds, and the parsed file for the two that are one JSON object."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.lstrip().startswith("{"):
        return "records", None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return "records", None  # JSONL: read line by line, bad lines skipped
    if isinstance(whole, dict) and isinstance(whole.get("questions"), list):
        return "vqav2", whole
    if isinstance(whole, dict) and whole and all(isinstance(v, dict) and "imageId" in v for v in whole.values()):
        return "gqa", whole
    return "records", None


def _vqav2(
    whole: dict[str, Any], path: Path, annotations: Path | None, pattern: str | None, bad: BadRecords
) -> list[VQAQuestion]:
    subtype = str(whole.get("data_subtype", ""))
    image_subtype = "test2015" if subtype == "test-dev2015" else subtype  # test-dev is a subset of test2015
    pattern = pattern or "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"
    by_id: dict[Any, dict[str, Any]] = {}
    if annotations is not None:
        try:
            data = json.loads(annotations.read_text(encoding="utf-8", errors="replace"))
            by_id = {a["question_id"]: a for a in data["annotations"] if isinstance(a, dict) and "question_id" in a}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{annotations}: not a VQA annotation file ({type(err).__name__}: {err})") from None
    out = []
    for k, q in enumerate(whole["questions"]):
        where = f"question {k}"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or "image_id" not in q:
            bad(where, "no 'question' text or 'image_id'")
            continue
        ann = by_id.get(q.get("question_id"))
        if annotations is not None and ann is None:
            bad(where, f"question {q.get('question_id')} has no annotation in {annotations.name}")
            continue
        answers: tuple[str, ...] = ()
        if ann is not None:
            answers = tuple(str(a["answer"]) for a in ann.get("answers", []) if isinstance(a, dict) and "answer" in a)
            if not answers:
                bad(where, "no answers")
                continue
        try:
            media = pattern.format(image_id=q["image_id"], data_subtype=image_subtype)
        except (ValueError, KeyError, IndexError) as err:
            raise ConfigError(f"data.task.image_pattern: {pattern!r} does not fit {path} ({err})") from None
        out.append(
            VQAQuestion(
                media,
                q["question"],
                answers,
                str(q.get("question_id", k)),
                answer_type=ann.get("answer_type") if ann else None,
                question_type=ann.get("question_type") if ann else None,
                best=ann.get("multiple_choice_answer") if ann else None,
            )
        )
    return out


def _gqa(whole: dict[str, Any], pattern: str, bad: BadRecords) -> list[VQAQuestion]:
    out = []
    for qid, q in whole.items():
        if not isinstance(q.get("question"), str):
            bad(f"question {qid}", "no 'question' text")
            continue
        answer = q.get("answer")
        types = q.get("types") if isinstance(q.get("types"), dict) else {}
        out.append(
            VQAQuestion(
                pattern.format(image_id=q["imageId"]),
                q["question"],
                (str(answer),) if answer is not None else (),
                str(qid),
                answer_type=types.get("structural"),
                question_type=types.get("semantic"),
            )
        )
    return out


def _records(path: Path, media_field: str, bad: BadRecords) -> list[VQAQuestion]:
    out = []
    for where, r in read_records(path, bad):
        media, question = r.get(media_field), r.get("question")
        if not isinstance(media, str) or not media.strip():
            bad(where, f"no '{media_field}' field")
            continue
        if not isinstance(question, str) or not question.strip():
            bad(where, "no 'question' text")
            continue
        answer = r.get("answer", r.get("answers"))
        values = answer if isinstance(answer, list) else ([] if answer is None else [answer])
        answers = tuple(str(a["answer"] if isinstance(a, dict) else a) for a in values)
        qid = r.get("question_id", where)
        out.append(
            VQAQuestion(
                media,
                question,
                answers,
                str(qid),
                answer_type=r.get("answer_type"),
                question_type=r.get("question_type"),
                best=r.get("multiple_choice_answer"),
            )
        )
    return out
