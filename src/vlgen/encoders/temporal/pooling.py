"""Temporal pooling without parameters: the mean over frames (EVLGen's readout) and a middle-frame baseline.

``MeanOverTime`` is what EVLGen applies after its contextualised encoder and, alone, the cheapest video model: an
image encoder's tokens averaged over frames. ``MiddleFrame`` encodes only the clip's middle frame, the control that
shows what a model gets from one picture of a video.
"""

from __future__ import annotations

from torch import Tensor

from vlgen.encoders.temporal.base import TemporalModule


class MeanOverTime(TemporalModule):
    """``[B, T, N, D]`` -> ``[B, N, D]``: each token position averaged over the frames."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


class MiddleFrame(TemporalModule):
    """Encode the middle frame only (frame ``T // 2``): ``[B, 1, N, D]`` -> ``[B, N, D]``."""

    def frame_indices(self, num_frames: int) -> list[int]:
        return [num_frames // 2]

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]
