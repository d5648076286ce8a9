"""What every vlgen LightningModule shares: the optimiser, trainable-only checkpoints, skipped-sample counts.

Frozen parameters (the LLM, usually the vision encoder) never enter the optimiser or a checkpoint: a checkpoint holds
the trainable weights plus the optimiser and scheduler state, so a run with a frozen 135M-parameter LLM saves
megabytes. Loading relies on the frozen parts being rebuilt from the same config (``strict_loading = False``), and
checks that every trainable weight the model expects is in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from vlgen import artifacts
from vlgen.dist import world_size
from vlgen.errors import ConfigError
from vlgen.interfaces import BridgeOutput, count_parameters
from vlgen.loading import load_checked, read_checkpoint
from vlgen.objectives import ModelParts, Objective

log = logging.getLogger(__name__)


@dataclass
class Optim:
    """AdamW with linear warmup then cosine decay, stepped per optimiser step.

    Args:
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine.
        weight_decay: decoupled weight decay (not applied to biases, norms and 1-d parameters).
        betas: AdamW betas.
        warmup_steps: linear warmup from 0 to ``lr``.
        max_steps: cosine length; by default the trainer's estimated number of optimiser steps.
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 2000
    max_steps: int | None = None


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine from 1 down to ``floor``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class VLModule(pl.LightningModule, ABC):
    """Base LightningModule: the training-step template, optimiser over trainable parameters, lean checkpoints,
    data-skip accounting.

    The template (:meth:`training_step`) asks the subclass for its named, unweighted losses of a batch
    (:meth:`training_losses`), multiplies each by its weight (an objective's own ``weight``, else
    ``loss_weights[name]``, else 1), logs every term as ``train/<name>`` and the weighted sum as ``train/loss``, and
    counts the samples the loader could not read.

    Args:
        optim: optimiser and schedule.
        objectives: auxiliary objectives; the subclass builds them with its parts (:meth:`build_objectives`).
    """

    def __init__(self, optim: Optim | None = None, objectives: list[Objective] | None = None) -> None:
        super().__init__()
        self.optim = optim or Optim()
        self.strict_loading = False  # frozen weights are rebuilt from the config, not read from the checkpoint
        self._skipped = 0
        self.objectives = nn.ModuleList(objectives or [])
        self.loss_weights: dict[str, float] = {}  # the subclass's own terms; objectives carry their weight
        self._parts: ModelParts | None = None

    # --- the training step ----------------------------------------------------------------------------------------
    def build_objectives(self, parts: ModelParts) -> None:
        """Build every objective with this model's parts; two terms of one name stop here with one line."""
        names = list(self.loss_weights)
        for objective in self.objectives:
            if objective.name in names:
                raise ConfigError(f"model.objectives: two training terms are named {objective.name!r}")
            names.append(objective.name)
            objective.build(parts)
        self._parts = parts

    def objective_losses(self, out: BridgeOutput, batch: Any) -> dict[str, Tensor]:
        """The unweighted losses of the objectives that apply to this step, by name."""
        if self.objectives and self._parts is None:
            raise RuntimeError(f"{type(self).__name__} must call build_objectives() in __init__")
        losses = {}
        for objective in self.objectives:
            value = objective.loss(out, batch, self._parts)
            if value is not None:
                losses[objective.name] = value
        return losses

    @abstractmethod
    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        """The named, unweighted losses of one batch (the subclass's terms and its objectives')."""

    def loss_weight(self, name: str) -> float:
        for objective in self.objectives:
            if objective.name == name:
                return objective.weight
        return self.loss_weights.get(name, 1.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.count_skipped(batch):
            return None
        losses = self.training_losses(batch)
        first = next(iter(losses.values()))
        loss = sum((self.loss_weight(k) * v for k, v in losses.items()), torch.zeros((), device=first.device))
        size = batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def on_train_epoch_end(self) -> None:
        self.report_skipped("train")

    def log_parameter_counts(self) -> None:
        for name, child in self.named_children():
            trainable, frozen = count_parameters(child)
            log.info("%s: %s trainable, %s frozen parameters", name, f"{trainable:,}", f"{frozen:,}")

    # --- optimisation ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        if not decay and not no_decay:
            raise ValueError("model has no trainable parameters: check the frozen flags of its components")
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0}]
        opt = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas)
        total = self.optim.max_steps or int(self.trainer.estimated_stepping_batches)
        floor = self.optim.min_lr / self.optim.lr
        warmup = min(self.optim.warmup_steps, max(0, total - 1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- lean checkpoints -----------------------------------------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        frozen_modules = {n for n, m in self.named_modules() if n and _all_frozen(m)}
        for name, _ in self.named_buffers():
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if not any(owner == f or owner.startswith(f + ".") for f in frozen_modules):
                keys.add(name)
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng_states"] = {  # so a resumed run draws the same dropout masks as an uninterrupted one
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }
        artifacts.describe_checkpoint(self, checkpoint)  # the model config and the frozen parts' fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(k for n, p in self.named_parameters() if p.requires_grad for k in [n])
        missing = [k for k in missing if k not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}")
        artifacts.check_frozen(self, checkpoint)  # one warning line when the frozen parts are not the saved ones
        states = checkpoint.get("rng_states")
        if states:  # the CPU generators as they were when the checkpoint was saved (rank 0's)
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            name, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))

    def save_pretrained(self, directory: str, config: Any = None) -> Any:
        """Write the model config and trainable weights into ``directory`` for ``vlgen.load`` (:mod:`vlgen.artifacts`).

        ``config`` (``class_path`` + ``init_args``) is needed only when the model was not built by the CLI or
        ``vlgen.load``. Returns the directory as a ``Path``.
        """
        return artifacts.save_pretrained(self, directory, config)

    def init_weights_from(self, path: str, option: str) -> None:
        """Start from the weights a vlgen checkpoint saved (e.g. an image model's, to fine-tune it on video).

        Weights the checkpoint lacks keep their fresh initialisation (a video encoder's temporal modules, a new
        projection); weights it holds that this model has not are logged and ignored. A checkpoint that shares no
        weight with the model, or a weight of another shape, stops with one line naming ``option``.
        """
        load_checked(self, read_checkpoint(path, option).get("state_dict", {}), option, path, required="any")

    # --- bad data accounting --------------------------------------------------------------------------------------
    def count_skipped(self, batch: dict[str, Any]) -> bool:
        """Add the batch's skipped samples to the epoch count; True when nothing usable is left in the batch."""
        self._skipped += int(batch.get("num_skipped", 0))
        return batch_size(batch) == 0

    def report_skipped(self, stage: str) -> None:
        total = self._skipped
        if world_size() > 1:
            t = torch.tensor(total, device=self.device)
            torch.distributed.all_reduce(t)
            total = int(t.item())
        self._skipped = 0
        if total:
            log.warning("%s: %d unreadable samples skipped this epoch", stage, total)
        self.log(f"{stage}/skipped", float(total))  # already summed over ranks


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a vlgen batch (the length of its first per-sample field)."""
    return len(next(iter(v for k, v in batch.items() if k != "num_skipped")))


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """NumPy's global generator state with its key array as a tensor (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)
