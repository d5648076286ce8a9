"""What every vlgen LightningModule shares: the optimiser, trainable-only checkpoints, skipped-sample counts, and
the guards that stop a run which cannot learn anything.

Frozen parameters (the LLM, usually the vision encoder) never enter the optimiser or a checkpoint: a checkpoint holds
the trainable weights plus the optimiser and scheduler state, so a run with a frozen 135M-parameter LLM saves
megabytes. Loading relies on the frozen parts being rebuilt from the same config (``strict_loading = False``), and
checks that every trainable weight the model expects is in the checkpoint.

Guards (each stop is a :class:`~vlgen.errors.RunStopped` with one line; under DDP every rank decides alike):

* A non-finite training loss (the weighted total or any term) or gradient is caught after backward, before the
  optimiser step (:meth:`VLModule.on_before_optimizer_step`): with ``nonfinite: stop`` the run stops naming the step,
  the non-finite terms and the batch's sample ids, so the weights are never updated with it; with ``nonfinite: skip``
  the step's gradients are dropped (no update, not even weight decay), the step is counted and logged as
  ``train/nonfinite_skipped``, and the run stops after ``NONFINITE_SKIP_LIMIT`` skipped steps in a row. Gradients are
  not checked under fp16 loss scaling, whose scaler skips such steps itself. A checkpoint whose trainable weights are
  not finite is never written.
* Unreadable samples are counted per split (``train``, ``val``, ``test``, ``predict``), summed over ranks and logged as
  ``<split>/skipped`` at that split's epoch end. A split whose whole epoch had no usable sample stops the run; so do
  the first ``EMPTY_BATCHES_TO_STOP`` training batches of an epoch when none held a usable sample, and a validation
  during training that follows only unusable training batches (before a checkpoint is written).
* A training batch with no usable sample takes no optimiser step. Under DDP its rank still returns a zero loss
  connected to every trainable parameter, so the gradient all-reduce matches the other ranks'. Sharded (FSDP2), every
  rank must run the same forward (its gathers), so every rank skips the step when any rank's batch is empty.

Sharding: under Lightning's ``ModelParallelStrategy`` (FSDP2, e.g. ``configs/cluster/cpu_fsdp2.yaml``)
:meth:`VLModule.configure_model` shards every component's blocks and then the module itself (:mod:`vlgen.sharding`);
under any other strategy it only applies ``activation_checkpointing``. A sharded run's checkpoint
(``save_distributed_checkpoint: false``) is the consolidated lean checkpoint a one-process run writes: the trainable
weights (gathered on rank 0), the optimiser state (gathered too), the fingerprint of the frozen weights (taken before
sharding). It resumes under the same strategy (Lightning loads it, the frozen weights left as built) and loads in one
process for ``vlgen test`` or ``vlgen.load``.
"""

from __future__ import annotations

import logging
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from vlgen import artifacts, sharding
from vlgen.dist import broadcast_from_zero, gather_objects, rank, world_size
from vlgen.errors import ConfigError, RunStopped
from vlgen.interfaces import BridgeOutput, count_parameters
from vlgen.loading import load_checked, read_checkpoint
from vlgen.objectives import ModelParts, Objective

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "predict")
EMPTY_BATCHES_TO_STOP = 20  # training batches of an epoch, all without a usable sample, that stop the run
NONFINITE_SKIP_LIMIT = 20  # consecutive optimiser steps skipped for a non-finite loss that stop the run anyway
_MAX_IDS = 32  # sample ids named in one message


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


@dataclass
class WarmupCosine:
    """:func:`warmup_cosine` as a ``LambdaLR`` multiplier whose length can change while training
    (:class:`~vlgen.callbacks.TimeBudget` sets ``total``); its fields travel in the scheduler's state."""

    warmup: int
    total: int
    floor: float

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, min(self.warmup, max(0, self.total - 1)), self.total, self.floor)


