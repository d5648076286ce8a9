"""The objective contract: an auxiliary training loss as a component, listed in YAML beside the model's own loss.

An :class:`Objective` reads what the model computed for a batch (the bridge's :class:`~vlgen.interfaces.BridgeOutput`)
and the batch itself, and returns one unweighted scalar; the LightningModule multiplies it by the objective's
``weight``, adds it to its own losses and logs it as ``train/<name>``. An objective is built once by the model that
owns it, with the model's encoder, bridge and language model (``None`` where the model has none, e.g. BLIP-2 stage
1), so it can size its own layers and check at build time that the bridge gives what it needs. Its trainable
parameters (projections, a temperature) are optimised and checkpointed with the model's; frozen ones (a teacher, a
sentence encoder) are rebuilt from the config. A new objective is one file here and a YAML entry under
``model.init_args.objectives``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vlgen.interfaces import Bridge, BridgeOutput, CaptionBatch, HasBlocks, LanguageModel, VisualEncoder


@dataclass(frozen=True)
class ModelParts:
    """The parts of the model an objective serves, handed to it at build time and at every step (an objective
    keeps no reference to them, so none of their weights is registered twice)."""

    encoder: VisualEncoder
    bridge: Bridge
    llm: LanguageModel | None = None


class Objective(HasBlocks, ABC):
    """An auxiliary loss with its own weight.

    Subclasses set ``name`` (the logged key, unique within a model) and take ``weight`` as their first argument.
    """

    name: ClassVar[str]

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = float(weight)

    @abstractmethod
    def build(self, parts: ModelParts) -> None:
        """Create the layers that depend on the model's parts and check that the bridge gives what this needs."""

    @abstractmethod
    def loss(self, out: BridgeOutput, batch: CaptionBatch, parts: ModelParts) -> Tensor | None:
        """The unweighted loss of one batch, or ``None`` when it does not apply to this step."""

    def llm_width(self) -> int | None:
        """The LLM width this objective's targets have, for a model that holds no LLM (BLIP-2 stage 1 sizes its
        projection to the LLM width from it); ``None`` when it sets none."""
        return None
