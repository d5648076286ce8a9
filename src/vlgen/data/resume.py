"""Exact mid-epoch resume for the map-style data modules (annotations + a media folder) and the text corpus stream.

A ``kill -9`` between two checkpoints must not change what a run trains on: resuming from the last checkpoint has to
draw the batches, the augmentations and the dropout masks an uninterrupted run draws. The web-scale shard modules do
this already (:mod:`vlgen.data.webdataset`); this module gives the same to the modules on a ``Dataset``:

* :class:`EpochBatches`, a batch sampler whose epoch is a permutation fixed by ``(seed, epoch)`` alone (seeded
  ``torch.Generator``, exactly :class:`~torch.utils.data.DistributedSampler`'s order and padding rule), dealt to the
  ranks as ``DistributedSampler`` deals it, and started past the samples an interrupted run already trained on. Each
  key it yields is ``(dataset index, sample seed)``: the seed is a function of ``(seed, epoch, position)``, so a
  sample's augmentation (image crops, video frame choices) does not depend on the worker that loads it, on
  ``num_workers`` or on what ran before (:class:`PositionSeeded`).
* :class:`ResumableLoader`, what ``train_dataloader`` returns: an iterable with a length (not a ``DataLoader``, so
  Lightning, whose ``use_distributed_sampler`` would rebuild a ``DataLoader``'s custom batch sampler around a
  ``DistributedSampler``, leaves it as it is, under DDP too) over one persistent ``DataLoader`` whose batch sampler
  is an :class:`EpochBatches` living in the main process. Its ``state_dict`` is the training position ``{"epoch",
  "consumed", "batches", "seed"}`` (``consumed``: global samples of the epoch trained on).
* :class:`StreamLoader`, the same for an ``IterableDataset`` of ready batches that can start at any batch number
  (the text stream): its position is the number of batches trained.

Counting what was trained: workers and Lightning both fetch ahead (Lightning holds the next batch when a checkpoint
is written at the end of a step), so neither the sampler's position nor the count of batches the loader has yielded
is what was trained. With a trainer attached, the loaders read the trainer's own count of processed batches
(``fit_loop.epoch_loop.batch_progress``, restored by Lightning with the loops); without one (a loader used by hand)
they count the batches they yielded, in the main process. The data modules put the position in their
``state_dict``, which Lightning writes into every checkpoint and restores before it asks for loaders; the loaders
have ``state_dict`` / ``load_state_dict`` too, so Lightning treats them as resumable and stores the same position
with its loops. Nothing here draws from the global random generators (the ``DataLoader`` s get generators of their
own), so the generator states the model saves in its checkpoints stay the ones an uninterrupted run has.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from vlgen import dist
from vlgen.data.common import seeded_transform
from vlgen.data.shards.stream import sample_seed

log = logging.getLogger(__name__)
Key = tuple[int, int]  # (dataset index, the sample's seed)
Position = dict[str, int]  # {"epoch", "consumed", "batches", "seed"}


def run_seed() -> int:
    """The run's seed: what ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    except ValueError:
        return 0


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """Dataset indices in the order of ``epoch``: ``DistributedSampler(shuffle=True)``'s permutation."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def position_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the sample at ``position`` of ``epoch`` (a 32-bit mix of the three)."""
    return sample_seed(sample_seed(seed, epoch), position)