class VLModule(pl.LightningModule, ABC):
    """Base LightningModule: the training-step template, optimiser over trainable parameters, lean checkpoints,
    data-skip accounting.

    The template (:meth:`training_step`) asks the subclass for its named, unweighted losses of a batch
    (:meth:`training_losses`), multiplies each by its weight (an objective's own ``weight``, else
    ``loss_weights[name]``, else 1), logs every term as ``train/<name>`` and the weighted sum as ``train/loss``, and
    counts the samples the loader could not read (per split: pass the split to :meth:`count_skipped` and
    :meth:`report_skipped`). A subclass that overrides :meth:`on_before_optimizer_step`, :meth:`on_train_epoch_start`
    or :meth:`on_train_epoch_end` must call ``super()``'s: the guards live there.

    Args:
        optim: optimiser and schedule.
        objectives: auxiliary objectives; the subclass builds them with its parts (:meth:`build_objectives`).
        nonfinite: what a non-finite training loss or gradient does: ``stop`` the run with one line naming the step,
            the terms and the samples (before the optimiser step), or ``skip`` the step (no update; counted and
            logged as ``train/nonfinite_skipped``).
        activation_checkpointing: recompute the activations of the components' blocks in the backward instead of
            keeping them (less memory, about one more forward of those blocks): ``true`` for every component with
            blocks, or the components by name (``[llm]``, ``[encoder, bridge]``); any strategy.
    """

    def __init__(
        self,
        optim: Optim | None = None,
        objectives: list[Objective] | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        activation_checkpointing: bool | list[str] = False,
    ) -> None:
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ConfigError(f"model.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.optim = optim or Optim()
        self.nonfinite = nonfinite
        self.activation_checkpointing = activation_checkpointing
        self._configured = False  # configure_model ran (Lightning calls it again for each trainer entry point)
        self.strict_loading = False  # frozen weights are rebuilt from the config, not read from the checkpoint
        self.skip_counts = dict.fromkeys(SPLITS, 0)  # unreadable samples this epoch, this rank, per split
        self.usable_counts = dict.fromkeys(SPLITS, 0)  # usable samples this epoch, this rank, per split
        self.nonfinite_skipped = 0  # optimiser steps skipped for a non-finite loss or gradient in this run
        self._consecutive_nonfinite = 0
        self._pending: list[dict[str, Any]] = []  # the micro-batches of the coming optimiser step
        self._step_usable = 0  # usable samples in those micro-batches (this rank)
        self._epoch_batches = 0  # training batches of this epoch (this rank)
        self._epoch_usable = 0  # usable training samples of this epoch, all ranks (summed at each optimiser step)
        self.objectives = nn.ModuleList(objectives or [])
        self.loss_weights: dict[str, float] = {}  # the subclass's own terms; objectives carry their weight
        self._parts: ModelParts | None = None

    # --- sharding -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Apply ``activation_checkpointing`` to the components' blocks and, when the strategy gives a device mesh
        (Lightning's ``ModelParallelStrategy``), shard the model with FSDP2 over its data-parallel dimension
        (:mod:`vlgen.sharding`). Once per module: Lightning calls this for every ``fit``, ``test`` ..."""
        if self._configured:
            return
        blocks = sharding.component_blocks(self)
        mesh = self.device_mesh
        if mesh is not None and mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                f"trainer.strategy: vlgen shards over data parallelism only (FSDP2), got tensor_parallel_size "
                f"{mesh['tensor_parallel'].size()}: set data_parallel_size to the number of processes and "
                "tensor_parallel_size: 1"
            )
        sharding.checkpoint_blocks(blocks, self.activation_checkpointing)
        if mesh is not None:
            artifacts.pin_frozen_fingerprint(self)  # of the whole frozen weights, which sharding splits up
            sharding.shard(self, mesh["data_parallel"], [b for found in blocks.values() for b in found])
        self._configured = True

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
        """The weighted sum of the batch's losses; for a batch without a usable sample, None (no step), or under DDP
        a zero loss on every trainable parameter so that this rank joins the other ranks' gradient all-reduce.
        Sharded, a step where any rank's batch has no usable sample is skipped by every rank (a zero loss that
        reaches no weight: Lightning takes no None from a distributed step)."""
        self._epoch_batches += 1
        empty = self.count_skipped(batch, "train")
        if sharding.is_sharded(self):  # every rank runs the same forward (its gathers) or none does
            if sharding.any_rank(empty, self.device):  # a loss of nothing: no unit runs, no weight gets a gradient
                return torch.zeros((), device=self.device, requires_grad=True)
        elif empty:
            return None if world_size() == 1 else self._zero_loss()
        losses = self.training_losses(batch)
        first = next(iter(losses.values()))
        loss = sum((self.loss_weight(k) * v for k, v in losses.items()), torch.zeros((), device=first.device))
        size = batch_size(batch)
        self._step_usable += size
        values = torch.stack([loss.detach().float().sum(), *(v.detach().float().sum() for v in losses.values())])
        ids = batch.get("ids") if isinstance(batch, dict) else None
        self._pending.append({"names": ["loss", *losses], "values": values, "ids": ids, "batch_idx": batch_idx})
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def _zero_loss(self) -> Tensor:
        """0, with a gradient (of zeros) for every trainable parameter."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        return sum((p.sum() * 0 for p in trainable), torch.zeros((), device=self.device))

    def on_train_epoch_start(self) -> None:
        self._epoch_batches = self._epoch_usable = 0

    def on_train_epoch_end(self) -> None:
        self.report_skipped("train")

    # --- guards before each optimiser step ------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After backward, before the update: stop or skip on a non-finite loss or gradient, take no step without a
        usable sample, and stop when an epoch's first ``EMPTY_BATCHES_TO_STOP`` batches had none.

        One all-reduce of three numbers under DDP, so every rank takes the same decision.
        """
        if sharding.is_sharded(self):  # the weights FSDP2 left whole (scalars): their gradients averaged as DDP does
            sharding.average_replicated_gradients(self)
        pending, self._pending = self._pending, []
        usable, self._step_usable = self._step_usable, 0
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # This rank's shards when sharded: the all-reduce of the flags below makes the verdict the whole gradient's.
        grads = [g for p in params if p.grad is not None and (g := sharding.local(p.grad)).numel()]
        flags = torch.tensor([0, 0, usable], dtype=torch.long, device=self.device)  # bad losses, bad grads, usable
        for entry in pending:
            flags[0] += (~torch.isfinite(entry["values"])).any().to(self.device)
        if grads and not _loss_scaled(self):  # fp16's grad scaler skips steps with inf gradients itself
            flags[1] += (~torch.isfinite(_max_abs(grads))).to(self.device)
        if world_size() > 1:
            torch.distributed.all_reduce(flags)
        bad_loss_n, bad_grad_n, usable_all = flags.tolist()
        self._epoch_usable += usable_all
        if bad_loss_n or bad_grad_n:
            self._nonfinite_step(pending, bool(bad_loss_n), params)
        else:
            self._consecutive_nonfinite = 0
            if usable_all == 0:  # no sample on any rank: no update (AdamW would still apply momentum and decay)
                _drop_grads(params)
        if self.nonfinite == "skip":
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
        if self._epoch_usable == 0 and self._epoch_batches >= EMPTY_BATCHES_TO_STOP:
            skipped = self._global([self.skip_counts["train"]])[0]
            raise RunStopped(
                f"train: the first {self._epoch_batches} batches of epoch {self.current_epoch} held no usable sample "
                f"({skipped} skipped as unreadable: missing or corrupt files?)"
            )

    def _nonfinite_step(self, pending: list[dict[str, Any]], loss_bad: bool, params: list[nn.Parameter]) -> None:
        """Stop, or drop this step's gradients, for a non-finite loss (``loss_bad``: on some rank) or else a
        non-finite gradient. Every rank calls this alike."""
        step = self.trainer.global_step
        on_rank = rank() if world_size() > 1 else None
        if loss_bad:  # the terms that were not finite, per micro-batch (and rank), with their samples
            what = _describe_nonfinite(pending, on_rank)
            head = ""
        else:  # a finite loss with a non-finite gradient (the same on every rank): name the first such weight
            names = {id(p): n for n, p in self.named_parameters()}
            bad = (
                names.get(id(p)) for p in params if p.grad is not None and not sharding.local(p.grad).isfinite().all()
            )
            first = next(bad, None)
            if sharding.is_sharded(self):  # each rank looked at its own shards
                first = next((n for n in gather_objects([first]) if n is not None), None)
            head = f"gradient of {first or '?'} from a finite loss"
            ids = [i for e in pending for i in (e["ids"] or [])]
            what = [f"rank {on_rank}:{_ids_text(ids)}" if on_rank is not None else _ids_text(ids)] if ids else []
        if world_size() > 1:
            what = gather_objects(what)
        if head and world_size() == 1:
            detail = head + "".join(what)  # "gradient of X from a finite loss in samples [...]"
        else:
            detail = "; ".join([head, *what] if head else what)
        where = f"training step {step} (epoch {self.current_epoch})"
        if self.nonfinite == "stop":
            raise RunStopped(
                f"{where}: non-finite {detail}; stopped before the optimiser step (lower model.optim.lr, check these "
                "samples, or set model.nonfinite: skip)"
            )
        _drop_grads(params)
        self.nonfinite_skipped += 1
        self._consecutive_nonfinite += 1
        if rank() == 0:
            log.warning("%s skipped: non-finite %s", where, detail)
        if self._consecutive_nonfinite >= NONFINITE_SKIP_LIMIT:
            raise RunStopped(
                f"{where}: {self._consecutive_nonfinite} optimiser steps in a row had a non-finite loss or gradient "
                f"(last: {detail}); nothing is being learnt (lower model.optim.lr)"
            )

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
        floor = self.optim.min_lr / self.optim.lr if self.optim.lr > 0 else 0.0  # lr 0: a run that only looks
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(self.optim.warmup_steps, total, floor))
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
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if sharding.is_sharded(self):  # rank 0 alone holds the gathered weights: its verdict is every rank's
            bad = broadcast_from_zero(bad)
        if bad:  # identical weights on every rank, so every rank stops here
            raise RunStopped(
                f"step {checkpoint.get('global_step', '?')}: {len(bad)} trainable weights are not finite (e.g. "
                f"{', '.join(bad[:3])}); no checkpoint written (lower model.optim.lr)"
            )
        checkpoint["rng_states"] = {  # so a resumed run draws the same dropout masks as an uninterrupted one
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }
        artifacts.describe_checkpoint(self, checkpoint)  # the model config and the frozen parts' fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("state_dict")
        if saved is None:  # ModelParallelStrategy loaded the weights into the shards and took them out of the dict
            saved = _saved_weight_names(self.trainer.ckpt_path)
        missing = sorted(k for n, p in self.named_parameters() if p.requires_grad for k in [n])
        missing = [] if saved is None else [k for k in missing if k not in saved]
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
    @property
    def _skipped(self) -> int:
        """Unreadable samples counted and not yet reported, all splits together (:attr:`skip_counts` per split)."""
        return sum(self.skip_counts.values())

    def count_skipped(self, batch: dict[str, Any], split: str | None = None) -> bool:
        """Add the batch's skipped and usable samples to ``split``'s epoch counts (by default the split the trainer
        is running); True when nothing usable is left in the batch."""
        split = split or self._running_split()
        size = batch_size(batch)
        self.skip_counts[split] += int(batch.get("num_skipped", 0))
        self.usable_counts[split] += size
        return size == 0

    def report_skipped(self, split: str) -> int:
        """At ``split``'s epoch end: sum its counts over ranks, log ``<split>/skipped`` (not for predict, where
        Lightning allows no logging), reset them and return the skipped count. Every rank must call this.

        Stops the run (:class:`~vlgen.errors.RunStopped`) when the epoch had skipped samples and no usable one, and,
        at a validation during training, when every training batch of the epoch so far was unusable (before a
        checkpoint of that validation is written). The sanity check only reports.
        """
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        sanity = self._trainer is not None and self.trainer.sanity_checking
        check_train = split == "val" and fitting and not sanity
        local = [self.skip_counts[split], self.usable_counts[split]]
        if check_train:
            local += [self.skip_counts["train"], self.usable_counts["train"]]
        counts = self._global(local)
        skipped, usable = counts[0], counts[1]
        self.skip_counts[split] = self.usable_counts[split] = 0
        if skipped and rank() == 0:
            log.warning("%s: %d unreadable samples skipped this epoch", split, skipped)
        if split != "predict":
            self.log(f"{split}/skipped", float(skipped))  # already summed over ranks
        if sanity:
            return skipped
        if skipped and not usable:
            raise RunStopped(
                f"{split}: every sample of the epoch was unreadable ({skipped} skipped, none usable): missing or "
                "corrupt files? (see the warnings above)"
            )
        if check_train and counts[2] and not counts[3]:
            raise RunStopped(
                f"train: no usable sample in epoch {self.current_epoch} before this validation ({counts[2]} skipped "
                "as unreadable): missing or corrupt files? (see the warnings above)"
            )
        return skipped

    def _global(self, counts: list[int]) -> list[int]:
        """``counts`` summed over ranks (a collective under DDP: every rank must call it)."""
        if world_size() == 1:
            return list(counts)
        t = torch.tensor(counts, dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t)
        return [int(x) for x in t.tolist()]

    def _running_split(self) -> str:
        trainer = self._trainer
        if trainer is None or trainer.training:
            return "train"
        if trainer.testing:
            return "test"
        if trainer.predicting:
            return "predict"
        return "val"  # validating or sanity checking


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a vlgen batch (the length of its first per-sample field)."""
    return len(next(iter(v for k, v in batch.items() if k != "num_skipped")))


