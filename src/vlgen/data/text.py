"""Text-only sentences for P-Former stage 0 (arXiv 2307.07063 pre-trains its prompt predictor on sentences alone).

Sources are ``.txt`` files (one sentence per line), JSONL files and ``.json`` caption lists (records whose
``text_field`` holds a string or a list of strings; each non-empty string is one sentence). ``.txt`` and ``.jsonl``
are streamed line by line and never held in memory; a ``.json`` list is loaded whole (fine for caption files).
Every line (or ``.json`` record) belongs to exactly one of ``world_size`` shards (one per rank), round robin, so one
pass over all shards yields each sentence once; each shard shuffles with a seeded buffer. Every dataloader worker of a
rank reads the rank's whole shard and builds every ``num_workers``-th of its batches (worker ``w`` the batches
``w, w + K, ...``, which the DataLoader hands out in turn), so a rank's batches do not depend on ``num_workers``.
Batches are built inside the dataset and carry the count of unusable lines met since the batch before
(``num_skipped``), so it survives worker processes and is counted once. The training stream cycles epochs forever
(epoch ``e`` reshuffles with ``seed + e``): every DDP rank can run the same number of steps, so a stage-0 config must
bound training with ``trainer.max_steps`` and validate every ``trainer.val_check_interval`` (an int) steps.
Validation is one finite pass, in file order.

Exact resume: the number of training batches trained is part of the data module's ``state_dict`` (so of every
checkpoint, :mod:`vlgen.data.resume`); a resumed stream starts at that batch, skipping the sentences before it (at most
about two passes over its shard are read to get there), so it yields what an uninterrupted run yields next.
"""

from __future__ import annotations

import glob
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlgen import dist
from vlgen.data.common import BadRecords, BadSample, make_loader, read_records, require_file
from vlgen.data.resume import StreamLoader, batches_in_total
from vlgen.data.synthetic.shapes import ShapesWorld
from vlgen.errors import ConfigError
from vlgen.interfaces import TextBatch

log = logging.getLogger(__name__)
SUFFIXES = (".txt", ".jsonl", ".json")


class _Unowned(BadRecords):
    """``read_records``' complaints in a shard that does not own them: raised when strict, else left to shard 0."""

    def __call__(self, where: str, why: str) -> None:
        if self.strict:
            raise BadSample(f"{self.path}:{where}: {why}")


def resolve_files(patterns: list[str], option: str) -> list[Path]:
    """Paths and globs -> existing files, each once, in the given order (a glob's matches sorted).

    A missing file, a glob that matches nothing or an unknown suffix raises one line naming ``option``.
    """
    if not patterns:
        raise ConfigError(f"{option}: no files given")
    files: dict[Path, None] = {}
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"{option}: {pattern} matches no file")
        else:
            found = [require_file(pattern, option)]
        for path in found:
            if path.suffix.lower() not in SUFFIXES:
                raise ConfigError(f"{option}: {path} is not one of {', '.join(SUFFIXES)}")
            files[path] = None
    return list(files)


