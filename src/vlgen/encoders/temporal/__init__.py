"""Temporal modules: how a :class:`~vlgen.encoders.FrameEncoder` turns per-frame tokens into one clip's tokens."""

from vlgen.encoders.temporal.base import ClipLength, TemporalModule
from vlgen.encoders.temporal.concat import ConcatFrames
from vlgen.encoders.temporal.contextualizer import ContextualizedBlock, TemporalAttention, TemporalContextualizer
from vlgen.encoders.temporal.pooling import MeanOverTime, MiddleFrame

__all__ = [
    "ClipLength",
    "ConcatFrames",
    "ContextualizedBlock",
    "MeanOverTime",
    "MiddleFrame",
    "TemporalAttention",
    "TemporalContextualizer",
    "TemporalModule",
]
