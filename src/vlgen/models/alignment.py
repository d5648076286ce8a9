"""P-Former prompt alignment (arXiv 2307.07063): pull any bridge's prompts towards those a frozen P-Former makes from
the paired caption.

The P-Former, trained on text alone in stage 0, knows which prompts make the frozen LLM say a sentence; the vision
bridge is then trained with an extra ``weight * MSE(bridge prompts, P-Former prompts of the caption)``. One
:class:`PromptAlignment` plugs into :class:`~vlgen.models.Captioner` (stage 2 and single-stage bridges: projectors,
the Q-Former) and :class:`~vlgen.models.Blip2Stage1` (stage 1, through a projection of the query outputs to the LLM
width that the alignment alone trains there); it is switched on in YAML with ``model.alignment``. The teacher is
frozen, so it never enters the optimiser or a checkpoint: a run rebuilds it from ``pformer.init_from``.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image
from torch import Tensor, nn

from vlgen.bridges.pformer import PFormer
from vlgen.bridges.qformer import QFormer
from vlgen.errors import ConfigError
from vlgen.interfaces import Bridge, VisualEncoder

log = logging.getLogger(__name__)


class PromptAlignment(nn.Module):
    """``weight * MSE(prompts, teacher(captions))`` with a frozen P-Former as the teacher.

    Args:
        pformer: the P-Former, with ``init_from`` naming its stage-0 checkpoint; it is frozen here whatever its own
            ``frozen`` says, and its ``num_prompts`` must equal the bridge's prompt count.
        weight: the loss weight (the paper's stage 2 uses 100; the reference's stage-1 config 10).
    """

    def __init__(self, pformer: PFormer, weight: float = 100.0) -> None:
        super().__init__()
        if pformer.init_from is None:
            log.warning("alignment: the P-Former has no init_from (stage-0 checkpoint): its prompts are untrained")
        pformer.frozen = True
        self.pformer = pformer
        self.weight = weight

    @property
    def num_prompts(self) -> int:
        return self.pformer.num_prompts

    def build(self, num_prompts: int, llm_dim: int | None = None) -> int:
        """Check the bridge's prompt count against the teacher's, then build and freeze the teacher.

        Args:
            num_prompts: prompts per sample the bridge gives.
            llm_dim: the LLM width; None (stage 1, no LLM) takes the width of the stage-0 checkpoint.

        Returns:
            the width of the teacher's prompts (what the bridge's prompts must have).
        """
        if num_prompts != self.num_prompts:
            raise ConfigError(
                f"model.alignment: the bridge gives {num_prompts} prompts but the P-Former gives {self.num_prompts} "
                "(set alignment.pformer.num_prompts to the bridge's count and train stage 0 with it)"
            )
        self.pformer.build(llm_dim)
        assert self.pformer.llm_dim is not None
        return self.pformer.llm_dim

    @torch.no_grad()
    def targets(self, captions: list[str]) -> Tensor:
        """The teacher's prompts ``[B, P, Dllm]`` for ``B`` captions (no gradient)."""
        return self.pformer(captions)

    def loss(self, prompts: Tensor, captions: list[str], mask: Tensor | None = None) -> Tensor:
        """Weighted mean squared error between ``prompts [B, P, Dllm]`` and the teacher's prompts of ``captions``.

        Args:
            prompts: the bridge's prompts.
            captions: the caption paired with each sample.
            mask: ``[B, P]`` with 1 for real prompts; padded prompts are left out of the mean.
        """
        target = self.targets(captions)
        if prompts.shape != target.shape:
            raise ValueError(f"alignment: bridge prompts {tuple(prompts.shape)} vs P-Former {tuple(target.shape)}")
        err = (prompts.float() - target.float()).pow(2)  # [B, P, D]
        if mask is None:
            return self.weight * err.mean()
        real = mask[..., None].to(err.dtype)  # [B, P, 1]
        return self.weight * (err * real).sum() / (real.sum() * err.shape[-1]).clamp_min(1.0)


def bridge_prompt_count(encoder: VisualEncoder, bridge: Bridge) -> int:
    """Prompts per image a built ``bridge`` gives after ``encoder``: a Q-Former's query count, otherwise measured
    once on a blank image through the encoder's own evaluation transform (token-wise bridges give one prompt per
    visual token)."""
    if isinstance(bridge, QFormer):
        return bridge.num_queries
    pixels = encoder.image_transform(False)(Image.new("RGB", (224, 224)))[None]  # [1, C, H, W]
    with torch.no_grad():
        return int(bridge(encoder(pixels)).prompts.shape[1])
