"""A video encoder from any image encoder: encode frames independently, then fold time with a temporal module.

``FrameEncoder`` takes clips ``[B, T, C, H, W]``, runs its image encoder on the ``B*T`` frames (so any
:class:`~vlgen.interfaces.VisualEncoder` - a timm ViT, the tiny CNN of the CPU configs - works unchanged) and lets a
:class:`~vlgen.encoders.temporal.TemporalModule` turn ``[B, T, N, D]`` into the ``[B, M, D]`` tokens every bridge
reads, so a bridge never learns whether its input was a picture or a clip. Images ``[B, C, H, W]`` are clips of one
frame. A frozen image encoder stays frozen; what the temporal module adds (EVLGen's contextualizer inside the blocks,
frame embeddings) trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from vlgen.encoders.temporal.base import TemporalModule
from vlgen.encoders.temporal.pooling import MeanOverTime
from vlgen.interfaces import VisualEncoder, count_parameters

log = logging.getLogger(__name__)


class FrameEncoder(VisualEncoder):
    """Frames ``[B, T, C, H, W]`` -> tokens ``[B, M, D]`` through an image encoder and a temporal module.

    Args:
        image: the per-frame encoder (its ``frozen`` flag decides whether its own weights train).
        temporal: how time is folded; default the mean over frames.
    """

    def __init__(self, image: VisualEncoder, temporal: TemporalModule | None = None) -> None:
        super().__init__()
        self.image = image
        self.temporal = temporal if temporal is not None else MeanOverTime()
        self.temporal.attach(image)
        trainable, _ = count_parameters(self.temporal)
        inside = sum(p.numel() for n, p in image.named_parameters() if ".temporal." in f".{n}" and p.requires_grad)
        log.info("temporal %s: %s trainable parameters", type(self.temporal).__name__, f"{trainable + inside:,}")

    @property
    def embed_dim(self) -> int:
        return self.image.embed_dim

    def block_modules(self) -> list[nn.Module]:
        """The image encoder's blocks (those a temporal module wraps included)."""
        return self.image.block_modules()

    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """The per-frame transform (the image encoder's)."""
        return self.image.image_transform(train)

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.ndim == 4:  # images: clips of one frame
            pixels = pixels[:, None]
        keep = self.temporal.frame_indices(pixels.shape[1])
        if keep is not None:
            pixels = pixels[:, keep]
        b, t = pixels.shape[:2]
        with self.temporal.clip(t):
            tokens = self.image(pixels.flatten(0, 1))  # [B*T, C, H, W] -> [B*T, N, D]
        return self.temporal(tokens.unflatten(0, (b, t)))  # [B, T, N, D] -> [B, M, D]