def shuffled(items: Iterator[str], size: int, rng: random.Random) -> Iterator[str]:
    """``items`` through a shuffle buffer of ``size`` (0: unchanged order); holds at most ``size`` items."""
    if size <= 0:
        yield from items
        return
    buffer: list[str] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class TextStream(IterableDataset):
    """Sentences of ``files`` as ready :class:`~vlgen.interfaces.TextBatch` es (use ``DataLoader(batch_size=None)``).

    Args:
        files: existing ``.txt``, ``.jsonl`` or ``.json`` files, read in this order.
        batch_size: sentences per batch (the last batch of a finite pass may be smaller).
        text_field: the field of JSON records holding a sentence or a list of sentences.
        min_words: sentences with fewer whitespace-separated words are filtered out (not counted as bad).
        max_words: sentences with more words are filtered out (None: no limit).
        shuffle_buffer: size of the per-shard shuffle buffer (0: file order).
        seed: seed of the shuffle; epoch ``e`` shuffles with ``seed + e``.
        cycle: repeat epochs forever (training) instead of one pass.
        epoch: the first epoch.
        strict: raise :class:`~vlgen.data.common.BadSample` on an unusable line instead of skipping it.
        rank: this process's rank (None: from ``torch.distributed`` when initialised, else 0).
        world_size: number of ranks (None: from ``torch.distributed`` when initialised, else 1).
        start_batch: the first batch to yield: a resumed stream skips the ``start_batch * batch_size`` sentences of
            the batches before it (cycling streams; over their epochs).
    """

    def __init__(
        self,
        files: list[Path],
        batch_size: int,
        text_field: str = "caption",
        min_words: int = 1,
        max_words: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        cycle: bool = False,
        epoch: int = 0,
        strict: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.files, self.batch_size, self.text_field = files, batch_size, text_field
        self.min_words, self.max_words = min_words, max_words
        self.shuffle_buffer, self.seed, self.cycle, self.epoch = shuffle_buffer, seed, cycle, epoch
        self.strict, self.rank, self.world_size, self.start_batch = strict, rank, world_size, start_batch
        self._bad: dict[Path, BadRecords] = {}  # per process; counts accumulate over passes

    def shard(self) -> tuple[int, int]:
        """``(index, count)`` of the shard this process reads: its rank's, whichever dataloader worker it is."""
        rank = self.rank if self.rank is not None else dist.rank()
        world = self.world_size if self.world_size is not None else dist.world_size()
        return rank, world

    @staticmethod
    def worker() -> tuple[int, int]:
        """``(index, count)`` of this dataloader worker among its rank's (``(0, 1)`` in the main process)."""
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __iter__(self) -> Iterator[TextBatch]:
        shard, count = self.shard()
        worker, workers = self.worker()
        epoch, batch, number = self.epoch, [], self.start_batch  # number: of the batch being filled
        skip = self.start_batch * self.batch_size  # sentences of the batches before the first one to yield
        mark = self._skipped()  # bad lines met before the batch being filled

        def mine() -> bool:  # the batch being filled is this worker's to yield
            return (number - self.start_batch) % workers == worker

        while True:
            rng = random.Random(f"{self.seed + epoch}/{shard}/{count}")
            stats = {"sentences": 0, "filtered": 0}
            for sentence in shuffled(self._sentences(shard, count, stats), self.shuffle_buffer, rng):
                if skip:
                    skip, mark = skip - 1, self._skipped()
                    continue
                batch.append(sentence)
                if len(batch) == self.batch_size:
                    if mine():
                        yield TextBatch(text=batch, num_skipped=self._skipped() - mark)
                    batch, number, mark = [], number + 1, self._skipped()
            if worker == 0:
                log.info(
                    "text shard %d/%d epoch %d: %d sentences, %d filtered by length, %d bad lines skipped so far",
                    shard, count, epoch, stats["sentences"], stats["filtered"], self._skipped(),
                )  # fmt: skip
            if not self.cycle:
                if (batch or self._skipped() > mark) and mine():
                    yield TextBatch(text=batch, num_skipped=self._skipped() - mark)
                return
            if not stats["sentences"]:
                raise ConfigError(
                    f"data.train_files: shard {shard} of {count} got no usable sentence in a whole pass "
                    f"({stats['filtered']} filtered by length, {self._skipped()} bad); fewer ranks or more data"
                )
            epoch += 1
            if skip >= stats["sentences"]:  # every pass holds as many sentences: jump over the passes to skip
                passes = skip // stats["sentences"]
                epoch, skip = epoch + passes, skip - passes * stats["sentences"]

    def _skipped(self) -> int:
        return sum(bad.count for bad in self._bad.values())

    def _sentences(self, shard: int, count: int, stats: dict[str, int]) -> Iterator[str]:
        """This shard's sentences, in file order, after the length filter; unusable lines go to ``BadRecords``."""
        index = -1  # over the lines (records) of all files: line ``index`` belongs to shard ``index % count``
        for path in self.files:
            bad = self._bad.setdefault(path, BadRecords(path, self.strict))
            for where, payload in self._units(path, bad if shard == 0 else _Unowned(path, self.strict)):
                index += 1
                if index % count != shard:
                    continue
                for sentence in self._parse(path, where, payload, bad):
                    words = len(sentence.split())
                    if words < self.min_words or (self.max_words is not None and words > self.max_words):
                        stats["filtered"] += 1
                    else:
                        stats["sentences"] += 1
                        yield sentence

    @staticmethod
    def _units(path: Path, bad: BadRecords) -> Iterator[tuple[str, bytes | dict[str, Any]]]:
        """``(position, raw line)`` of a streamed file, or ``(position, record)`` of a loaded ``.json`` list."""
        if path.suffix.lower() == ".json":
            yield from read_records(path, bad)
            return
        with path.open("rb") as lines:
            for n, raw in enumerate(lines, 1):
                yield f"line {n}", raw

    def _parse(self, path: Path, where: str, payload: bytes | dict[str, Any], bad: BadRecords) -> list[str]:
        """The sentences of one line or record; none (and one call to ``bad``) when it has no usable text.

        Empty entries of a list that holds some text are dropped without counting: bad counts are per line.
        """
        if isinstance(payload, bytes):
            try:
                line = payload.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                bad(where, f"not UTF-8 ({err.reason})")
                return []
            if not line:
                bad(where, "empty line")
                return []
            if path.suffix.lower() == ".txt":
                return [line]
            try:
                payload = json.loads(line)
            except json.JSONDecodeError as err:
                bad(where, f"bad JSON ({err.msg})")
                return []
            if not isinstance(payload, dict):
                bad(where, "not a JSON object")
                return []
        value = payload.get(self.text_field)
        items = value if isinstance(value, list) else [value]
        good = [s.strip() for s in items if isinstance(s, str) and s.strip()]
        if not good:
            bad(where, f"no '{self.text_field}' field" if value is None else f"no text in '{self.text_field}'")
        return good


def _as_is(batch: TextBatch) -> TextBatch:
    return batch


class TextCorpusDataModule(pl.LightningDataModule):
    """Streamed text-only sentences (P-Former stage 0): an endless shuffled training stream, a finite validation pass.

    Args:
        train_files: training files or globs: ``.txt`` (one sentence per line) and ``.jsonl`` are streamed, a
            ``.json`` caption list is loaded whole. Training cycles forever: set ``trainer.max_steps``.
        val_files: validation files or globs, read once in order (null: no validation).
        text_field: the field of JSON / JSONL records holding a sentence or a list of sentences.
        min_words: drop sentences with fewer words (whitespace-separated); dropped ones are logged, not "bad".
        max_words: drop sentences with more words (null: no limit).
        batch_size: training sentences per batch per device.
        eval_batch_size: validation sentences per batch per device (default: ``batch_size``).
        num_workers: dataloader worker processes; each reads the rank's shard and builds every
            ``num_workers``-th batch of it (the batches do not depend on this number).
        seed: seed of the shuffle (epoch ``e`` of the training stream uses ``seed + e``).
        shuffle_buffer: sentences held by each shard's shuffle buffer (0: file order).
        skip_bad_samples: skip (log and count) empty, undecodable and bad JSON lines; false raises on the first.
        generate: a synthetic world to write into the directory of the first training file when it is not there.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        text_field: str = "caption",
        min_words: int = 1,
        max_words: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 10000,
        skip_bad_samples: bool = True,
        generate: ShapesWorld | None = None,
    ) -> None:
        super().__init__()
        for option, value, least in (
            ("min_words", min_words, 0),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
        ):
            if value < least:
                raise ConfigError(f"data.{option}: {value} is below {least}")
        if max_words is not None and max_words < max(min_words, 1):
            raise ConfigError(f"data.max_words: {max_words} is below min_words ({min_words}) or 1")
        if not train_files:
            raise ConfigError("data.train_files: no files given")
        self.patterns = {"train": list(train_files), "val": list(val_files) if val_files else None}
        self.text_field, self.min_words, self.max_words = text_field, min_words, max_words
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.strict = not skip_bad_samples
        self.generate = generate
        self.files: dict[str, list[Path]] = {}
        self.train_loader: StreamLoader | None = None
        self._restored: dict[str, int] | None = None  # a checkpoint's position, for the next training loader
        if generate is None:
            self._resolve()
        elif any(c in train_files[0] for c in "*?["):
            raise ConfigError(f"data.train_files: {train_files[0]} is a glob; with generate, name the world's file")

    def _resolve(self) -> None:
        for split, patterns in self.patterns.items():
            if patterns is not None:
                self.files[split] = resolve_files(patterns, f"data.{split}_files")

    def prepare_data(self) -> None:
        if self.generate is not None:
            self.generate.write(Path(self.patterns["train"][0]).parent)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op when the world is there (or needs none)
        self._resolve()
        log.info("data: %s", ", ".join(f"{s} {len(f)} files" for s, f in self.files.items()))

    def _rank(self) -> tuple[int | None, int | None]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (None, None)

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader | StreamLoader | list:
        if not self.files:
            self.setup()
        if split not in self.files:  # no validation files: Lightning skips an empty list of loaders
            return []
        rank, world = self._rank()

        def stream(start_batch: int = 0) -> TextStream:
            return TextStream(
                self.files[split], batch_size, self.text_field, self.min_words, self.max_words,
                shuffle_buffer=self.shuffle_buffer if train else 0, seed=self.seed, cycle=train,
                strict=self.strict, rank=rank, world_size=world, start_batch=start_batch,
            )  # fmt: skip

        if not train:
            return make_loader(stream(), None, False, self.num_workers, False, _as_is)  # type: ignore[arg-type]
        trainer = self.trainer
        progress_fn = (lambda: batches_in_total(trainer)) if trainer is not None else None
        loader = StreamLoader(stream, self.num_workers, self.seed, progress_fn)
        if self._restored is not None:
            loader.load_state_dict(self._restored)
            self._restored = None
        self.train_loader = loader
        return loader

    def train_dataloader(self) -> StreamLoader | list:
        return self._loader("train", self.batch_size, train=True)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (Lightning saves it in every checkpoint): ``{"train_position":
        {"batches": n}}``, the batches trained so far (the same number on every rank)."""
        if self.train_loader is None:
            return {"train_position": self._restored} if self._restored else {}
        position = self.train_loader.state_dict()
        return {"train_position": position} if position else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at a checkpoint's position: the next training stream starts at its batch."""
        self._restored = state_dict.get("train_position")
        if self.train_loader is not None and self._restored is not None:
            self.train_loader.load_state_dict(self._restored)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size, train=False)
