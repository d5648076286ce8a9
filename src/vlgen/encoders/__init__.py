"""Visual encoders: pixels -> tokens ``[B, N, D]`` (frames ``[B, T, C, H, W]`` through :class:`FrameEncoder`)."""

from vlgen.encoders.hf_vision import HFBlip2Vision
from vlgen.encoders.temporal import ConcatFrames, MeanOverTime, MiddleFrame, TemporalContextualizer, TemporalModule
from vlgen.encoders.timm import TimmEncoder
from vlgen.encoders.video import FrameEncoder

__all__ = [
    "ConcatFrames",
    "FrameEncoder",
    "HFBlip2Vision",
    "MeanOverTime",
    "MiddleFrame",
    "TemporalContextualizer",
    "TemporalModule",
    "TimmEncoder",
]
