"""Visual encoders: pixels -> tokens ``[B, N, D]`` (frames ``[B, T, C, H, W]`` through :class:`FrameEncoder`).

A new encoder is one file here: a :class:`~vlgen.interfaces.VisualEncoder` (``embed_dim``, ``image_transform``,
``forward``); a new way to fold time is a :class:`TemporalModule` in ``temporal/``. Export it below and choose it in
YAML (``model.init_args.encoder.class_path``).
"""

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
