"""Gradual token merging: the connector starts merging nothing and reaches its full schedule over some steps."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from vlgen.errors import ConfigError
from vlgen.interfaces import MergingBridge

log = logging.getLogger(__name__)


class MergeRamp(Callback):
    """Raise ``model.bridge.merge_fraction`` linearly from 0 to 1 over the first ``steps`` optimiser steps.

    Every layer of a :class:`~vlgen.bridges.TokenMergingConnector` then merges ``round(fraction * r)`` tokens, so
    early training sees nearly all visual tokens and the prompts condense as the connector learns. The fraction is
    a function of the global step, so a resumed run picks up where it was. Logged as ``train/merge_fraction``.
    P-Former alignment, whose prompt count is the full schedule's, applies from the step the counts agree.

    Args:
        steps: optimiser steps until the full schedule; 0 means full merging from the start.
    """

    def __init__(self, steps: int) -> None:
        if steps < 0:
            raise ConfigError(f"MergeRamp.steps must be >= 0, got {steps}")
        self.steps = steps

    def fraction(self, step: int) -> float:
        return 1.0 if self.steps == 0 else min(1.0, step / self.steps)

    def _set(self, pl_module: LightningModule, step: int) -> float:
        bridge = getattr(pl_module, "bridge", None)
        if not isinstance(bridge, MergingBridge):
            raise ConfigError("MergeRamp needs a bridge that merges tokens (vlgen.bridges.TokenMergingConnector)")
        bridge.merge_fraction = self.fraction(step)
        return bridge.merge_fraction

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        value = self._set(pl_module, trainer.global_step)
        pl_module.log("train/merge_fraction", value, batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(pl_module, self.steps)  # as `vlgen test` will: the full schedule
