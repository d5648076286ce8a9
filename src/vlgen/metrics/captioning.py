"""Caption metrics as the papers report them: pycocoevalcap's BLEU, METEOR, ROUGE-L and CIDEr-D.

Text is PTB-tokenised first (Stanford's tokenizer, which runs on Java, then punctuation tokens dropped), exactly as
``COCOEvalCap`` does. Predictions and references from every rank are gathered before scoring, since CIDEr-D's
document frequencies come from the whole evaluated set. Without Java the metric says so once, leaves METEOR out and
tokenises with :func:`simple_ptb_tokenize`, which gives the PTB tokenizer's tokens on plain caption text.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from typing import Any

from torchmetrics import Metric

from vlgen.dist import broadcast_from_zero, gather_objects, rank

log = logging.getLogger(__name__)

# The tokens pycocoevalcap drops after PTB tokenisation.
PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
_CONTRACTION = re.compile(r"(?i)(n't|'s|'re|'ve|'m|'ll|'d)$")
_WORD = r"[^\s.?!,:;`'\"()\[\]{}]+"
_TOKEN = re.compile(rf"\d+(?:[.,]\d+)+|\.\.\.|--|[.?!,:;]|``|''|[`'\"()\[\]{{}}]|{_WORD}(?:'{_WORD})*")
# PTB escapes brackets; lower-cased, the escapes are not in pycocoevalcap's punctuation list, so they stay.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_java_warned = False
_meteor: Any = None  # one METEOR Java process per Python process, started on first use
EMPTY = "emptycaption"


def simple_ptb_tokenize(text: str) -> str:
    """Lower-cased PTB-style tokens with pycocoevalcap's punctuation removed, joined by spaces (no Java)."""
    out: list[str] = []
    for token in _TOKEN.findall(text.lower()):
        match = _CONTRACTION.search(token)
        if match and match.start() > 0:  # "dog's" -> "dog" "'s", "don't" -> "do" "n't"
            out += [token[: match.start()], token[match.start() :]]
        else:
            out.append(_BRACKETS.get(token, token))
    return " ".join(t for t in out if t not in PTB_PUNCTUATION and t != '"')


def java_available() -> bool:
    return shutil.which("java") is not None


class CaptionMetrics(Metric):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D over all updates, gathered across ranks.

    ``compute()`` returns pycocoevalcap's keys (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``) as
    fractions (CIDEr 1.458, not 145.8). When ``ids`` are passed to :meth:`update`, samples repeated by a distributed
    sampler's padding are scored once (the first occurrence of each id).

    Args:
        use_java: force the Java PTB tokenizer and METEOR on or off; by default they are used when ``java`` is found.
    """

    full_state_update = False
    sample_score_name = "CIDEr-D"  # what sample_scores gives, for a gallery's column

    def __init__(self, use_java: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_java = java_available() if use_java is None else use_java
        self.add_state("preds", default=[], dist_reduce_fx=None)
        self.add_state("refs", default=[], dist_reduce_fx=None)
        self.add_state("ids", default=[], dist_reduce_fx=None)

    def update(self, preds: list[str], refs: list[list[str]], ids: list[str] | None = None) -> None:
        if len(preds) != len(refs) or (ids is not None and len(ids) != len(preds)):
            raise ValueError(f"got {len(preds)} predictions, {len(refs)} reference lists, ids {ids and len(ids)}")
        self.preds.extend(preds)
        self.refs.extend([list(r) for r in refs])
        self.ids.extend(ids if ids is not None else [None] * len(preds))

    def update_batch(self, preds: list[str], batch: Mapping[str, Any]) -> None:
        """Update from a :class:`~vlgen.interfaces.CaptionBatch`: its ``references`` and ``ids``."""
        self.update(preds, batch["references"], ids=batch["ids"])

    def is_empty(self) -> bool:
        return not self.preds

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        # Strings cannot travel through torchmetrics' tensor all-gather; compute() gathers them itself.
        return None

    def compute(self) -> dict[str, float]:
        rows = gather_objects(list(zip(self.ids, self.preds, self.refs)))
        seen: set[Any] = set()
        preds, refs = {}, {}
        for i, (sample_id, pred, ref) in enumerate(rows):
            if sample_id is not None:
                if sample_id in seen:
                    continue
                seen.add(sample_id)
            preds[i] = [pred]
            refs[i] = ref
        if not preds:
            raise ValueError("CaptionMetrics.compute() called before any update()")
        # Rank zero scores the gathered set (one Java tokenizer/METEOR run) and shares the numbers.
        return broadcast_from_zero(self.score(preds, refs) if rank() == 0 else None)

    def score(self, preds: dict[Any, list[str]], refs: dict[Any, list[str]]) -> dict[str, float]:
        """Score ``{key: [prediction]}`` against ``{key: [references]}`` with pycocoevalcap's scorers."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res = self._tokenized(preds, refs)
        out: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        if self.use_java:
            out["METEOR"] = float(_meteor_scorer().compute_score(gts, res)[0])
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        return out

    def sample_scores(self, preds: list[str], refs: list[list[str]]) -> list[float]:
        """Each prediction's own CIDEr-D against its references, in order (:class:`~vlgen.interfaces.ScoresSamples`).

        The document frequencies come from all the references passed, so pass the whole evaluated set (as
        ``metrics.json``'s ``CIDEr`` was computed over): pycocoevalcap's corpus CIDEr-D is the mean of these
        per-sample scores, and that is what :meth:`score` reports for the same samples. Text is tokenised as there.
        """
        from pycocoevalcap.cider.cider import Cider

        if len(preds) != len(refs):
            raise ValueError(f"got {len(preds)} predictions and {len(refs)} reference lists")
        if not preds:
            return []
        gts, res = self._tokenized({i: [p] for i, p in enumerate(preds)}, {i: list(r) for i, r in enumerate(refs)})
        _, per_sample = Cider().compute_score(gts, res)
        by_key = dict(zip(gts.keys(), per_sample, strict=True))  # Cider scores in the order of gts' keys
        return [float(by_key[i]) for i in range(len(preds))]

    def _tokenized(
        self, preds: dict[Any, list[str]], refs: dict[Any, list[str]]
    ) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
        """``(references, predictions)`` tokenised for pycocoevalcap's scorers, an empty prediction replaced."""
        # pycocoevalcap's scorers assert non-empty hypotheses: an empty caption is scored as one word no reference has
        preds = {k: [c if simple_ptb_tokenize(c) else EMPTY for c in v] for k, v in preds.items()}
        return self._tokenize(refs), self._tokenize(preds)

    def _tokenize(self, captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
        global _java_warned
        if self.use_java:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
        if not _java_warned:
            log.warning(
                "Java PTB tokenizer not used (java missing or use_java=False): METEOR skipped, Python tokenizer used"
            )
            _java_warned = True
        return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}


def _meteor_scorer() -> Any:
    global _meteor
    if _meteor is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor = Meteor()
    return _meteor
