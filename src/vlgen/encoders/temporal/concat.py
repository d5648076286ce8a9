"""Concatenation over time: every frame's tokens, each marked with a learned embedding of its frame position.

The bridge then sees ``T * N`` tokens and can tell their order, which neither mean pooling nor EVLGen's
contextualizer (whose attention across frames has no notion of position) preserves. It costs the bridge ``T`` times
the tokens: a token-merging connector can merge them back down.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlgen.encoders.temporal.base import TemporalModule
from vlgen.errors import ConfigError
from vlgen.interfaces import VisualEncoder


class ConcatFrames(TemporalModule):
    """``[B, T, N, D]`` -> ``[B, T*N, D]`` with a learned ``[T, D]`` frame embedding added first.

    Args:
        max_frames: frames per clip the embedding table covers.
        init_std: standard deviation of the embeddings' normal initialisation (ViT-style small values).
    """

    def __init__(self, max_frames: int = 16, init_std: float = 0.02) -> None:
        super().__init__()
        self.max_frames, self.init_std = max_frames, init_std
        self.frame_embed: nn.Parameter | None = None

    def attach(self, encoder: VisualEncoder) -> None:
        self.frame_embed = nn.Parameter(torch.randn(self.max_frames, encoder.embed_dim) * self.init_std)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.frame_embed is None:
            raise RuntimeError("ConcatFrames.attach was not called (a FrameEncoder does it)")
        b, t, n, d = tokens.shape
        if t > self.max_frames:
            raise ConfigError(f"encoder.temporal.max_frames is {self.max_frames}, but clips have {t} frames")
        tokens = tokens + self.frame_embed[:t, None].to(tokens.dtype)  # [B, T, N, D] + [T, 1, D]
        return tokens.reshape(b, t * n, d)
