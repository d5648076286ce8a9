"""P-Former prompt alignment (arXiv 2307.07063) as an objective: pull any bridge's prompts towards those a frozen
P-Former makes from the paired caption.

The P-Former, trained on text alone in stage 0 (:class:`~vlgen.models.PFormerStage0`), knows which prompts make the
frozen LLM say a sentence; the vision bridge is then trained with ``weight * MSE(bridge prompts, P-Former prompts of
the caption)``. Listed under ``objectives`` of a :class:`~vlgen.models.Captioner` (projectors, the Q-Former, the
token-merging connector) or of :class:`~vlgen.models.Blip2Stage1` (there the Q-Former's query outputs are projected
to the LLM width by a projection the alignment alone trains, sized by :meth:`PromptAlignment.llm_width`). The
teacher is frozen, so it never enters the optimiser or a checkpoint: a run rebuilds it from ``pformer.init_from``.
This objective owns its prompt-count check: at build time on one image, and at every step, where a count that
changed (a merge ramp under way excepted) stops the run with one line.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from vlgen.bridges.pformer import PFormer
from vlgen.errors import ConfigError
from vlgen.interfaces import BridgeOutput, CaptionBatch, MergingBridge, prompt_count
from vlgen.objectives.base import ModelParts, Objective

log = logging.getLogger(__name__)


class PromptAlignment(Objective):
    """``MSE(prompts, teacher(captions))`` with a frozen P-Former as the teacher, logged as ``train/align``.

    Args:
        pformer: the P-Former, with ``init_from`` naming its stage-0 checkpoint; it is frozen here whatever its own
            ``frozen`` says, and its ``num_prompts`` must equal the bridge's prompt count.
        weight: the loss weight (the paper's stage 2 uses 100; the reference's stage-1 config 10).
    """

    name = "align"

    def __init__(self, pformer: PFormer, weight: float = 100.0) -> None:
        super().__init__(weight)
        if pformer.init_from is None:
            log.warning("alignment: the P-Former has no init_from (stage-0 checkpoint): its prompts are untrained")
        pformer.frozen = True
        self.pformer = pformer
        self._waiting = False  # logged once: a merge ramp is under way and the counts disagree for now

    @property
    def num_prompts(self) -> int:
        return self.pformer.num_prompts

    def llm_width(self) -> int | None:
        """The width of the stage-0 checkpoint's prompts (the LLM the P-Former was trained against)."""
        if self.pformer.llm_dim is None:
            self.pformer.build(None)
        return self.pformer.llm_dim

    def build(self, parts: ModelParts) -> None:
        """Check the bridge's prompt count against the teacher's, then build and freeze the teacher."""
        count = prompt_count(parts.encoder, parts.bridge)
        if count != self.num_prompts:
            raise ConfigError(
                f"model.objectives: align: the bridge gives {count} prompts but the P-Former gives {self.num_prompts} "
                "(set pformer.num_prompts to the bridge's count and train stage 0 with it)"
            )
        if self.pformer.llm_dim is None:
            self.pformer.build(None if parts.llm is None else parts.llm.hidden_size)
        elif parts.llm is not None and parts.llm.hidden_size != self.pformer.llm_dim:
            raise ConfigError(
                f"model.objectives: align: the P-Former's prompts are {self.pformer.llm_dim}-d, the LLM's "
                f"embeddings {parts.llm.hidden_size}-d"
            )

    @torch.no_grad()
    def targets(self, captions: list[str]) -> Tensor:
        """The teacher's prompts ``[B, P, Dllm]`` for ``B`` captions (no gradient)."""
        return self.pformer(captions)

    def loss(self, out: BridgeOutput, batch: CaptionBatch, parts: ModelParts) -> Tensor | None:
        count = out.prompts.shape[1]
        if count != self.num_prompts:
            if isinstance(parts.bridge, MergingBridge) and parts.bridge.merge_fraction < 1.0:
                if not self._waiting:
                    self._waiting = True
                    log.info(
                        "alignment: the bridge gives %d prompts, not the P-Former's %d, while its merging ramps up; "
                        "alignment applies from the step they agree",
                        count, self.num_prompts,
                    )  # fmt: skip
                return None
            raise ConfigError(
                f"model.objectives: align: the bridge gave {count} prompts per sample in training but "
                f"{self.num_prompts} when checked on one image (does the encoder's token count grow with the "
                "frames, as ConcatFrames does? use a temporal module with a fixed count, or a bridge with fixed "
                "queries)"
            )
        return mse(out.prompts, self.targets(batch["captions"]), out.mask)


def mse(prompts: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between ``prompts`` and ``target`` (``[B, P, D]``); padded prompts (``mask [B, P]`` 0)
    are left out of the mean."""
    if prompts.shape != target.shape:
        raise ValueError(f"alignment: bridge prompts {tuple(prompts.shape)} vs P-Former {tuple(target.shape)}")
    err = (prompts.float() - target.float()).pow(2)  # [B, P, D]
    if mask is None:
        return err.mean()
    real = mask[..., None].to(err.dtype)  # [B, P, 1]
    return (err * real).sum() / (real.sum() * err.shape[-1]).clamp_min(1.0)