class EpochBatches(Sampler[list[Key]]):
    """One rank's batches of one pass over an epoch, starting ``start`` global positions into it.

    The epoch's order is :func:`epoch_permutation`; the pass runs over its positions ``[start, num_samples)``, padded
    (by repeating the epoch's first samples) to a multiple of ``world_size`` as ``DistributedSampler`` pads, and
    position ``start + k`` goes to rank ``k % world_size``. Global batch ``j`` (all ranks' batch ``j``) is therefore
    the ``world_size * batch_size`` positions after ``start + j * world_size * batch_size``; a pass from 0 deals
    exactly as ``DistributedSampler`` with ``BatchSampler(drop_last=False)`` does, and a pass resumed at the same
    world size continues exactly where the interrupted one stopped. Every rank gets the same number of batches.

    Args:
        num_samples: the dataset's length.
        batch_size: samples per batch on this rank.
        seed: seeds the order of every epoch and every sample's seed.
        rank: this rank.
        world_size: number of ranks.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start, self.done = 0, 0, 0  # the pass: epoch, first global position, batches trained
        self.pass_seed = seed  # the seed of the pass (a resumed epoch keeps its checkpoint's)

    def set_pass(self, epoch: int, start: int = 0, seed: int | None = None) -> None:
        """Make the next ``iter`` run over ``epoch`` from global position ``start`` (in ``seed``'s order if given)."""
        self.epoch, self.start, self.done = epoch, max(0, start), 0
        self.pass_seed = self.seed if seed is None else seed

    def _span(self, start: int) -> int:
        """Positions of a pass from ``start`` on all ranks together, padding included (a multiple of the world)."""
        left = max(0, self.num_samples - start)
        return math.ceil(left / self.world_size) * self.world_size

    def positions(self) -> list[int]:
        """This rank's global positions in the pass (a padded position ``p >= num_samples`` repeats ``p - num``)."""
        return list(range(self.start + self.rank, self.start + self._span(self.start), self.world_size))

    def pass_length(self, start: int) -> int:
        """Batches on each rank of a pass from global position ``start``."""
        return math.ceil(self._span(start) // self.world_size / self.batch_size)

    def __len__(self) -> int:
        return self.pass_length(self.start)

    def epoch_length(self) -> int:
        """Batches of a whole epoch (a pass from position 0) on each rank."""
        return self.pass_length(0)

    def __iter__(self) -> Iterator[list[Key]]:
        order = epoch_permutation(self.num_samples, self.pass_seed, self.epoch)
        keys = [(order[p % self.num_samples], position_seed(self.pass_seed, self.epoch, p)) for p in self.positions()]
        for i in range(0, len(keys), self.batch_size):
            yield keys[i : i + self.batch_size]

    def consumed_after(self, batches: int) -> int:
        """Global positions of the epoch trained on after ``batches`` batches of this pass."""
        return min(self.num_samples, self.start + max(0, batches) * self.world_size * self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "consumed"}``: the epoch, and its samples (over all ranks) trained on (``done`` batches)."""
        return {"epoch": self.epoch, "consumed": self.consumed_after(self.done)}


class PositionSeeded(Dataset):
    """``dataset`` read by :class:`EpochBatches` keys: ``dataset[index]`` with the sample's own seed.

    A dataset with a ``seeded_item(index, seed)`` method (the video one: frame choices and the clip's augmentation)
    gets the seed; any other is read with Python's and torch's global generators seeded by it for the call and
    restored afterwards (:func:`~vlgen.data.common.seeded_transform`), so its random transforms draw the same in any
    worker, in the main process, in a resumed run and in an uninterrupted one.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> Any:
        index, seed = key
        seeded = getattr(self.dataset, "seeded_item", None)
        if callable(seeded):
            return seeded(index, seed)
        return seeded_transform(self.dataset.__getitem__, index, seed)


def trainer_world(trainer: Any) -> tuple[int, int]:
    """``(rank, world size)``: the trainer's, else ``torch.distributed``'s, else ``(0, 1)``."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return dist.rank(), dist.world_size()


def batches_this_epoch(trainer: Any) -> int | None:
    """Training batches the trainer has processed in its current epoch (None without a trainer)."""
    return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed


def batches_in_total(trainer: Any) -> int | None:
    """Training batches the trainer has processed over the whole run, resumed ones included (None: no trainer)."""
    return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.total.processed


class ResumableLoader:
    """The training loader of a map-style dataset: epoch by epoch, resumable mid-epoch (see the module docstring).

    Args:
        dataset: the training dataset (read through :class:`PositionSeeded`).
        order: the batch sampler; its rank and world size are this process's.
        collate: list of samples -> batch.
        num_workers: dataloader worker processes (persistent across epochs).
        pin_memory: pin batches for faster copies to the GPU.
        epoch_fn: the current epoch (the trainer's), or None to count passes.
        progress_fn: batches of the current epoch trained so far (the trainer's count), or None to count the batches
            this loader yielded.
    """

    def __init__(
        self,
        dataset: Dataset,
        order: EpochBatches,
        collate: Callable[[list[Any]], Any],
        num_workers: int,
        pin_memory: bool,
        epoch_fn: Callable[[], int] | None = None,
        progress_fn: Callable[[], int | None] | None = None,
    ) -> None:
        self.order, self.epoch_fn, self.progress_fn = order, epoch_fn, progress_fn
        self.loader = DataLoader(
            PositionSeeded(dataset), batch_sampler=order, num_workers=num_workers, pin_memory=pin_memory,
            collate_fn=collate, persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(order.seed),
        )  # fmt: skip
        self._resume: Position | None = None
        self._passes = 0
        self.started = False  # whether a pass has begun (the position is the sampler's)
        self.resumed_batches = 0  # batches of the current epoch trained before this pass began
        self.delivered = 0  # batches this pass has yielded

    def _epoch(self) -> int:
        return self.epoch_fn() if self.epoch_fn is not None else self._passes

    def _pass_for(self, epoch: int) -> tuple[int, int, int | None]:
        """``(start, batches already trained, seed)`` of a pass over ``epoch``: a restored position's, or the top."""
        if self._resume is not None and self._resume["epoch"] == epoch:
            return self._resume["consumed"], self._resume["batches"], self._resume.get("seed")
        return 0, 0, None

    def __len__(self) -> int:
        start, done, _ = self._pass_for(self._epoch())
        return max(self.order.epoch_length(), done + self.order.pass_length(start))

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch()
        start, self.resumed_batches, seed = self._pass_for(epoch)
        if seed is not None and seed != self.order.seed:
            log.warning("data train: epoch %d resumes in the order of the checkpoint's seed %d (now %d)",
                        epoch, seed, self.order.seed)  # fmt: skip
        if start:
            log.info("data train: resuming epoch %d after %d of %d samples (%d batches done)",
                     epoch, start, self.order.num_samples, self.resumed_batches)  # fmt: skip
        self.order.set_pass(epoch, start, seed)
        self._resume, self._passes, self.started, self.delivered = None, self._passes + 1, True, 0
        for batch in self.loader:
            self.delivered += 1
            yield batch

    def trained(self) -> int:
        """Batches of the current pass trained on: the trainer's count past the resumed ones, else the yielded."""
        processed = self.progress_fn() if self.progress_fn is not None else None
        return self.delivered if processed is None else max(0, processed - self.resumed_batches)

    def state_dict(self) -> Position:
        """The training position: ``{"epoch", "consumed", "batches", "seed"}`` (empty before any pass or resume)."""
        if not self.started:
            return dict(self._resume) if self._resume is not None else {}
        done = self.trained()
        self.order.done = done
        return {**self.order.state_dict(), "batches": self.resumed_batches + done, "seed": self.order.pass_seed}

    def load_state_dict(self, state: Position) -> None:
        """Continue at ``state`` (what :meth:`state_dict` gave): its epoch's next pass starts past its samples."""
        if state:
            keys = {"epoch": 0, "consumed": 0, "batches": 0, "seed": self.order.seed}
            self._resume = {k: int(state.get(k, default)) for k, default in keys.items()}


def _as_is(batch: Any) -> Any:
    return batch


class StreamLoader:
    """The training loader of an endless stream of ready batches that can start at any batch number (the text corpus).

    Each ``iter`` builds ``make_stream(start)`` at the batches trained so far (a restored count first), through a
    ``DataLoader(batch_size=None)`` with its own generator; the position is the number of batches trained (the
    trainer's total, else the batches yielded), the same on every rank.

    Args:
        make_stream: first batch number -> the stream (an ``IterableDataset`` yielding batches from there on).
        num_workers: dataloader worker processes.
        seed: seeds the ``DataLoader``'s generator (the workers' base seed).
        progress_fn: batches trained over the whole run (the trainer's count), or None to count yielded batches.
    """

    def __init__(
        self,
        make_stream: Callable[[int], IterableDataset],
        num_workers: int,
        seed: int,
        progress_fn: Callable[[], int | None] | None = None,
    ) -> None:
        self.make_stream, self.num_workers, self.seed, self.progress_fn = make_stream, num_workers, seed, progress_fn
        self._resume: int | None = None
        self.start, self.delivered, self.started = 0, 0, False

    def trained(self) -> int:
        """Batches trained on so far, over the whole run."""
        processed = self.progress_fn() if self.progress_fn is not None else None
        return self.start + self.delivered if processed is None else processed

    def __iter__(self) -> Iterator[Any]:
        start = self._resume if self._resume is not None else (self.trained() if self.started else 0)
        if self._resume:
            log.info("data train: resuming the stream at batch %d", start)
        self._resume, self.start, self.delivered, self.started = None, start, 0, True
        loader = DataLoader(
            self.make_stream(start), batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
            generator=torch.Generator().manual_seed(self.seed),
        )  # fmt: skip
        for batch in loader:
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"batches": n}``: the stream continues at batch ``n`` (empty before any pass or resume)."""
        if not self.started:
            return {"batches": self._resume} if self._resume is not None else {}
        return {"batches": self.trained()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume = int(state["batches"])
