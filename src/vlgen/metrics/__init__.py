"""Metrics on generated text: captions (pycocoevalcap) and VQA accuracy."""

from vlgen.metrics.captioning import CaptionMetrics

__all__ = ["CaptionMetrics"]
