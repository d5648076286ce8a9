"""Where each sample of an epoch goes: pure functions of the seed, the epoch and a global position.

Three layers, none of which depends on the number of ranks or workers:

* :class:`SourceOrder`: the ``i``-th sample of epoch ``e`` of one source. Shards are permuted (seeded by ``e``), their
  samples laid end to end, and that sequence shuffled inside consecutive windows of ``shuffle_block`` samples (each
  window seeded by ``e`` and its number). Any position maps to a ``(shard, sample)`` in O(log shards) with one
  window's permutation held in memory, so a 100M-sample epoch needs no 100M-long permutation, and a window spans
  ``shuffle_block / samples_per_shard`` shards: reads stay local while samples of different shards mix.
* :class:`Mixture`: which source the global position ``p`` draws from (weighted, in blocks seeded by the block number)
  and how many draws that source had before it, so each source runs through its own epochs at its own pace.
* :func:`rank_batch`: the global positions of batch ``j`` of rank ``r``: global batch ``j`` is the ``world * batch``
  positions after the start, dealt round-robin (position ``q`` to rank ``q % world``), so the ranks' batches
  interleaved by position are exactly the single-process order.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

MIX_BLOCK = 4096


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class SourceOrder:
    """The visiting order of one source's samples, epoch by epoch.

    Args:
        counts: usable samples per shard, shards in their listed order.
        seed: the run's data seed.
        shuffle: permute shards and shuffle inside windows (False: listed order, for evaluation).
        shuffle_block: the window, in samples, inside which samples are shuffled.
        salt: distinguishes sources of one mixture.
    """

    def __init__(self, counts: Sequence[int], seed: int, shuffle: bool, shuffle_block: int, salt: int = 0) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.shuffle, self.block, self.salt = seed, shuffle, max(1, shuffle_block), salt
        self._shards = lru_cache(maxsize=4)(self._shard_layout)
        self._window = lru_cache(maxsize=8)(self._window_perm)

    def __len__(self) -> int:
        return self.total

    def _shard_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = _rng(self.seed, self.salt, epoch, 0).permutation(len(self.counts)) if self.shuffle else None
        order = np.arange(len(self.counts)) if order is None else order
        return order, np.cumsum(self.counts[order])  # shard at each slot, samples up to and including it

    def _window_perm(self, epoch: int, window: int) -> np.ndarray:
        length = min(self.block, self.total - window * self.block)
        return _rng(self.seed, self.salt, epoch, 1, window).permutation(length)

    def locate(self, epoch: int, i: int) -> tuple[int, int]:
        """``(shard number, sample number inside that shard)`` of the ``i``-th sample of ``epoch``."""
        if not 0 <= i < self.total:
            raise IndexError(f"sample {i} of a source with {self.total}")
        j = i
        if self.shuffle:
            window, offset = divmod(i, self.block)
            j = window * self.block + int(self._window(epoch, window)[offset])
        order, ends = self._shards(epoch)
        slot = int(np.searchsorted(ends, j, side="right"))
        before = int(ends[slot - 1]) if slot else 0
        return int(order[slot]), j - before


class Mixture:
    """Which source each global position draws from, with sampling weights; deterministic by seed.

    Args:
        weights: relative weight per source (normalised here).
        seed: the run's data seed.
    """

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
        self.p, self.seed = w / w.sum(), seed
        self._before: list[np.ndarray] = [np.zeros(len(w), dtype=np.int64)]  # draws per source before each block
        self._choices = lru_cache(maxsize=4)(self._block_choices)

    def __len__(self) -> int:
        return len(self.p)

    def _block_choices(self, block: int) -> np.ndarray:
        return _rng(self.seed, 2, block).choice(len(self.p), size=MIX_BLOCK, p=self.p)

    def at(self, position: int) -> tuple[int, int]:
        """``(source, k)``: global ``position`` draws the ``k``-th sample (counted over all epochs) of ``source``."""
        if len(self.p) == 1:
            return 0, position
        block, offset = divmod(position, MIX_BLOCK)
        while len(self._before) <= block:  # walk forward once; later lookups are O(1)
            b = len(self._before) - 1
            self._before.append(self._before[b] + np.bincount(self._choices(b), minlength=len(self.p)))
        choices = self._choices(block)
        source = int(choices[offset])
        return source, int(self._before[block][source] + np.count_nonzero(choices[:offset] == source))


def num_rank_batches(start: int, end: int, world: int, batch: int, keep_short: bool) -> int:
    """Batches every rank runs for positions ``[start, end)``.

    Full global batches, plus the last partial one when each rank gets at least one of its samples (or always when
    ``keep_short``, for evaluation, where a rank may then get an empty batch). A shorter remainder (fewer samples
    than ranks) is left out and counted by :func:`dropped_remainder`.
    """
    span = max(0, end - start)
    full, rest = divmod(span, world * batch)
    return full + (1 if rest and (keep_short or rest >= world) else 0)


def dropped_remainder(start: int, end: int, world: int, batch: int, keep_short: bool) -> int:
    """Samples of ``[start, end)`` that no batch holds (see :func:`num_rank_batches`)."""
    span = max(0, end - start)
    return min(span, max(0, span - num_rank_batches(start, end, world, batch, keep_short) * world * batch))


def rank_batch(start: int, end: int, world: int, rank: int, batch: int, j: int) -> range:
    """Global positions of batch ``j`` of ``rank``: ``start + j*world*batch + t*world + rank`` below ``end``."""
    first = start + j * world * batch + rank
    return range(first, min(end, first + batch * world), world)
