"""Metrics on generated text: captions (pycocoevalcap) and VQA accuracy."""

from vlgen.metrics.captioning import CaptionMetrics
from vlgen.metrics.vqa import (
    VQAAccuracy,
    exact_match,
    normalize_answer,
    process_digits_articles,
    process_punctuation,
    vqa_score,
)

__all__ = [
    "CaptionMetrics",
    "VQAAccuracy",
    "exact_match",
    "normalize_answer",
    "process_digits_articles",
    "process_punctuation",
    "vqa_score",
]
