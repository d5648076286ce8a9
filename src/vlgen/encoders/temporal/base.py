"""The contract of a temporal module: how a :class:`~vlgen.encoders.FrameEncoder` folds time out of frame tokens.

A video encoder runs an image encoder on every frame (``[B*T, C, H, W] -> [B*T, N, D]``) and hands the tokens,
regrouped as ``[B, T, N, D]``, to a temporal module that returns ``[B, M, D]`` for the bridge. Some temporal modules
also work *inside* the image encoder (EVLGen's contextualizer mixes frames in every block): they insert themselves
once in :meth:`TemporalModule.attach` and read the number of frames of the clip in flight from
:meth:`TemporalModule.clip`. A module may ask for a subset of the frames (:meth:`TemporalModule.frame_indices`), so a
single-frame baseline does not pay for encoding the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from vlgen.interfaces import VisualEncoder


class ClipLength:
    """The number of frames per clip of the batch being encoded, shared with modules inside the image encoder."""

    def __init__(self) -> None:
        self.num_frames = 1


class TemporalModule(nn.Module, ABC):
    """Frame tokens ``[B, T, N, D]`` -> clip tokens ``[B, M, D]``."""

    def __init__(self) -> None:
        super().__init__()
        self.clip_length = ClipLength()

    def attach(self, encoder: VisualEncoder) -> None:
        """Called once with the image encoder: build width-dependent layers or insert modules into it."""

    def frame_indices(self, num_frames: int) -> list[int] | None:
        """The frames (of ``num_frames``) this module needs encoded; ``None`` means all of them."""
        return None

    @contextmanager
    def clip(self, num_frames: int) -> Iterator[None]:
        """Make ``num_frames`` visible to modules inside the image encoder while it encodes ``[B*T, ...]`` frames."""
        previous, self.clip_length.num_frames = self.clip_length.num_frames, num_frames
        try:
            yield
        finally:
            self.clip_length.num_frames = previous

    @abstractmethod
    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [B, T, N, D]`` -> ``[B, M, D]``."""