def _loss_scaled(module: pl.LightningModule) -> bool:
    """Whether fp16 loss scaling is on (its grad scaler skips steps with non-finite gradients by itself)."""
    trainer = module._trainer
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def _max_abs(tensors: list[Tensor]) -> Tensor:
    """The largest absolute value over ``tensors`` (NaN if any holds a NaN), without a copy of them."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # fused (foreach) from torch 2.6
    if total_norm is not None:
        return total_norm(tensors, float("inf"))
    return torch.stack([torch.linalg.vector_norm(t, float("inf")).to(tensors[0].device) for t in tensors]).max()


def _drop_grads(params: list[nn.Parameter]) -> None:
    """No update for these parameters at this step: AdamW skips a parameter whose gradient is None."""
    for p in params:
        p.grad = None


def _ids_text(ids: list[Any] | None) -> str:
    """`` in samples [...]`` for a message (at most ``_MAX_IDS`` ids), or nothing without ids."""
    if not ids:
        return ""
    more = f" and {len(ids) - _MAX_IDS} more" if len(ids) > _MAX_IDS else ""
    return f" in samples {[str(i) for i in ids[:_MAX_IDS]]}{more}"


def _describe_nonfinite(pending: list[dict[str, Any]], on_rank: int | None) -> list[str]:
    """One phrase per micro-batch with a non-finite term: the terms with their values and the sample ids."""
    out = []
    for entry in pending:
        values = entry["values"].tolist()
        bad = [f"{n}={v}" for n, v in zip(entry["names"], values) if not math.isfinite(v)]
        if bad:
            where = f"rank {on_rank}: " if on_rank is not None else ""
            out.append(f"{where}{' '.join(bad)} (batch {entry['batch_idx']}){_ids_text(entry['ids'])}")
    return out


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """NumPy's global generator state with its key array as a tensor (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _saved_weight_names(path: Any) -> set[str] | None:
    """The names of the weights a checkpoint file holds, read without loading them (memory-mapped); None for a
    checkpoint directory (DeepSpeed's), whose engine loaded the weights it holds itself."""
    if path is None:
        return set()
    if Path(path).is_dir():
        return None
    return set(read_checkpoint(path, "--ckpt_path", mmap=True)["state_dict"])


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)
