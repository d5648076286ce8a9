"""Streaming batches out of indexed shards: sources, the per-epoch stream, and a loader that resumes mid-epoch.

:class:`ShardSource` is one corpus: its shard URLs, their indexes (missing shards and unusable samples named once
and counted), and random reads of a sample's members. :class:`ShardStream` is an ``IterableDataset`` over one
epoch's positions ``[start, end)`` for one rank; dataloader worker ``w`` of ``K`` builds the rank's batches
``w, w + K, ...``, which the DataLoader hands out round-robin, so the batch order is the same for any ``K``. Every
sample's randomness (augmentation, frame choice) is seeded by the run's seed and its global position.
:class:`ShardLoader` makes one such stream per epoch, starting where a restored position says, and reports its
position for checkpoints.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlgen.data.common import BadSample
from vlgen.data.shards.index import IndexCache, Kind, Members, open_url
from vlgen.data.shards.order import Mixture, SourceOrder, num_rank_batches, rank_batch
from vlgen.errors import ConfigError

log = logging.getLogger(__name__)
TEXT_MEMBERS = ("txt", "jsonl", "json")
RawSample = dict[str, Any]  # {"key", "source", "shard", extension: bytes...}
Decode = Callable[[RawSample, int], Any]  # raw sample, per-sample seed -> a sample, or None when unusable
Collate = Callable[[list[Any]], dict[str, Any]]


class ShardSource:
    """One corpus of shards for one kind of data: indexes, counts, and random reads.

    Args:
        name: shown in logs and per-source counts.
        urls: the shards, in order.
        kind: ``image``, ``video`` or ``text``.
        weight: sampling weight in a mixture.
        index_dir: where indexes are cached.
        strict: a missing shard, an unusable sample or a truncated shard raises instead of being skipped.
        option: the config option named in errors.
    """

    def __init__(
        self, name: str, urls: list[str], kind: Kind, weight: float, index_dir: str | None, strict: bool, option: str
    ) -> None:
        self.name, self.kind, self.weight, self.option = name, kind, weight, option
        self.cache = IndexCache(index_dir)
        with ThreadPoolExecutor(max_workers=8) as pool:
            headers = list(pool.map(self._header, urls))
        self.missing = [u for u, h in zip(urls, headers) if h is None]
        kept = [(u, h) for u, h in zip(urls, headers) if h is not None and h["num_samples"] > 0]
        self.urls = [u for u, _ in kept]
        self.counts = [h["num_samples"] for _, h in kept]
        self.num_bad = sum(len(h["bad"]) for h in headers if h is not None)
        self.truncated = [(u, h["tail_error"]) for u, h in zip(urls, headers) if h is not None and h["tail_error"]]
        self._report(urls, headers, strict)
        if not self.counts:
            raise ConfigError(f"{option}: no usable {kind} sample in {len(urls)} shard(s), e.g. {urls[0]}")
        self.cached_shards = 8  # shard indexes held per process; a Plan raises it to what a shuffle window spans
        self._samples: OrderedDict[int, list[tuple[str, Members]]] = OrderedDict()
        self._files: OrderedDict[int, BinaryIO] = OrderedDict()

    def _header(self, url: str) -> dict[str, Any] | None:
        try:
            return self.cache.header(url, self.kind)
        except FileNotFoundError:
            return None

    def _report(self, urls: list[str], headers: list[dict[str, Any] | None], strict: bool) -> None:
        problems = [f"missing shard {u}" for u in self.missing]
        problems += [f"{u}: cut short ({why}); kept the samples before" for u, why in self.truncated]
        for url, head in zip(urls, headers):
            problems += [f"{url}:{key}: {why}" for key, why in (head or {}).get("bad", [])]
        if problems and strict:
            raise BadSample(f"{self.option}: {problems[0]} (and {len(problems) - 1} more problems)")
        for line in problems[:20]:
            log.warning("%s: skipping %s", self.name, line)
        if len(problems) > 20:
            log.warning("%s: %d more problems, counted and not logged", self.name, len(problems) - 20)

    def __len__(self) -> int:
        return sum(self.counts)

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self)} {self.kind} samples in {len(self.urls)} shards; skipped "
            f"{len(self.missing)} missing shards, {self.num_bad} unusable samples, "
            f"{len(self.truncated)} cut-short shards"
        )

    def read(self, shard: int, local: int) -> RawSample:
        """The members of sample ``local`` of shard ``shard`` as bytes (raises OSError on a short read)."""
        if shard not in self._samples:
            self._samples[shard] = self.cache.samples(self.urls[shard], self.kind)
            while len(self._samples) > self.cached_shards:
                self._samples.popitem(last=False)
        self._samples.move_to_end(shard)
        key, members = self._samples[shard][local]
        f = self._file(shard)
        raw: RawSample = {"key": key, "source": self.name, "shard": self.urls[shard]}
        for ext, (offset, size) in members.items():
            if self.kind == "text" and ext not in TEXT_MEMBERS:
                continue  # a text corpus read from image shards never reads the images
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise OSError(f"{self.urls[shard]}:{key}.{ext}: read {len(data)} of {size} bytes")
            raw[ext] = data
        return raw

    def _file(self, shard: int) -> BinaryIO:
        if shard not in self._files:
            self._files[shard] = open_url(self.urls[shard])
            while len(self._files) > self.cached_shards:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        return self._files[shard]

    def __getstate__(self) -> dict[str, Any]:  # open files and caches stay in their process
        state = dict(self.__dict__)
        state["_samples"], state["_files"] = OrderedDict(), OrderedDict()
        return state


MASK64 = (1 << 64) - 1


def sample_seed(seed: int, position: int) -> int:
    """The seed of one sample's randomness, from the run's seed and the sample's absolute position (splitmix64 of
    the two, a 32-bit result; cheap enough to run per sample)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) & 0xFFFFFFFF


class Plan:
    """The positions of the stream and where each one leads: sources, their orders and the mixture.

    Args:
        sources: the corpora.
        seed: the data seed.
        shuffle: shuffle (training) or keep shard order (evaluation).
        shuffle_block: shuffle window in samples.
        epoch_size: positions per epoch (default: the sources' samples together).
    """

    def __init__(
        self, sources: list[ShardSource], seed: int, shuffle: bool, shuffle_block: int, epoch_size: int | None
    ) -> None:
        self.sources, self.seed = sources, seed
        self.orders = [SourceOrder(s.counts, seed, shuffle, shuffle_block, salt=n) for n, s in enumerate(sources)]
        for s in sources:  # a window's samples come from about block / (samples per shard) shards: keep their indexes
            spanned = -(-shuffle_block * len(s.counts) // max(1, len(s))) + 2 if shuffle else 2
            s.cached_shards = max(8, min(64, spanned))
        self.mixture = Mixture([s.weight for s in sources], seed)
        self.epoch_size = epoch_size or sum(len(s) for s in sources)

    def locate(self, epoch: int, position: int) -> tuple[int, int, int]:
        """``(source, shard, sample)`` at ``position`` of ``epoch``."""
        source, k = self.mixture.at(epoch * self.epoch_size + position)
        order = self.orders[source]
        return (source, *order.locate(k // len(order), k % len(order)))


class ShardStream(IterableDataset):
    """One rank's batches of one epoch, for positions ``[start, end)``; use with ``DataLoader(batch_size=None)``.

    Args:
        plan: sources, orders and mixture.
        epoch: the epoch (seeds the order).
        start: first position (a resumed epoch starts past the positions already trained on).
        end: one past the last position.
        world: number of ranks.
        rank: this rank.
        batch_size: samples per batch on this rank.
        keep_short: keep a final global batch too short to give every rank a sample (evaluation).
        decode: raw sample and its seed -> a sample, or None when unusable (counted as skipped).
        collate: list of samples (None for unusable ones) -> batch.
        strict: an unreadable sample raises instead of being skipped.
    """

    def __init__(
        self, plan: Plan, epoch: int, start: int, end: int, world: int, rank: int, batch_size: int,
        keep_short: bool, decode: Decode, collate: Collate, strict: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.plan, self.epoch, self.start, self.end = plan, epoch, start, end
        self.world, self.rank, self.batch_size, self.keep_short = world, rank, batch_size, keep_short
        self.decode, self.collate, self.strict = decode, collate, strict

    def __len__(self) -> int:
        return num_rank_batches(self.start, self.end, self.world, self.batch_size, self.keep_short)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        names = [s.name for s in self.plan.sources]
        for j in range(worker, len(self), workers):
            samples, seen, skipped = [], [0] * len(names), [0] * len(names)
            for q in rank_batch(self.start, self.end, self.world, self.rank, self.batch_size, j):
                source, shard, local = self.plan.locate(self.epoch, q)
                sample = self._load(source, shard, local, self.epoch * self.plan.epoch_size + q)
                seen[source] += 1
                skipped[source] += sample is None
                samples.append(sample)
            batch = self.collate(samples)
            batch["source_counts"] = {"names": names, "samples": seen, "skipped": skipped}
            yield batch

    def _load(self, source: int, shard: int, local: int, absolute: int) -> Any:
        src = self.plan.sources[source]
        try:
            raw = src.read(shard, local)
        except OSError as err:
            if self.strict:
                raise BadSample(f"{src.urls[shard]} sample {local}: {err}") from err
            log.warning("%s: skipping unreadable sample %d of %s: %s", src.name, local, src.urls[shard], err)
            return None
        return self.decode(raw, sample_seed(self.plan.seed, absolute))


class ShardLoader:
    """The training (or evaluation) loader over a :class:`Plan`: one :class:`ShardStream` per epoch.

    Lightning sees an iterable with a length; the position is checkpointed by the data module
    (:meth:`position_after`), and :meth:`resume_at` makes the next epoch start there. Only the trained-on batches count:
    ``progress()`` (the trainer's processed-batch count of this epoch) says how many were, since Lightning fetches one
    batch ahead.

    Args:
        make_stream: ``(epoch, start) -> ShardStream`` for this rank.
        num_workers: dataloader worker processes.
        pin_memory: pin batches for faster copies to the GPU.
        seed: seeds the DataLoader's own generator, so creating workers never draws from the global RNG.
        epoch_fn: the current epoch (the trainer's), or None to count calls to ``iter``.
    """

    def __init__(
        self,
        make_stream: Callable[[int, int], ShardStream],
        num_workers: int,
        pin_memory: bool,
        seed: int,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        self.make_stream, self.num_workers, self.pin_memory, self.seed = make_stream, num_workers, pin_memory, seed
        self.epoch_fn = epoch_fn
        self._epochs_started = 0
        self._resume: dict[str, int] | None = None  # {"epoch", "position", "batches"} to continue from
        self.current: ShardStream | None = None
        self.resumed_batches = 0
        self.delivered = 0

    def resume_at(self, epoch: int, position: int, batches: int) -> None:
        """Start ``epoch`` at ``position`` next; ``batches`` were already trained in it (Lightning's restored count)."""
        self._resume = {"epoch": epoch, "position": position, "batches": batches}

    def _epoch(self) -> int:
        return self.epoch_fn() if self.epoch_fn is not None else self._epochs_started

    def _stream_for(self, epoch: int) -> tuple[ShardStream, int]:
        if self._resume is not None and self._resume["epoch"] == epoch:
            return self.make_stream(epoch, self._resume["position"]), self._resume["batches"]
        return self.make_stream(epoch, 0), 0

    def __len__(self) -> int:
        stream, done = self._stream_for(self._epoch())
        full = len(self.make_stream(self._epoch(), 0))
        return max(full, done + len(stream))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._epoch()
        self.current, self.resumed_batches = self._stream_for(epoch)
        self._resume = None
        self._epochs_started += 1
        self.delivered = 0
        generator = torch.Generator().manual_seed(self.seed + epoch)
        loader = DataLoader(
            self.current, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=generator, persistent_workers=False,
        )  # fmt: skip
        for batch in loader:
            self.delivered += 1
            yield batch

    def position_after(self, processed: int | None) -> dict[str, int] | None:
        """``{"epoch", "position", "batches"}`` after ``processed`` batches of the current epoch (None: before any)."""
        stream = self.current
        if stream is None:
            return None
        done = self.resumed_batches + self.delivered if processed is None else processed
        fresh = max(0, done - self.resumed_batches)
        position = min(stream.end, stream.start + fresh * stream.world * stream.batch_size)
        return {"epoch": stream.epoch, "position": position, "batches": done}


def total_counts(batches: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Per-source sample counts summed over ``batches`` (their ``source_counts``)."""
    out: dict[str, int] = {}
    for batch in batches:
        counts = batch["source_counts"]
        for name, n in zip(counts["names"], counts["samples"]):
            out[name] = out.get(name, 0) + n
    return out
